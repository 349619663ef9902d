"""Scaling-law fits against published numbers and synthetic laws; the IsoFLOP sweep driver; Grokfast."""

import csv
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.optim import grokfast
from experiments.studies import scaling, scaling_fits
from experiments.training import metrics_writer
from tests.conftest import make_tiny_lm_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHINCHILLA = os.path.join(REPO, "data", "files", "chinchilla_svg_extracted_data.csv")


@pytest.mark.slow  # ~40 s: 4,500 L-BFGS starts screened, where running, not compiling, dominates: XLA's optimisations on
def test_fit_command_reproduces_besiroglu_et_al_on_the_chinchilla_data():
    out = subprocess.run([sys.executable, "-m", "experiments.studies.scaling", f"--fit={CHINCHILLA}"], cwd=REPO,
                         capture_output=True, text=True, timeout=900,
                         env={**os.environ, "JAX_PLATFORMS": "cpu", "JAX_DISABLE_MOST_OPTIMIZATIONS": "0"})
    assert out.returncode == 0, out.stderr[-2000:]
    fit = json.loads(out.stdout.strip().splitlines()[-1])
    assert fit["points"] == 240
    assert fit["E"] == pytest.approx(1.8172, rel=0.01)
    assert fit["alpha"] == pytest.approx(0.3478, rel=0.02) and fit["beta"] == pytest.approx(0.3658, rel=0.02)
    assert fit["A"] == pytest.approx(482.01, rel=0.10) and fit["B"] == pytest.approx(2085.43, rel=0.10)


@pytest.mark.slow  # a subprocess; by default the in-process fits
def test_fit_command_names_a_missing_file():
    out = subprocess.run([sys.executable, "-m", "experiments.studies.scaling", "--fit=no/such.csv"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "no/such.csv" in out.stderr.strip().splitlines()[-1]


def _law(n, d, e=1.7, a=400.0, b=2000.0, alpha=0.34, beta=0.37):
    return e + a / n**alpha + b / d**beta


@pytest.mark.slow
def test_approach3_recovers_a_noise_free_law_with_bootstrap_intervals():
    rng = np.random.default_rng(0)
    n = 10 ** rng.uniform(7, 10, 60)
    d = 10 ** rng.uniform(9, 12, 60)
    grid = dict(a=np.array([5.0]), b=np.array([5.0, 10.0]), e=np.array([0.0, 0.5]), alpha=np.array([0.5]),
                beta=np.array([0.5]))
    fit = scaling_fits.fit_approach3(n, d, _law(n, d), grid=grid, steps=400, bootstrap=8)
    for key, true in dict(E=1.7, A=400.0, B=2000.0, alpha=0.34, beta=0.37).items():
        assert fit[key] == pytest.approx(true, rel=0.02), key
        low, high = fit["intervals"][key]
        assert low <= fit[key] * 1.02 and high >= fit[key] * 0.98


def test_approach2_finds_the_compute_optimal_exponent_of_a_known_law():
    alpha, beta = 0.34, 0.37
    sizes, flops, losses = [], [], []
    for budget in (1e18, 1e19, 1e20, 1e21):
        for n in np.geomspace(1e7, 1e11, 25):
            sizes.append(n)
            flops.append(budget)
            losses.append(_law(n, budget / (6 * n), alpha=alpha, beta=beta))
    fit = scaling_fits.fit_approach2(np.array(sizes), np.array(flops), np.array(losses))
    # L(N, C/6N) is minimised at N_opt ~ C^(beta / (alpha + beta))
    assert fit["n_opt_exponent"] == pytest.approx(beta / (alpha + beta), abs=0.03)
    assert fit["d_opt_exponent"] == pytest.approx(alpha / (alpha + beta), abs=0.03)
    # Sizes all above the optimum (loss rising with N on every curve): no valley to fit.
    large = np.array(sizes) > 1e10
    with pytest.raises(ValueError, match="interior minimum"):
        scaling_fits.fit_approach2(np.array(sizes)[large], np.array(flops)[large], np.array(losses)[large])


@pytest.mark.slow
def test_sweep_runs_each_point_once_and_writes_the_csv(tmp_path):
    base = make_tiny_lm_config()
    base.model.update(vocab_size=0, max_len=0)
    sizes, budgets = ["32x1", "64x1"], [2e8]
    rows = scaling.sweep(base, sizes, budgets, str(tmp_path))
    assert [r["size"] for r in rows] == sizes
    for row in rows:
        assert row["tokens"] == pytest.approx(2e8 / (6 * row["Model Size"]))
        assert row["steps"] == max(1, round(row["tokens"] / (16 * 16))) and np.isfinite(row["loss"])
    assert rows[0]["Model Size"] < rows[1]["Model Size"] and rows[0]["steps"] > rows[1]["steps"]
    logged = {s: len(metrics_writer.read(str(tmp_path / f"{s}_2e+08"))) for s in sizes}
    again = scaling.sweep(base, sizes, budgets, str(tmp_path))
    assert again == rows and logged == {s: len(metrics_writer.read(str(tmp_path / f"{s}_2e+08"))) for s in sizes}
    with open(tmp_path / "results.csv") as f:
        assert [r["size"] for r in csv.DictReader(f)] == sizes
    # A later sweep at another budget adds its points; the earlier ones stay, in size-then-budget order.
    scaling.sweep(base, ["32x1"], [1e8], str(tmp_path))
    with open(tmp_path / "results.csv") as f:
        assert [(r["size"], float(r["Training FLOP"])) for r in csv.DictReader(f)] == [
            ("32x1", 1e8), ("32x1", 2e8), ("64x1", 2e8)]
    with pytest.raises(ValueError, match="WIDTHxLAYERS"):
        scaling.parse_size("wide")


def test_moe_counts_active_parameters():
    """N for a mixture of experts is what a token uses: the dense parts, and top_k of the routed
    experts (SwiGLU, 3 x d_model x d_expert each), counted by hand here."""
    from experiments.configs import moe_lm

    config, n, _ = scaling.run_config(moe_lm.get_config(), "64x2", 1e12)
    m = config.model.copy_and_resolve_references()
    m.update(vocab_size=256, max_len=config.data.seq_len)
    d, layers, experts, top_k = 64, 2, m.num_experts, m.top_k
    assert m.d_expert == d
    attention = 4 * d * d
    routed = experts * 3 * d * d
    shared = 3 * d * d * m.num_shared_experts
    router = d * experts
    norms = 2 * 2 * d  # two layernorms per block (scale, bias)
    dense_params = layers * (attention + shared + router + norms) + 2 * d  # + the final layernorm
    assert scaling.non_embedding_params(m) == dense_params + layers * routed * top_k // experts
    assert n == dense_params + layers * routed * top_k // experts


def test_grokfast_amplifies_the_exponential_moving_average_of_the_gradients():
    alpha, lamb = 0.9, 2.0
    tx = grokfast.grokfast_ema(alpha, lamb)
    params = {"w": jnp.zeros(3)}
    state = tx.init(params)
    ema = None
    for g in np.random.default_rng(0).normal(size=(5, 3)):
        ema = g if ema is None else alpha * ema + (1 - alpha) * g
        out, state = tx.update({"w": jnp.asarray(g)}, state, params)
        np.testing.assert_allclose(out["w"], g + lamb * ema, rtol=1e-6)
    assert jax.tree.structure(out) == jax.tree.structure(params)
