"""Decoder-only transformer: pre-norm blocks over the LM skeleton (models/lm.py).

    x_0 = E[tokens] (+ P[positions] for learned positions)
    x_{l+1} = x_l + Attn(norm(x_l)) ;  x_{l+1} += Mlp(norm(x_{l+1}))     (models/blocks.Block, nn.scan)
    logits = norm(x_L) U           (U = E^T when embeddings are tied)

Attention is the kind `model.attention` names (grouped-query attention with RoPE by default,
models/gqa.py); decoding keeps each kind's cache stacked over layers, and `decode` returns the logits
the full pass gives at the same positions.
"""

import dataclasses

from models import blocks, lm
from models.lm_config import LMConfig


@dataclasses.dataclass(frozen=True)
class TransformerConfig(LMConfig):
    """Every `config.model` key of the transformer: the LM keys (models/lm_config.py)."""


class Transformer(lm.LM):
    cfg: TransformerConfig


def validate(m) -> list[str]:
    """Cross-field problems of a transformer config.model (each key's own range is declared with it)."""
    return blocks.validate_attention(m)
