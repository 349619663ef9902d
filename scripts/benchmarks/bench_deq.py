"""Deep-equilibrium LM: backward memory by solver budget, and the LM against an explicit transformer.

    PYTHONPATH=. python scripts/benchmarks/bench_deq.py [--max_iters=5,10,20,50] [--lm_steps=2000]

1. Memory: the compiled temporary memory of one training gradient of the DEQ LM
   (`lm_shakespeare.py:deq`: width 128, one block, batch 12 x 64) with the implicit backward and with
   plain unrolling, as `max_iter` grows (tolerance 0, so every iteration runs). Implicit
   differentiation keeps nothing per iteration (flat); unrolling keeps every iterate (linear).
2. Language modelling on tiny Shakespeare with the shared trainer: the DEQ LM (with and without
   Jacobian regularisation) against the explicit 4-layer transformer of `lm_shakespeare.py` at the
   same number of steps, and at equal compute: the transformer given as many steps as fit in the
   (unregularised) DEQ run's wall time, from the two runs' wall times measured here (per-step cost
   measured at initialisation would flatter the DEQ, whose solver needs more iterations as it
   trains). `--lm_steps=0` skips this.
"""

import tempfile
import time

from absl import app, flags
import jax
import jax.numpy as jnp

import models
from experiments import losses
from experiments.training import trainer
from experiments.configs import lm_shakespeare

_MAX_ITERS = flags.DEFINE_list("max_iters", ["5", "10", "20", "50"], "Solver budgets for the memory table.")
_LM_STEPS = flags.DEFINE_integer("lm_steps", 2000, "Training steps of the DEQ LM runs; 0 skips them.")
VOCAB = 256  # the byte tokenizer's

_JACOBIAN_WEIGHT = flags.DEFINE_float("jacobian_weight", 1.0, "Jacobian regularisation of the regularised run.")


def _deq_model_config(**overrides):
    config = lm_shakespeare.get_config("deq")
    config.model.update(vocab_size=VOCAB, max_len=64, **overrides)
    return config


def gradient_memory(backward: str, max_iter: int) -> int:
    """Temporary bytes of jit(grad(loss)) for the DEQ LM at this budget."""
    config = _deq_model_config(backward=backward, max_iter=max_iter, backward_max_iter=max_iter, tol=1e-30)
    model = models.build(config.model)
    tokens = jax.ShapeDtypeStruct((12, 64), jnp.int32)
    variables = jax.eval_shape(model.init, jax.random.key(0), tokens)

    def loss(variables, tokens):
        logits = model.apply(variables, tokens)
        return losses.masked_mean(logits, tokens, jnp.ones(tokens.shape))[0]

    compiled = jax.jit(jax.grad(loss)).lower(variables, tokens).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def train(config) -> dict:
    with tempfile.TemporaryDirectory() as workdir:
        start = time.perf_counter()
        result = trainer.train_and_evaluate(config, workdir, devices=jax.devices()[:1], verbose=False)
        seconds = time.perf_counter() - start
    return {"val_loss": result["eval"]["loss"], "seconds": seconds, "train": result["train"]}


def main(argv):
    del argv
    print("## Backward memory of one DEQ LM gradient (compiled temporaries, MiB)\n")
    print("| max_iter | implicit | unroll | unroll / implicit |\n|---|---|---|---|")
    for max_iter in map(int, _MAX_ITERS.value):
        implicit, unroll = gradient_memory("implicit", max_iter), gradient_memory("unroll", max_iter)
        print(f"| {max_iter} | {implicit / 2**20:.1f} | {unroll / 2**20:.1f} | {unroll / implicit:.1f}x |", flush=True)
    if not _LM_STEPS.value:
        return

    deq = lm_shakespeare.get_config("deq")
    deq.train.steps = _LM_STEPS.value
    deq_jacobian = lm_shakespeare.get_config("deq")
    deq_jacobian.train.steps = _LM_STEPS.value
    deq_jacobian.model.update(jacobian_weight=_JACOBIAN_WEIGHT.value, jacobian_frequency=0.5)
    explicit = lm_shakespeare.get_config()
    explicit.train.steps = _LM_STEPS.value
    for config in (deq, deq_jacobian, explicit):
        config.model.update(vocab_size=VOCAB, max_len=64)

    print(f"\n## Tiny Shakespeare, {_LM_STEPS.value} steps\n")
    print("| model | params | steps | val loss | train loss | fwd iters | fwd residual | bwd iters | wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    runs = [("DEQ, 1 block, Anderson 12 + implicit 12", deq),
            (f"DEQ + Jacobian reg. (weight {_JACOBIAN_WEIGHT.value}, half the steps)", deq_jacobian),
            ("explicit transformer, 4 layers, same steps", explicit)]
    seconds = {}
    for name, config in runs + [("explicit transformer, 4 layers, equal compute (the DEQ's wall time)", None)]:
        if config is None:
            config = lm_shakespeare.get_config()
            config.model.update(vocab_size=VOCAB, max_len=64)
            config.train.steps = int(round(_LM_STEPS.value * seconds[runs[0][0]] / seconds[runs[2][0]]))
        result = train(config)
        seconds[name] = result["seconds"]
        last = result["train"]
        deq_cells = (f"{last['forward_iterations']:.1f} | {last['forward_residual']:.3g} | "
                     f"{last.get('backward_iterations', float('nan')):.1f}") if "forward_iterations" in last else "- | - | -"
        print(f"| {name} | {models.parameter_count(config.model, 64):,} | {config.train.steps} | {result['val_loss']:.3f} | "
              f"{last['loss']:.3f} | {deq_cells} | {result['seconds']:.0f} |", flush=True)


if __name__ == "__main__":
    app.run(main)
