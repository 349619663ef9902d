"""Decoder-only transformer: pre-norm blocks over the LM skeleton (models/lm.py).

    x_0 = E[tokens] (+ P[positions] for learned positions)
    x_{l+1} = x_l + Attn(norm(x_l)) ;  x_{l+1} += Mlp(norm(x_{l+1}))     (models/blocks.Block, nn.scan)
    logits = norm(x_L) U           (U = E^T when embeddings are tied)

Attention is the kind `model.attention` names (grouped-query attention with RoPE by default,
models/gqa.py); decoding keeps each kind's cache stacked over layers, and `decode` returns the logits
the full pass gives at the same positions. With `exit_every = k` the blocks run as segments of k with an exit
after each (models/early_exit.py).
"""

import dataclasses

import jax
import jax.numpy as jnp

from models import blocks, early_exit, lm, quantization
from models.lm_config import LMConfig


@dataclasses.dataclass(frozen=True)
class TransformerConfig(early_exit.EarlyExitOptions, LMConfig):
    """Every `config.model` key of the transformer: the LM keys (models/lm_config.py) and early exit's."""


class Transformer(lm.LM):
    cfg: TransformerConfig

    def unit(self):
        return None if self.cfg.exit_every else super().unit()

    def setup(self):
        super().setup()
        if self.cfg.exit_every:
            self.segments = [self.scanned(early_exit.FreezingBlock, {}, self.cfg.exit_every, name)
                             for name in early_exit.segment_names(self.cfg)]

    def hidden(self, x, cache=None, start=0, key_mask=None, segments=None):
        if not self.cfg.exit_every:
            return super().hidden(x, cache, start, key_mask, segments)
        h, cache, _ = early_exit.run(self, x, cache, start, key_mask, segments)
        return h, cache

    def layers_used(self, tokens):
        """int32[B, T]: the blocks each position ran through (its exit's depth; num_layers without early exit)."""
        return early_exit.run(self, self.embed_tokens(tokens), None, 0, None)[2]

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32):
        if not self.cfg.exit_every:
            return super().init_cache(batch, max_len, dtype)
        one = blocks.Block.init_cache(self.cfg, batch, max_len, dtype)
        segment = jax.tree.map(lambda v: jnp.broadcast_to(v, (self.cfg.exit_every, *v.shape)), one)
        return {name: segment for name in early_exit.segment_names(self.cfg)}


def validate(m) -> list[str]:
    """Cross-field problems of a transformer config.model (each key's own range is declared with it)."""
    return (blocks.validate_attention(m) + blocks.validate_ffn(m) + early_exit.validate(m)
            + quantization.validate(m))
