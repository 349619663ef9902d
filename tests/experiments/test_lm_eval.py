"""lm-evaluation-harness on our backend (experiments/training/harness_backend.py, experiments/lm_eval.py): on a trained run
and its Hugging Face export, our `beyond` model and lm_eval's own `hf` model give the same log-likelihoods (to
float32 rounding), rolling log-likelihoods, greedy generations and task metrics on the shipped tasks; the shipped
task data are what their generator makes; both command lines run. Needs the `[eval]` and `[hf]` extras."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval", reason="needs the [eval] extra (pip install -e '.[eval]')")

from lm_eval.api.instance import Instance  # noqa: E402  (light; torch, transformers and the task index load in the
# tests that need them, so a worker that collects this file does not carry them)

import models  # noqa: E402
from data.config_fields import ConfigError  # noqa: E402
from experiments import export_hf, lm_eval as lm_eval_command, restore  # noqa: E402
from experiments.training import harness_backend as harness  # noqa: E402
from experiments.training import metrics_writer, trainer  # noqa: E402
from tests.conftest import make_tiny_lm_config  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHIPPED_TASKS = ("shakespeare_next_line", "shakespeare_complete", "shakespeare_rolling")
NEWLINE = 10


@pytest.fixture(scope="module")
def run_and_export(tmp_path_factory):
    """A Llama-shaped byte-level LM trained 2 steps on tiny Shakespeare (context 64), and its export."""
    root = tmp_path_factory.mktemp("lm_eval")
    config = make_tiny_lm_config(steps=2)
    config.model.update(activation="swiglu", norm="rmsnorm", positional="rope", mlp_bias=False, tie_embeddings=False)
    config.data.seq_len = 64
    trainer.train_and_evaluate(config, str(root / "run"), devices=jax.devices()[:1], verbose=False)
    export_hf.export(str(root / "run"), str(root / "hf"))
    return str(root / "run"), str(root / "hf")


@pytest.fixture(scope="module")
def both(run_and_export):
    """(ours, lm_eval's hf model on the export). The byte tokenizer has no end-of-text token, which lm_eval's hf
    model needs for its stop strings: the newline's byte symbol stands in, as our prefix token does. Its logits
    cache is off: that cache shares one forward pass among requests with equal inputs, and with two identical
    rolling windows in a batch (a periodic text) it gave the window after them another value (-213.35 for
    -217.53, which it gives alone and we give batched or alone; lm_eval 0.4.13)."""
    transformers = pytest.importorskip("transformers", reason="needs the [hf] extra (pip install -e '.[hf]')")
    pytest.importorskip("accelerate", reason="lm_eval's hf model needs the [hf] extra's accelerate")
    from lm_eval.models.huggingface import HFLM

    workdir, exported = run_and_export
    tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    tokenizer.eos_token = "\u010a"  # the byte-level alphabet's newline
    theirs = HFLM(pretrained=exported, tokenizer=tokenizer, batch_size=4, max_length=64, prefix_token_id=NEWLINE,
                  device="cpu", dtype="float32", logits_cache=False)
    return harness.BeyondLM(workdir, batch_size=4), theirs


def test_loglikelihoods_are_the_models_log_softmax_in_float64(tmp_path):
    """On a run folder of random weights (no training, no torch): each continuation's score is the sum of the full
    forward pass's float64 log-softmax at its tokens, and `is_greedy` says whether each was the argmax."""
    config = make_tiny_lm_config(steps=2)
    config.model.update(vocab_size=256, max_len=16)
    model = models.build(config.model)
    variables = {"params": nn.meta.unbox(jax.jit(model.init)(jax.random.key(3), jnp.zeros((1, 16), jnp.int32))["params"])}
    restore.save_variables(config, variables, str(tmp_path))
    ours = harness.BeyondLM(str(tmp_path), batch_size=3)
    pairs = [("ROMEO:", " O"), ("", "Hi"), ("abcdefghijklmnopqrstuvwxyz", "!!")]
    got = ours.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)])
    for (context, continuation), (logp, greedy) in zip(pairs, got):
        tokens = ([NEWLINE] if not context else list(context.encode())) + list(continuation.encode())
        tokens = tokens[-17:]  # the last max_len + 1
        logits = np.asarray(model.apply(variables, jnp.asarray([tokens[:-1]])), np.float64)[0]
        logits -= logits.max(-1, keepdims=True)
        log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        scored = range(len(tokens) - 1 - len(continuation), len(tokens) - 1)
        np.testing.assert_allclose(logp, sum(log_softmax[i, tokens[i + 1]] for i in scored), rtol=1e-5)
        assert greedy == all(log_softmax[i].argmax() == tokens[i + 1] for i in scored)


@pytest.mark.slow  # trains, exports, loads torch: ~20 s
def test_requests_score_and_generate_as_lm_evals_hf_model_on_the_export(both):
    ours, theirs = both
    assert ours.prefix_token_id == NEWLINE and ours.max_length == 64
    pairs = [("ROMEO:\nO", " she doth"), ("", "Hello"), ("A " * 50, "end"), ("x", "y"), ("KING:\n", "My lord,\nI")]
    likelihood = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    rolling = [Instance("loglikelihood_rolling", {}, (text,), i)
               for i, text in enumerate(["The quick brown fox. " * 10, "short", "a\nb\n" * 40])]
    generation = [Instance("generate_until", {}, (prompt, {"until": ["\n", "."], "max_gen_toks": 12}), i)
                  for i, prompt in enumerate(["ROMEO:\n", "To be, or not", "ROMEO:\n", "x" * 70])]
    got, want = ours.loglikelihood(likelihood), theirs.loglikelihood(likelihood)
    np.testing.assert_allclose([g for g, _ in got], [w for w, _ in want], rtol=1e-5)
    assert [g for _, g in got] == [w for _, w in want]
    np.testing.assert_allclose(ours.loglikelihood_rolling(rolling), theirs.loglikelihood_rolling(rolling), rtol=1e-5)
    assert ours.generate_until(generation) == theirs.generate_until(generation)


