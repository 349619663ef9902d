"""Checkpoints from Hugging Face `transformers` into run folders (docs/interfaces.md).

    python -m experiments.import_hf --hf_dir=DIR --workdir=OUT

reads DIR's `config.json` and `*.safetensors` and writes OUT: `config.json` (the default LM experiment's
config with the equivalent `config.model`) and an orbax checkpoint at step 0 (the weights, a fresh optimizer
state), which `experiments.restore` and `experiments.sample` read. `convert(hf_dir)` is the library function:
`(model_config, variables)` with `models.build(model_config).apply(variables, tokens)` equal to the
`transformers` model's logits.

Architectures (one converter each: a config mapping and a weight mapping):
- `LlamaForCausalLM`: our transformer (GQA, SwiGLU, RMSNorm), with RoPE scaled as the checkpoint's
  `rope_parameters` say (linear, dynamic NTK, YaRN; models/positions.py); Llama's `attention_bias`.
  `MistralForCausalLM` (without a sliding window shorter than the context), `Qwen2ForCausalLM` (query / key /
  value biases) and `Qwen3ForCausalLM` (QK-norm: our `attention='qk_norm'`, whose norms use epsilon 1e-6) share
  its layout.
- `GPT2LMHeadModel`: our transformer with LayerNorm, learned positions, GELU and biases everywhere.
- `MambaForCausalLM`: our `mamba` family (Mamba-1 layers: the selective scan, models/mamba1.py).
- `Mamba2ForCausalLM`: our `ssd` family (Mamba-2 layers: SSD, models/mamba2.py), groups of B / C included.
- `DeepseekV3ForCausalLM`: MLA (models/mla.py), the sigmoid router with groups and route_scale, dense first
  blocks (models/moe.py, models/moe_transformer.py). `transformers` Linear weights are [out, in]; ours [in, out].
  DeepSeek rotates interleaved pairs (x_0, x_1), (x_2, x_3), ... of the rotary columns; we rotate
  (x_i, x_{i + d/2}): the rotary columns of the query and shared-key projections are permuted (evens, then
  odds), which gives the same rotated vectors in our layout and the same scores. The MTP layers of a full
  DeepSeek-V3 checkpoint (`model.layers.{num_hidden_layers}.*`) are not part of `DeepseekV3ForCausalLM`.

An architecture or config field this cannot reproduce exactly is refused in one line naming it. Weights are
read from safetensors only: pickle checkpoints (`*.bin`, `*.pt`) are refused (unpickling runs arbitrary code).
Needs the `[hf]` extra only for its tests (`safetensors` reads the weights; `transformers` is the reference).
"""

import glob
import json
import math
import os

import jax
import ml_collections
import numpy as np

from data.config_fields import ConfigError

PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def read_hf_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"--hf_dir={hf_dir!r} has no config.json; pass a transformers checkpoint folder")
    with open(path) as f:
        return json.load(f)


def read_weights(hf_dir: str) -> dict[str, np.ndarray]:
    """Every tensor of the folder's safetensors files, as float32 NumPy arrays (bfloat16 included)."""
    from safetensors.flax import load_file  # jax arrays: NumPy has no bfloat16

    files = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
    if not files:
        pickles = [os.path.basename(p) for pattern in PICKLE_PATTERNS for p in glob.glob(os.path.join(hf_dir, pattern))]
        if pickles:
            raise ConfigError(f"--hf_dir={hf_dir!r} holds only pickle weights ({', '.join(pickles)}); unpickling runs "
                              "arbitrary code, so only *.safetensors is read (convert with transformers' save_pretrained)")
        raise ConfigError(f"--hf_dir={hf_dir!r} has no *.safetensors weights")
    weights = {}
    for path in files:
        weights.update({k: np.asarray(v, np.float32) for k, v in load_file(path).items()})
    return weights


def _refuse(field: str, value, valid: str):
    raise ConfigError(f"the checkpoint's {field}={value!r} is not supported (supported: {valid})")


