"""Model merging: run folders fine-tuned from one base become one model, without training.

    python -m experiments.posttrain.merge --base=RUN --runs=RUN_A,RUN_B --method=ties --workdir=OUT [--scale=1 --density=0.2]

With task vectors tau_i = theta_i - theta_base (one per fine-tune), per parameter tensor:

    task_arithmetic  theta = theta_base + lambda sum_i tau_i                                (Ilharco et al. 2023)
    ties             trim: keep each tau_i's top `density` fraction of entries by magnitude, zero the rest;
                     elect: gamma = sign(sum_i trimmed tau_i);
                     disjoint mean: tau = the mean of the trimmed entries whose sign is gamma (0 if none);
                     theta = theta_base + lambda tau                                        (Yadav et al. 2023)
    dare             drop each entry of tau_i with probability p = 1 - density, rescale the kept by 1 / (1 - p),
                     then task arithmetic                                                    (Yu et al. 2024)
    slerp            two runs, t in [0, 1]: theta = sin((1 - t) W) / sin W theta_a + sin(t W) / sin W theta_b,
                     W the angle between the two tensors (flattened); linear interpolation when they are
                     (nearly) parallel                                                        (Shoemake 1985)

Trimming is per tensor (mergekit's choice; the TIES paper trims the whole flattened vector). The merged folder
is the base's config with the merged parameters and the base's model state, at step 0 (experiments/restore.py):
`experiments.sample`, `reasoning_eval`, `train.init_from` read it like any run.
"""

import numpy as np

from data.config_fields import ConfigError

METHODS = ("task_arithmetic", "ties", "dare", "slerp")


def task_arithmetic(base: np.ndarray, tuned: list[np.ndarray], scale: float) -> np.ndarray:
    return base + scale * sum(t - base for t in tuned)


def trim(tau: np.ndarray, density: float) -> np.ndarray:
    """tau with all but its ceil(density * size) largest-magnitude entries set to 0."""
    keep = int(np.ceil(density * tau.size))
    if keep >= tau.size:
        return tau
    flat = np.abs(tau).ravel()
    threshold = np.partition(flat, tau.size - keep)[tau.size - keep]
    return np.where(np.abs(tau) >= threshold, tau, 0.0).astype(tau.dtype)


def ties(base: np.ndarray, tuned: list[np.ndarray], scale: float, density: float) -> np.ndarray:
    trimmed = np.stack([trim(t - base, density) for t in tuned])
    sign = np.sign(np.sum(trimmed, axis=0))
    agrees = (np.sign(trimmed) == sign) & (trimmed != 0)
    mean = np.sum(np.where(agrees, trimmed, 0.0), axis=0) / np.maximum(np.sum(agrees, axis=0), 1)
    return (base + scale * mean).astype(base.dtype)


def dare(base: np.ndarray, tuned: list[np.ndarray], scale: float, density: float, rng) -> np.ndarray:
    taus = [np.where(rng.random(t.shape) < density, (t - base) / density, 0.0) for t in tuned]
    return (base + scale * sum(taus)).astype(base.dtype)


def slerp(a: np.ndarray, b: np.ndarray, t: float, eps: float = 1e-6) -> np.ndarray:
    norms = np.linalg.norm(a) * np.linalg.norm(b)
    cosine = np.clip(np.vdot(a, b) / norms, -1.0, 1.0) if norms > 0 else 1.0
    angle = np.arccos(cosine)
    if np.sin(angle) < eps:
        return ((1 - t) * a + t * b).astype(a.dtype)
    return ((np.sin((1 - t) * angle) * a + np.sin(t * angle) * b) / np.sin(angle)).astype(a.dtype)


def merge_tensors(method: str, base, tuned: list, *, scale: float = 1.0, density: float = 0.2, t: float = 0.5, rng=None):
    """One tensor merged by `method` (the module docstring's rules)."""
    if method == "task_arithmetic":
        return task_arithmetic(base, tuned, scale)
    if method == "ties":
        return ties(base, tuned, scale, density)
    if method == "dare":
        return dare(base, tuned, scale, density, rng)
    return slerp(tuned[0], tuned[1], t)


