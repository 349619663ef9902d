"""The transformer with mixture-of-experts FFNs (`model.name = "moe"`): every `moe_every`-th block's
MLP is replaced by `models/moe.MoEFfn` (routed SwiGLU experts plus shared experts).

    period = (moe_every - 1) dense blocks, then one MoE block      scanned num_layers / moe_every times
    MoE block:  x += Attn(norm(x));  x += MoE(norm(x))

Expert weights are [E, D, F] with logical axes (expert, embed, mlp): the `expert` mesh axis splits
the experts, and inside the MoE layer tokens split over (data, fsdp, expert). The routers' biases,
sown losses and metrics are stacked over periods like the parameters.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import moe, transformer


@dataclasses.dataclass(frozen=True)
class MoEConfig(moe.MoEOptions, transformer.TransformerConfig):
    """The transformer's keys, the MoE layer's (models/moe.MoEOptions), and where MoE layers go."""

    name: str = "moe"
    activation: str = "swiglu"
    moe_every: int = 1  # the MoE FFN in every moe_every-th block; the others keep a dense MLP


class MoEBlock(transformer.Block):
    cfg: MoEConfig

    def feed_forward(self):
        cfg = self.cfg
        return moe.MoEFfn(cfg.d_model, cfg.d_expert or cfg.d_mlp, cfg, cfg.compute_dtype, name="moe")


class Period(nn.Module):
    """moe_every - 1 dense blocks, then an MoE block; caches [moe_every, B, len, Hkv, Dh] in and out."""

    cfg: MoEConfig

    @nn.compact
    def __call__(self, x, cache, start, key_mask=None):
        new_cache = []
        for i in range(self.cfg.moe_every):
            block = MoEBlock if i == self.cfg.moe_every - 1 else transformer.Block
            x, layer_cache = block(self.cfg, name=f"block_{i}")(x, None if cache is None else jax.tree.map(
                lambda c: c[i], cache), start, key_mask)
            new_cache.append(layer_cache)
        return x, None if cache is None else jax.tree.map(lambda *c: jnp.stack(c), *new_cache)


class MoETransformer(transformer.Transformer):
    cfg: MoEConfig

    def stack(self, unit, length, variable_axes):
        """Periods instead of blocks; the routers' biases, losses and metrics stacked like the parameters."""
        del unit, length, variable_axes
        axes = {"params": 0, "router_bias": 0, "metrics": 0, "losses": 0}
        return super().stack(Period, self.cfg.num_layers // self.cfg.moe_every, axes)

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32):
        cfg = self.cfg
        return jax.tree.map(lambda c: c.reshape(cfg.num_layers // cfg.moe_every, cfg.moe_every, *c.shape[1:]),
                            transformer.init_cache(cfg, batch, max_len, dtype))


def validate(m) -> list[str]:
    """Problems with an MoE config.model, as one-line messages."""
    p = transformer.validate(m) + moe.validate(m)
    if m.moe_every < 1 or (m.num_layers >= 1 and m.num_layers % m.moe_every):
        p.append(f"model.moe_every={m.moe_every} must be >= 1 and divide model.num_layers={m.num_layers}")
    return p
