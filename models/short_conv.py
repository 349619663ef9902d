"""A short causal convolution in front of a block's token mixer (`model.short_conv = w`): each position's input to
the mixer also carries the w - 1 positions before it, so one attention layer can match on a token and what
preceded it (an induction-style lookup, "every X is a Y": the key at Y knows X) instead of composing two layers
(H3 / Based's shortconv, Allen-Zhu's Canon layers):

    y_t = h_t + sum_{j=0}^{w-1} c_j * h_{t-j}        c [w, D] per channel, zero at initialisation (y = h)

h_{t-j} for t - j < 0 is 0, and so is h_s at a left-padded position s (`valid` False: Coconut's padded questions),
so a padded row convolves as the same row unpadded. Decoding keeps the last w - 1 inputs as the state, so a cached
pass continues exactly where the previous one stopped (what the full pass computes with its zero padding).
"""

import flax.linen as nn
import jax.numpy as jnp

from models import packing


class ShortConv(nn.Module):
    width: int

    @nn.compact
    def __call__(self, h, state=None, valid=None, segments=None):
        """h [B, T, D], state [B, w - 1, D] (None: a full pass from position 0), valid: None or bool [B, T] (False:
        padding, which enters the sums as 0), segments: packed rows (models/packing.py; the tap at lag j reads
        only the same document) -> (y [B, T, D], the new state)."""
        kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.zeros, (None, "embed")),
                            (self.width, h.shape[-1]))
        history = jnp.zeros((h.shape[0], self.width - 1, h.shape[-1]), h.dtype) if state is None else state.astype(h.dtype)
        inputs = h if valid is None else h * valid[:, :, None].astype(h.dtype)
        padded = jnp.concatenate([history, inputs], axis=1)  # position t of h sits at t + w - 1
        steps = h.shape[1]

        def tap(j):  # c_j * h_{t-j}
            term = kernel[j].astype(h.dtype) * padded[:, self.width - 1 - j:self.width - 1 - j + steps]
            if segments is None:
                return term
            return term * packing.same_segment_at_lag(segments, j)[..., None].astype(h.dtype)

        mixed = sum(tap(j) for j in range(self.width))
        return h + mixed, padded[:, steps:]

    @staticmethod
    def init_cache(batch: int, width: int, d_model: int, dtype) -> jnp.ndarray:
        return jnp.zeros((batch, width - 1, d_model), dtype)
