"""Compress a run's model after training: quantize or prune its kernels with calibration on the run's own data.

    python -m experiments.compress --workdir=RUN --out=RUN2 --method=gptq --bits=4 [--group_size=128] [--act_order]
    python -m experiments.compress --workdir=RUN --out=RUN2 --method=sparsegpt --sparsity=0.5   (or --n_m=2:4)

methods: rtn, gptq, awq, awq_gptq (--bits, --group_size, --symmetric, --act_order), fp8 (e4m3: --group_size),
smoothquant (W8A8, --alpha), magnitude, wanda, sparsegpt (--sparsity or --n_m; with --bits [--symmetric], its joint
mode: the kept weights rounded on their channel's grid); --damp and --block_size for GPTQ and SparseGPT;
`--calibration_rows` rows of the run's training data, or of a prepared token store (`--calibration=STORE`, e.g. for
an imported checkpoint whose tokenizer is not the run's data's), in one pass or `--sequential`ly (block after block,
each calibrated through the compressed blocks before it, as GPTQ's code does);
experiments/compression/model.py says what is compressed and how. RUN2 is a run folder at step 0 with the compressed
weights (dequantized, float32; SmoothQuant's smoothed, with model.quantization=w8a8) and RUN's config: it evaluates,
samples, decodes and exports like any other run. A quantizer's run (and joint SparseGPT's) also holds RUN2/packed,
the compact weights: each quantized kernel as its integer (or e4m3) codes with their grids' scales and zero points
(two 4-bit codes to a byte), the rest as it is, which `experiments.compression.storage.load_params` dequantizes to
the checkpoint's weights. RUN2/compression.json is the report (options, per kernel and layer the relative
reconstruction error on the calibration inputs and the fraction of zeros, the packed and float32 bytes, wall time).
`compress_run(...)` is the library function.
"""

import json
import os

import ml_collections
import numpy as np

from data.config_fields import ConfigError
from experiments.compression import model as compression_model, storage


def options_from(method: str, *, bits=None, group_size=-1, symmetric=False, act_order=False, damp=0.01,
                 block_size=128, sparsity=None, n_m="", alpha=None) -> dict:
    """The method's options, with the ones that belong to the other kind of method refused in one line."""
    quantizer = method in compression_model.QUANTIZERS
    if method not in compression_model.METHODS:
        raise ConfigError(f"--method={method!r}: one of {', '.join(compression_model.METHODS)}")
    if method in compression_model.SMOOTHERS:
        if bits is not None or group_size != -1 or symmetric or act_order or sparsity is not None or n_m:
            raise ConfigError("--method=smoothquant is W8A8 per channel and per token: only --alpha applies")
        alpha = 0.5 if alpha is None else alpha
        if not 0 <= alpha <= 1:
            raise ConfigError(f"--alpha={alpha}: the migration strength is in [0, 1]")
        return {"alpha": alpha}
    if alpha is not None:
        raise ConfigError(f"--alpha is SmoothQuant's migration strength, not an option of --method={method}")
    if quantizer and (sparsity is not None or n_m):
        raise ConfigError(f"--method={method} quantizes: --sparsity and --n_m are for "
                          f"{', '.join(compression_model.PRUNERS)}")
    joint = method == "sparsegpt" and bits is not None  # SparseGPT's joint mode: pruned, then rounded per channel
    if not quantizer and (group_size != -1 or act_order or (not joint and (bits is not None or symmetric))):
        raise ConfigError(f"--method={method} prunes: --bits, --group_size, --symmetric and --act_order are for "
                          f"{', '.join(compression_model.QUANTIZERS)} (sparsegpt takes --bits and --symmetric: its "
                          "joint mode, per output channel)")
    if method == "fp8" and (bits is not None or symmetric or act_order):
        raise ConfigError("--method=fp8 is e4m3 with one scale per channel or group: --bits, --symmetric and "
                          "--act_order are for the integer grids")
    if quantizer and method != "fp8" and bits is None:
        raise ConfigError(f"--method={method} needs --bits (2 to 8)")
    pattern = None
    if n_m:
        parts = n_m.split(":")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ConfigError(f"--n_m={n_m!r}: two integers n:m, e.g. 2:4")
        pattern = tuple(int(p) for p in parts)
        if sparsity is not None:
            raise ConfigError("--sparsity and --n_m both given: one pattern")
    return {"bits": bits, "group_size": group_size, "symmetric": symmetric, "act_order": act_order, "damp": damp,
            "block_size": block_size, "sparsity": 0.5 if sparsity is None else sparsity, "n_m": pattern}


def calibration_rows_of(config, rows: int, store: str = ""):
    """int32 [rows, T]: the first `rows` training rows of the run's own data, or of the prepared token store `store`
    (`python -m data.prepare`) cut to the run's data.seq_len; a one-line ConfigError if their ids do not fit the
    model's vocabulary (an imported model calibrated on data of another tokenizer)."""
    import data as datasets
    from data import token_store
    from experiments.configs import base

    if store:
        data_config = base.get_config(config.model.name, "tokens").data
        data_config.update(stores=store, seq_len=config.data.seq_len)
        problems = token_store.validate(data_config)
        if problems:
            raise ConfigError(f"--calibration={store!r}: {problems[0]}")
        found = token_store.sample_rows(data_config, config.seed, rows)["inputs"]
    else:
        found = datasets.load(config.data, config.seed).train["inputs"][:rows]
    largest = int(np.max(found))
    if largest >= config.model.vocab_size:
        raise ConfigError(f"the calibration rows hold token id {largest}, outside the model's vocabulary of "
                          f"{config.model.vocab_size}: calibrate on a store written with this model's tokenizer "
                          "(--calibration=STORE from `python -m data.prepare`)")
    return found


