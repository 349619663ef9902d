"""The transformer with mixture-of-experts FFNs (`model.name = "moe"`): every `moe_every`-th block's
MLP is `models/moe.MoEFfn` (routed SwiGLU experts plus shared experts), through the FFN table of
models/blocks.py, so the same FFN can sit in any family's block (the hybrid's "E" layers).

    first_k_dense_replace dense blocks                               (DeepSeek-V3: the first 3 of 61)
    period = (moe_every - 1) dense blocks, then one MoE block      scanned (num_layers - first_k) / moe_every times
    MoE block:  x += Attn(norm(x));  x += MoE(norm(x))

Expert weights are [E, D, F] with logical axes (expert, embed, mlp): the `expert` mesh axis splits
the experts, and inside the MoE layer tokens split over the batch axes. The routers' biases, sown
losses and metrics are stacked over periods like the parameters (models/lm.py).
"""

import dataclasses

from models import blocks, lm, moe, transformer
from data.config_fields import field
from models.layers import ACTIVATIONS


@dataclasses.dataclass(frozen=True)
class MoEConfig(moe.MoEOptions, transformer.TransformerConfig):
    """The transformer's keys, the MoE layer's (models/moe.MoEOptions), and where MoE layers go."""

    name: str = "moe"
    activation: str = field("swiglu", choices=ACTIVATIONS)
    moe_every: int = field(1, min=1)  # the MoE FFN in every moe_every-th block; the others keep a dense MLP
    first_k_dense_replace: int = field(0, min=0)  # the first k blocks keep a dense MLP (width d_mlp)


class MoETransformer(lm.LM):
    cfg: MoEConfig

    def unit(self):
        every = self.cfg.moe_every
        members = tuple((f"block_{i}", blocks.Block, (("ffn", "moe" if i == every - 1 else ""),))
                        for i in range(every))
        return blocks.Period, {"members": members}

    @property
    def num_units(self) -> int:
        return (self.cfg.num_layers - self.cfg.first_k_dense_replace) // self.cfg.moe_every

    @property
    def num_dense_blocks(self) -> int:
        return self.cfg.first_k_dense_replace


def validate(m) -> list[str]:
    """Cross-field problems of an MoE config.model."""
    p = transformer.validate(m) + moe.validate(m)
    if m.bitnet:
        p.append("model.bitnet=True is not supported by model.name='moe' (its experts are not BitLinear); use "
                 "model.name='transformer'")
    moe_layers = m.num_layers - m.first_k_dense_replace
    if moe_layers < 1 or moe_layers % m.moe_every:
        p.append(f"model.num_layers={m.num_layers} minus model.first_k_dense_replace={m.first_k_dense_replace} must be "
                 f"a positive multiple of model.moe_every={m.moe_every}")
    return p
