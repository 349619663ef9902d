"""Small layers shared by the model families: norms, the MLP, rotary embeddings, initialisers.

Every parameter carries logical axis names (`embed`, `mlp`, `heads`, `vocab`, ...); the one table
in `experiments/training/sharding.py` maps them to mesh axes.
"""

import functools

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import bitnet

NORMS = ("rmsnorm", "layernorm", "none")
ACTIVATIONS = ("relu", "gelu", "swiglu")


def dropout(module: nn.Module, x, rate: float):
    """Inverted dropout: x * keep / (1 - rate), keep ~ Bernoulli(1 - rate) from the module's "dropout" rng;
    the identity when rate is 0 or no "dropout" rng was given (evaluation, sampling, initialisation)."""
    if not rate or not module.has_rng("dropout"):
        return x
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def sow_site(module: nn.Module, name: str, x):
    """The activation x at site `name`: patched to where(mask, value, x) when a "patches" collection holds
    {"value", "mask"} under `name` (activation patching, ablation), shifted by a vector [D] when a "steering"
    collection holds one under `name` (steering, at every position, decoding included), then sown into
    "intermediates" when that collection is mutable (capture). Without any, x unchanged and nothing computed."""
    if module.has_variable("patches", name):
        patch = module.get_variable("patches", name)
        x = jnp.where(patch["mask"], patch["value"].astype(x.dtype), x)
    if module.has_variable("steering", name):
        x = x + module.get_variable("steering", name).astype(x.dtype)
    if module.is_mutable_collection("intermediates"):
        module.sow("intermediates", name, x)
    return x


CALIBRATION = "calibration"


def matmul(x, w):
    """x [N, K] @ w [K, M] as a dot_general: the form models/quantization.py's qwix rules round."""
    return bitnet.matmul(x, w, False)


def record_input(module: nn.Module, path: tuple, x, row_weights=None):
    """Calibration for compression (experiments/compression): when the "calibration" collection is mutable, adds
    what the calibration-based methods need of the kernel's flattened input x [..., N, in] (leading axes: one kernel
    per index, e.g. MoE experts), under NAME = `path[0]` (the kernel's name in its module): the second moment
    X^T X [..., in, in] as "NAME_gram", the count of rows N as "NAME_rows", each feature's sum of |x| [..., in] as
    "NAME_abs_sum" (AWQ) and its largest |x| as "NAME_abs_max" (SmoothQuant); row_weights [..., N] in {0, 1} counts
    only the rows that reach the kernel (the tokens routed to an expert). Nothing otherwise (and nothing at `init`,
    where every collection is mutable: these statistics are not part of a model's state)."""
    if not calibrating(module):
        return
    x = x.astype(jnp.float32)
    weights = jnp.ones(x.shape[:-1], jnp.float32) if row_weights is None else row_weights.astype(jnp.float32)
    weighted = x * weights[..., None]
    batch, width = x.shape[:-2], x.shape[-1]
    statistics = {"gram": ((*batch, width, width), jnp.einsum("...ni,...nj->...ij", weighted, x)),
                  "rows": (batch, weights.sum(-1)), "abs_sum": ((*batch, width), jnp.abs(weighted).sum(-2)),
                  "abs_max": ((*batch, width), jnp.abs(weighted).max(-2))}
    for statistic, (shape, value) in statistics.items():
        total = module.variable(CALIBRATION, f"{path[0]}_{statistic}", jnp.zeros, shape, jnp.float32)
        total.value = jnp.maximum(total.value, value) if statistic == "abs_max" else total.value + value


def calibrating(module: nn.Module) -> bool:
    """Whether `record_input` records in this call."""
    return module.is_mutable_collection(CALIBRATION) and not module.is_initializing()


def lora_delta(module: nn.Module, path: tuple, x, out_shape):
    """LoRA's unmerged branch for the kernel at `path` under `module` (experiments/posttrain/lora.py): dropout(x) A B [*out_shape]
    when a "lora" collection holds {"a" [in, r], "b" [r, out] (alpha / r folded in), "rate"} there, else 0. x [N, in]
    is the kernel's flattened input; each call draws its own mask from the "dropout" rng (none: no dropout)."""
    if not module.has_variable("lora", path[0]):
        return 0.0
    pair = module.get_variable("lora", path[0])
    for part in path[1:]:
        pair = pair[part]
    if module.has_rng("dropout"):
        keep_rate = 1.0 - pair["rate"]
        keep = jax.random.bernoulli(module.make_rng("dropout"), keep_rate, x.shape)
        x = jnp.where(keep, x / keep_rate.astype(x.dtype), 0.0).astype(x.dtype)
    return ((x @ pair["a"].astype(x.dtype)) @ pair["b"].astype(x.dtype)).reshape(out_shape)


def dense_init(*logical_axes):
    """LeCun-normal (std 1/sqrt(fan_in)) kernels with logical axis names."""
    return nn.with_logical_partitioning(nn.initializers.lecun_normal(), logical_axes)