def _rope_keys(hf: dict, scalings=("default", "linear", "dynamic", "yarn")) -> dict:
    """Our RoPE keys (models/positions.py) for the checkpoint's `rope_parameters` (or legacy `rope_scaling`)."""
    rope = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in scalings:
        _refuse("rope type", kind, ", ".join(map(repr, scalings)))
    keys = dict(positional="rope", rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
                rope_fraction=float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))))
    if kind == "default":
        return keys
    factor = rope.get("factor") or hf["max_position_embeddings"] / rope["original_max_position_embeddings"]
    keys.update(rope_scaling=kind, rope_factor=float(factor))
    if kind == "dynamic":  # transformers scales beyond max_position_embeddings; the cache may grow s-fold
        keys.update(rope_original_max_len=hf["max_position_embeddings"],
                    max_len=int(hf["max_position_embeddings"] * factor))
    if kind == "yarn":
        if rope.get("truncate") is False:
            _refuse("yarn truncate", False, "True (the floor / ceil correction range)")
        keys.update(rope_original_max_len=rope["original_max_position_embeddings"],
                    rope_beta_fast=float(rope.get("beta_fast") or 32), rope_beta_slow=float(rope.get("beta_slow") or 1))
        attention_factor = rope.get("attention_factor")
        if attention_factor is None and rope.get("mscale") and rope.get("mscale_all_dim"):
            mscale = lambda m: 0.1 * m * math.log(factor) + 1.0 if factor > 1 else 1.0  # noqa: E731
            attention_factor = mscale(rope["mscale"]) / mscale(rope["mscale_all_dim"])
        keys["rope_attention_factor"] = float(attention_factor or 0.0)
    return keys


def _check(hf: dict, expected: dict):
    """Refuses the first field whose value differs from the one this converter reproduces (None: absent, allowed)."""
    for field, valid in expected.items():
        value = hf.get(field)
        if value is not None and value != valid:
            _refuse(field, value, repr(valid))


# DeepSeek-V3 -----------------------------------------------------------------------------------------------

def deepseek_v3_config(hf: dict) -> ml_collections.ConfigDict:
    """The equivalent `config.model` (name "moe" with MLA, or "transformer" when no block has experts)."""
    checks = {"hidden_act": ("silu", hf.get("hidden_act", "silu")), "attention_bias": (False, hf.get("attention_bias")),
              "moe_layer_freq": (1, hf.get("moe_layer_freq", 1)),
              "num_key_value_heads": (hf["num_attention_heads"], hf.get("num_key_value_heads") or hf["num_attention_heads"])}
    for field, (valid, value) in checks.items():
        if value != valid and not (field == "attention_bias" and value is None):
            _refuse(field, value, repr(valid))
    first_dense = hf.get("first_k_dense_replace") or 0
    has_experts = bool(hf.get("n_routed_experts")) and first_dense < hf["num_hidden_layers"]
    model = dict(
        name="moe" if has_experts else "transformer", vocab_size=hf["vocab_size"], max_len=hf["max_position_embeddings"],
        d_model=hf["hidden_size"], num_layers=hf["num_hidden_layers"], norm="rmsnorm", norm_eps=hf["rms_norm_eps"],
        **_rope_keys(hf, scalings=("default",)), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention="mla", num_heads=hf["num_attention_heads"], num_kv_heads=0, q_lora_rank=hf.get("q_lora_rank") or 0,
        kv_lora_rank=hf["kv_lora_rank"], qk_nope_head_dim=hf["qk_nope_head_dim"], qk_rope_head_dim=hf["qk_rope_head_dim"],
        v_head_dim=hf["v_head_dim"], d_mlp=hf["intermediate_size"], activation="swiglu", mlp_bias=False)
    if has_experts:
        model.update(num_experts=hf["n_routed_experts"], top_k=hf["num_experts_per_tok"],
                     d_expert=hf["moe_intermediate_size"], num_shared_experts=hf.get("n_shared_experts") or 0,
                     router="sigmoid", n_groups=hf.get("n_group") or 1, topk_groups=hf.get("topk_group") or 1,
                     route_scale=float(hf.get("routed_scaling_factor", 1.0)), first_k_dense_replace=first_dense,
                     normalise_gates=bool(hf.get("norm_topk_prob", True)),
                     moe_every=1, dispatch="dense")
    return ml_collections.ConfigDict(model)


def _deinterleave(width: int) -> np.ndarray:
    """Column order that turns DeepSeek's interleaved rotary pairs into our halves: evens, then odds."""
    return np.concatenate([np.arange(0, width, 2), np.arange(1, width, 2)])