@pytest.mark.slow  # each model on each shipped task: ~20 s
def test_the_shipped_tasks_give_lm_evals_hf_metrics(both):
    from lm_eval.tasks import TaskManager

    ours, theirs = both
    manager = TaskManager(include_path=[lm_eval_command.SHIPPED_TASKS], include_defaults=False)
    results = [lm_eval.simple_evaluate(model=model, tasks=list(SHIPPED_TASKS), limit=6, task_manager=manager,
                                       log_samples=False, bootstrap_iters=0)["results"] for model in (ours, theirs)]
    for task in SHIPPED_TASKS:
        metrics = {k: v for k, v in results[1][task].items() if k != "alias" and isinstance(v, float)}
        assert metrics, task
        for name, value in metrics.items():
            np.testing.assert_allclose(results[0][task][name], value, rtol=1e-5, err_msg=f"{task} {name}")


def test_the_shipped_task_data_are_what_their_generator_makes(tmp_path):
    from experiments.evaluation.harness_tasks import shakespeare

    made = shakespeare.make()
    for name, rows in made.items():
        with open(os.path.join(lm_eval_command.SHIPPED_TASKS, f"{name}.jsonl"), encoding="utf-8") as f:
            assert [json.loads(line) for line in f] == rows, name
    assert all(row["choices"][row["label"]] not in row["context"] for row in made["next_line"])
    assert all(0 <= row["label"] < 4 and len(set(row["choices"])) == 4 for row in made["next_line"])


@pytest.mark.slow  # the harness indexes its thousands of task files first: ~10 s
def test_unknown_tasks_and_runs_that_are_not_language_models_are_one_line(run_and_export, tmp_path):
    workdir, _ = run_and_export
    with pytest.raises(ConfigError, match=r"--tasks names \['no_such_task'\], which no task folder defines") as error:
        lm_eval_command.evaluate(workdir, ["no_such_task"])
    assert "\n" not in str(error.value)
    os.makedirs(tmp_path / "grokking")
    with open(tmp_path / "grokking" / "config.json", "w") as f:
        json.dump({"data": {"name": "algorithmic"}, "model": {"name": "transformer"}}, f)
    with pytest.raises(ConfigError, match="data.name='algorithmic'; lm_eval scores text, so the run must be a language"):
        harness.BeyondLM(str(tmp_path / "grokking"))


@pytest.mark.slow  # two subprocesses, each importing lm_eval and compiling the model
def test_both_command_lines_score_a_run(run_and_export, tmp_path):
    workdir, _ = run_and_export
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    output = tmp_path / "results.json"
    ours = subprocess.run([sys.executable, "-m", "experiments.lm_eval", f"--workdir={workdir}",
                           "--tasks=shakespeare_next_line,shakespeare_rolling", "--limit=2", f"--output={output}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert ours.returncode == 0, ours.stderr[-3000:]
    results = json.loads(output.read_text())["results"]
    assert 0.0 <= results["shakespeare_next_line"]["acc,none"] <= 1.0
    assert results["shakespeare_rolling"]["bits_per_byte,none"] > 0
    theirs = subprocess.run([sys.executable, "-m", "experiments.lm_eval", "run", "--model", "beyond", "--model_args",
                             f"workdir={workdir}", "--tasks", "shakespeare_next_line", "--include_path",
                             lm_eval_command.SHIPPED_TASKS, "--limit", "2", "--output_path", str(tmp_path / "cli")],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert theirs.returncode == 0, theirs.stderr[-3000:]
    assert "shakespeare_next_line" in theirs.stdout and "acc" in theirs.stdout


@pytest.mark.slow  # indexes the harness's tasks, trains and evaluates twice
def test_tasks_named_in_the_config_are_scored_during_training(tmp_path):
    config = make_tiny_lm_config(steps=4)
    config.data.seq_len = 64
    config.train.evals.update(tasks="shakespeare_next_line,shakespeare_rolling", every=2, limit=3)
    trainer.train_and_evaluate(config, str(tmp_path / "run"), verbose=False)
    events = [e for e in metrics_writer.read(str(tmp_path / "run")) if e["split"] == "harness"]
    assert [e["step"] for e in events] == [2, 4]
    for event in events:
        assert 0.0 <= event["shakespeare_next_line/acc"] <= 1.0 and event["shakespeare_rolling/bits_per_byte"] > 0
    assert events[0]["shakespeare_rolling/bits_per_byte"] != events[1]["shakespeare_rolling/bits_per_byte"]


@pytest.mark.slow  # looks for the name among the harness's own task files too: ~10 s
def test_an_unknown_task_in_the_config_is_refused_before_compiling(tmp_path):
    config = make_tiny_lm_config(steps=2)
    config.train.evals.update(tasks="shakespeare_next_line,no_such_task", include_path=str(tmp_path))
    with pytest.raises(ConfigError, match=r"train.evals.tasks names \['no_such_task'\], which no task folder"):
        trainer.train_and_evaluate(config, str(tmp_path / "run"), verbose=False)


def test_tasks_in_a_config_whose_data_has_no_tokenizer_are_refused_before_compiling(tmp_path):
    from experiments.configs import default

    config = default.get_config()
    config.train.evals.tasks = "shakespeare_next_line"
    with pytest.raises(ConfigError, match="train.evals.tasks with data.name='algorithmic': lm_eval scores text"):
        trainer.train_and_evaluate(config, str(tmp_path / "run"), verbose=False)
