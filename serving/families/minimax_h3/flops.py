"""FLOPs of one MiniMax-H3 transformer pass, from its config and the packed sequence's size (for MFU figures).

Counted as multiply-adds x 2 over the matmuls: per block, q/k/v and the output
projection (4 x hidden x attention width a row), the SwiGLU (3 x hidden x ffn a
row) and full attention over the packed sequence (QK^T and AV: 4 x rows^2 x
attention width); the text refiner does the same over the text rows only. Norms,
modulations, rotary embeddings and the small in/out projections are left out
(under 1% at real sizes).
"""

from __future__ import annotations

__all__ = ["transformer_pass_flops"]


def transformer_pass_flops(config: dict, rows: int, text_rows: int, batch: int = 1) -> dict[str, float]:
    """FLOPs of one pass over ``batch`` packed sequences of ``rows`` rows (``text_rows`` of them text), by part."""
    hidden, ffn = config["hidden_size"], config["ffn_dim"]
    width = config["num_attention_heads"] * config["attention_head_dim"]

    def blocks(count: int, tokens: int) -> tuple[float, float]:
        linear = 2 * tokens * (4 * hidden * width + 3 * hidden * ffn)
        attention = 4 * tokens * tokens * width
        return batch * count * linear, batch * count * attention

    linear, attention = blocks(config["num_layers"], rows)
    refiner_linear, refiner_attention = blocks(config["num_refiner_layers"], text_rows)
    return {"blocks_linear": linear, "blocks_attention": attention, "refiner": refiner_linear + refiner_attention}
