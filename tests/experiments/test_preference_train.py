"""Preference optimisation through the trainer (experiments/objectives/preference.py) on ProntoQA's derailed pairs."""

import json

import numpy as np
import pytest

import data
from data import prontoqa
from data.config_fields import ConfigError
from experiments.training import trainer
from experiments.configs import preference as preference_configs


def tiny(variant: str):
    config = preference_configs.get_config(f"prontoqa,{variant}")
    config.model.update(d_model=32, num_layers=1, num_heads=2, d_mlp=64)
    config.data.update(min_hops=2, max_hops=3, branches=2, train_examples=64, eval_examples=16, test_examples=16,
                       batch_size=16)
    config.train.update(steps=3, log_every=1, eval_every=0, checkpoint_every=3)
    return config


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("sft"))
    trainer.train_and_evaluate(tiny("sft"), workdir, verbose=False)
    return workdir


def rows(workdir):
    with open(f"{workdir}/metrics.jsonl") as f:
        return [r for r in map(json.loads, f) if r["split"] == "train"]


@pytest.mark.slow  # an SFT run, then DPO / KTO from it; the default suite keeps the losses and the errors
@pytest.mark.parametrize("kind,at_reference", [("dpo", np.log(2)), ("kto", 0.5)])
def test_starts_from_its_reference_and_raises_the_margin(sft_run, tmp_path, kind, at_reference):
    config = tiny("dpo")
    config.train.update(init_from=sft_run, steps=6)
    config.train.preference.kind = kind
    config.optimizer.lr = 3e-3
    config.mesh.update(data=2, fsdp=2, tensor=2)
    trainer.train_and_evaluate(config, str(tmp_path), verbose=False)
    first, last = rows(tmp_path)[0], rows(tmp_path)[-1]
    # Step 1's policy is its reference: every implicit reward 0 (DPO's loss log 2, KTO's 1/2 with its reference
    # point, the mismatched pairs' KL, at 0), no KL.
    assert first["preference/loss"] == pytest.approx(at_reference, abs=1e-5)
    assert abs(first["preference/reward_margin"]) < 1e-5 and abs(first["preference/kl_ref"]) < 1e-5
    assert last["preference/loss"] < at_reference - 0.002 and last["preference/reward_margin"] > 0
    assert last["preference/kl_ref"] > 0
    if kind == "kto":
        assert first["preference/reference_point"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("change,message", [
    (dict(kind="dpo"), "needs a reference model: set train.init_from"),
    (dict(kind="simpo", data="no_pairs"), "needs paired data"),
    (dict(kind="", data="prosqa"), "data.rejected='derailed' needs data.name='prontoqa'"),
])
def test_bad_preference_configs_are_one_line_errors(tmp_path, change, message):
    config = tiny("sft")
    config.train.preference.kind = change["kind"]
    if change.get("data") == "no_pairs":
        config.data.rejected = ""
    if change.get("data") == "prosqa":
        config.data.name = "prosqa"
    with pytest.raises(ConfigError, match=message) as error:
        trainer.train_and_evaluate(config, str(tmp_path / "run"), verbose=False)
    assert "\n" not in str(error.value)


def test_derailed_responses_are_wrong_and_share_the_prompt():
    config = tiny("sft").data
    problems = data.reasoning_problems(config, seed=0)["train"]
    rejected = data.rejected_problems(config, {"train": problems}, seed=0)["train"]
    for p, r in zip(problems, rejected):
        edges, properties = prontoqa._facts(p.question)
        name, start = p.question[0], p.question[3]
        assert r.answer != p.answer
        concepts = [start] + [s[3] for s in r.steps[:-1]]
        unsupported = [(a, b) for a, b in zip(concepts, concepts[1:]) if edges.get(a) != b]
        assert len(unsupported) == 1  # exactly one jump no fact licenses; the rest follow the facts
        negated, prop = properties[concepts[-1]]  # its conclusion is the last concept's property
        assert r.steps[-1] == (name, "is", *(("not",) if negated else ()), prop, ".")
    splits = data.load(config, seed=0)
    question_len = splits.model_keys["bot_position"]
    np.testing.assert_array_equal(splits.train["inputs"][:, :question_len],
                                  splits.train["rejected_inputs"][:, :question_len])
    assert (splits.train["rejected_loss_mask"][:, :question_len - 1] == 0).all()


def test_ktos_mismatched_pairs_are_each_prompt_with_the_previous_rows_response():
    """Right-padded rows of awkward lengths (one borrowed response cut at the row's end) against a NumPy loop."""
    from experiments.objectives import preference
    rows_ = [([5, 6, 7], [20, 21]), ([8], [22, 23, 24, 25]), ([9, 10, 11, 12, 13, 14], [26, 27, 28])]  # (prompt, response)
    length, pad = 8, 0
    batch = {"inputs": [], "targets": [], "loss_mask": []}
    for prompt, response in rows_:
        row = (prompt + response + [pad] * length)[:length + 1]
        mask = [0.0] * len(prompt) + [1.0] * len(response) + [0.0] * length
        batch["inputs"].append(row[:-1])
        batch["targets"].append(row[1:])
        batch["loss_mask"].append(mask[1:length + 1])
    got = preference.mismatched({k: np.asarray(v) for k, v in batch.items()})
    for i, (prompt, _) in enumerate(rows_):
        borrowed = rows_[i - 1][1][:length + 1 - len(prompt)]
        row = np.asarray(batch["inputs"][i] + batch["targets"][i][-1:])
        row[len(prompt):len(prompt) + len(borrowed)] = borrowed
        mask = np.zeros(length + 1)
        mask[len(prompt):len(prompt) + len(borrowed)] = 1
        np.testing.assert_array_equal(got["inputs"][i], row[:-1])
        np.testing.assert_array_equal(got["targets"][i], row[1:])
        np.testing.assert_array_equal(got["loss_mask"][i], mask[1:])
    assert got["loss_mask"][2].sum() == 3 and got["loss_mask"][1].sum() == 2  # row 1's 4 tokens cut to 3 in row 2


def test_the_objectives_kl_to_the_reference_sums_over_response_tokens():
    """kl_ref = mean over chosen rows of sum_t KL(pi || pi_ref) on their response tokens, in float64."""
    from experiments.objectives import preference
    rng = np.random.default_rng(3)
    b, length, vocab = 3, 6, 5
    mask = (rng.random((b, length)) < 0.6).astype(np.float32)
    batch = {"inputs": rng.integers(0, vocab, (b, length)), "targets": rng.integers(0, vocab, (b, length)),
             "loss_mask": mask}
    batch.update({f"rejected_{k}": v for k, v in batch.items()})
    logits, ref_logits = rng.normal(size=(2 * b, length, vocab)), rng.normal(size=(2 * b, length, vocab))
    config = preference.PreferenceConfig(kind="dpo")
    _, metrics = preference.objective(config, logits.astype(np.float32), ref_logits.astype(np.float32), batch)
    log_p = logits[:b] - np.log(np.exp(logits[:b]).sum(-1, keepdims=True))
    log_q = ref_logits[:b] - np.log(np.exp(ref_logits[:b]).sum(-1, keepdims=True))
    kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
    np.testing.assert_allclose(metrics["kl_ref"], np.mean((kl * mask).sum(-1)), rtol=1e-5)


def test_the_preference_objectives_loss_is_the_pair_loss_plus_the_weighted_sft_term():
    """Preference.loss for DPO with sft_weight 0.5, one of 2 micro-batches: -mean log sigmoid(beta ((pi_w - ref_w)
    - (pi_l - ref_l))) / 2 + 0.5 * the chosen responses' CE sum / the whole batch's count, in float64; the frozen
    reference reads the chosen rows then the rejected ones, and `loss` logs the chosen rows' CE sum."""
    from experiments.objectives import preference
    rng = np.random.default_rng(5)
    b, length, vocab, beta, count = 3, 5, 6, 0.4, 20.0
    batch = {"inputs": rng.integers(0, vocab, (b, length)), "targets": rng.integers(0, vocab, (b, length)),
             "loss_mask": (rng.random((b, length)) < 0.7).astype(np.float32)}
    batch.update({f"rejected_{k}": (rng.random((b, length)) < 0.7).astype(np.float32) if k == "loss_mask"
                  else rng.integers(0, vocab, (b, length)) for k in list(batch)})
    logits, ref_logits = rng.normal(size=(2, 2 * b, length, vocab))
    seen = []

    def reference(tokens):
        seen.append(np.asarray(tokens))
        return ref_logits.astype(np.float32)

    objective = preference.Preference(config=preference.PreferenceConfig(kind="dpo", beta=beta, sft_weight=0.5))
    got, sums = objective.loss(logits.astype(np.float32), batch, np.float32(count), 2, frozen_logits=reference)
    np.testing.assert_array_equal(seen[0], np.concatenate([batch["inputs"], batch["rejected_inputs"]]))

    targets = np.concatenate([batch["targets"], batch["rejected_targets"]])
    mask = np.concatenate([batch["loss_mask"], batch["rejected_loss_mask"]])

    def logps(lg):
        log_p = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
        return np.take_along_axis(log_p, targets[..., None], -1)[..., 0] * mask

    pi, ref = logps(logits).sum(-1), logps(ref_logits).sum(-1)
    margin = beta * ((pi[:b] - ref[:b]) - (pi[b:] - ref[b:]))
    sft = -logps(logits)[:b].sum()
    np.testing.assert_allclose(got, np.mean(np.log1p(np.exp(-margin))) / 2 + 0.5 * sft / count, rtol=1e-5)
    np.testing.assert_allclose(sums["loss"], sft, rtol=1e-5)
    np.testing.assert_allclose(sums["preference/chosen_logps"], pi[:b].mean() / 2, rtol=1e-5)


def test_ktos_objective_reads_chosen_rejected_and_mismatched_rows_apart():
    """KTO's policy pass reads 3B rows (chosen, rejected, mismatched pairs): the logged chosen and rejected
    log-probabilities are the means over their own B rows, in float64, not over the mismatched ones beside them."""
    from experiments.objectives import preference
    rng = np.random.default_rng(6)
    b, length, vocab = 2, 5, 6
    batch = {"inputs": rng.integers(0, vocab, (b, length)), "targets": rng.integers(0, vocab, (b, length)),
             "loss_mask": np.array([[0, 0, 1, 1, 1], [0, 1, 1, 1, 0]], np.float32)}
    batch.update({f"rejected_{k}": v.copy() if k == "loss_mask" else rng.integers(0, vocab, (b, length))
                  for k, v in list(batch.items())})
    config = preference.PreferenceConfig(kind="kto")
    targets = np.asarray(preference.stacked(batch, "kto", "targets"))
    mask = np.asarray(preference.stacked(batch, "kto", "loss_mask"))
    logits, ref_logits = rng.normal(size=(2, 3 * b, length, vocab)).astype(np.float32)
    _, metrics = preference.objective(config, logits, ref_logits, batch)
    log_p = logits - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
    logps = (np.take_along_axis(log_p, targets[..., None], -1)[..., 0] * mask).sum(-1)
    np.testing.assert_allclose(metrics["chosen_logps"], logps[:b].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["rejected_logps"], logps[b:2 * b].mean(), rtol=1e-5)
    assert not np.isclose(logps[b:2 * b].mean(), logps[b:].mean())  # the mismatched rows would change it