def _mla_params(w: dict, prefix: str, hf: dict) -> dict:
    heads, d_nope, d_rope, d_v, rank = (hf["num_attention_heads"], hf["qk_nope_head_dim"], hf["qk_rope_head_dim"],
                                        hf["v_head_dim"], hf["kv_lora_rank"])
    order = _deinterleave(d_rope) if hf.get("rope_interleave", True) else np.arange(d_rope)
    query_order = np.concatenate([np.arange(d_nope), d_nope + order])  # per head: no-position part, then rotary

    def query(weight):  # [H * (d_n + d_r), in] -> [in, H, d_n + d_r]
        return weight.T.reshape(-1, heads, d_nope + d_rope)[..., query_order]

    p = {}
    if hf.get("q_lora_rank"):
        p["query_down"] = w[prefix + "q_a_proj.weight"].T
        p["query_norm"] = {"scale": w[prefix + "q_a_layernorm.weight"]}
        p["query_up"] = query(w[prefix + "q_b_proj.weight"])
    else:
        p["query"] = query(w[prefix + "q_proj.weight"])
    kv_a = w[prefix + "kv_a_proj_with_mqa.weight"]  # [r + d_r, D]
    p["kv_down"], p["key_rope"] = kv_a[:rank].T, kv_a[rank:].T[:, order]
    p["kv_norm"] = {"scale": w[prefix + "kv_a_layernorm.weight"]}
    kv_b = w[prefix + "kv_b_proj.weight"].reshape(heads, d_nope + d_v, rank)
    p["key_up"], p["value_up"] = kv_b[:, :d_nope].transpose(2, 0, 1), kv_b[:, d_nope:].transpose(2, 0, 1)
    p["out"] = w[prefix + "o_proj.weight"].T.reshape(heads, d_v, -1)
    return p


def _swiglu(w: dict, prefix: str) -> dict:
    return {"wg": {"kernel": w[prefix + "gate_proj.weight"].T}, "wi": {"kernel": w[prefix + "up_proj.weight"].T},
            "wo": {"kernel": w[prefix + "down_proj.weight"].T}}


def _experts(w: dict, prefix: str, num_experts: int) -> dict:
    """Routed experts as [E, D, F] / [E, F, D], from per-expert tensors or transformers' fused in-memory layout."""
    if prefix + "gate_up_proj" in w:  # [E, 2F, D] and [E, D, F]
        gate, up = np.split(w[prefix + "gate_up_proj"], 2, axis=1)
        return {"w_gate": gate.transpose(0, 2, 1), "w_in": up.transpose(0, 2, 1),
                "w_out": w[prefix + "down_proj"].transpose(0, 2, 1)}
    stack = lambda name: np.stack([w[f"{prefix}{e}.{name}.weight"].T for e in range(num_experts)])  # noqa: E731
    return {"w_gate": stack("gate_proj"), "w_in": stack("up_proj"), "w_out": stack("down_proj")}


def _stacked(layers: list[dict]) -> dict:
    """Per-layer trees -> one tree with a leading layer axis (what nn.scan holds)."""
    return jax.tree.map(lambda *xs: np.stack(xs), *layers)


