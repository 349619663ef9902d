"""A deep-equilibrium transformer LM (Bai et al. 2019): one weight-tied cell iterated to its fixed point.

    x = norm_x(E[tokens] (+ P[positions]))         the input injection
    f(z; x) = norm_f(Blocks(z + x) - z)            Blocks: `num_layers` pre-norm transformer blocks
    z* = f(z*; x), solved from z = 0               (models/deq.py: Anderson / Broyden / iteration)
    logits = norm(z*) U

Subtracting z removes the blocks' identity path, so z reaches the output only through attention and
the MLP, yet still feeds every sublayer. The injection is normalised too: at the embeddings' scale
(rms d^-1/2) norm_f would amplify the sublayers' dependence on z by ~sqrt(d) and the iteration would
expand; normalised, Anderson reaches a relative residual of 1e-3 in ~9 iterations at initialisation
(35 without the norm).

Gradients come from the implicit function theorem (constant memory in the iterations), the
phantom gradient, or unrolling (`backward`). Stabilisers (models/deq_stabilisers.py): the cell's
kernels spectrally or weight normalised (`weight_normalisation`; not flax's SpectralNorm / WeightNorm
wrappers, which view a kernel as [-1, last axis], not the attention projections' operator, and would
update their power-iteration state at every solver iteration), and a Hutchinson estimate of
||J_f(z*)||_F^2 / d added to the training loss with weight `jacobian_weight` on a random
`jacobian_frequency` of the steps. Each training step sows the forward solve's iterations, residual
and convergence, and the adjoint solve's iterations and residual (through a probe's cotangent).

Decoding is exact with a KV cache: attention is causal, so the fixed point at earlier positions does
not depend on later tokens; new positions are solved against the cached keys and values of the
solved prefix, and the cache then takes the keys and values at the new positions' fixed point.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import deq, deq_stabilisers, layers, transformer


@dataclasses.dataclass(frozen=True)
class DEQConfig(transformer.TransformerConfig):
    """The transformer's keys (num_layers: blocks inside the cell) and the solver's."""

    name: str = "deq"
    num_layers: int = 1
    solver: str = "anderson"  # fixed_point | anderson | broyden
    tol: float = 1e-3  # relative residual ||f(z) - z|| / ||f(z)||
    max_iter: int = 12
    backward: str = "implicit"  # implicit | phantom | unroll
    backward_max_iter: int = 12
    phantom_steps: int = 5
    weight_normalisation: str = "none"  # none | spectral | weight
    jacobian_weight: float = 0.0  # 0: no Jacobian regularisation
    jacobian_frequency: float = 1.0  # fraction of training steps that compute it


class Cell(nn.Module):
    """f(z; x) = norm_f(Blocks(z + x) - z), with each block's KV cache when decoding."""

    cfg: DEQConfig

    @nn.compact
    def __call__(self, z, x, cache, start):
        h, new_cache = z + x, []
        for i in range(self.cfg.num_layers):
            layer_cache = None if cache is None else jax.tree.map(lambda c: c[i], cache)
            h, layer_cache = transformer.Block(self.cfg, name=f"block_{i}")(h, layer_cache, start)
            new_cache.append(layer_cache)
        h = layers.Norm(self.cfg.norm, self.cfg.compute_dtype, "cell_norm")(h - z)
        return h, None if cache is None else jax.tree.map(lambda *c: jnp.stack(c), *new_cache)


class WeightNormGains(nn.Module):
    """The gains g of weight normalisation, one per output unit of each kernel, initialised to ||V||."""

    @nn.compact
    def __call__(self, params):
        return self.param("gains", lambda _: deq_stabilisers.column_norms(params))


