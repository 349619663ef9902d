"""QK-norm attention (`model.attention = "qk_norm"`; Dehghani et al. 2023, OLMo 2): grouped-query
attention whose queries and keys are RMS-normalised per head, with a learned scale, before RoPE:

    q_h = g_q * q_h / rms(q_h),   k_g = g_k * k_g / rms(k_g)        (g_q, g_k: [Dh], shared by heads)

It bounds the attention logits, which keeps large-lr training stable. The KV cache and decoding are
GQA's (the cache holds the normalised, rotated keys). This file is the extending guide's worked example of
adding an attention kind: a module here and one entry in `models/blocks.ATTENTIONS`.
"""

import flax.linen as nn

from models import gqa


class QKNormAttention(gqa.GroupedQueryAttention):
    def queries_and_keys(self, q, k, q_positions):
        scale_init = nn.with_logical_partitioning(nn.initializers.ones, ("head_dim",))
        q = nn.RMSNorm(dtype=q.dtype, scale_init=scale_init, name="query_norm")(q)
        k = nn.RMSNorm(dtype=k.dtype, scale_init=scale_init, name="key_norm")(k)
        return super().queries_and_keys(q, k, q_positions)
