"""Sparse autoencoders through the one trainer and inside their model (experiments/analysis/sae_eval.py): loss recovered is
1 for the identity reconstruction and 0 for the zero one, the metrics equal a NumPy recount, a missing store is a
one-line error, and an SAE trains on an activation store with its dead-latent state kept by the trainer."""

import numpy as np
import pytest

import data as datasets
from data import activation_rows
from data.config_fields import ConfigError
from experiments import restore
from experiments.analysis import activation_store, activations, sae_dashboard, sae_eval
from experiments.training import metrics_writer, trainer, validation
from experiments.configs import sae as sae_config
from models import sae
from tests.conftest import slow


@pytest.fixture(scope="module")
def tiny_lm(finished_tiny_run):
    config = restore.load_config(str(finished_tiny_run))
    model, variables = restore.load_variables(config, str(finished_tiny_run))
    return model, variables, datasets.load(config.data, seed=config.seed).evals["eval"]


@pytest.mark.parametrize("position", [None, slow(-1)])
def test_loss_recovered_is_one_for_the_identity_and_zero_for_zeros(tiny_lm, position):
    model, variables, examples = tiny_lm
    evaluate = lambda reconstruct: sae_eval.evaluate(model, variables, examples, 0, "ffn_out", reconstruct,  # noqa: E731
                                                     position, batch_size=32, batches=2)
    identity = evaluate(lambda x: (x, x))
    assert identity["loss_recovered"] == pytest.approx(1.0, abs=1e-5)
    assert identity["loss_spliced"] == pytest.approx(identity["loss_clean"], rel=1e-6)
    assert identity["normalised_mse"] == pytest.approx(0.0, abs=1e-6) and identity["l0"] == pytest.approx(32.0)
    zeros = evaluate(lambda x: (0 * x, 0 * x))
    assert zeros["loss_recovered"] == pytest.approx(0.0, abs=1e-5) and zeros["dead_fraction"] == 1.0
    assert zeros["loss_zero_ablated"] != pytest.approx(zeros["loss_clean"], rel=1e-3)  # the site matters


def test_summarised_metrics_equal_a_numpy_recount():
    rng = np.random.default_rng(0)
    x, x_hat = rng.normal(size=(40, 6)), rng.normal(size=(40, 6))
    f = rng.normal(size=(40, 10)) * (rng.random((40, 10)) < np.linspace(0, 0.3, 10))
    sums = lambda loss: {"loss": loss, "correct": loss / 4, "count": 4.0}  # noqa: E731
    totals = {"clean": sums(4.0), "sae": sums(6.0), "zero": sums(12.0), "squared_error": np.sum((x - x_hat) ** 2),
              "row_sum": x.sum(0), "row_square_sum": np.sum(x**2), "rows": 40, "active": np.sum(f != 0),
              "fired": np.sum(f != 0, axis=0)}
    got = sae_eval.summarise(totals)
    frequency = np.mean(f != 0, axis=0)
    assert got["loss_recovered"] == pytest.approx((3.0 - 1.5) / (3.0 - 1.0)) and got["accuracy_spliced"] == 6 / 16
    assert got["normalised_mse"] == pytest.approx(np.sum((x - x_hat) ** 2) / np.sum((x - x.mean(0)) ** 2))
    assert got["l0"] == pytest.approx(np.mean(np.sum(f != 0, axis=1)))
    assert got["dead_fraction"] == np.mean(frequency == 0) and got["dense_fraction"] == np.mean(frequency > 0.1)


def test_a_missing_store_is_a_one_line_error(tmp_path):
    config = sae_config.get_config("relu")
    config.data.store = str(tmp_path / "nothing")
    with pytest.raises(ConfigError, match=r"data.store=.*nothing' is not an activation store"):
        validation.validate(config, 8)
    with pytest.raises(ValueError, match="is not one of"):
        sae_config.get_config("gated")


@pytest.mark.slow  # a store captured, an SAE trained on 8 devices and evaluated in its model
def test_an_sae_trains_through_the_trainer_on_a_store(finished_tiny_run, tmp_path):
    store = str(tmp_path / "store")
    activation_store.write(str(finished_tiny_run), store, "mlp_hidden", 0, "train", batches=4, batch_size=16)
    config = sae_config.get_config("topk")
    config.data.update(store=store, batch_size=64)
    config.model.update(num_latents=128, k=4, dead_after=128)
    config.train.update(steps=40, log_every=10, checkpoint_every=20)
    config.optimizer.update(lr=3e-3, warmup_steps=5)
    config.mesh.update(data=2, fsdp=2, tensor=2)
    workdir = str(tmp_path / "sae")
    trainer.train_and_evaluate(config, workdir, verbose=False)
    train = [e for e in metrics_writer.read(workdir) if e["split"] == "train"]
    assert train[-1]["normalised_mse"] < 0.5 * train[0]["normalised_mse"] and train[-1]["l0"] == 4.0
    assert train[-1]["loss"] == 0.0 and train[-1]["aux_loss"] == pytest.approx(train[-1]["mse"] + train[-1]["penalty"])
    sae_cfg = restore.load_config(workdir)
    model, variables = restore.load_variables(sae_cfg, workdir)
    rows_since = np.asarray(variables["sae_state"]["rows_since_fired"])  # kept and checkpointed by the trainer
    assert np.all(rows_since % 64 == 0) and rows_since.max() <= 40 * 64 and (rows_since == 0).any()
    result = sae_eval.evaluate_run(workdir, split="eval", batches=2, batch_size=16)
    assert result["l0"] == 4.0 and 0 < result["explained_variance"] <= 1 and result["site"] == "mlp_hidden"
    lm_config = restore.load_config(str(finished_tiny_run))
    lm, lm_variables = restore.load_variables(lm_config, str(finished_tiny_run))
    tokens = datasets.load(lm_config.data, seed=lm_config.seed).train["inputs"][:8]
    hidden = activations.capture(lm, lm_variables, tokens)[2][0]["mlp_hidden"]
    assert hidden.shape == (8, 3, 64)  # d_mlp wide, sown from inside the MLP
    # A fresh start sets b_dec at the scaled rows' geometric median (lr 0 at the first warmup step keeps it there).
    config.train.update(steps=1, checkpoint_every=1)
    trainer.train_and_evaluate(config, str(tmp_path / "fresh"), verbose=False)
    fresh_cfg = restore.load_config(str(tmp_path / "fresh"))
    _, fresh = restore.load_variables(fresh_cfg, str(tmp_path / "fresh"))
    rows = activation_rows.read(store)[:sae.MEDIAN_ROWS]
    np.testing.assert_allclose(fresh["params"]["b_dec"], sae.geometric_median(fresh_cfg.model.input_scale * rows),
                               rtol=1e-4, atol=1e-5)
    summaries = sae_dashboard.write_dashboards(workdir, str(tmp_path / "dash"), latents=2, batches=1, batch_size=16)
    assert len(summaries) == 2 and all(0 < s["frequency"] <= 1 for s in summaries)
    for name in ["index.html", *(f"latent_{s['latent']}.{ext}" for s in summaries for ext in ("html", "png"))]:
        assert (tmp_path / "dash" / name).stat().st_size > 0
