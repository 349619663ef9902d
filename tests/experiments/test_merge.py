"""Model merging (experiments/posttrain/merge.py) against entry-by-entry float64 loops of the papers' rules, and the CLI's
run folders."""

import subprocess
import sys

import jax
import numpy as np
import pytest

from data.config_fields import ConfigError
from experiments import restore
from experiments.posttrain import merge


def ties_loop(base, tuned, scale, density):
    """TIES (Yadav et al. 2023, Algorithm 1) one entry at a time, with a sort for the trim."""
    taus = [np.asarray(t, np.float64) - base for t in tuned]
    keep = int(np.ceil(density * base.size))
    trimmed = []
    for tau in taus:
        order = sorted(range(tau.size), key=lambda i: -abs(tau.flat[i]))
        kept = np.zeros(tau.size)
        for i in order[:keep]:
            kept[i] = tau.flat[i]
        trimmed.append(kept)
    out = np.array(base, np.float64).ravel()
    for i in range(base.size):
        total = sum(t[i] for t in trimmed)
        elected = [t[i] for t in trimmed if t[i] != 0 and np.sign(t[i]) == np.sign(total)]
        out[i] += scale * (sum(elected) / len(elected) if elected else 0.0)
    return out.reshape(base.shape)


@pytest.fixture(scope="module")
def tensors():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(5, 7)).astype(np.float32)
    return base, [base + rng.normal(0, 0.1, base.shape).astype(np.float32) for _ in range(3)]


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_equals_its_algorithm(tensors, density):
    base, tuned = tensors
    np.testing.assert_allclose(merge.ties(base, tuned, 0.8, density), ties_loop(base, tuned, 0.8, density), atol=1e-6)


def test_dare_drops_and_rescales_with_its_masks(tensors):
    base, tuned = tensors
    got = merge.dare(base, tuned, 0.5, 0.3, np.random.default_rng(7))
    draws = np.random.default_rng(7)  # the same masks, drawn again in the same order
    expected = np.array(base, np.float64)
    for t in tuned:
        mask = draws.random(base.shape) < 0.3
        for index in np.ndindex(base.shape):
            if mask[index]:
                expected[index] += 0.5 * (float(t[index]) - float(base[index])) / 0.3
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_slerp_walks_the_great_circle():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
    angle = np.arccos(np.vdot(a, b))
    for t in (0.0, 0.3, 0.5, 1.0):
        p = merge.slerp(a, b, t)
        assert np.linalg.norm(p) == pytest.approx(1.0, abs=1e-12)  # stays on the sphere
        assert np.arccos(np.clip(np.vdot(a, p), -1, 1)) == pytest.approx(t * angle, abs=1e-6)
        assert np.arccos(np.clip(np.vdot(p, b), -1, 1)) == pytest.approx((1 - t) * angle, abs=1e-6)
    np.testing.assert_allclose(merge.slerp(a, 2 * a, 0.25), 1.25 * a)  # parallel: linear interpolation


def test_trim_keeps_the_largest_entries():
    tau = np.array([0.1, -3.0, 0.5, 2.0, -0.2])
    np.testing.assert_array_equal(merge.trim(tau, 0.4), [0, -3.0, 0, 2.0, 0])


@pytest.fixture(scope="module")
def runs(finished_tiny_run, tmp_path_factory):
    """The tiny run as base and two 'fine-tunes' of it (the base's weights plus noise), as run folders."""
    config = restore.load_config(str(finished_tiny_run))
    _, variables = restore.load_variables(config, str(finished_tiny_run))
    folders = []
    for seed in (1, 2):
        keys = iter(jax.random.split(jax.random.key(seed), 100))
        params = jax.tree.map(lambda x: np.asarray(x) + 0.05 * np.asarray(jax.random.normal(next(keys), x.shape)),
                              variables["params"])
        folder = str(tmp_path_factory.mktemp(f"tuned{seed}"))
        restore.save_variables(config, {**variables, "params": params}, folder)
        folders.append(folder)
    return str(finished_tiny_run), folders


@pytest.mark.slow
def test_the_cli_writes_a_run_folder_of_the_merged_weights(runs, tmp_path):
    base, (a, b) = runs
    subprocess.run([sys.executable, "-m", "experiments.posttrain.merge", f"--base={base}", f"--runs={a},{b}", "--method=ties",
                    "--density=0.5", "--scale=0.7", f"--workdir={tmp_path}"], check=True, capture_output=True)
    load = lambda d: restore.load_variables(restore.load_config(d), d)[1]["params"]  # noqa: E731
    merged, expected = load(str(tmp_path)), jax.tree.map(lambda x, y, z: merge.ties(np.asarray(x), [np.asarray(y), np.asarray(z)],
                                                                                       0.7, 0.5), load(base), load(a), load(b))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), merged, expected)
    # One fine-tune at scale 1 is that fine-tune; slerp at t = 0 is its first run.
    merge.merge_runs(base, [a], str(tmp_path / "one"), "task_arithmetic", scale=1.0)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), load(str(tmp_path / "one")), load(a))
    merge.merge_runs(base, [a, b], str(tmp_path / "slerp"), "slerp", t=0.0)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), load(str(tmp_path / "slerp")), load(a))


@pytest.mark.parametrize("method,run_count,message", [("average", 2, "is not one of"),
                                                      ("slerp", 1, "interpolates two runs"),
                                                      ("ties", 0, "--runs is empty")])
def test_bad_merges_are_one_line_errors(runs, tmp_path, method, run_count, message):
    base, folders = runs
    with pytest.raises(ConfigError, match=message):
        merge.merge_runs(base, folders[:run_count], str(tmp_path), method)


def test_runs_of_another_model_are_refused():
    base = {"w": np.zeros((2, 3))}
    with pytest.raises(ConfigError, match="does not share the base's parameters"):
        merge.merge_params("task_arithmetic", base, [{"w": np.zeros((3, 3))}])
