"""Compression measured: validation loss against bits (quantizers) and sparsity (pruners), per trained run.

    python -m experiments.train --config=experiments/configs/lm_shakespeare.py --workdir=runs/lm        (and :ssd,
    experiments/configs/moe_lm.py for runs/ssd and runs/moe)
    PYTHONPATH=. python scripts/studies/compression_study.py --runs=runs/lm,runs/ssd,runs/moe

For every run: the calibration statistics once (experiments/compression/model.second_moments on
`--calibration_rows` training rows), then every method and setting below compressed from the same weights and
scored on the whole validation split (experiments/evaluation/loss_eval.scorer):

    quantizers  rtn, gptq, awq, awq_gptq at each of --bits, per channel (group -1) and per group of --group_size;
                fp8 (e4m3) per channel
    pruners     magnitude, wanda, sparsegpt at each of --sparsities and at 2:4
    qwix        (transformer runs) the run's own weights under model.quantization int8, int4 (symmetric per channel)
                and w8a8, and SmoothQuant (alpha 0.5) under w8a8
    qat         --qat: runs trained with model.quantization set, reported beside the run they are named with

Writes --out (a JSON row per point: run, method, bits or sparsity, group, validation loss, the mean relative layer
error, compression seconds, the weights' size if stored packed) and --plot; docs/studies/compression.md shows them.
"""

import json
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import data as datasets  # noqa: E402
from experiments import compress, restore  # noqa: E402
from experiments.compression import model as compression_model  # noqa: E402
from experiments.evaluation import loss_eval  # noqa: E402

_RUNS = flags.DEFINE_list("runs", ["runs/lm", "runs/ssd", "runs/moe"], "Trained run folders.")
_BITS = flags.DEFINE_list("bits", ["8", "4", "3"], "Integer bit widths.")
_GROUP = flags.DEFINE_integer("group_size", 128, "The per-group setting's group size.")
_SPARSITIES = flags.DEFINE_list("sparsities", ["0.5", "0.6", "0.7"], "Unstructured sparsities.")
_ROWS = flags.DEFINE_integer("calibration_rows", 128, "Training rows (of the run's context) calibrating.")
_OUT = flags.DEFINE_string("out", "runs/compression_study.json", "The rows, as JSON.")
_PLOT = flags.DEFINE_string("plot", "docs/compression_study.png", "The figure.")
_QAT = flags.DEFINE_list("qat", [], "QAT runs as RUN=QAT_RUN (e.g. runs/lm=runs/lm_qat_int4).")

QUANTIZERS = ("rtn", "gptq", "awq", "awq_gptq")
PRUNERS = ("magnitude", "wanda", "sparsegpt")


def settings():
    """(method, flags of compress.options_from, the row's labels) of every point."""
    for bits in map(int, _BITS.value):
        for group in (-1, _GROUP.value):
            for method in QUANTIZERS:
                yield method, {"bits": bits, "group_size": group}, {"bits": bits, "group": group}
    yield "fp8", {}, {"bits": 8, "group": -1}
    for sparsity in map(float, _SPARSITIES.value):
        for method in PRUNERS:
            yield method, {"sparsity": sparsity}, {"sparsity": sparsity, "pattern": "unstructured"}
    for method in PRUNERS:
        yield method, {"n_m": "2:4"}, {"sparsity": 0.5, "pattern": "2:4"}


