"""Kill trials: a run killed at any moment resumes from its newest complete step and loses nothing.

    python scripts/tools/fault_injection.py --trials=40 --seed=0 --out=fault_trials.json

Each trial starts the tiny grokking run (`RUN_FLAGS`: 300 steps, a checkpoint every 10, asynchronous
saves) in a subprocess and kills it with SIGKILL or SIGTERM (2 : 1) at a moment drawn in turn from
`MOMENTS`: a random few milliseconds after the k-th checkpoint save began (k random, or 1: the first
save), during start-up (importing, loading data, compiling: the first 40% of the reference run's
time), or at any random time. It notes what the kill left (the complete steps, a temporary save folder, i.e.
killed mid-save, a torn metrics line), reruns the same command to the end, and compares every train and
eval event of the finished workdir with the uninterrupted reference run's: loss and accuracy equal to
the last bit at every step (the resumed run logs again the steps after its checkpoint; the later event
wins). Prints one row per trial and the totals; `--out` keeps them as JSON.
"""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from experiments.training import metrics_writer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS, CHECKPOINT_EVERY = 300, 10
RUN_FLAGS = ["--config=experiments/configs/grokking.py", "--config.data.p=13", "--config.model.d_model=32",
             "--config.model.d_mlp=64", f"--config.train.steps={STEPS}", "--config.train.log_every=1",
             "--config.train.eval_every=50", f"--config.train.checkpoint_every={CHECKPOINT_EVERY}"]
COMPARED = ("loss", "accuracy")

_TRIALS = flags.DEFINE_integer("trials", 20, "Kill trials.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the kill moments and signals.")
_OUT = flags.DEFINE_string("out", None, "Where the trials go as JSON (optional).")
_ROOT = flags.DEFINE_string("root", None, "Folder for the workdirs (default: a temporary one, removed).")


def _env() -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu",  # 8 fake devices, after any XLA flags already set (the last wins)
           "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()}
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "beyond-fault-trials-cache"))
    return env


def _start(workdir: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "experiments.train", *RUN_FLAGS, f"--workdir={workdir}"],
                            cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _events(workdir: str) -> dict:
    """{(split, step): (loss, accuracy)}, the later event winning."""
    return {(e["split"], e["step"]): tuple(e[k] for k in COMPARED) for e in metrics_writer.read(workdir)
            if all(k in e for k in COMPARED)}


def _saves_begun(checkpoints: str, seen: set) -> int:
    if os.path.isdir(checkpoints):
        seen.update(n for n in os.listdir(checkpoints) if "tmp" in n)
    return len(seen)


MOMENTS = ("during the first save", "during a save", "start-up", "random time", "during a save")