def check(method: str, runs: list[str], density: float, t: float) -> None:
    if method not in METHODS:
        raise ConfigError(f"--method={method!r} is not one of {list(METHODS)}")
    if method == "slerp" and len(runs) != 2:
        raise ConfigError(f"--method=slerp interpolates two runs; --runs names {len(runs)}")
    if not runs:
        raise ConfigError("--runs is empty: name the fine-tuned run folders to merge, comma-separated")
    if not 0 < density <= 1:
        raise ConfigError(f"--density={density} must lie in (0, 1]")
    if not 0 <= t <= 1:
        raise ConfigError(f"--t={t} must lie in [0, 1]")


def merge_params(method: str, base: dict, tuned: list[dict], *, scale: float = 1.0, density: float = 0.2,
                 t: float = 0.5, seed: int = 0) -> dict:
    """The merged parameter tree; ConfigError when a tuned tree's paths or shapes differ from the base's."""
    import jax

    base_leaves, treedef = jax.tree_util.tree_flatten_with_path(base)
    for i, tree in enumerate(tuned):
        theirs = jax.tree_util.tree_flatten_with_path(tree)[0]
        mine = [(jax.tree_util.keystr(p), np.shape(x)) for p, x in base_leaves]
        other = [(jax.tree_util.keystr(p), np.shape(x)) for p, x in theirs]
        if mine != other:
            bad = next((b for a, b in zip(mine, other) if a != b), other[len(mine):] or mine[len(other):])
            raise ConfigError(f"run {i + 1} of --runs does not share the base's parameters (first difference: {bad}); "
                              "merging needs fine-tunes of one model")
    rng = np.random.default_rng(seed)
    tuned_leaves = [[np.asarray(x) for x in jax.tree.leaves(tree)] for tree in tuned]
    merged = [merge_tensors(method, np.asarray(x), [leaves[j] for leaves in tuned_leaves], scale=scale, density=density,
                            t=t, rng=rng) for j, (_, x) in enumerate(base_leaves)]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(base), merged)


def merge_runs(base_dir: str, run_dirs: list[str], workdir: str, method: str, **options):
    """Reads the runs' newest weights, merges them and writes `workdir` (a run folder at step 0)."""
    from experiments import restore

    check(method, run_dirs, options.get("density", 0.2), options.get("t", 0.5))
    try:
        config = restore.load_config(base_dir)
        _, base = restore.load_variables(config, base_dir)
        tuned = [restore.load_variables(restore.load_config(d), d)[1]["params"] for d in run_dirs]
    except FileNotFoundError as error:
        raise ConfigError(str(error)) from None
    params = merge_params(method, base["params"], tuned, **options)
    restore.save_variables(config, {**base, "params": params}, workdir)
    return config


def main(argv):
    from absl import flags

    from experiments.training import cli

    del argv
    f = flags.FLAGS
    runs = [r for r in f.runs.split(",") if r]
    try:
        merge_runs(f.base, runs, f.workdir, f.method, scale=f.scale, density=f.density, t=f.t, seed=f.seed)
    except ConfigError as e:
        cli.fail(str(e))
    print(f"merged {len(runs)} runs onto {f.base} by {f.method} into {f.workdir}")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("base", None, "The run folder every fine-tune started from.", required=True)
    flags.DEFINE_string("runs", None, "The fine-tuned run folders, comma-separated.", required=True)
    flags.DEFINE_string("workdir", None, "The run folder to write.", required=True)
    flags.DEFINE_string("method", "task_arithmetic", f"One of {', '.join(METHODS)}.")
    flags.DEFINE_float("scale", 1.0, "lambda: the merged task vector's scale (task_arithmetic, ties, dare).")
    flags.DEFINE_float("density", 0.2, "The fraction of each task vector kept (ties: by magnitude; dare: at random).")
    flags.DEFINE_float("t", 0.5, "slerp's interpolation point: 0 the first run, 1 the second.")
    flags.DEFINE_integer("seed", 0, "dare's drop masks.")
    app.run(main)