def packed_megabytes(report: dict, params: dict, labels: dict) -> float:
    """The compressed kernels' size if stored packed (bits per weight, a float16 scale and zero per channel or
    group; pruned: float16 values and a 1-bit mask), plus everything else at float32."""
    total = sum(np.size(leaf) * 4 for leaf in jax.tree.leaves(params))
    for entry in report:
        weights = entry["size"]
        if "bits" in labels:
            groups = entry["outputs"] * (1 if labels["group"] == -1 else entry["inputs"] // labels["group"])
            packed = weights * labels["bits"] / 8 + groups * 4
        else:
            packed = weights * (1 - entry["zeros"]) * 2 + weights / 8
        total += packed - weights * 4
    return total / 2**20


def measure(workdir: str) -> list[dict]:
    config = restore.load_config(workdir)
    model, variables = restore.load_variables(config, workdir)
    splits = datasets.load(config.data, config.seed)
    score = loss_eval.scorer(model, splits)
    calibration = compression_model.second_moments(model, variables, splits.train["inputs"][:_ROWS.value])
    matrices = {}  # kernel -> one layer's (or expert's) matrix: its size and inputs
    for name, (path, scope, kernel) in compression_model.kernels(variables["params"], calibration).items():
        gram = compression_model._get(calibration, scope + (f"{kernel}_gram",))  # [L(, E), in, in]
        shape = np.shape(compression_model._get(variables["params"], path))[gram.ndim - 2:]
        matrices[name] = {"size": int(np.prod(shape)), "inputs": gram.shape[-1],
                          "outputs": int(np.prod(shape)) // gram.shape[-1]}
    baseline = score(variables)["eval"]["loss"]
    rows = [{"run": workdir, "family": config.model.name, "method": "none", "bits": 32, "loss": baseline}]
    print(f"{workdir}: uncompressed validation loss {baseline:.4f}", flush=True)
    for method, flags_, labels in settings():
        options = compress.options_from(method, **flags_)
        started = time.time()
        params, report, _ = compression_model.compress_params(variables["params"], calibration, method, options)
        seconds = time.time() - started
        loss = score({**variables, "params": params})["eval"]["loss"]
        sizes = [{**matrices[r["kernel"]], "zeros": r["zeros"]} for r in report]
        row = {"run": workdir, "method": method, **labels, "loss": loss,
               "relative_error": float(np.mean([r["relative_error"] for r in report])), "seconds": seconds,
               "packed_mb": packed_megabytes(sizes, variables["params"], labels)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    rows[0]["packed_mb"] = packed_megabytes([], variables["params"], {})
    if config.model.name == "transformer":
        rows += qwix_rows(workdir, config, variables, splits, calibration)
    for pair in _QAT.value:
        source, qat_run = pair.split("=")
        if source == workdir:
            qat_config = restore.load_config(qat_run)
            loss = loss_eval.evaluate(qat_run)["eval"]["loss"]
            bits = {"int8": 8, "int4": 4, "w8a8": 8, "fp8": 8}[qat_config.model.quantization]
            rows.append({"run": workdir, "method": f"qat_{qat_config.model.quantization}", "bits": bits,
                         "group": -1, "loss": loss, "qat_run": qat_run})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def qwix_rows(workdir, config, variables, splits, calibration) -> list[dict]:
    """The run's weights under qwix's numerics (models/quantization.py), and SmoothQuant's smoothed ones under
    w8a8."""
    import ml_collections

    import models
    from experiments.compression import smoothquant

    rows = []
    for name, bits in (("int8", 8), ("int4", 4), ("w8a8", 8), ("smoothquant", 8)):
        model_config = ml_collections.ConfigDict({**config.model.to_dict(),
                                                  "quantization": "w8a8" if name == "smoothquant" else name})
        params = variables["params"]
        if name == "smoothquant":
            params = smoothquant.smooth_params(params, calibration, "layers", alpha=0.5)[0]
        loss = loss_eval.scorer(models.build(model_config), splits)({**variables, "params": params})["eval"]["loss"]
        rows.append({"run": workdir, "method": name if name == "smoothquant" else f"qwix_{name}", "bits": bits,
                     "group": -1, "loss": loss})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def plot(rows: list[dict], path: str) -> None:
    runs = sorted({r["run"] for r in rows})
    fig, axes = plt.subplots(2, len(runs), figsize=(4.2 * len(runs), 7), squeeze=False)
    for column, run in enumerate(runs):
        mine = [r for r in rows if r["run"] == run]
        baseline, family = next((r["loss"], r["family"]) for r in mine if r["method"] == "none")
        top, bottom = axes[0, column], axes[1, column]
        for method in QUANTIZERS:
            for group, style in ((-1, "-"), (_GROUP.value, "--")):
                points = sorted((r["bits"], r["loss"]) for r in mine if r["method"] == method and r.get("group") == group)
                if points:
                    top.plot(*zip(*points), style, marker="o", label=f"{method} g{group}")
        for method, marker in (("fp8", "k*"), ("qwix_w8a8", "rx"), ("smoothquant", "g+"), ("qwix_int4", "bD"),
                               ("qat_int4", "m*")):
            points = [(r["bits"], r["loss"]) for r in mine if r["method"] == method]
            if points:
                top.plot(*zip(*points), marker, markersize=9, label=method)
        top.axhline(baseline, color="gray", lw=0.8, label="float32")
        top.set(title=f"{family} ({run})", xlabel="bits per weight", ylabel="validation loss", yscale="log")
        top.invert_xaxis()
        for method in PRUNERS:
            points = sorted((r["sparsity"], r["loss"]) for r in mine
                            if r["method"] == method and r.get("pattern") == "unstructured")
            line, = bottom.plot(*zip(*points), marker="o", label=method)
            two_four = [r["loss"] for r in mine if r["method"] == method and r.get("pattern") == "2:4"]
            bottom.plot([0.5], two_four, "s", color=line.get_color(), markerfacecolor="none", label=f"{method} 2:4")
        bottom.axhline(baseline, color="gray", lw=0.8)
        bottom.set(xlabel="sparsity", ylabel="validation loss", yscale="log")
    for top in axes[0]:
        top.legend(fontsize=5, ncol=2)
    axes[1, -1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv):
    del argv
    malformed = [pair for pair in _QAT.value if pair.count("=") != 1]
    if malformed:
        raise app.UsageError(f"--qat={malformed[0]!r}: RUN=QAT_RUN, e.g. runs/lm=runs/lm_qat_int4")
    rows = [row for run in _RUNS.value for row in measure(run)]
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    with open(_OUT.value, "w") as f:
        json.dump(rows, f, indent=1)
    plot(rows, _PLOT.value)
    print(f"wrote {_OUT.value} and {_PLOT.value}")


if __name__ == "__main__":
    app.run(main)