def Norm(kind: str, dtype, name=None, eps: float = 1e-6, axis_name: str = "embed"):
    """y = x / sqrt(mean(x^2) + eps) * scale (rmsnorm), the usual LayerNorm, or the identity ("none")."""
    scale_init = nn.with_logical_partitioning(nn.initializers.ones, (axis_name,))
    if kind == "rmsnorm":
        return nn.RMSNorm(epsilon=eps, dtype=dtype, scale_init=scale_init, name=name)
    if kind == "layernorm":
        bias_init = nn.with_logical_partitioning(nn.initializers.zeros, (axis_name,))
        return nn.LayerNorm(epsilon=eps, dtype=dtype, scale_init=scale_init, bias_init=bias_init, name=name)
    return lambda x: x


class Mlp(nn.Module):
    """act(x W_in + b_in) W_out + b_out, or SwiGLU: (silu(x W_gate) * x W_in) W_out."""

    d_mlp: int
    activation: str
    use_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    bitnet: bool = False  # ternary weights and 8-bit activations (models/bitnet.py)
    hidden_site: Any = None  # h -> h: the block's sow_site for "mlp_hidden" (act(x W_in + b_in) [B, L, d_mlp])

    @nn.compact
    def __call__(self, x):  # [B, L, D]
        dense = functools.partial(
            nn.Dense, use_bias=self.use_bias, dtype=self.dtype, dot_general=bitnet.dot_general if self.bitnet else None,
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)))
        tokens = x.reshape(-1, x.shape[-1])  # 2-D matmuls: XLA:CPU runs them (and their grads) ~2x faster
        h = dense(self.d_mlp, kernel_init=dense_init("embed", "mlp"), name="wi")(tokens)
        h = h + lora_delta(self, ("wi", "kernel"), tokens, h.shape)
        record_input(self, ("wi", "kernel"), tokens)
        if self.activation == "swiglu":
            gate = dense(self.d_mlp, kernel_init=dense_init("embed", "mlp"), name="wg")(tokens)
            gate = gate + lora_delta(self, ("wg", "kernel"), tokens, gate.shape)
            record_input(self, ("wg", "kernel"), tokens)
            h = nn.silu(gate) * h
        else:
            h = {"relu": nn.relu, "gelu": nn.gelu}[self.activation](h)
        if self.is_mutable_collection("monitors"):
            self.sow("monitors", "activation_density", jnp.mean((h > 0).astype(jnp.float32)))
        h = nn.with_logical_constraint(h.reshape(*x.shape[:-1], self.d_mlp),
                                       ("activation_batch", "activation_length", "activation_mlp"))
        if self.hidden_site is not None:
            h = self.hidden_site(h)
        h = h.reshape(tokens.shape[0], -1)
        out = dense(
            x.shape[-1], name="wo",
            kernel_init=dense_init("mlp", "embed"),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))(h)
        out = out + lora_delta(self, ("wo", "kernel"), h, out.shape)
        record_input(self, ("wo", "kernel"), h)
        return out.reshape(x.shape[:-1] + out.shape[-1:])

def token_embedding(vocab_size: int, d_model: int, dtype):
    """E [V, D], normal(std 1/sqrt(D)): the input embedding, and the unembedding when tied."""
    return nn.Embed(vocab_size, d_model, dtype=dtype, embedding_init=nn.with_logical_partitioning(
        nn.initializers.normal(d_model**-0.5), ("vocab", "embed")))


def learned_positions(module: nn.Module, max_len: int, d_model: int):
    """P [max_len, D], normal(std 1/sqrt(D)): a learned position table, a parameter of `module` (call in setup)."""
    return module.param("position_embedding", nn.with_logical_partitioning(
        nn.initializers.normal(d_model**-0.5), (None, "embed")), (max_len, d_model))


def add_positions(x, table, start):
    """x [B, T, D] + P[start : start + T]."""
    return x + jax.lax.dynamic_slice_in_dim(table, start, x.shape[1]).astype(x.dtype)


def unembedding(vocab_size: int, dtype):
    """U [D, V] of an untied output layer."""
    return nn.Dense(vocab_size, use_bias=False, dtype=dtype, kernel_init=dense_init("embed", "vocab"))


def vocab_logits(h, embed, unembed):
    """[B, T, D] -> float32 logits [B, T, V]: h E^T when unembed is None (tied), else h U."""
    tokens = h.reshape(-1, h.shape[-1])  # one 2-D matmul
    out = embed.attend(tokens) if unembed is None else unembed(tokens)
    return out.reshape(*h.shape[:-1], -1).astype(jnp.float32)


def remat_policy(name: str):
    """Rematerialisation policies by config name; None means no remat."""
    return {
        "none": None,
        "full": jax.checkpoint_policies.nothing_saveable,
        "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    }[name]


REMAT_POLICIES = ("none", "full", "dots")
