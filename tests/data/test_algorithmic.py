"""Algorithmic tasks against a plain Python loop; seeded splits; the grain batch pipeline."""

import chex
import numpy as np
import pytest

from data import algorithmic, pipeline

PYTHON_OPS = {
    "a+b": lambda a, b, p: (a + b) % p,
    "a-b": lambda a, b, p: (a - b) % p,
    "a*b": lambda a, b, p: (a * b) % p,
    "a/b": lambda a, b, p: next(c for c in range(p) if (c * b) % p == a),
    "a^2+b^2": lambda a, b, p: (a * a + b * b) % p,
    "a^2+ab+b^2": lambda a, b, p: (a * a + a * b + b * b) % p,
    "a^2+ab+b^2+a": lambda a, b, p: (a * a + a * b + b * b + a) % p,
    "a^3+ab": lambda a, b, p: (a**3 + a * b) % p,
}


def test_every_operation_has_a_reference():
    assert set(PYTHON_OPS) == set(algorithmic.OPERATIONS)


@pytest.mark.parametrize("op", sorted(PYTHON_OPS))
def test_examples_match_python_loop(op):
    p = 7
    ex = algorithmic.all_examples(p, op)
    pairs = [(a, b) for a in range(p) for b in range(p) if not (op == "a/b" and b == 0)]
    assert len(ex["inputs"]) == len(pairs)
    for (a, b), inputs, targets, mask in zip(pairs, ex["inputs"], ex["targets"], ex["loss_mask"]):
        assert list(inputs) == [a, b, p]  # "a b =" with "=" the token p
        assert targets[2] == PYTHON_OPS[op](a, b, p)
        assert list(mask) == [0, 0, 1]  # the loss sees only the answer


@pytest.mark.parametrize("op,terms", [("a-b", 3), ("a/b", 4)])
def test_chains_spell_out_their_partial_results(op, terms):
    import itertools

    p = 5
    ex = algorithmic.chain_examples(p, op, terms)
    chains = [xs for xs in itertools.product(range(p), repeat=terms) if not (op == "a/b" and 0 in xs[1:])]
    assert len(ex["inputs"]) == len(chains)
    for xs, inputs, targets, mask in zip(chains, ex["inputs"], ex["targets"], ex["loss_mask"]):
        partials = [xs[0]]
        for x in xs[1:]:
            partials.append(PYTHON_OPS[op](partials[-1], x, p))
        row = [*xs, p, *partials[1:]]  # "x_1 ... x_k = s_1 ... s_{k-1}"
        assert list(inputs) == row[:-1] and list(targets) == row[1:]
        assert list(mask) == [0] * terms + [1] * (terms - 1)  # the loss on every partial result


def test_op_tokens_name_the_operation_in_one_shared_vocabulary():
    plus, minus = (algorithmic.chain_examples(5, op, 3, op_token=True) for op in ("a+b", "a-b"))
    np.testing.assert_array_equal(plus["inputs"][:, :3], minus["inputs"][:, :3])  # the same operands ...
    assert set(plus["inputs"][:, 3]) == {6} and set(minus["inputs"][:, 3]) == {7}  # ... and each op's own `=`
    np.testing.assert_array_equal(algorithmic.chain_examples(5, "a-b", 3)["targets"][:, 3:], minus["targets"][:, 3:])
    assert algorithmic.vocab_size(5, True) == 6 + len(algorithmic.OPERATIONS)


def test_split_is_seeded_disjoint_and_complete():
    train, test = algorithmic.train_test_split(13, "a+b", 0.3, seed=5)
    assert len(train["inputs"]) == int(0.3 * 169)
    pairs = lambda d: {tuple(r) for r in d["inputs"][:, :2]}  # noqa: E731
    assert not pairs(train) & pairs(test) and len(pairs(train) | pairs(test)) == 169
    again, _ = algorithmic.train_test_split(13, "a+b", 0.3, seed=5)
    other, _ = algorithmic.train_test_split(13, "a+b", 0.3, seed=6)
    np.testing.assert_array_equal(train["inputs"], again["inputs"])
    assert pairs(train) != pairs(other)


