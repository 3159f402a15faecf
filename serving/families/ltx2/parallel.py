"""Sequence parallelism of the LTX-2 transformer over N ranks (Ulysses), Ray-free.

Every rank holds the whole transformer and the same inputs; each processes a
contiguous 1/N of the video tokens through every per-token layer (patch
projection, norms, feed-forwards, projections, text cross-attention, audio
-> video attention), so those layers cost 1/N each. Only two operations need
the other ranks' tokens:

- video self-attention: an all-to-all turns "my tokens, all heads" into "all
  tokens, my heads" (Ulysses), attention runs on 1/N of the heads, and a
  second all-to-all turns it back;
- video -> audio attention (audio queries, video keys): the keys and values of
  the video shards are gathered.

The audio stream (about 0.3% of the FLOPs at 1280x704 x 121) runs whole on
every rank and comes out identical on all of them. Finally the video output
shards are gathered. Rotary embeddings follow the tokens: each rank passes
the coordinates of its own tokens, so the model computes just their angles.

Why not diffusers' ``enable_parallelism``: on LTX-2 its plan splits rotary
embeddings as 3-D while ``rope_type: split`` makes them 4-D, it divides by the
accelerator count (0 on CPUs), its cross-attention masks stop broadcasting
once the plan is fixed, and it would run the replicated audio stream through
the all-to-all (N copies of every audio key). Here the attention processors
are replaced, nothing else in the model changes, and any attention backend
chosen by the speed switches still runs the local attention.

A pass's inputs travel from rank 0 to the others over the same process group
(``serving.engine.pass_inputs``), so a caller only ships a small description
of them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["SequenceParallelTransformer"]


class SequenceParallelTransformer:
    """Wraps a loaded LTX-2 transformer so one call runs sharded over ``group`` (all ranks call it)."""

    def __init__(self, transformer: Any, group: dist.ProcessGroup | None = None):  # a diffusers LTX2 transformer
        self.transformer = transformer
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        heads = transformer.config.num_attention_heads
        if heads % self.world:
            raise ValueError(f"{heads} video attention heads do not split over {self.world} ranks; use a divisor of {heads}")
        self._install_processors()

    @property
    def config(self):
        return self.transformer.config

    def _install_processors(self) -> None:
        for block in self.transformer.transformer_blocks:
            block.attn1.set_processor(_UlyssesSelfAttention(self.group, block.attn1.processor))
            block.video_to_audio_attn.set_processor(_GatheredKeysAttention(self.group, block.video_to_audio_attn.processor))

    @torch.no_grad()
    def __call__(self, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Same arguments as the transformer's forward; returns the whole (video, audio) output on every rank."""
        hidden_states = kwargs["hidden_states"]
        batch, tokens = hidden_states.shape[:2]
        if tokens % self.world:
            raise ValueError(f"{tokens} video tokens do not split over {self.world} ranks; pick a size whose token count does")
        if kwargs.get("video_self_attention_mask") is not None:
            raise ValueError("video_self_attention_mask is not supported with sequence parallelism")
        local = slice(self.rank * tokens // self.world, (self.rank + 1) * tokens // self.world)
        coords = kwargs.get("video_coords")
        if coords is None:
            coords = self.transformer.rope.prepare_video_coords(
                batch, kwargs["num_frames"], kwargs["height"], kwargs["width"], hidden_states.device,
                fps=kwargs.get("fps", 24.0),
            )
        shard = dict(kwargs, hidden_states=hidden_states[:, local], video_coords=coords[:, :, local], return_dict=False)
        timestep = kwargs["timestep"]
        if timestep.ndim == 2 and timestep.shape[1] == tokens:  # image-to-video: a timestep per video token
            shard["timestep"] = timestep[:, local]
        for name in ("video_keyframes_mask",):
            if kwargs.get(name) is not None:
                shard[name] = kwargs[name][:, local]
        video, audio = self.transformer(**shard)
        return _all_gather(video, dim=1, group=self.group, world=self.world), audio


class _UlyssesSelfAttention:
    """Video self-attention with the sequence gathered per head group (two all-to-alls)."""

    def __init__(self, group, original):
        self.group = group
        self.world = dist.get_world_size(group)
        self._attention_backend = getattr(original, "_attention_backend", None)
        self._parallel_config = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 query_rotary_emb=None, key_rotary_emb=None, perturbation_mask=None, all_perturbed=None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn  # noqa: PLC0415 - diffusers only when the transformer runs

        if attention_mask is not None:
            raise ValueError("sequence-parallel self-attention takes no attention mask")
        gate_logits = attn.to_gate_logits(hidden_states) if attn.to_gate_logits is not None else None
        value = attn.to_v(hidden_states)
        if all_perturbed is None:
            all_perturbed = bool(torch.all(perturbation_mask == 0)) if perturbation_mask is not None else False
        if all_perturbed:  # spatio-temporal guidance: the block's self-attention is skipped (per token, local)
            out = value
        else:
            query, key = attn.norm_q(attn.to_q(hidden_states)), attn.norm_k(attn.to_k(hidden_states))
            query, key = _rotate(attn, query, key, query_rotary_emb, key_rotary_emb)
            heads = [_seq_to_heads(t.unflatten(2, (attn.heads, -1)), self.group, self.world) for t in (query, key, value)]
            out = dispatch_attention_fn(*heads, dropout_p=0.0, is_causal=False, backend=self._attention_backend)
            out = _heads_to_seq(out, self.group, self.world).flatten(2, 3).to(query.dtype)
            if perturbation_mask is not None:
                out = torch.lerp(value, out, perturbation_mask)
        return _finish(attn, out, gate_logits)


class _GatheredKeysAttention:
    """Audio queries over all video tokens: keys and values of every shard are gathered first."""

    def __init__(self, group, original):
        self.group = group
        self.world = dist.get_world_size(group)
        self._attention_backend = getattr(original, "_attention_backend", None)
        self._parallel_config = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 query_rotary_emb=None, key_rotary_emb=None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn  # noqa: PLC0415 - diffusers only when the transformer runs

        if attention_mask is not None:
            raise ValueError("sequence-parallel video->audio attention takes no attention mask")
        gate_logits = attn.to_gate_logits(hidden_states) if attn.to_gate_logits is not None else None
        query = attn.norm_q(attn.to_q(hidden_states))
        key = attn.norm_k(attn.to_k(encoder_hidden_states))
        value = attn.to_v(encoder_hidden_states)
        query, key = _rotate(attn, query, key, query_rotary_emb, key_rotary_emb)
        key, value = (_all_gather(t, dim=1, group=self.group, world=self.world) for t in (key, value))
        out = dispatch_attention_fn(
            query.unflatten(2, (attn.heads, -1)), key.unflatten(2, (attn.heads, -1)), value.unflatten(2, (attn.heads, -1)),
            dropout_p=0.0, is_causal=False, backend=self._attention_backend,
        )
        return _finish(attn, out.flatten(2, 3).to(query.dtype), gate_logits)


def _rotate(attn, query, key, query_rotary_emb, key_rotary_emb):
    """The model's own rotary embedding, as its processor applies it."""
    from diffusers.models.transformers.transformer_ltx2 import apply_interleaved_rotary_emb, apply_split_rotary_emb  # noqa: PLC0415 - diffusers only when the transformer runs

    if query_rotary_emb is None:
        return query, key
    apply = apply_split_rotary_emb if attn.rope_type == "split" else apply_interleaved_rotary_emb
    return apply(query, query_rotary_emb), apply(key, key_rotary_emb if key_rotary_emb is not None else query_rotary_emb)


def _finish(attn, out, gate_logits):
    if gate_logits is not None:
        out = out.unflatten(2, (attn.heads, -1)) * (2.0 * torch.sigmoid(gate_logits)).unsqueeze(-1)
        out = out.flatten(2, 3)
    return attn.to_out[1](attn.to_out[0](out))


def _seq_to_heads(x: torch.Tensor, group, world: int) -> torch.Tensor:
    """[B, S/N, H, D] on each rank -> [B, S, H/N, D]: every rank gets all tokens of its head group."""
    b, s, h, d = x.shape
    send = x.reshape(b, s, world, h // world, d).permute(2, 0, 1, 3, 4).contiguous()  # chunk i: heads for rank i
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)  # received[j]: rank j's tokens, my heads
    return received.permute(1, 0, 2, 3, 4).reshape(b, world * s, h // world, d)


def _heads_to_seq(x: torch.Tensor, group, world: int) -> torch.Tensor:
    """[B, S, H/N, D] -> [B, S/N, H, D]: back to my tokens, all heads."""
    b, s_total, h, d = x.shape
    s = s_total // world
    send = x.reshape(b, world, s, h, d).permute(1, 0, 2, 3, 4).contiguous()  # chunk j: rank j's tokens
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)  # received[i]: head group i of my tokens
    return received.permute(1, 2, 0, 3, 4).reshape(b, s, world * h, d)


def _all_gather(x: torch.Tensor, dim: int, group, world: int) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)
