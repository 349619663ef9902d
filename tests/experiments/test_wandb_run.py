"""Weights & Biases logging (experiments/training/wandb_run.py) in offline mode: a run and its resumption log into one
W&B run id, with the resolved config and every train event of metrics.jsonl; without wandb installed the key is
refused in one line. The offline run files are read back with a reader of their record log written here (LevelDB's
log format of W&B protobuf records; the wandb package no longer ships one)."""

import glob
import json
import os
import struct

import jax
import pytest

from data.config_fields import ConfigError
from experiments.training import metrics_writer, trainer, wandb_run
from tests.conftest import make_tiny_lm_config

BLOCK, HEADER = 32768, 7  # the log's block size and a record's header: CRC-32C (4), length (2, little-endian), kind (1)


def records(path: str):
    """The protobuf records of one offline `.wandb` file, whole records reassembled from their fragments."""
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B", f"{path} is not a W&B record log"
    position, pending = HEADER, b""
    while position + HEADER <= len(data):
        if BLOCK - position % BLOCK < HEADER:  # a block's tail too short for a header is padding
            position += BLOCK - position % BLOCK
            continue
        length, kind = struct.unpack("<HB", data[position + 4:position + HEADER])
        pending += data[position + HEADER:position + HEADER + length]
        position += HEADER + length
        if kind in (1, 4):  # a full record, or the last fragment of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def history_and_runs(workdir: str):
    rows, runs = [], []
    for path in sorted(glob.glob(os.path.join(workdir, "wandb", "offline-run-*", "run-*.wandb"))):
        for record in records(path):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
            elif kind == "run":
                runs.append(record.run)
    return rows, runs


@pytest.mark.slow
def test_a_run_and_its_resumption_log_their_events_and_config_to_one_wandb_run(tmp_path):
    pytest.importorskip("wandb", reason="the wandb extra: pip install -e '.[wandb]'")
    workdir = str(tmp_path / "run")
    for steps in (2, 4):  # a run, then its resumption to step 4
        config = make_tiny_lm_config(steps=steps)
        config.train.update(log_every=1, checkpoint_every=2)
        config.train.wandb.update(project="beyond-tests", mode="offline", tags="a,b")
        trainer.train_and_evaluate(config, workdir, devices=jax.devices()[:1], verbose=False)

    with open(os.path.join(workdir, wandb_run.ID_FILE)) as f:
        run_id = json.load(f)["id"]
    rows, runs = history_and_runs(workdir)
    assert [r.run_id for r in runs] == [run_id, run_id]  # the resumption reopened the same run
    assert {r.display_name for r in runs} == {"run"} and list(runs[0].tags) == ["a", "b"]
    logged_config = {i.key: json.loads(i.value_json) for i in runs[1].config.update}
    with open(os.path.join(workdir, "config.json")) as f:
        assert logged_config["model"] == json.load(f)["model"]
    assert logged_config["data_identity"]["file_sha256"] and logged_config["workdir"] == os.path.abspath(workdir)

    train = {r["step"]: r for r in rows if "train/loss" in r}
    expected = metrics_writer.read(workdir, "train")
    assert sorted(train) == [e["step"] for e in expected] == [1, 2, 3, 4]
    for event in expected:
        for key in ("loss", "accuracy", "tokens_per_s", "mfu"):
            assert train[event["step"]][f"train/{key}"] == pytest.approx(event[key], rel=1e-12)
    assert any("eval/loss" in r for r in rows)


def test_wandb_logging_without_wandb_installed_is_one_line(tmp_path, monkeypatch):
    real_find_spec = wandb_run.importlib.util.find_spec
    monkeypatch.setattr(wandb_run.importlib.util, "find_spec", lambda n: None if n == "wandb" else real_find_spec(n))
    config = make_tiny_lm_config(steps=2)
    config.train.wandb.project = "beyond-tests"
    with pytest.raises(ConfigError, match=r"train.wandb.project='beyond-tests' needs wandb: pip install -e '.\[wandb\]'"):
        trainer.train_and_evaluate(config, str(tmp_path), verbose=False)