def _examples(n):
    return {"inputs": np.arange(n)[:, None].astype(np.int32), "targets": np.zeros((n, 1), np.int32),
            "loss_mask": np.ones((n, 1), np.float32)}


def _take(dataset, count):
    it = pipeline.iterator(dataset)
    return [next(it) for _ in range(count)]


def test_batches_are_deterministic_and_cover_each_epoch_once():
    ex = _examples(20)
    first = _take(pipeline.batched(ex, batch_size=4, seed=3), 10)
    second = _take(pipeline.batched(ex, batch_size=4, seed=3), 10)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
    epoch0 = np.concatenate([b["inputs"][:, 0] for b in first[:5]])
    epoch1 = np.concatenate([b["inputs"][:, 0] for b in first[5:]])
    assert sorted(epoch0) == list(range(20)) == sorted(epoch1)
    assert list(epoch0) != list(epoch1)  # reshuffled each epoch
    other = _take(pipeline.batched(ex, batch_size=4, seed=4), 1)[0]
    assert list(other["inputs"][:, 0]) != list(first[0]["inputs"][:, 0])


@pytest.mark.parametrize("process_count", [2, 4])
def test_processes_get_disjoint_slices_of_the_global_batch(process_count):
    ex = _examples(24)
    global_batches = _take(pipeline.batched(ex, batch_size=8, seed=0), 6)
    slices = [_take(pipeline.batched(ex, batch_size=8, seed=0, process_index=i, process_count=process_count), 6)
              for i in range(process_count)]
    for step, batch in enumerate(global_batches):
        joined = np.concatenate([s[step]["inputs"] for s in slices])
        np.testing.assert_array_equal(joined, batch["inputs"])


def test_padding_masks_rows_beyond_the_data():
    ex = _examples(10)
    batches = _take(pipeline.batched(ex, batch_size=4, seed=0, shuffle=False, num_epochs=1,
                                     drop_remainder=False), 3)
    assert [b["loss_mask"].sum() for b in batches] == [4, 4, 2]
    seen = np.concatenate([b["inputs"][b["loss_mask"][:, 0] > 0, 0] for b in batches])
    assert sorted(seen) == list(range(10))
    full = _take(pipeline.batched(ex, batch_size=12, seed=0, drop_remainder=False), 1)[0]  # full batch, padded
    chex.assert_shape(full["inputs"], (12, 1))
    assert full["loss_mask"].sum() == 10


def test_iterator_state_resumes_exactly():
    ds = pipeline.batched(_examples(20), batch_size=4, seed=1)
    it = pipeline.iterator(ds)
    for _ in range(7):
        next(it)
    state = it.get_state()
    expected = [next(it)["inputs"] for _ in range(5)]
    resumed = pipeline.iterator(ds)
    resumed.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(resumed)["inputs"], want)


def test_validate_names_bad_values():
    """The declared ranges (data/config_fields.py) and the task's own rule (a prime modulus), one line each."""
    import dataclasses

    import ml_collections

    from data import AlgorithmicConfig, config_fields

    config = ml_collections.ConfigDict(dataclasses.asdict(AlgorithmicConfig()))
    assert algorithmic.validate(config) == [] and config_fields.problems(AlgorithmicConfig, config, "data.") == []
    config.update(p=100, op="a%b", train_fraction=1.5)
    assert algorithmic.validate(config) == ["data.p=100 is not a prime (grokking tasks need a prime modulus, e.g. 97 or 113)"]
    assert config_fields.problems(AlgorithmicConfig, config, "data.") == [
        f"data.op='a%b' is not one of {list(algorithmic.OPERATIONS)}",
        "data.train_fraction=1.5 must lie in (0, 1)"]