def _kill(proc, workdir: str, rng: random.Random, reference_seconds: float, moment: str) -> dict:
    """Kills `proc` at a random point of `moment`; returns how."""
    sig = rng.choice([signal.SIGKILL, signal.SIGKILL, signal.SIGTERM])
    start = time.perf_counter()
    if moment in ("start-up", "random time"):  # start-up: importing, loading data, compiling
        time.sleep(rng.uniform(0.0, 0.4) * reference_seconds if moment == "start-up"
                   else rng.uniform(0.05, 1.0) * reference_seconds)
    else:
        k = 1 if moment == "during the first save" else rng.randrange(2, STEPS // CHECKPOINT_EVERY)
        moment = f"during save {k}"
        seen, checkpoints = set(), os.path.join(workdir, "checkpoints")
        while _saves_begun(checkpoints, seen) < k and proc.poll() is None:
            time.sleep(0.001)
        time.sleep(rng.uniform(0.0, 0.02))
    killed_after = time.perf_counter() - start
    checkpoints = os.path.join(workdir, "checkpoints")
    names = os.listdir(checkpoints) if os.path.isdir(checkpoints) else []
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    metrics = os.path.join(workdir, "metrics.jsonl")
    torn = os.path.exists(metrics) and not open(metrics, "rb").read().endswith(b"\n") and os.path.getsize(metrics)
    return {"signal": signal.Signals(sig).name, "moment": moment, "killed_after_s": round(killed_after, 3),
            "kill_run_exit": proc.returncode, "mid_save": any("tmp" in n for n in names),
            "complete_steps_at_kill": sorted(int(n) for n in names if n.isdigit()), "torn_line": bool(torn),
            "kill_run_stderr": err.strip().splitlines()[-1] if err.strip() else ""}


def trial(index: int, root: str, rng: random.Random, reference: dict, reference_seconds: float) -> dict:
    workdir = os.path.join(root, f"trial_{index}")
    moment = MOMENTS[index % len(MOMENTS)]
    record = {"trial": index, **_kill(_start(workdir), workdir, rng, reference_seconds, moment)}
    resumed = _start(workdir)
    out, err = resumed.communicate(timeout=600)
    found = re.search(r"resumed from step (\d+)", out)
    events = _events(workdir) if os.path.exists(os.path.join(workdir, "metrics.jsonl")) else {}
    record.update(resume_exit=resumed.returncode, resumed_from=int(found.group(1)) if found else 0,
                  warnings=[line for line in err.splitlines() if line.startswith("warning:")],
                  missing_events=len(reference.keys() - events.keys()),
                  different_events=sum(events[k] != v for k, v in reference.items() if k in events))
    record["ok"] = record["resume_exit"] == 0 and not record["missing_events"] and not record["different_events"]
    shutil.rmtree(workdir, ignore_errors=True)
    return record


def run(trials: int, seed: int, root: str) -> dict:
    """The reference run, then `trials` kill trials; {"reference_seconds", "trials": [...]}."""
    reference_dir = os.path.join(root, "reference")
    start = time.perf_counter()
    proc = _start(reference_dir)
    _, err = proc.communicate(timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"the reference run failed: {err.strip().splitlines()[-1:]}")
    reference_seconds = time.perf_counter() - start
    reference = _events(reference_dir)
    rng = random.Random(seed)
    return {"reference_seconds": reference_seconds, "reference_events": len(reference),
            "trials": [trial(i, root, rng, reference, reference_seconds) for i in range(trials)]}


def summary(result: dict) -> str:
    rows = ["| trial | signal | moment | killed after (s) | mid-save | steps complete at kill | torn line | "
            "resumed from | warnings | events lost / different | ok |", "|" + "---|" * 11]
    for t in result["trials"]:
        complete = t["complete_steps_at_kill"]
        rows.append(f"| {t['trial']} | {t['signal']} | {t['moment']} | {t['killed_after_s']:.2f} | "
                    f"{'yes' if t['mid_save'] else 'no'} | {complete[-1] if complete else 'none'} | "
                    f"{'yes' if t['torn_line'] else 'no'} | {t['resumed_from']} | {len(t['warnings'])} | "
                    f"{t['missing_events']} / {t['different_events']} | {'yes' if t['ok'] else 'NO'} |")
    trials = result["trials"]
    rows.append(f"\n{sum(t['ok'] for t in trials)} of {len(trials)} trials resumed with nothing lost "
                f"({sum(t['mid_save'] for t in trials)} killed mid-save, "
                f"{sum(not t['complete_steps_at_kill'] for t in trials)} before any checkpoint was complete, "
                f"{sum(t['signal'] == 'SIGTERM' for t in trials)} by SIGTERM); reference run "
                f"{result['reference_seconds']:.1f} s, {result['reference_events']} events compared per trial")
    return "\n".join(rows)


def main(argv):
    del argv
    root = _ROOT.value or tempfile.mkdtemp(prefix="fault-trials-")
    try:
        result = run(_TRIALS.value, _SEED.value, root)
    finally:
        if not _ROOT.value:
            shutil.rmtree(root, ignore_errors=True)
    print(summary(result))
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(result, f, indent=2)
    sys.exit(0 if all(t["ok"] for t in result["trials"]) else 1)


if __name__ == "__main__":
    app.run(main)