def deepseek_v3_variables(hf: dict, w: dict, model_config) -> dict:
    first_dense = model_config.get("first_k_dense_replace", model_config.num_layers if model_config.name != "moe" else 0)

    def block(i: int) -> tuple[dict, dict]:
        prefix = f"model.layers.{i}."
        params = {"attention_norm": {"scale": w[prefix + "input_layernorm.weight"]},
                  "mlp_norm": {"scale": w[prefix + "post_attention_layernorm.weight"]},
                  "attention": _mla_params(w, prefix + "self_attn.", hf)}
        if i < first_dense:
            return {**params, "mlp": _swiglu(w, prefix + "mlp.")}, {}
        moe = {"router": w[prefix + "mlp.gate.weight"].T, **_experts(w, prefix + "mlp.experts.", hf["n_routed_experts"])}
        if hf.get("n_shared_experts"):
            moe["shared"] = _swiglu(w, prefix + "mlp.shared_experts.")
        bias = w.get(prefix + "mlp.gate.e_score_correction_bias", np.zeros(hf["n_routed_experts"], np.float32))
        return {**params, "moe": moe}, {"moe": {"bias": bias}}

    blocks = [block(i) for i in range(hf["num_hidden_layers"])]
    params = {"embed": {"embedding": w["model.embed_tokens.weight"]}, "final_norm": {"scale": w["model.norm.weight"]}}
    if not model_config.tie_embeddings:
        params["unembed"] = {"kernel": w["lm_head.weight"].T}
    if model_config.name != "moe":
        params["layers"] = _stacked([p for p, _ in blocks])
        return {"params": params}
    if first_dense:
        params["dense_layers"] = _stacked([p for p, _ in blocks[:first_dense]])
    params["layers"] = {"block_0": _stacked([p for p, _ in blocks[first_dense:]])}
    return {"params": params, "router_bias": {"layers": {"block_0": _stacked([s for _, s in blocks[first_dense:]])}}}


# Llama -------------------------------------------------------------------------------------------------------

def llama_config(hf: dict) -> ml_collections.ConfigDict:
    """The equivalent `config.model`: our transformer with GQA, SwiGLU, RMSNorm and Llama's RoPE (scalings
    included). transformers' Llama rotates halves (x_i, x_{i + d/2}) as we do: no column permutation."""
    _check(hf, {"hidden_act": "silu", "mlp_bias": False, "pretraining_tp": 1, "use_sliding_window": False})
    if hf.get("sliding_window") and hf["sliding_window"] < hf["max_position_embeddings"] and (
            hf.get("model_type") != "qwen2" or hf.get("use_sliding_window")):
        _refuse("sliding_window", hf["sliding_window"], f"None or >= max_position_embeddings={hf['max_position_embeddings']}")
    heads, qk_norm = hf["num_attention_heads"], hf.get("model_type") == "qwen3"
    if qk_norm and hf["rms_norm_eps"] != 1e-6:
        _refuse("rms_norm_eps", hf["rms_norm_eps"], "1e-6 for Qwen3 (the epsilon of our query / key norms)")
    bias = "qkv" if hf.get("model_type") == "qwen2" else "all" if hf.get("attention_bias") else "none"
    model = dict(name="transformer", vocab_size=hf["vocab_size"], max_len=hf["max_position_embeddings"],
                 d_model=hf["hidden_size"], num_layers=hf["num_hidden_layers"], norm="rmsnorm", norm_eps=hf["rms_norm_eps"],
                 tie_embeddings=bool(hf.get("tie_word_embeddings", False)), attention="qk_norm" if qk_norm else "gqa",
                 num_heads=heads,
                 num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
                 d_mlp=hf["intermediate_size"], activation="swiglu", mlp_bias=False, attention_bias=bias)
    model.update(_rope_keys(hf))  # may raise max_len (dynamic NTK decodes past the original context)
    return ml_collections.ConfigDict(model)


def llama_variables(hf: dict, w: dict, model_config) -> dict:
    heads, kv_heads, head_dim = model_config.num_heads, model_config.num_kv_heads, model_config.head_dim

    def block(i: int) -> dict:
        prefix = f"model.layers.{i}."
        projection = lambda name, n: w[f"{prefix}self_attn.{name}.weight"].T.reshape(-1, n, head_dim)  # noqa: E731
        params = {"attention_norm": {"scale": w[prefix + "input_layernorm.weight"]},
                "mlp_norm": {"scale": w[prefix + "post_attention_layernorm.weight"]},
                "attention": {"query": projection("q_proj", heads), "key": projection("k_proj", kv_heads),
                              "value": projection("v_proj", kv_heads),
                              "out": w[prefix + "self_attn.o_proj.weight"].T.reshape(heads, head_dim, -1)},
                "mlp": _swiglu(w, prefix + "mlp.")}
        if model_config.attention_bias != "none":
            for name, proj, n in (("query", "q_proj", heads), ("key", "k_proj", kv_heads), ("value", "v_proj", kv_heads)):
                params["attention"][f"{name}_bias"] = w[f"{prefix}self_attn.{proj}.bias"].reshape(n, head_dim)
        if model_config.attention_bias == "all":
            params["attention"]["out_bias"] = w[prefix + "self_attn.o_proj.bias"]
        if model_config.attention == "qk_norm":
            params["attention"]["query_norm"] = {"scale": w[prefix + "self_attn.q_norm.weight"]}
            params["attention"]["key_norm"] = {"scale": w[prefix + "self_attn.k_norm.weight"]}
        return params

    params = {"embed": {"embedding": w["model.embed_tokens.weight"]}, "final_norm": {"scale": w["model.norm.weight"]},
              "layers": _stacked([block(i) for i in range(hf["num_hidden_layers"])])}
    if not model_config.tie_embeddings:
        params["unembed"] = {"kernel": w["lm_head.weight"].T}
    return {"params": params}