def compress_run(workdir: str, out: str, method: str, *, calibration_rows: int = 128, step=None, calibration: str = "",
                 sequential: bool = False, **flags) -> dict:
    """Writes `out` (module doc) and returns the report."""
    from experiments import restore

    options = options_from(method, **flags)
    if calibration_rows < 1:
        raise ConfigError(f"--calibration_rows={calibration_rows}: at least 1")
    if os.path.abspath(out) == os.path.abspath(workdir):
        raise ConfigError(f"--out={out!r} is the run itself: write the compressed model to a new folder")
    if os.path.exists(os.path.join(out, "checkpoints")):
        raise ConfigError(f"--out={out!r} already holds a run: name a new folder")
    try:
        config = restore.load_config(workdir)
        model, variables = restore.load_variables(config, workdir, step)
    except FileNotFoundError as error:
        raise ConfigError(str(error)) from None
    rows = calibration_rows_of(config, calibration_rows, calibration)
    variables, report, packed = compression_model.compress_variables(model, variables, rows, method, options,
                                                                     sequential)
    if method in compression_model.SMOOTHERS:
        config = ml_collections.ConfigDict(config.to_dict())
        config.model.quantization = "w8a8"
    restore.save_variables(config, variables, out)
    if packed is not None:
        report["stored"] = {"packed": os.path.join(out, storage.FOLDER), "bytes": storage.save(out, packed),
                            "float32_bytes": storage.nbytes(variables["params"])}
    report["source"] = {"workdir": os.path.abspath(workdir), "step": step}
    with open(os.path.join(out, "compression.json"), "w") as f:
        json.dump(report, f, indent=1)
    return report


def main(argv):
    from absl import flags

    from experiments.training import cli

    del argv
    f = flags.FLAGS
    try:
        report = compress_run(f.workdir, f.out, f.method, calibration_rows=f.calibration_rows, step=f.step,
                              calibration=f.calibration, sequential=f.sequential,
                              bits=f.bits, group_size=f.group_size, symmetric=f.symmetric, act_order=f.act_order,
                              damp=f.damp, block_size=f.block_size, sparsity=f.sparsity, n_m=f.n_m, alpha=f.alpha)
    except ConfigError as e:
        cli.fail(str(e))
    errors = [k["relative_error"] for k in report["kernels"]]
    summary = (f"{len(errors)} kernels, relative reconstruction error mean {sum(errors) / len(errors):.4f}, max "
               f"{max(errors):.4f}" if errors else f"{len(report['smoothing'])} norms smoothed, every matmul W8A8")
    if "stored" in report:
        summary += (f"; packed weights {report['stored']['bytes'] / 2**20:.2f} MiB against "
                    f"{report['stored']['float32_bytes'] / 2**20:.2f} MiB in float32")
    print(f"compressed {f.workdir} by {f.method} into {f.out}: {summary}")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("workdir", None, "The run folder to compress.", required=True)
    flags.DEFINE_string("out", None, "The run folder to write.", required=True)
    flags.DEFINE_string("method", None, "rtn, gptq, awq, awq_gptq, fp8, smoothquant, magnitude, wanda or sparsegpt.",
                        required=True)
    flags.DEFINE_integer("bits", None, "Quantizers: bits per weight (2 to 8).")
    flags.DEFINE_integer("group_size", -1, "Quantizers: inputs per grid (-1: one grid per output channel).")
    flags.DEFINE_bool("symmetric", False, "Quantizers: a grid symmetric about 0.")
    flags.DEFINE_bool("act_order", False, "GPTQ (and awq_gptq): inputs in order of decreasing Hessian diagonal.")
    flags.DEFINE_float("damp", 0.01, "GPTQ, SparseGPT: the fraction of the mean Hessian diagonal added to it.")
    flags.DEFINE_integer("block_size", 128, "GPTQ, SparseGPT: inputs per lazy block.")
    flags.DEFINE_float("sparsity", None, "Pruners: the fraction of weights zeroed (default 0.5).")
    flags.DEFINE_string("n_m", "", "Pruners: n zeros in every m consecutive inputs, as n:m (e.g. 2:4).")
    flags.DEFINE_float("alpha", None, "SmoothQuant: the migration strength in [0, 1] (default 0.5).")
    flags.DEFINE_integer("calibration_rows", 128, "Rows of the run's training data the calibration runs on.")
    flags.DEFINE_string("calibration", "", "A prepared token store (python -m data.prepare) to calibrate on instead.")
    flags.DEFINE_bool("sequential", False, "Calibrate block after block through the compressed earlier blocks.")
    flags.DEFINE_integer("step", None, "The checkpoint step (default: the newest intact one).")
    app.run(main)
