"""Many grokking runs in one compiled program: the shared `trainer.train_step`, vmapped over members
that differ in seed, learning rate, weight decay and train fraction; and the phase classifier of
Liu et al. 2022 ("Towards Understanding Grokking: An Effective Theory of Representation Learning").

Every member trains full batch on all p^2 examples of the task with its own loss mask (its seeded
train split), so all members share shapes and one `jax.vmap` carries them; its test set is the
complement. Learning rate and weight decay live in each member's optimizer state
(`optax.inject_hyperparams`); the config's schedule (warmup, cosine), normalised to peak 1, is a
shared multiplier after AdamW, which makes each member's update exactly the trainer's AdamW
(`experiments/optim/optimizers.py`) at that member's learning rate and weight decay.

`scripts/studies/phase_diagram.py` runs a grid of members and draws Liu et al.'s phase diagram;
`scripts/benchmarks/bench_vmap_sweep.py` measures the throughput against running members one by one.

Phases, from the steps at which train and test accuracy first reach 90% (never within the budget
counts as never): confusion (train never), memorisation (train, test never), grokking (test more
than `grokking_gap` steps after train), comprehension (test within `grokking_gap` steps of train).
"""

import dataclasses
import functools
import itertools
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import models
from data import algorithmic
from experiments.optim import optimizers
from experiments.training import plots, train_state, trainer

PHASES = ("comprehension", "grokking", "memorisation", "confusion")


def member_grid(seeds=(0,), lrs=(1e-3,), weight_decays=(1.0,), train_fractions=(0.3,)) -> list[dict]:
    return [dict(seed=s, lr=lr, weight_decay=wd, train_fraction=f)
            for s, lr, wd, f in itertools.product(seeds, lrs, weight_decays, train_fractions)]


def train_masks(p: int, op: str, members) -> np.ndarray:
    """[M, N] float32: 1 where example n is in member m's train split (its seeded permutation)."""
    n = len(algorithmic.all_examples(p, op)["inputs"])
    masks = np.zeros((len(members), n), np.float32)
    for i, m in enumerate(members):
        order = np.random.default_rng(m["seed"]).permutation(n)
        masks[i, order[:int(m["train_fraction"] * n)]] = 1.0
    return masks


def _optimizer(opt, lr, weight_decay, total_steps):
    """(the table's optimizer with injectable lr / weight decay, then the schedule's shape; the shape)."""
    shape_of_schedule = opt.copy_and_resolve_references()
    shape_of_schedule.lr = 1.0
    schedule = optimizers.learning_rate_schedule(shape_of_schedule, total_steps)
    keys_cls, make = optimizers.OPTIMIZERS[opt.name]
    keys = keys_cls(**opt[opt.name])

    def factory(learning_rate, weight_decay):  # the table's optimizer with both as per-member hyperparameters
        return make(learning_rate, dataclasses.replace(keys, weight_decay=weight_decay), optimizers.decay_mask(opt.decay))

    tx = optax.inject_hyperparams(factory)(learning_rate=lr, weight_decay=weight_decay)
    return optax.chain(tx, optax.scale_by_schedule(schedule)), schedule


def init_states(config, members, inputs, total_steps: int):
    """The members' train states stacked on a leading axis (vmapped init, one seed each)."""
    model = models.build(config.model)
    tx, _ = _optimizer(config.optimizer, 0.0, 0.0, total_steps)

    def init(seed, lr, weight_decay):
        state = nn.meta.unbox(train_state.init_state(model, tx, inputs[:1], jax.random.PRNGKey(seed)))
        hyper = state.opt_state[0].hyperparams
        hyper = {**hyper, "learning_rate": jnp.asarray(lr, jnp.float32), "weight_decay": jnp.asarray(weight_decay, jnp.float32)}
        return state.replace(opt_state=(state.opt_state[0]._replace(hyperparams=hyper), *state.opt_state[1:]))

    column = lambda k, dtype: jnp.asarray([m[k] for m in members], dtype)  # noqa: E731
    return jax.jit(jax.vmap(init))(column("seed", jnp.uint32), column("lr", jnp.float32),
                                   column("weight_decay", jnp.float32))


