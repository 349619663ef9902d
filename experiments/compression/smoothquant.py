"""SmoothQuant (Xiao et al. 2023, "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language
Models"): W8A8 with the activations' outlier channels made tame by moving their range into the weights.

For the kernels W_1..W_K [in, out] that read one normalised input x (attention's query, key and value; the MLP's wi
and wg), with max|x_j| over calibration tokens per input feature j and migration strength alpha:

    s_j = max(max|x_j|^alpha / max(max_k max_o |W_k[j, o]|, 1e-5)^(1 - alpha), 1e-5)
    x W_k = (x / s) (diag(s) W_k)      the norm's scale (and LayerNorm's bias) divided by s, every W_k's rows times s

an identity before quantization; then every matmul of the blocks runs W8A8 (models/quantization.py, `w8a8`: int8
weights per output channel, int8 activations per token). Kernels whose input no norm produces (attention's output
projection, the MLP's wo, the experts' w_out, Mamba-2's out_proj) are quantized without smoothing, as the paper's
code does; kernels that read a smoothed norm but stay in float (an MoE router) take s too, so nothing changes.
"""

import jax
import numpy as np

FLOOR = 1e-5


def smoothing_scales(input_abs_max, kernels, alpha: float) -> np.ndarray:
    """s [in] of the module doc, for the kernels [in, out] (each) that read one input."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha={alpha}: the migration strength is in [0, 1]")
    weight_max = np.max([np.abs(np.asarray(w, np.float64)).max(1) for w in kernels], axis=0)
    scales = np.asarray(input_abs_max, np.float64) ** alpha / np.maximum(weight_max, FLOOR) ** (1 - alpha)
    return np.maximum(scales, FLOOR)


def groups(unit: dict):
    """(norm name, kernels quantized, kernels only rescaled) of every norm of this unit of the parameter tree whose
    output feeds kernels directly; a kernel is (module path, name). Attention's query, key and value after
    attention_norm; the MLP's wi and wg, or the MoE experts' w_gate and w_in and its shared expert's wi and wg (the
    router, kept in float, rescaled only) after mlp_norm; Mamba-2's in_proj after its block's norm."""
    if "attention_norm" in unit and "attention" in unit:
        yield "attention_norm", [(("attention",), name) for name in ("query", "key", "value")], []
    if "mlp_norm" in unit and "mlp" in unit:
        yield "mlp_norm", [(("mlp",), name) for name in ("wi", "wg") if name in unit["mlp"]], []
    if "mlp_norm" in unit and "moe" in unit:
        shared = unit["moe"].get("shared", {})
        yield "mlp_norm", ([(("moe",), "w_gate"), (("moe",), "w_in")]
                           + [(("moe", "shared"), name) for name in ("wi", "wg") if name in shared]), [(("moe",), "router")]
    if "norm" in unit and "mixer" in unit and "in_proj" in unit["mixer"]:
        yield "norm", [(("mixer",), "in_proj")], []


def _input_axis(name: str) -> int:
    """The input axis of one layer's kernel: MoE experts' [E, in, out] have it second."""
    return 1 if name in ("w_gate", "w_in") else 0


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _kernel_path(unit: dict, module: tuple, name: str) -> tuple:
    node = _get(unit, module + (name,))
    return module + (name, "kernel") if isinstance(node, dict) else module + (name,)


def smooth_params(params: dict, calibration: dict, stack: str, alpha: float) -> tuple[dict, list[dict]]:
    """(params with every `groups` norm of the scanned stack `stack` and the kernels it feeds smoothed, per layer and
    norm {"layer", "norm", "scale_min", "scale_max"}); calibration as model.second_moments gives it."""
    new = jax.tree.map(np.array, params)  # writable copies
    report = []

    def visit(unit: dict, recorded: dict, prefix: tuple):
        for key, child in unit.items():
            if isinstance(child, dict) and key in recorded:
                visit(child, recorded[key], prefix + (key,))
        for norm_name, quantized, rescaled in groups(unit):
            maxima = [_get(recorded, module + (f"{name}_abs_max",)) for module, name in quantized]
            maxima = np.max([m if m.ndim == 2 else m.max(1) for m in maxima], axis=0)  # [L, in]; experts: any
            target = _get(new, prefix)
            for layer in range(maxima.shape[0]):
                matrices = [np.moveaxis(_get(target, _kernel_path(unit, module, name))[layer], _input_axis(name), 0)
                            for module, name in quantized]
                scales = smoothing_scales(maxima[layer], [m.reshape(m.shape[0], -1) for m in matrices], alpha)
                for value in target[norm_name].values():
                    value[layer] /= scales
                for module, name in quantized + rescaled:
                    kernel = _get(target, _kernel_path(unit, module, name))
                    shape = [1] * (kernel.ndim - 1)
                    shape[_input_axis(name)] = -1
                    kernel[layer] *= scales.reshape(shape)
                report.append({"layer": layer, "norm": "/".join(prefix + (norm_name,)),
                               "scale_min": float(scales.min()), "scale_max": float(scales.max())})

    visit(params[stack], calibration[stack], (stack,))
    return new, report