# GPT-2 -----------------------------------------------------------------------------------------------------

def gpt2_config(hf: dict) -> ml_collections.ConfigDict:
    """The equivalent `config.model`: our transformer with LayerNorm, learned positions, GELU (tanh approximation:
    GPT-2's gelu_new is Flax's default gelu) and biases on every projection. GPT-2's Conv1D weights are already
    [in, out]; the fused c_attn [D, 3D] splits into query, key and value."""
    _check(hf, {"activation_function": "gelu_new", "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                "add_cross_attention": False})
    width, heads = hf["n_embd"], hf["n_head"]
    return ml_collections.ConfigDict(dict(
        name="transformer", vocab_size=hf["vocab_size"], max_len=hf["n_positions"], d_model=width,
        num_layers=hf["n_layer"], norm="layernorm", norm_eps=hf["layer_norm_epsilon"], positional="learned",
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)), attention="gqa", num_heads=heads, num_kv_heads=heads,
        head_dim=width // heads, attention_bias="all", d_mlp=hf.get("n_inner") or 4 * width, activation="gelu",
        mlp_bias=True))


def gpt2_variables(hf: dict, w: dict, model_config) -> dict:
    w = {k.removeprefix("transformer."): v for k, v in w.items()}
    heads, head_dim, width = model_config.num_heads, model_config.head_dim, model_config.d_model
    norm = lambda name: {"scale": w[name + ".weight"], "bias": w[name + ".bias"]}  # noqa: E731
    dense = lambda name: {"kernel": w[name + ".weight"], "bias": w[name + ".bias"]}  # noqa: E731

    def block(i: int) -> dict:
        prefix = f"h.{i}."
        qkv = np.split(w[prefix + "attn.c_attn.weight"], 3, axis=1)  # [D, D] each
        qkv_bias = np.split(w[prefix + "attn.c_attn.bias"], 3)
        attention = {}
        for name, kernel, bias in zip(("query", "key", "value"), qkv, qkv_bias):
            attention[name] = kernel.reshape(width, heads, head_dim)
            attention[f"{name}_bias"] = bias.reshape(heads, head_dim)
        attention["out"] = w[prefix + "attn.c_proj.weight"].reshape(heads, head_dim, width)
        attention["out_bias"] = w[prefix + "attn.c_proj.bias"]
        return {"attention_norm": norm(prefix + "ln_1"), "mlp_norm": norm(prefix + "ln_2"), "attention": attention,
                "mlp": {"wi": dense(prefix + "mlp.c_fc"), "wo": dense(prefix + "mlp.c_proj")}}

    params = {"embed": {"embedding": w["wte.weight"]}, "position_embedding": w["wpe.weight"],
              "final_norm": norm("ln_f"), "layers": _stacked([block(i) for i in range(model_config.num_layers)])}
    if not model_config.tie_embeddings:
        params["unembed"] = {"kernel": w["lm_head.weight"].T}
    return {"params": params}


# Mamba -----------------------------------------------------------------------------------------------------

