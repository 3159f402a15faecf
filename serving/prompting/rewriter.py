"""The prompt rewriter: one vLLM async engine, many concurrent requests (vLLM batches them).

Ray-free: the ``prompt_rewriter`` stage deployment wraps it. A rewrite never
fails a job: on a timeout, an engine error or an empty answer it returns the
reason instead of a text, and the job goes on with the user's prompt.
"""

from __future__ import annotations

import asyncio
import gc
import io
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from cluster.config import RewriterConfig

__all__ = ["PromptRewriter", "Rewrite", "SYSTEM_PROMPT_VERSION", "load_system_prompt", "clean_answer"]

SYSTEM_PROMPT_VERSION = "ltx2-v1"
_PROMPTS = Path(__file__).parent / "system_prompts"


def load_system_prompt(version: str = SYSTEM_PROMPT_VERSION) -> str:
    path = _PROMPTS / f"{version}.txt"
    if not path.is_file():
        known = sorted(p.stem for p in _PROMPTS.glob("*.txt"))
        raise ValueError(f"rewriter.system_prompt_version: unknown version '{version}'; known: {known}")
    return path.read_text().strip()


@dataclass(frozen=True)
class Rewrite:
    """A rewritten prompt, or why there is none (``fallback``): timeout, engine_error or empty."""

    text: str | None
    fallback: str | None
    tokens: int
    seconds: float
    system_prompt_version: str


def clean_answer(text: str) -> str:
    """The model's answer as one paragraph: control characters and stray turn markers removed."""
    for marker in ("<end_of_turn>", "<start_of_turn>", "<eos>", "<bos>"):
        text = text.replace(marker, " ")
    kept = "".join(c if c.isprintable() or c in " \n" else " " for c in text.replace("\ufffd", " "))
    return " ".join(kept.split())


class PromptRewriter:
    def __init__(self, config: RewriterConfig, model_path: str):
        os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")  # vLLM must not reconfigure our logging
        from transformers import AutoTokenizer  # noqa: PLC0415 - transformers only when the rewriter loads
        from vllm.engine.arg_utils import AsyncEngineArgs  # noqa: PLC0415 - vLLM is optional (the gpu extra)
        from vllm.v1.engine.async_llm import AsyncLLM  # noqa: PLC0415 - vLLM is optional (the gpu extra)

        self.config = config
        self.system_prompt = load_system_prompt(config.system_prompt_version)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        on_cpu = not _cuda_available()
        args = AsyncEngineArgs(
            model=model_path,
            dtype=config.dtype,
            max_model_len=config.max_model_len,
            seed=0,
            enforce_eager=on_cpu or config.enforce_eager,
            disable_log_stats=True,
            max_num_seqs=config.max_num_seqs,
            **({"kv_cache_memory_bytes": config.kv_cache_memory_mb * 1024**2} if on_cpu else
               {"gpu_memory_utilization": config.gpu_memory_utilization}),
        )
        self.engine: Any = AsyncLLM.from_engine_args(args)  # None once shut down

    async def rewrite(self, prompt: str, seed: int, photo: bytes | None = None) -> Rewrite:
        started = time.perf_counter()
        request_id = "rewrite-" + uuid.uuid4().hex
        try:
            text, tokens = await asyncio.wait_for(
                self._generate(prompt, seed, photo, request_id), timeout=self.config.timeout_s
            )
        except asyncio.TimeoutError:
            await self._abort(request_id)
            return self._result(None, "timeout", 0, started)
        except Exception:  # noqa: BLE001 - any engine failure means: go on with the original prompt
            return self._result(None, "engine_error", 0, started)
        cleaned = clean_answer(text)
        if not cleaned:
            return self._result(None, "empty", tokens, started)
        return self._result(cleaned, None, tokens, started)

    async def _generate(self, prompt: str, seed: int, photo: bytes | None, request_id: str) -> tuple[str, int]:
        from vllm import SamplingParams  # noqa: PLC0415 - vLLM is optional (the gpu extra)

        params = SamplingParams(
            max_tokens=self.config.max_new_tokens, temperature=self.config.temperature, top_p=0.95, seed=seed
        )
        final = None
        async for output in self.engine.generate(self._engine_input(prompt, photo), params, request_id=request_id):
            final = output
        assert final is not None  # vLLM yields at least the finished output
        completion = final.outputs[0]
        return completion.text, len(completion.token_ids)

    def _engine_input(self, prompt: str, photo: bytes | None) -> dict:
        if photo is not None and self.config.multimodal:
            # Multimodal checkpoints (e.g. Gemma 3 4B-27B instruct) see the photo itself.
            content = [{"type": "image"}, {"type": "text", "text": prompt}]
            text = self.tokenizer.apply_chat_template(
                [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": content}],
                add_generation_prompt=True, tokenize=False,
            )
            image = ImageOps.exif_transpose(Image.open(io.BytesIO(photo))).convert("RGB")
            return {"prompt": text, "multi_modal_data": {"image": image}}
        messages = [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": prompt}]
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        return {"prompt_token_ids": list(ids)}

    async def _abort(self, request_id: str) -> None:
        try:
            await self.engine.abort(request_id)
        except Exception:  # noqa: BLE001 - the request may already be gone
            pass

    def _result(self, text, fallback, tokens, started) -> Rewrite:
        return Rewrite(
            text=text, fallback=fallback, tokens=tokens, seconds=time.perf_counter() - started,
            system_prompt_version=self.config.system_prompt_version,
        )

    def shutdown(self) -> None:
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.shutdown()
            del engine  # let vLLM's own __del__ run now, not during interpreter teardown
            gc.collect()


def _cuda_available() -> bool:
    import torch  # noqa: PLC0415 - torch only when the rewriter loads

    return torch.cuda.is_available()
