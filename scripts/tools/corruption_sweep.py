"""Corrupted-checkpoint sweep: every file of the latest checkpoint, truncated, deleted or with one byte flipped;
every case must resume with nothing lost.

    python scripts/tools/corruption_sweep.py [--damages=truncated,deleted,flipped]

Trains the tiny grokking config to step 6 (checkpoints at 3 and 6) once, then for each file of step 6 and
each damage: copies the workdir, damages the file, resumes to step 6 in process, and checks that the run
warned at most once, resumed from step 6 (the damage touched nothing the manifest guards, e.g. the
manifest itself deleted) or from step 3, and logged exactly the uninterrupted run's losses and accuracies
at every step. Prints one row per case and the totals.
"""

import contextlib
import io
import os
import shutil
import sys
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "beyond-fault-trials-cache"))

from absl import app, flags, logging  # noqa: E402

from experiments.training import metrics_writer, trainer  # noqa: E402
from experiments.configs import grokking  # noqa: E402


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _flip(path):
    content = bytearray(open(path, "rb").read())
    if content:
        content[len(content) // 2] ^= 0xFF
    open(path, "wb").write(bytes(content))


DAMAGES = {"truncated": _truncate, "deleted": os.remove, "flipped": _flip}
_DAMAGES = flags.DEFINE_list("damages", list(DAMAGES), f"Damages, of {list(DAMAGES)}.")


def tiny_config(steps: int = 6):
    config = grokking.get_config()
    config.model.update(d_model=32, d_mlp=64)
    config.data.update(p=13)
    config.train.update(steps=steps, log_every=1, eval_every=3, checkpoint_every=3)
    return config


def _events(workdir):
    return {(e["split"], e["step"]): (e["loss"], e["accuracy"]) for e in metrics_writer.read(workdir)
            if "loss" in e}


def sweep(root: str, damages) -> list[dict]:
    reference = os.path.join(root, "reference")
    trainer.train_and_evaluate(tiny_config(), reference, verbose=False)
    expected = _events(reference)
    step_dir = os.path.join(reference, "checkpoints", "6")
    files = sorted(os.path.relpath(os.path.join(r, n), step_dir) for r, _, ns in os.walk(step_dir) for n in ns)
    cases = []
    for name in files:
        for damage in damages:
            workdir = os.path.join(root, "case")
            shutil.rmtree(workdir, ignore_errors=True)
            shutil.copytree(reference, workdir)
            DAMAGES[damage](os.path.join(workdir, "checkpoints", "6", name))
            stderr, stdout = io.StringIO(), io.StringIO()
            with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
                result = trainer.train_and_evaluate(tiny_config(), workdir, verbose=True)
            resumed = next((int(line.split()[3]) for line in stdout.getvalue().splitlines()
                            if line.startswith("resumed from step")), 0)
            warnings = [line for line in stderr.getvalue().splitlines() if line.startswith("warning:")]
            got = _events(workdir)
            case = {"file": name, "damage": damage, "resumed_from": resumed, "warnings": len(warnings),
                    "lost": len(expected.keys() - got.keys()),
                    "different": sum(got[k] != v for k, v in expected.items() if k in got)}
            case["ok"] = (result["step"] == 6 and resumed in (3, 6) and case["warnings"] == (1 if resumed == 3 else 0)
                          and not case["lost"] and not case["different"])
            cases.append(case)
    return cases


def summary(cases: list[dict]) -> str:
    rows = ["| file of step 6 | damage | resumed from | warnings | events lost / different | ok |", "|---|---|---|---|---|---|"]
    rows += [f"| {c['file']} | {c['damage']} | {c['resumed_from']} | {c['warnings']} | {c['lost']} / {c['different']} "
             f"| {'yes' if c['ok'] else 'NO'} |" for c in cases]
    rows.append(f"\n{sum(c['ok'] for c in cases)} of {len(cases)} corrupted-checkpoint cases resumed with nothing lost "
                f"({sum(c['resumed_from'] == 3 for c in cases)} fell back to step 3 with one warning, "
                f"{sum(c['resumed_from'] == 6 for c in cases)} resumed from step 6)")
    return "\n".join(rows)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax's INFO chatter off
    with tempfile.TemporaryDirectory() as root:
        cases = sweep(root, _DAMAGES.value)
    print(summary(cases))
    sys.exit(0 if all(c["ok"] for c in cases) else 1)


if __name__ == "__main__":
    app.run(main)
