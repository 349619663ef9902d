"""Quantized numerics of the blocks' linear layers, through qwix (Google's JAX quantization library), in training
(quantization-aware training: the forward pass rounds, the backward pass is the straight-through estimator) and in
evaluation and decoding alike. `model.quantization` names them:

    int8, int4   weights symmetric per output channel j: scale_j = max_i |w_ij| / (q_max + 1/2),
                 w_hat = scale_j clip(round(w / scale_j), -2^(b-1), q_max),  q_max = 2^(b-1) - 1
    w8a8         int8 weights as above, and int8 activations with one such scale per token (dynamic)
    fp8          weights in e4m3, scale_j = max_i |w_ij| / 448

What is quantized: every matmul of the scanned stacks' attention projections, MLPs (dense and MoE experts, routers
excepted) and Mamba-2 projections; not the attention scores, the embeddings or the output head. The arithmetic is
emulated (values rounded, products in the compute dtype), as qwix's quantization-aware path does; a deployment would
run the same numerics as integer matmuls. `experiments/compress.py` writes a run with `model.quantization` set
(SmoothQuant: w8a8).
"""

import qwix

QUANTIZATIONS = ("", "int8", "int4", "w8a8", "fp8")
_WEIGHTS = {"int8": "int8", "int4": "int4", "w8a8": "int8", "fp8": "float8_e4m3fn"}
# The matmuls to round, by the module that makes them: the dot_generals of attention and Mamba-2 (their projections:
# attention's scores and mixing and the SSD scan are einsums), of the MLPs' Dense kernels wi / wg / wo, and of the MoE
# experts (models/moe_dispatch.expert_matmul: the router is a plain product and the dispatch and combine einsums,
# which hold no weight, stay in float).
_RULES = ((r".*(attention|mixer|moe)$", ("dot_general",)), (r".*/(wi|wg|wo)$", ("dot_general",)))
DECODING = ("decode", "decode_hidden")  # the LM's entry points besides __call__ whose matmuls are the blocks'
FAMILIES = ("transformer", "moe", "mod", "ssd", "hybrid")  # where the rules reach every block's matmuls


def rules(name: str) -> list:
    """qwix's rules for `model.quantization = name`."""
    act = "int8" if name == "w8a8" else None
    return [qwix.QtRule(module_path=path, op_names=ops, weight_qtype=_WEIGHTS[name], act_qtype=act)
            for path, ops in _RULES]


def wrap(module, name: str):
    """`module` with its blocks' matmuls quantized as `name` says ("" : unchanged)."""
    if not name:
        return module
    return qwix.quantize_model(module, qwix.QtProvider(rules(name)), methods=DECODING + ("__call__",))


def validate(m) -> list[str]:
    """One-line problems of `model.quantization` with the rest of config.model."""
    if not m.quantization:
        return []
    if m.name not in FAMILIES:
        return [f"model.quantization={m.quantization!r} covers model.name in {', '.join(FAMILIES)}, not {m.name!r}"]
    if m.bitnet:
        return [f"model.quantization={m.quantization!r} and model.bitnet=True both quantize the blocks' matmuls: "
                "choose one"]
    if getattr(m, "dispatch", "capacity") == "ragged":
        return [f"model.quantization={m.quantization!r} covers the dense and capacity MoE dispatches, not "
                "model.dispatch='ragged' (its grouped matmul is not one qwix rounds)"]
    if m.attention not in ("gqa", "qk_norm"):
        return [f"model.quantization={m.quantization!r} covers GQA attention (model.attention='gqa' or 'qk_norm'), "
                f"not model.attention={m.attention!r}"]
    return []
