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

from models import blocks, deq, deq_stabilisers, layers, lm, transformer
from data.config_fields import field


@dataclasses.dataclass(frozen=True)
class DEQConfig(transformer.TransformerConfig):
    """The transformer's keys (num_layers: blocks inside the cell) and the solver's."""

    name: str = "deq"
    num_layers: int = field(1, min=1)
    remat: str = field("none", choices=("none",))  # a DEQ keeps no per-iteration activations
    solver: str = field("anderson", choices=deq.SOLVERS)  # fixed_point | anderson | broyden
    tol: float = field(1e-3, above=0)  # relative residual ||f(z) - z|| / ||f(z)||
    max_iter: int = field(12, min=1)
    backward: str = field("implicit", choices=deq.BACKWARDS)  # implicit | phantom | unroll
    backward_max_iter: int = field(12, min=1)
    phantom_steps: int = field(5, min=1)
    weight_normalisation: str = field("none", choices=deq_stabilisers.NORMALISATIONS)  # none | spectral | weight
    jacobian_weight: float = field(0.0, min=0)  # 0: no Jacobian regularisation
    jacobian_frequency: float = field(1.0, min=0, max=1)  # fraction of training steps that compute it


class Cell(nn.Module):
    """f(z; x) = norm_f(Blocks(z + x) - z), with each block's cache (keyed by block name) when decoding."""

    cfg: DEQConfig

    @nn.compact
    def __call__(self, z, x, cache, start, segments=None):
        h, new_cache = z + x, {}
        for i in range(self.cfg.num_layers):
            name = f"block_{i}"
            h, new_cache[name] = blocks.Block(self.cfg, name=name)(h, None if cache is None else cache[name], start,
                                                                   None, segments)
        h = layers.Norm(self.cfg.norm, self.cfg.compute_dtype, "cell_norm", self.cfg.norm_eps)(h - z)
        return h, None if cache is None else new_cache


class WeightNormGains(nn.Module):
    """The gains g of weight normalisation, one per output unit of each kernel, initialised to ||V||."""

    @nn.compact
    def __call__(self, params):
        return self.param("gains", lambda _: deq_stabilisers.column_norms(params))


class DEQTransformer(lm.LM):
    cfg: DEQConfig

    @staticmethod
    def active_share(cfg, path: tuple) -> float:
        return active_share(path, cfg)

    def unit(self):
        return None  # no stack: the cell is iterated to its fixed point

    def setup(self):
        super().setup()
        cfg = self.cfg
        self.cell = Cell(cfg, name="cell")
        if cfg.weight_normalisation == "weight":
            self.weight_norm = WeightNormGains(name="weight_norm")
        if cfg.backward == "implicit" and (self.has_variable("probes", "backward_iterations")
                                           or self.is_mutable_collection("probes")):
            self.probes = [self.variable("probes", f"backward_{name}", jnp.zeros, ()) for name in ("iterations", "residual")]
        self.injection_norm = layers.Norm(cfg.norm, cfg.compute_dtype, "injection_norm", cfg.norm_eps)

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

    def _f(self, z, params, x, cache, segments, start):
        return Cell(self.cfg, parent=None).apply({"params": params}, z, x, cache, start, segments)[0]

    def _equilibrium(self, x, cache=None, start=0, segments=None):
        """(z* [B, T, D], cell parameters) for injections x; sows solver statistics when training."""
        cfg = self.cfg
        params = self._cell_params(x, cache, start)
        probes = getattr(self, "probes", None) if cache is None else None
        f = functools.partial(self._f, start=start)
        z, stats = deq.fixed_point_with_stats(
            f, jnp.zeros_like(x), params, x, cache, segments, solver=cfg.solver, tol=cfg.tol, max_iter=cfg.max_iter,
            backward=cfg.backward, backward_max_iter=cfg.backward_max_iter, phantom_steps=cfg.phantom_steps,
            probe=None if probes is None else jnp.stack([p.value for p in probes]))
        for name, value in stats.items():
            self.sow("metrics", f"forward_{name}", value)
        return z, params

    def _jacobian_penalty(self, z, params, x, segments):
        """weight * ||J_f(z*)||_F^2 / d on a random `jacobian_frequency` of the training steps."""
        cfg = self.cfg
        coin, probe_rng = jax.random.split(self.make_rng("dropout"))
        estimate = jax.lax.cond(
            jax.random.uniform(coin) < cfg.jacobian_frequency,
            lambda: deq_stabilisers.jacobian_frobenius_sq(
                lambda z_: self._f(z_, params, x, None, segments, 0), jax.lax.stop_gradient(z), rng=probe_rng),
            lambda: jnp.zeros((), z.dtype))
        self.sow("metrics", "jacobian_frobenius_sq", estimate)
        self.sow("losses", "jacobian", cfg.jacobian_weight * estimate)

    def hidden(self, x, cache=None, start=0, key_mask=None, segments=None):
        """The fixed point z* of the cell for embeddings x [B, T, D] (packed rows: segments), final-normed; with a
        cache, also the cache's keys and values at the new positions' fixed point."""
        if key_mask is not None:
            raise ValueError("the DEQ takes no key mask")
        x = self.injection_norm(x)
        z, params = self._equilibrium(x, cache, start, segments)
        if cache is None and self.cfg.jacobian_weight > 0 and self.has_rng("dropout") \
                and self.is_mutable_collection("losses"):
            self._jacobian_penalty(z, params, x, segments)
        if cache is not None:
            _, cache = Cell(self.cfg, parent=None).apply({"params": params}, z, x, cache, start)
        return self.final_norm(z), cache

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32):
        """Each cell block's attention cache, keyed by block name."""
        return {f"block_{i}": blocks.Block.init_cache(self.cfg, batch, max_len, dtype) for i in range(self.cfg.num_layers)}


def cell_uses(m) -> float:
    """The cell's compute per token in a training step, in uses of its parameters (one use: 6 FLOPs per parameter,
    a forward and a backward pass), at the iteration limits (an upper bound when the solver stops at tol):

        implicit: forward max_iter f's, the linearisation at z*, backward_max_iter adjoint VJPs (input side)
                  and the parameters' VJP:  2 N (max_iter + 1 + backward_max_iter + 2) = 6 N (f + b + 3) / 3
        unroll:   max_iter iterations, forward and backward:                          6 N max_iter
        phantom:  the forward solve, then phantom_steps iterations differentiated:    6 N (f / 3 + k)"""
    if m.backward == "implicit":
        return (m.max_iter + m.backward_max_iter + 3) / 3
    if m.backward == "unroll":
        return float(m.max_iter)
    return m.max_iter / 3 + m.phantom_steps


def active_share(path: tuple, m) -> float:
    """`cell_uses` for the cell's parameters, 1 for the rest (experiments/studies/scaling.py's N active)."""
    return cell_uses(m) if getattr(path[0], "key", path[0]) == "cell" else 1.0


def validate(m) -> list[str]:
    """Cross-field problems of a DEQ config.model (each key's range is declared with it)."""
    random = [f"model.{k}={m[k]}" for k in ("attention_dropout", "residual_dropout") if m[k]]
    return transformer.validate(m) + ([f"{random[0]} is not supported by model.name='deq' (its fixed point needs a "
                                       "deterministic map); use embed_dropout"] if random else [])
