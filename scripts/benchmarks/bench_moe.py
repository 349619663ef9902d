"""Tokens per second of each MoE dispatch against a dense FFN of equal active parameters.

    PYTHONPATH=. python scripts/benchmarks/bench_moe.py [--d_model=256 --num_experts=8 --top_k=2 --tokens=4096]

One MoE FFN (`models.moe.MoEFfn`: sigmoid router, `num_experts` SwiGLU experts of width d_model,
top_k of them per token plus one shared expert) with dispatch `dense` (every expert on every
token, masked: the reference), `capacity` (bucketed: at factor 0 every expert has a slot per token, so
nothing drops and it computes as much as `dense`; at 1.25, 1.25 T k / E slots, the usual setting)
and `ragged`
(`jax.lax.ragged_dot` over tokens sorted by expert), against a SwiGLU FFN of width
(top_k + shared) x d_model, which has the same active parameters per token. Forward and
forward + backward (gradients of the parameters and the input), jitted, on this machine's
default device; the median of --repeats calls after a warm-up. Ratios are against the dense FFN.
"""


from absl import app, flags
import flax.linen as nn
import jax
import jax.numpy as jnp

from experiments import studies
from models import layers, moe

_D_MODEL = flags.DEFINE_integer("d_model", 256, "Model width (and each expert's width).")
_EXPERTS = flags.DEFINE_integer("num_experts", 8, "Routed experts.")
_TOP_K = flags.DEFINE_integer("top_k", 2, "Experts per token.")
_TOKENS = flags.DEFINE_integer("tokens", 4096, "Tokens per call (batch 16 x tokens / 16).")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed calls after a warm-up.")


def timed_ms(fn, *args):
    return 1e3 * studies.median_seconds(jax.jit(fn).lower(*args).compile(), *args, repeats=_REPEATS.value)


def measure(module, x, mutable=()):
    variables = module.init(jax.random.key(1), x)
    params = variables["params"]
    rest = {k: v for k, v in variables.items() if k != "params"}

    def forward(params, x):
        out = module.apply({"params": params, **rest}, x, mutable=list(mutable) + ["losses", "metrics"])
        return out[0] if isinstance(out, tuple) else out

    def loss(params, x):
        return jnp.mean(forward(params, x) ** 2)

    params = nn.meta.unbox(params)
    return timed_ms(forward, params, x), timed_ms(jax.grad(loss, argnums=(0, 1)), params, x)


def main(argv):
    del argv
    d, experts, top_k, tokens = _D_MODEL.value, _EXPERTS.value, _TOP_K.value, _TOKENS.value
    x = jax.random.normal(jax.random.key(0), (16, tokens // 16, d))
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}; {tokens} tokens, d_model {d}, "
          f"{experts} experts of {d} (top-{top_k} + 1 shared) vs a dense SwiGLU of {(top_k + 1) * d}\n")
    print("| FFN | fwd ms | fwd tokens/s | fwd+bwd ms | fwd+bwd tokens/s | fwd+bwd vs dense FFN |\n|---|---|---|---|---|---|")
    rows = [("dense FFN, equal active params", layers.Mlp((top_k + 1) * d, "swiglu"), ())]
    for dispatch, factor in (("dense", 0.0), ("capacity", 0.0), ("capacity", 1.25), ("ragged", 0.0)):
        options = moe.MoEOptions(num_experts=experts, top_k=top_k, d_expert=d, dispatch=dispatch,
                                 capacity_factor=factor)
        label = f"MoE, dispatch={dispatch}" + (f", capacity factor {factor}" if dispatch == "capacity" else "")
        rows.append((label, moe.MoEFfn(d, d, options), ("router_bias",)))
    baseline = None
    for name, module, mutable in rows:
        fwd, total = measure(module, x, mutable)
        baseline = baseline or total
        print(f"| {name} | {fwd:.2f} | {tokens / fwd * 1e3:,.0f} | {total:.2f} | {tokens / total * 1e3:,.0f} "
              f"| {baseline / total:.2f}x |", flush=True)


if __name__ == "__main__":
    app.run(main)
