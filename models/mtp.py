"""Multi-token prediction (`model.mtp_depth = D`; DeepSeek-V3 §2.2): D sequential modules after the main model.

Module k (k = 1..D) at position i combines the previous depth's hidden state with the embedding of token i + k,
runs one transformer block, and predicts token i + k + 1 through the shared output head:

    h'_i^k = M_k [RMSNorm(h_i^{k-1}); RMSNorm(Emb(t_{i+k}))]      M_k [2D, D]; h^0: the main model's hidden
    h_i^k  = Block_k(h'^k)_i                                         causal over positions 1..T-k
    P_{i+k+1}^k = softmax(OutHead(norm_k(h_i^k)))                    OutHead: the shared (un)embedding

    L_MTP = lambda / D * sum_k CE_k       (experiments/training/trainer.py, lambda scheduled by `train.mtp_weight*`)

The main model's hidden h^0 is its final-norm output (what its own head reads), which each module normalises
again. The modules run only when the "mtp" collection is mutable (the training step): they sow their logits
there; evaluation, sampling and plain decoding drop them. Self-speculative decoding (models/speculative.py)
runs module 1 with its own KV cache through `step`.
"""

import flax.linen as nn
import jax.numpy as jnp

from models import blocks, layers

COLLECTION = "mtp"


class MTPModule(nn.Module):
    cfg: object

    @nn.compact
    def __call__(self, h_prev, next_embeddings, cache=None, start=0):
        """h_prev, next_embeddings [B, T, D] -> (this depth's hidden h^k [B, T, D], its head input, cache)."""
        cfg, dtype = self.cfg, self.cfg.compute_dtype
        joined = jnp.concatenate([layers.Norm("rmsnorm", dtype, "hidden_norm", cfg.norm_eps)(h_prev),
                                  layers.Norm("rmsnorm", dtype, "embedding_norm", cfg.norm_eps)(next_embeddings)], -1)
        projection = self.param("projection", layers.dense_init(None, "embed"), (2 * cfg.d_model, cfg.d_model))
        h = (joined.reshape(-1, 2 * cfg.d_model) @ projection.astype(dtype)).reshape(h_prev.shape)
        h, cache = blocks.Block(cfg, name="block")(h, cache, start)
        return h, layers.Norm(cfg.norm, dtype, "output_norm", cfg.norm_eps)(h), cache
