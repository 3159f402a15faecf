"""A tiny, randomly initialised text-only Gemma 3 causal LM with a chat template, built in code.

It lets the default embedded run and the tests exercise a real vLLM engine
offline. Random weights write junk text; what matters is that the engine,
batching, seeds, timeouts and fallbacks are real.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, GemmaTokenizer

__all__ = ["build_tiny_rewriter", "CHAT_TEMPLATE", "TURN_TOKENS", "REWRITER_SUBFOLDER"]

# Where a tiny video checkpoint carries its rewriter (not a pipeline component: model_index.json does not list it).
REWRITER_SUBFOLDER = "prompt_rewriter"

# Special tokens the chat template uses; the vocabulary handed to ``build_tiny_rewriter`` must hold them.
TURN_TOKENS = ("<start_of_turn>", "<end_of_turn>")

# Gemma's chat format: the system prompt is folded into the first user turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(system='') %}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.system = message['content'] + '\\n\\n' %}"
    "{% else %}<start_of_turn>{{ 'model' if message['role'] == 'assistant' else 'user' }}\\n"
    "{{ ns.system }}{{ message['content'] }}<end_of_turn>\\n{% set ns.system = '' %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\\n{% endif %}"
)


def build_tiny_rewriter(directory: str | Path, vocabulary: dict[str, int], seed: int = 0) -> Path:
    """Save the tiny rewriter (model and tokenizer over ``vocabulary``) under ``directory``.

    The vocabulary comes from the video checkpoint it ships with, so both read prompts alike;
    it must hold ``<pad>``, ``<bos>``, ``<eos>`` and the ``TURN_TOKENS``.
    """
    missing = [token for token in ("<pad>", "<bos>", "<eos>", *TURN_TOKENS) if token not in vocabulary]
    if missing:
        raise ValueError(f"the rewriter's vocabulary lacks {missing}")
    directory = Path(directory)
    tokenizer = GemmaTokenizer(
        vocab=vocabulary, merges=[], model_max_length=2048, additional_special_tokens=list(TURN_TOKENS)
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    config = Gemma3TextConfig(
        vocab_size=len(vocabulary),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,  # vLLM's CPU attention needs 32..512
        max_position_embeddings=2048,
        sliding_window=128,
        pad_token_id=vocabulary["<pad>"],
        bos_token_id=vocabulary["<bos>"],
        eos_token_id=[vocabulary["<eos>"], vocabulary["<end_of_turn>"]],
    )
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