class DEQTransformer(nn.Module):
    cfg: DEQConfig

    def setup(self):
        cfg, dtype = self.cfg, self.cfg.compute_dtype
        self.embed = layers.token_embedding(cfg.vocab_size, cfg.d_model, dtype)
        if cfg.positional == "learned":
            self.position_embedding = layers.learned_positions(self, cfg.max_len, cfg.d_model)
        self.cell = Cell(cfg, name="cell")
        if cfg.weight_normalisation == "weight":
            self.weight_norm = WeightNormGains(name="weight_norm")
        if cfg.backward == "implicit" and (self.has_variable("probes", "backward_iterations")
                                           or self.is_mutable_collection("probes")):
            self.probes = [self.variable("probes", f"backward_{name}", jnp.zeros, ()) for name in ("iterations", "residual")]
        self.injection_norm = layers.Norm(cfg.norm, dtype, "injection_norm")
        self.final_norm = layers.Norm(cfg.norm, dtype, "final_norm")
        self.unembed = None if cfg.tie_embeddings else layers.unembedding(cfg.vocab_size, dtype)

    def _inject(self, tokens, start):
        x = self.embed(tokens)
        if self.cfg.positional == "learned":
            x = layers.add_positions(x, self.position_embedding, start)
        return nn.with_logical_constraint(self.injection_norm(x), ("activation_batch", "activation_length", "activation_embed"))

    def _cell_params(self, x, cache, start):
        """The cell's parameters as a plain tree (created on first use), normalised as configured."""
        if self.is_initializing():
            self.cell(jnp.zeros_like(x), x, cache, start)
        params = nn.meta.unbox(self.cell.variables["params"])
        if self.cfg.weight_normalisation == "spectral":
            return deq_stabilisers.spectral_normalise(params)
        if self.cfg.weight_normalisation == "weight":
            return deq_stabilisers.weight_normalise(params, self.weight_norm(params))
        return params

    def _f(self, z, params, x, cache, start):
        return Cell(self.cfg, parent=None).apply({"params": params}, z, x, cache, start)[0]

    def _equilibrium(self, x, cache=None, start=0):
        """(z* [B, T, D], cell parameters) for injections x; sows solver statistics when training."""
        cfg = self.cfg
        params = self._cell_params(x, cache, start)
        probes = getattr(self, "probes", None) if cache is None else None
        f = functools.partial(self._f, start=start)
        z, stats = deq.fixed_point_with_stats(
            f, jnp.zeros_like(x), params, x, cache, solver=cfg.solver, tol=cfg.tol, max_iter=cfg.max_iter,
            backward=cfg.backward, backward_max_iter=cfg.backward_max_iter, phantom_steps=cfg.phantom_steps,
            probe=None if probes is None else jnp.stack([p.value for p in probes]))
        for name, value in stats.items():
            self.sow("metrics", f"forward_{name}", value)
        return z, params

    def _jacobian_penalty(self, z, params, x):
        """weight * ||J_f(z*)||_F^2 / d on a random `jacobian_frequency` of the training steps."""
        cfg = self.cfg
        coin, probe_rng = jax.random.split(self.make_rng("dropout"))
        estimate = jax.lax.cond(
            jax.random.uniform(coin) < cfg.jacobian_frequency,
            lambda: deq_stabilisers.jacobian_frobenius_sq(
                lambda z_: self._f(z_, params, x, None, 0), jax.lax.stop_gradient(z), rng=probe_rng),
            lambda: jnp.zeros((), z.dtype))
        self.sow("metrics", "jacobian_frobenius_sq", estimate)
        self.sow("losses", "jacobian", cfg.jacobian_weight * estimate)

    def logits(self, h):
        return layers.vocab_logits(self.final_norm(h), self.embed, self.unembed)

    def __call__(self, tokens):
        """int32[B, L] -> float32 logits [B, L, V]."""
        x = self._inject(tokens, 0)
        z, params = self._equilibrium(x)
        if self.cfg.jacobian_weight > 0 and self.has_rng("dropout") and self.is_mutable_collection("losses"):
            self._jacobian_penalty(z, params, x)
        return self.logits(z)

    def decode(self, tokens, cache, start):
        """Tokens int32[B, T] at positions start.. against the KV cache of the solved prefix; (logits, cache)."""
        x = self._inject(tokens, start)
        z, params = self._equilibrium(x, cache, start)
        _, cache = Cell(self.cfg, parent=None).apply({"params": params}, z, x, cache, start)
        return self.logits(z), cache

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32):
        return transformer.init_cache(self.cfg, batch, max_len, dtype)


def validate(m) -> list[str]:
    """Problems with a DEQ config.model, as one-line messages."""
    p = transformer.validate(m)
    for key, choices in (("solver", deq.SOLVERS), ("backward", deq.BACKWARDS),
                         ("weight_normalisation", deq_stabilisers.NORMALISATIONS)):
        if m[key] not in choices:
            p.append(f"model.{key}={m[key]!r} is not one of {list(choices)}")
    for key in ("max_iter", "backward_max_iter", "phantom_steps"):
        if m[key] < 1:
            p.append(f"model.{key}={m[key]} must be >= 1")
    if not m.tol > 0:
        p.append(f"model.tol={m.tol} must be > 0")
    if m.jacobian_weight < 0 or not 0 <= m.jacobian_frequency <= 1:
        p.append(f"model.jacobian_weight={m.jacobian_weight} must be >= 0 and model.jacobian_frequency="
                 f"{m.jacobian_frequency} in [0, 1]")
    if m.remat != "none":
        p.append(f"model.remat={m.remat!r}: a DEQ keeps no per-iteration activations; use 'none'")
    return p