def mamba_config(hf: dict) -> ml_collections.ConfigDict:
    """The equivalent `config.model`: our `mamba` family (Mamba-1 layers, models/mamba1.py), RMSNorm before each mixer
    and at the end. transformers' MambaMixer computes what ours does: no layout change but [out, in] -> [in, out]."""
    _check(hf, {"hidden_act": "silu"})
    width, inner = hf["hidden_size"], hf.get("intermediate_size") or int(hf.get("expand", 2) * hf["hidden_size"])
    if inner % width:
        _refuse("intermediate_size", inner, f"a multiple of hidden_size={width} (our d_inner = expand * d_model)")
    rank = hf.get("time_step_rank", "auto")
    return ml_collections.ConfigDict(dict(
        name="mamba", layer_pattern="M", vocab_size=hf["vocab_size"], max_len=2048, positional="none",
        d_model=width, num_layers=hf["num_hidden_layers"], norm="rmsnorm", norm_eps=hf["layer_norm_epsilon"],
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)), expand=inner // width, ssm_state=hf["state_size"],
        conv_width=hf["conv_kernel"], dt_rank=math.ceil(width / 16) if rank == "auto" else int(rank),
        mamba1_bias=bool(hf.get("use_bias", False))))


def mamba_variables(hf: dict, w: dict, model_config) -> dict:
    def layer(i: int) -> dict:
        prefix = f"backbone.layers.{i}.mixer."
        mixer = {"in_proj": w[prefix + "in_proj.weight"].T, "x_proj": w[prefix + "x_proj.weight"].T,
                 "dt_proj": w[prefix + "dt_proj.weight"].T, "dt_bias": w[prefix + "dt_proj.bias"],
                 "conv_kernel": w[prefix + "conv1d.weight"][:, 0, :].T, "A_log": w[prefix + "A_log"], "D": w[prefix + "D"],
                 "conv_bias": w.get(prefix + "conv1d.bias", np.zeros(w[prefix + "D"].shape, np.float32)),
                 "out_proj": w[prefix + "out_proj.weight"].T}
        if model_config.mamba1_bias:
            mixer.update(in_proj_bias=w[prefix + "in_proj.bias"], out_proj_bias=w[prefix + "out_proj.bias"])
        return {"layer_0_mamba1": {"norm": {"scale": w[f"backbone.layers.{i}.norm.weight"]}, "mixer": mixer}}

    params = {"embed": {"embedding": w["backbone.embeddings.weight"]}, "final_norm": {"scale": w["backbone.norm_f.weight"]},
              "periods": _stacked([layer(i) for i in range(hf["num_hidden_layers"])])}
    if not model_config.tie_embeddings:
        params["unembed"] = {"kernel": w["lm_head.weight"].T}
    return {"params": params}


# Mamba-2 ---------------------------------------------------------------------------------------------------

def _json_float(value) -> float:
    """A config.json number; transformers 5 writes infinities as {"__float__": "Infinity"}."""
    return float(value["__float__"]) if isinstance(value, dict) else float(value)


def mamba2_config(hf: dict) -> ml_collections.ConfigDict:
    """The equivalent `config.model`: our `ssd` family (Mamba-2 layers, models/mamba2.py), RMSNorm before each mixer
    and at the end. transformers' Mamba2Mixer splits in_proj as [z, xBC, dt] and gates its RMSNorm per group after
    the gate, as ours (mamba_ssm's layout); one epsilon serves the block norms and the gated norm."""
    _check(hf, {"hidden_act": "silu", "use_bias": False, "rms_norm": True})
    width, heads, head_dim = hf["hidden_size"], hf["num_heads"], hf["head_dim"]
    inner = int(hf.get("expand", 2) * width)
    if inner % width or heads * head_dim != inner:
        _refuse("num_heads * head_dim", heads * head_dim, f"expand * hidden_size = {inner}, a multiple of hidden_size")
    limit = [_json_float(x) for x in hf.get("time_step_limit") or (0.0, float("inf"))]
    return ml_collections.ConfigDict(dict(
        name="ssd", layer_pattern="S", vocab_size=hf["vocab_size"], max_len=2048, positional="none", d_model=width,
        num_layers=hf["num_hidden_layers"], norm="rmsnorm", norm_eps=hf["layer_norm_epsilon"],
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), expand=inner // width, ssm_head_dim=head_dim,
        ssm_state=hf["state_size"], ssm_groups=hf.get("n_groups", 1), conv_width=hf["conv_kernel"],
        dt_limit_min=float(limit[0]), dt_limit_max=float(limit[1]), ssm_norm_eps=hf["layer_norm_epsilon"]))