def make_steps(config, total_steps: int):
    """(vmapped train step, vmapped eval) over stacked states and per-member masks."""
    _, schedule = _optimizer(config.optimizer, 0.0, 0.0, total_steps)
    step = functools.partial(trainer.train_step, schedule=schedule)

    def train(states, examples, masks):
        batches = {"inputs": examples["inputs"], "targets": examples["targets"],
                   "loss_mask": examples["loss_mask"] * masks[:, :, None]}
        return jax.vmap(step, in_axes=(0, {"inputs": None, "targets": None, "loss_mask": 0}))(states, batches)

    def accuracies(states, examples, masks):
        def one(state, mask):
            logits = state.apply_fn({"params": state.params}, examples["inputs"])
            correct = (jnp.argmax(logits[:, -1], -1) == examples["targets"][:, -1]).astype(jnp.float32)
            return jnp.sum(correct * mask) / jnp.sum(mask), jnp.sum(correct * (1 - mask)) / jnp.maximum(jnp.sum(1 - mask), 1)
        return jax.vmap(one)(states, masks)

    return jax.jit(train, donate_argnums=0), jax.jit(accuracies)


def first_step(steps, values, threshold):
    """The first logged step where values >= threshold, or None."""
    hits = np.flatnonzero(np.asarray(values) >= threshold)
    return int(steps[hits[0]]) if len(hits) else None


def classify(train_step, test_step, grokking_gap: int) -> str:
    """Liu et al.'s phases from the steps to 90% train and test accuracy (None: never)."""
    if train_step is None:
        return "confusion"
    if test_step is None:
        return "memorisation"
    return "grokking" if test_step - train_step > grokking_gap else "comprehension"


def run(config, members, steps: int, eval_every: int, grokking_gap: int) -> list[dict]:
    """Trains all members together; returns each member's settings, milestones, phase and curves."""
    examples = {k: jnp.asarray(v) for k, v in algorithmic.all_examples(config.data.p, config.data.op).items()}
    masks = jnp.asarray(train_masks(config.data.p, config.data.op, members))
    config = trainer.resolve(config, _splits_like(config))
    states = init_states(config, members, examples["inputs"], steps)
    train, accuracies = make_steps(config, steps)
    logged, train_acc, test_acc = [], [], []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        states, _ = train(states, examples, masks)
        if step % eval_every == 0 or step == steps:
            tr, te = jax.device_get(accuracies(states, examples, masks))
            logged.append(step)
            train_acc.append(tr)
            test_acc.append(te)
    seconds = time.perf_counter() - start
    logged, train_acc, test_acc = np.array(logged), np.array(train_acc), np.array(test_acc)
    results = []
    for i, member in enumerate(members):
        milestones = {f"{split}_{int(q * 100)}": first_step(logged, acc[:, i], q)
                      for split, acc in (("train", train_acc), ("test", test_acc)) for q in (0.9, 0.99)}
        results.append({**member, **milestones, "phase": classify(milestones["train_90"], milestones["test_90"], grokking_gap),
                        "final_train_accuracy": float(train_acc[-1, i]), "final_test_accuracy": float(test_acc[-1, i]),
                        "curve_steps": logged.tolist(), "curve_train": train_acc[:, i].tolist(),
                        "curve_test": test_acc[:, i].tolist(), "seconds_all_members": seconds})
    return results


def _splits_like(config):
    """What `trainer.resolve` reads from the data: vocabulary p + 1 (the `=` token), length 3."""
    class Splits:
        vocab_size = config.data.p + 1
        seq_len = 3
        model_keys = {}
    return Splits


def plot_phase_diagram(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    lrs = sorted({r["lr"] for r in results})
    wds = sorted({r["weight_decay"] for r in results})
    grid = np.full((len(wds), len(lrs)), np.nan)
    for r in results:
        grid[wds.index(r["weight_decay"]), lrs.index(r["lr"])] = PHASES.index(r["phase"])
    fig, ax = plt.subplots(figsize=(1.2 * len(lrs) + 3, 1.0 * len(wds) + 2))
    colours = ListedColormap(["tab:green", "tab:orange", "tab:blue", "tab:red"])
    ax.imshow(grid, cmap=colours, vmin=-0.5, vmax=3.5, origin="lower", aspect="auto")
    for (i, j), value in np.ndenumerate(grid):
        if not np.isnan(value):
            ax.text(j, i, PHASES[int(value)][:5], ha="center", va="center", fontsize=8, color="white")
    ax.set_xticks(range(len(lrs)), [f"{v:g}" for v in lrs])
    ax.set_yticks(range(len(wds)), [f"{v:g}" for v in wds])
    ax.set(xlabel="learning rate", ylabel="weight decay", title="phases (90% accuracy milestones)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours(i)) for i in range(4)]
    ax.legend(handles, PHASES, loc="upper left", bbox_to_anchor=(1.02, 1))
    plots.save_figure(fig, path)
