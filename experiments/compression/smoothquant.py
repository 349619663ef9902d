"""SmoothQuant (Xiao et al. 2023, "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language
Models"): W8A8 with the activations' outlier channels made tame by moving their range into the weights.

For the kernels W_1..W_K [in, out] that read one normalised input x (attention's query, key and value; the MLP's wi
and wg), with max|x_j| over calibration tokens per input feature j and migration strength alpha:

    s_j = max(max|x_j|^alpha / max(max_k max_o |W_k[j, o]|, 1e-5)^(1 - alpha), 1e-5)
    x W_k = (x / s) (diag(s) W_k)      the norm's scale (and LayerNorm's bias) divided by s, every W_k's rows times s

an identity before quantization; then every matmul of the blocks runs W8A8 (models/quantization.py, `w8a8`: int8
weights per output channel, int8 activations per token). Kernels whose input no norm produces (attention's output
projection, the MLP's wo) are quantized without smoothing, as the paper's code does.
"""

import jax.numpy as jnp
import numpy as np

FLOOR = 1e-5


def smoothing_scales(input_abs_max, kernels, alpha: float) -> np.ndarray:
    """s [in] of the module doc, for the kernels [in, out] (each) that read one input."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha={alpha}: the migration strength is in [0, 1]")
    weight_max = np.max([np.abs(np.asarray(w, np.float64)).max(1) for w in kernels], axis=0)
    scales = np.asarray(input_abs_max, np.float64) ** alpha / np.maximum(weight_max, FLOOR) ** (1 - alpha)
    return np.maximum(scales, FLOOR)


def smooth(norm: dict, kernels: list, scales) -> tuple[dict, list]:
    """(the norm's params {"scale"[, "bias"]} divided by s, each kernel [in, ...] with its rows times s)."""
    scales = jnp.asarray(scales, jnp.float32)
    new_norm = {name: value / scales for name, value in norm.items()}
    shaped = lambda w: scales.reshape((-1,) + (1,) * (w.ndim - 1))  # noqa: E731
    return new_norm, [w * shaped(w) for w in kernels]


# What one block's norms feed: (norm, module, kernels read from its output, those present), in the transformer's
# parameter tree.
GROUPS = (("attention_norm", "attention", ("query", "key", "value")), ("mlp_norm", "mlp", ("wi", "wg")))


def _kernel(module: dict, name: str):
    return module[name]["kernel"] if isinstance(module[name], dict) else module[name]


def smooth_params(params: dict, calibration: dict, alpha: float) -> tuple[dict, list[dict]]:
    """(params of the scanned "layers" stack with every GROUPS norm and its kernels smoothed, per layer and norm
    {"layer", "norm", "scale_min", "scale_max"}); calibration as model.second_moments gives it."""
    stack, recorded = params["layers"], calibration["layers"]
    new_stack, report = {**stack}, []
    for norm_name, module_name, names in GROUPS:
        norm, module = stack[norm_name], stack[module_name]
        names = [name for name in names if name in module]  # wg: SwiGLU only
        input_abs_max = recorded[module_name][f"{names[0]}_abs_max"]  # the kernels share the norm's output
        layers_out = []
        for layer in range(input_abs_max.shape[0]):
            kernels = [np.asarray(_kernel(module, name)[layer]) for name in names]
            scales = smoothing_scales(input_abs_max[layer], [k.reshape(k.shape[0], -1) for k in kernels], alpha)
            layers_out.append(smooth({k: v[layer] for k, v in norm.items()}, kernels, scales))
            report.append({"layer": layer, "norm": norm_name, "scale_min": float(scales.min()),
                           "scale_max": float(scales.max())})
        new_stack[norm_name] = {k: jnp.stack([n[k] for n, _ in layers_out]) for k in norm}
        new_module = {**module}
        for i, name in enumerate(names):
            stacked = jnp.stack([kernels[i] for _, kernels in layers_out])
            new_module[name] = {**module[name], "kernel": stacked} if isinstance(module[name], dict) else stacked
        new_stack[module_name] = new_module
    return {**params, "layers": new_stack}, report