def mamba2_variables(hf: dict, w: dict, model_config) -> dict:
    def layer(i: int) -> dict:
        prefix = f"backbone.layers.{i}.mixer."
        conv = w[prefix + "conv1d.weight"][:, 0, :].T  # [C, 1, W] -> [W, C]
        mixer = {"in_proj": w[prefix + "in_proj.weight"].T, "conv_kernel": conv,
                 "conv_bias": w.get(prefix + "conv1d.bias", np.zeros(conv.shape[1], np.float32)),
                 "dt_bias": w[prefix + "dt_bias"], "A_log": w[prefix + "A_log"], "D": w[prefix + "D"],
                 "norm": w[prefix + "norm.weight"], "out_proj": w[prefix + "out_proj.weight"].T}
        return {"layer_0_ssm": {"norm": {"scale": w[f"backbone.layers.{i}.norm.weight"]}, "mixer": mixer}}

    params = {"embed": {"embedding": w["backbone.embeddings.weight"]}, "final_norm": {"scale": w["backbone.norm_f.weight"]},
              "periods": _stacked([layer(i) for i in range(hf["num_hidden_layers"])])}
    if not model_config.tie_embeddings:
        params["unembed"] = {"kernel": w["lm_head.weight"].T}
    return {"params": params}


ARCHITECTURES = {"DeepseekV3ForCausalLM": (deepseek_v3_config, deepseek_v3_variables),
                 "GPT2LMHeadModel": (gpt2_config, gpt2_variables),
                 "LlamaForCausalLM": (llama_config, llama_variables),
                 "MistralForCausalLM": (llama_config, llama_variables),
                 "Qwen2ForCausalLM": (llama_config, llama_variables),
                 "Qwen3ForCausalLM": (llama_config, llama_variables),
                 "Mamba2ForCausalLM": (mamba2_config, mamba2_variables),
                 "MambaForCausalLM": (mamba_config, mamba_variables)}


def convert(hf_dir: str):
    """(config.model as a ConfigDict, Flax variables) of the transformers checkpoint in `hf_dir`."""
    hf = read_hf_config(hf_dir)
    architecture = (hf.get("architectures") or [None])[0]
    if architecture not in ARCHITECTURES:
        _refuse("architecture", architecture, ", ".join(ARCHITECTURES))
    if hf.get("quantization_config"):  # e.g. DeepSeek-V3's released FP8 weights with their block scales
        _refuse("quantization_config", hf["quantization_config"].get("quant_method", "?"),
                "unquantised float32 / bfloat16 weights; dequantise first")
    to_config, to_variables = ARCHITECTURES[architecture]
    model_config = to_config(hf)
    return model_config, to_variables(hf, read_weights(hf_dir), model_config)


def write_run_folder(hf_dir: str, workdir: str):
    """Converts the checkpoint into `workdir`: config.json (the default LM experiment's config with the converted
    model, every other model key at its default; the folder's tokenizer.json as data.tokenizer "hf" when it has
    one) and a sealed orbax checkpoint of the train state at step 0."""
    from experiments import restore
    from experiments.training import validation
    from experiments.configs import base, lm_shakespeare

    model_config, variables = convert(hf_dir)
    config = lm_shakespeare.get_config()
    with config.unlocked():
        config.model = base.get_config(model_config.name, config.data.name).model
    config.model.update(model_config.to_dict())
    config.mesh.update(data=1, fsdp=1, tensor=1, expert=1)
    if os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):  # its tokenizer reads text for sampling and training
        config.data.update(tokenizer="hf", tokenizer_file=os.path.abspath(hf_dir))
    validation.validate(config, num_devices=1)
    restore.save_variables(config, variables, workdir)
    return config


def main(argv):
    from absl import flags

    from experiments.training import cli

    del argv
    hf_dir, workdir = flags.FLAGS.hf_dir, flags.FLAGS.workdir
    try:
        config = write_run_folder(hf_dir, workdir)
    except ConfigError as e:
        cli.fail(str(e))
    print(f"imported {hf_dir} as model.name={config.model.name!r} "
          f"({config.model.num_layers} layers, d_model {config.model.d_model}) into {workdir}")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("hf_dir", None, "A transformers checkpoint folder: config.json and *.safetensors.", required=True)
    flags.DEFINE_string("workdir", None, "The run folder to write.", required=True)
    app.run(main)
