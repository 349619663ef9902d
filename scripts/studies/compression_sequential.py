"""Sequential against one-pass calibration, and the packed weights' size, per trained run.

    PYTHONPATH=. python scripts/studies/compression_sequential.py --runs=runs/lm,runs/ssd,runs/moe

For every run and setting (GPTQ at 4 and 3 bits per channel, SparseGPT at 50%, and at 50% with its kept weights
rounded to 4 bits per channel, its joint mode): the run's weights compressed by
experiments/compression/model.compress_variables on `--calibration_rows` training rows, once with every block's
statistics from one pass through the uncompressed model and once `sequential`ly (block b's from the model whose
blocks before b are compressed), scored on the whole validation split; for the quantizers, the bytes of the packed
weights (experiments/compression/storage.py: codes, grids, the uncompressed rest) against float32. Prints a
markdown table and writes --out (a JSON row per point); docs/studies/compression.md shows them.
"""

import json
import os

from absl import app, flags

import data as datasets
from experiments import compress, restore
from experiments.compression import model as compression_model, storage
from experiments.evaluation import loss_eval

_RUNS = flags.DEFINE_list("runs", ["runs/lm", "runs/ssd", "runs/moe"], "Trained run folders.")
_ROWS = flags.DEFINE_integer("calibration_rows", 128, "Training rows (of the run's context) calibrating.")
_OUT = flags.DEFINE_string("out", "runs/compression_sequential.json", "The rows, as JSON.")

SETTINGS = (("gptq", {"bits": 4}), ("gptq", {"bits": 3}), ("sparsegpt", {"sparsity": 0.5}),
            ("sparsegpt", {"sparsity": 0.5, "bits": 4}))  # the last SparseGPT's joint mode


def measure(workdir: str) -> list[dict]:
    config = restore.load_config(workdir)
    model, variables = restore.load_variables(config, workdir)
    splits = datasets.load(config.data, config.seed)
    score = loss_eval.scorer(model, splits)
    calibration_rows = splits.train["inputs"][:_ROWS.value]
    rows = []
    for method, flags_ in SETTINGS:
        options = compress.options_from(method, **flags_)
        for sequential in (False, True):
            compressed, report, packed = compression_model.compress_variables(model, variables, calibration_rows,
                                                                              method, options, sequential)
            rows.append({"run": workdir, "family": config.model.name, "method": method, **flags_,
                         "calibration": report["calibration"], "loss": score(compressed)["eval"]["loss"],
                         "seconds": report["seconds"],
                         "packed_bytes": None if packed is None else storage.nbytes(packed),
                         "float32_bytes": storage.nbytes(variables["params"])})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| run | setting | one pass | sequential | packed / float32 |", "|---|---|---|---|---|"]
    for one, sequential in zip(rows[0::2], rows[1::2]):
        parts = ([f"{one['sparsity']:.0%}"] if "sparsity" in one else []) + (
            [f"{one['bits']} bits"] if "bits" in one else [])
        setting = f"{one['method']} {' + '.join(parts)}"
        size = (f"{one['packed_bytes'] / 2**20:.2f} / {one['float32_bytes'] / 2**20:.2f} MiB"
                if one["packed_bytes"] else "")
        lines.append(f"| {one['family']} | {setting} | {one['loss']:.4f} | {sequential['loss']:.4f} | {size} |")
    return "\n".join(lines)


def main(argv):
    del argv
    rows = [row for run in _RUNS.value for row in measure(run)]
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    with open(_OUT.value, "w") as f:
        json.dump(rows, f, indent=1)
    print(table(rows))


if __name__ == "__main__":
    app.run(main)
