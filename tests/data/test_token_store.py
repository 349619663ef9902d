"""`data.name="tokens"`: prepared stores read lazily, held-out documents, per-process shares, concat-then-split
packing with segment ids, training and exact resumption, mixtures of stores, one-line errors."""

import collections
import dataclasses
import json
import re

import jax
import numpy as np
import pytest

from data import TokensConfig, prepare, token_store
from experiments.configs import base
from experiments.training import metrics_writer, trainer
from tests.conftest import assert_mesh_run_matches_one_device, make_tiny_lm_config, slow


def _write_corpus(path, seed, n, marker):
    """n documents of awkward lengths (1 to 90 bytes; one-byte documents have no target), each starting with
    `marker` so that a mixture's rows can be traced to their store."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n):
            length = int(rng.choice([0, 1, 2, 15, 16, 17, 40, 89]))
            f.write(json.dumps({"text": marker + "".join(rng.choice(list("abcdefgh \n"), size=length))}) + "\n")


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("token_stores")
    made = {}
    for name, seed, marker in (("alpha", 0, "A"), ("beta", 1, "B")):
        _write_corpus(root / f"{name}.jsonl", seed, 120, marker)
        prepare.prepare([str(root / f"{name}.jsonl")], str(root / name), documents_per_shard=32)
        made[name] = str(root / name)
    return made


def _config(**overrides):
    return dataclasses.replace(TokensConfig(), **{"seq_len": 16, "eval_fraction": 0.2, "eval_tokens": 300, **overrides})


def _bigrams(pairs):
    return collections.Counter(zip(*pairs))


def test_streams_share_the_kept_documents_and_never_see_the_held_out_ones(stores):
    documents = prepare.read_documents(stores["alpha"])
    held = token_store.held_out(np.arange(len(documents)), 0.2)
    assert 0 < held.sum() < len(documents)
    seen = []
    for stream in range(2):
        expected = [tuple(d) for i, d in enumerate(documents) if not held[i] and i % 2 == stream and len(d) > 1]
        documents_read = iter(token_store._train_documents(stores["alpha"], 0.2, seed=3, stream=stream, streams=2))
        epoch = [next(documents_read) for _ in expected]  # one epoch: each of this stream's documents once, shuffled
        got = [tuple(np.append(e["inputs"], e["targets"][-1])) for e in epoch]
        assert sorted(got) == sorted(expected) and got != expected
        seen += got
    assert sorted(seen) == sorted(tuple(d) for i, d in enumerate(documents) if not held[i] and len(d) > 1)


@pytest.mark.parametrize("packing", list(token_store.PACKINGS))
def test_packed_rows_hold_each_documents_next_token_pairs_once_with_segments_and_positions(packing):
    rng = np.random.default_rng(0)
    documents = [rng.integers(0, 50, size=n).astype(np.int32) for n in (2, 3, 16, 17, 40, 5, 2, 33)]
    source = [token_store._next_token_pairs(d) for d in documents]
    import grain

    rows = list(token_store._packed(grain.MapDataset.source(source).to_iter_dataset(), 16, packing, bins=3))
    got = collections.Counter()
    for row in rows:
        segment, position, mask = row["segment_ids"], row["positions"], row["loss_mask"]
        np.testing.assert_array_equal(mask, (segment > 0).astype(np.float32))
        assert np.all(np.diff(segment[segment > 0]) >= 0) and np.all(segment[np.argmax(segment == 0):] == 0 if
                                                                     (segment == 0).any() else True)
        starts = np.flatnonzero(np.diff(np.concatenate([[0], segment])) != 0)
        for start in starts:  # positions count from 0 within each piece
            length = np.sum(segment == segment[start])
            if segment[start]:
                np.testing.assert_array_equal(position[start:start + length], np.arange(length))
        got += _bigrams((row["inputs"][mask > 0], row["targets"][mask > 0]))
    expected = sum((_bigrams((d[:-1], d[1:])) for d in documents), collections.Counter())
    assert got == expected


def _lm_config(stores_value, steps=4, **data):
    config = make_tiny_lm_config(steps)
    with config.unlocked():
        config.data = base.get_config("transformer", "tokens").data
    config.data.update(stores=stores_value, seq_len=16, batch_size=16, eval_batch_size=16, eval_fraction=0.2,
                       eval_tokens=300, **data)
    config.model.max_len = 0
    config.train.update(eval_every=2, checkpoint_every=2)
    return config


@pytest.mark.parametrize("packing", ["first_fit", slow("concat_then_split")])
def test_fixed_streams_give_the_same_global_batches_on_one_two_and_four_processes(stores, packing):
    """data.streams=4: the union of the processes' slices of each global batch is the same rows whatever the number
    of processes, each process reading only its streams' documents."""
    config = _config(stores=stores["alpha"], streams=4, packing=packing)

    def global_batches(processes):
        slices = [iter(token_store.train_batches(config, batch_size=8, seed=5, process_index=p, process_count=processes))
                  for p in range(processes)]
        batches = []
        for _ in range(6):
            parts = [next(s) for s in slices]
            assert all(len(part["inputs"]) == 8 // processes for part in parts)
            rows = np.concatenate([np.concatenate([part[k] for k in ("inputs", "targets", "segment_ids", "positions")],
                                                  axis=1) for part in parts])
            batches.append(sorted(map(tuple, rows)))
        return batches

    one = global_batches(1)
    assert global_batches(2) == one and global_batches(4) == one
    assert len({tuple(map(tuple, b)) for b in one}) == len(one)  # the batches differ from each other
    with pytest.raises(ValueError, match="data.streams=4 gives 4 streams, which must be a multiple of the 3 processes"):
        token_store.train_batches(config, batch_size=12, seed=5, process_index=0, process_count=3)


@pytest.mark.parametrize("packing", ["concat_then_split", slow("first_fit"), slow("best_fit")])
def test_training_on_a_store_resumes_exactly(stores, tmp_path, packing):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    trainer.train_and_evaluate(_lm_config(stores["alpha"], steps=4, packing=packing), str(straight), verbose=False)
    trainer.train_and_evaluate(_lm_config(stores["alpha"], steps=2, packing=packing), str(resumed), verbose=False)
    trainer.train_and_evaluate(_lm_config(stores["alpha"], steps=4, packing=packing), str(resumed), verbose=False)
    for split in ("train", "eval"):
        a = {e["step"]: e["loss"] for e in metrics_writer.read(str(straight), split)}
        b = {e["step"]: e["loss"] for e in metrics_writer.read(str(resumed), split)}
        assert a == b and max(a) == 4, split
    padding = [e["padding_fraction"] for e in metrics_writer.read(str(straight), "train")]
    assert padding and all(0 <= p < 1 for p in padding), padding  # logged each step (0 when nothing is padded)
    assert json.load(open(straight / "data.json"))["stores"] == {
        stores["alpha"]: [s["sha256"] for s in token_store.read_manifest(stores["alpha"])["shards"]]}


@pytest.mark.slow  # two compiles of the step
def test_training_on_a_store_gives_the_same_losses_on_one_device_and_a_2x2x2_mesh(stores, tmp_path):
    assert_mesh_run_matches_one_device(lambda: _lm_config(stores["alpha"]), tmp_path)


def test_a_mixture_draws_from_each_store_by_weight_and_evaluates_each(stores, tmp_path):
    config = _lm_config(f"{stores['alpha']},{stores['beta']}", weights="3,1")
    rows = next(iter(token_store.train_batches(config.data, batch_size=256, seed=0)))
    firsts = rows["inputs"][rows["positions"] == 0]  # the first token of each document piece: its store's marker
    alpha, beta = np.sum(firsts == ord("A")), np.sum(firsts == ord("B"))
    assert alpha > 2 * beta > 0, (alpha, beta)
    result = trainer.train_and_evaluate(config, str(tmp_path / "run"), devices=jax.devices()[:1], verbose=False)
    assert result["step"] == 4
    assert {e["split"] for e in metrics_writer.read(str(tmp_path / "run"))} == {"train", "alpha", "beta"}


@pytest.mark.parametrize("overrides,message", [
    (dict(stores=""), "data.stores is empty"),
    (dict(stores="no/such/store"), "holds no manifest.json; prepare it with"),
    (dict(weights="1,2"), "data.weights='1,2' must be 1 positive numbers"),
    (dict(weights="x"), "data.weights='x' must be comma-separated numbers"),
])
def test_bad_token_configs_are_one_line(stores, overrides, message):
    found = token_store.validate(_config(**{"stores": stores["alpha"], **overrides}))
    assert len(found) == 1 and message in found[0], found


@pytest.mark.parametrize("model,message", [
    (dict(mtp_depth=1), "model.mtp_depth=1 reads tokens across a packed row's document boundaries"),
    (dict(name="ssd", ssd_impl="pallas"), "model.ssd_impl='pallas' takes decays as differences of prefix sums"),
    (dict(name="mor", kv_sharing="share", attention_pattern="sliding", attention_window=4),
     "model.kv_sharing='share' with model.attention_pattern='sliding' keeps the shared keys in a ring"),
])
def test_families_that_cannot_read_packed_rows_are_refused_in_one_line(stores, model, message):
    from experiments.configs import base as configs
    from experiments.training import validation
    config = _lm_config(stores["alpha"])
    if "name" in model:
        configs.switch_family(config, model["name"])
    config.model.update({k: v for k, v in model.items() if k != "name"})
    with pytest.raises(validation.ConfigError, match=re.escape(message)):
        validation.validate(config, num_devices=1)


def test_streams_that_the_processes_cannot_share_are_refused_in_one_line(stores):
    from experiments.training import validation
    config = _lm_config(stores["alpha"], streams=4)
    config.data.update(batch_size=24, eval_batch_size=24)  # divisible by the batch shards of both meshes below
    validation.validate(config, num_devices=8, process_count=2)  # 2 streams per process
    with pytest.raises(validation.ConfigError, match=re.escape("data.streams=4 must be a multiple of the 3 processes")):
        validation.validate(config, num_devices=6, process_count=3)


def test_the_command_line_switches_an_lm_config_to_the_stores(stores, capsys):
    from experiments.configs import lm_shakespeare
    from experiments.training import cli

    shakespeare = lm_shakespeare.get_config()
    config = cli.switch_sections(lm_shakespeare.get_config(), ["data.name=tokens", f"data.stores={stores['alpha']}",
                                                               "data.eval_fraction=0.2"])
    assert (config.data.name, config.data.stores, config.data.eval_fraction) == ("tokens", stores["alpha"], 0.2)
    assert (config.data.seq_len, config.data.batch_size) == (shakespeare.data.seq_len, shakespeare.data.batch_size)
    assert "path" not in config.data and config.model == shakespeare.model
    with pytest.raises(SystemExit):
        cli.switch_sections(lm_shakespeare.get_config(), ["data.name=tokens", "data.path=x.txt"])
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --config.data.path=x.txt: data.name='tokens' has no key 'path' (its keys: batch_size, eval_batch_size, "
        "eval_fraction, eval_tokens, name, packing, seq_len, stores, streams, weights, workers)"]
