"""Faults a long run meets, in process: a damaged latest checkpoint, a failed save, a torn metrics line,
a NaN that a rollback survives, and a resume with another config or other data."""

import errno
import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import data as datasets
from data import pipeline
from experiments import losses, restore
from experiments.training import checkpointing, metrics_writer, run_record, trainer, validation
from tests.conftest import make_tiny_config, slow


def _run(config, workdir):
    return trainer.train_and_evaluate(config, str(workdir), verbose=False)


def _by_step(workdir, split="train"):
    return {e["step"]: e for e in metrics_writer.read(str(workdir), split)}


@pytest.fixture
def finished_run(finished_tiny_run):
    """The tiny config trained to step 6, checkpoints at 3 and 6 (conftest.py): every test copies it."""
    return finished_tiny_run


def _copy(finished_run, tmp_path):
    shutil.copytree(finished_run, tmp_path / "run")
    return tmp_path / "run"


def _largest_file(step_dir):
    files = [os.path.join(r, n) for r, _, ns in os.walk(step_dir) for n in ns if n != checkpointing.MANIFEST]
    return max(files, key=os.path.getsize)


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _flip_a_byte(path):
    content = bytearray(open(path, "rb").read())
    content[len(content) // 2] ^= 0xFF
    open(path, "wb").write(bytes(content))


DAMAGES = {"truncated": _truncate, "deleted": os.remove, "one byte flipped": _flip_a_byte}


def test_a_sealed_step_names_the_file_that_differs_from_its_manifest(tmp_path):
    """The manifest lists every file of the step but itself, with its size and CRC-32; each damage to each file is
    named, the byte flip included (the one damage a reader may not notice)."""
    contents = {"_CHECKPOINT_METADATA": b'{"step": 6}', "state/array_0.bin": bytes(range(256)) * 3,
                "data/process_0-of-1.json": b'{"index": 12}'}
    sealed = tmp_path / "sealed"
    for name, content in contents.items():
        os.makedirs(os.path.dirname(sealed / name), exist_ok=True)
        (sealed / name).write_bytes(content)
    checkpointing.seal(str(sealed))
    assert checkpointing.damage(str(sealed)) is None
    with open(sealed / checkpointing.MANIFEST) as f:
        assert sorted(json.load(f)["files"]) == sorted(contents)
    expected = {"truncated": "{} has {} bytes, the manifest {}", "deleted": "{} is missing",
                "one byte flipped": "{} fails its CRC-32"}
    for name, content in contents.items():
        for damage, message in expected.items():
            case = tmp_path / "case"
            shutil.rmtree(case, ignore_errors=True)
            shutil.copytree(sealed, case)
            DAMAGES[damage](str(case / name))
            assert checkpointing.damage(str(case)) == message.format(name, len(content) // 2, len(content))


@pytest.mark.parametrize("damage", ["truncated", pytest.param("deleted", marks=pytest.mark.slow),
                                    pytest.param("one byte flipped", marks=pytest.mark.slow)])
def test_a_damaged_latest_checkpoint_resumes_from_the_previous_step(finished_run, tmp_path, capsys, damage):
    workdir = _copy(finished_run, tmp_path)
    DAMAGES[damage](_largest_file(workdir / "checkpoints" / "6"))
    with open(workdir / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "split": "tra')  # a writer killed mid-line
    result = _run(make_tiny_config(steps=6), workdir)

    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "checkpoint step 6" in warnings[0] and "damaged" in warnings[0], warnings
    assert result["step"] == 6
    assert sorted(os.listdir(workdir / "damaged_checkpoints")) == ["6"]
    assert restore.checkpoint_steps(str(workdir)) == [3, 6]  # step 6 written again
    assert open(workdir / "metrics.jsonl").read().endswith("\n")
    events = metrics_writer.read(str(workdir))
    assert all(e["step"] <= 6 for e in events)
    straight, resumed = _by_step(finished_run), _by_step(workdir)
    for step in (4, 5, 6):  # retrained from step 3: exactly the uninterrupted run's losses
        assert resumed[step]["loss"] == straight[step]["loss"], step


def test_every_checkpoint_damaged_is_one_error_naming_the_workdir(finished_run, tmp_path):
    workdir = _copy(finished_run, tmp_path)
    for step in ("3", "6"):
        os.remove(_largest_file(workdir / "checkpoints" / step))
    with pytest.raises(checkpointing.NoGoodCheckpointError, match="no checkpoint in .*/run/checkpoints restores") as e:
        _run(make_tiny_config(steps=6), workdir)
    assert "\n" not in str(e.value)


def test_an_intact_checkpoint_that_no_longer_fits_the_state_stops_the_run_and_moves_nothing(finished_run, tmp_path,
                                                                                         monkeypatch):
    """A code change that reshapes the state (a new model-state collection, say) is not damage: quarantining every
    intact step, as a damaged one is, would leave the run with nothing to resume after an upgrade."""
    workdir = _copy(finished_run, tmp_path)

    def mismatch(*args, **kwargs):
        raise ValueError("User-provided restore item and on-disk value metadata tree structures do not match")

    monkeypatch.setattr(checkpointing, "_restore_step", mismatch)
    with pytest.raises(checkpointing.IncompatibleCheckpointError, match="checkpoint step 6 in .* is intact") as e:
        _run(make_tiny_config(steps=6), workdir)
    assert "\n" not in str(e.value) and "tree structures do not match" in str(e.value)
    assert restore.checkpoint_steps(str(workdir)) == [3, 6] and not (workdir / "damaged_checkpoints").exists()


def _disk_full_after_step_6(monkeypatch):
    real_save = ocp.CheckpointManager.save

    def save(self, step, *args, **kwargs):
        if step > 6:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)


def _little_free_space(monkeypatch):
    monkeypatch.setattr(checkpointing.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 1000))


@pytest.mark.parametrize("fault, cause", [(_disk_full_after_step_6, "No space left on device"),
                                          slow(_little_free_space, "1000 bytes free, the state needs")])
def test_a_failed_save_stops_with_one_line_and_keeps_the_previous_step(finished_run, tmp_path, monkeypatch,
                                                                       fault, cause):
    workdir = _copy(finished_run, tmp_path)
    fault(monkeypatch)
    with pytest.raises(checkpointing.CheckpointWriteError) as e:
        _run(make_tiny_config(steps=9), workdir)
    message = str(e.value)
    assert "\n" not in message
    assert "could not write checkpoint step 9" in message and cause in message
    assert "the latest good checkpoint is step 6" in message
    monkeypatch.undo()
    assert restore.checkpoint_steps(str(workdir)) == [3, 6]
    assert _run(make_tiny_config(steps=9), workdir)["step"] == 9  # space freed: it resumes from step 6


@pytest.mark.slow
def test_nan_rollback_restores_the_last_checkpoint_and_skips_the_batches_that_diverged(tmp_path, monkeypatch):
    """Batch 4 (step 5) poisons the loss; with checkpoints every 2 steps the run goes back to step 4 and trains
    step 5 on batch 5. Checked against the step computed by hand from the step-4 checkpoint and batch 5."""
    config = make_tiny_config(steps=6)
    config.train.update(checkpoint_every=2, keep_checkpoints=10, nan_rollbacks=1)
    splits = datasets.load(config.data, seed=config.seed)
    batches = pipeline.batched(splits.train, batch_size=config.data.batch_size, seed=config.seed)
    poisoned = np.asarray(batches[4]["inputs"])
    real_step = trainer.train_step

    def train_step_with_a_poisoned_batch(state, batch, *args, **kwargs):
        new_state, metrics = real_step(state, batch, *args, **kwargs)
        bad = jax.numpy.all(batch["inputs"] == poisoned)
        for key in ("loss", "objective"):  # the check reads `objective`, what the step minimised
            metrics[key] = jax.numpy.where(bad, jax.numpy.nan, metrics[key])
        return new_state, metrics

    monkeypatch.setattr(trainer, "train_step", train_step_with_a_poisoned_batch)
    result = _run(config, tmp_path)
    assert result["step"] == 6 and np.isfinite(result["train"]["loss"])
    rollbacks = metrics_writer.read(str(tmp_path), "rollback")
    assert [(e["step"], e["bad_step"], e["skipped_batches"]) for e in rollbacks] == [(4, 5, 1.0)]

    # Step 5 after the rollback = one step from the step-4 checkpoint on batch 5 (not the poisoned batch 4).
    model, variables = restore.load_variables(restore.load_config(str(tmp_path)), str(tmp_path), step=4)
    batch5 = {k: np.asarray(v) for k, v in batches[5].items()}
    logits = model.apply(variables, batch5["inputs"])
    expected, _ = losses.masked_mean(logits, batch5["targets"], batch5["loss_mask"])
    np.testing.assert_allclose(_by_step(tmp_path)[5]["loss"], float(expected), rtol=1e-5)


@pytest.mark.slow
def test_nan_rollbacks_give_up_after_k_with_the_clear_error(tmp_path, capsys):
    config = make_tiny_config(steps=20)
    config.train.update(checkpoint_every=2, nan_rollbacks=2)
    config.optimizer.update(lr=1e30, warmup_steps=4)  # diverges whatever the batches
    with pytest.raises(trainer.NonFiniteLossError, match=r"after 2 rollbacks; stopping"):
        _run(config, tmp_path)
    assert len(metrics_writer.read(str(tmp_path), "rollback")) == 2
    assert capsys.readouterr().err.count("rolled back to step") == 2


@pytest.mark.parametrize("key, value, named", [
    ("model.d_model", 64, "model.d_model 32 -> 64"),
    ("optimizer.lr", 1e-3, "optimizer.lr 0.003 -> 0.001"),
    ("data.train_fraction", 0.6, "data.train_fraction 0.5 -> 0.6"),
])
def test_resuming_with_another_config_is_refused_in_one_line(finished_run, tmp_path, key, value, named):
    workdir = _copy(finished_run, tmp_path)
    config = make_tiny_config(steps=9)
    section, name = key.split(".")
    config[section][name] = value
    with pytest.raises(validation.ConfigError, match="was trained with another config") as e:
        _run(config, workdir)
    assert named in str(e.value) and "\n" not in str(e.value)
    assert restore.checkpoint_steps(str(workdir)) == [3, 6]  # nothing touched


def test_resuming_on_a_changed_text_file_is_refused(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("to be or not to be, that is the question. " * 40)
    config = datasets.TextConfig(path=str(corpus), seq_len=8)
    before = datasets.identity(config, datasets.load(config, seed=0))
    corpus.write_text("to be or not to be, that is the question! " * 40)  # same size, one character changed
    after = datasets.identity(config, datasets.load(config, seed=0))
    assert before["file_bytes"] == after["file_bytes"]
    workdir = tmp_path / "run"
    os.makedirs(workdir / "checkpoints" / "3")
    run_record.record(str(workdir), {"seed": 0}, before)
    run_record.check_resumable(str(workdir), {"seed": 0}, before)  # the same data: fine
    with pytest.raises(validation.ConfigError, match=f"trained on other data: the text file {corpus} .sha256"):
        run_record.check_resumable(str(workdir), {"seed": 0}, after)


def test_step_counts_intervals_and_mesh_may_change_on_resume():
    saved = make_tiny_config().to_dict()
    changed = make_tiny_config(steps=100)
    changed.train.update(log_every=10, eval_every=50, checkpoint_every=20, nan_rollbacks=3)
    changed.mesh.update(data=2, tensor=4)
    changed.data.eval_batch_size = 64
    assert run_record.config_changes(saved, changed.to_dict()) == []
    changed.seed = 1
    assert run_record.config_changes(saved, changed.to_dict()) == ["seed 0 -> 1"]


def test_a_key_newer_than_the_run_resumes_at_its_default_only():
    saved = make_tiny_config().to_dict()
    del saved["train"]["monitors"], saved["model"]["bitnet"]  # as written before these keys existed
    current, schema = make_tiny_config(), validation.defaults(make_tiny_config())
    assert run_record.config_changes(saved, current.to_dict(), schema) == []
    current.model.bitnet = True
    assert run_record.config_changes(saved, current.to_dict(), schema) == ["model.bitnet '(absent)' -> True"]
