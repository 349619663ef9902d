"""Run folders out to Hugging Face `transformers` checkpoints: the inverse of experiments/import_hf.py.

    python -m experiments.export_hf --workdir=RUN --out=DIR [--step=N] [--max_shard_mb=2000]

reads the run's config and checkpoint (the newest intact one, or step N; the weights the run evaluates: a LoRA
run's adapters merged, a schedule-free run's averaged iterate) and writes DIR: `config.json`, `model.safetensors`
(or `model-0000k-of-0000n.safetensors` shards and their `model.safetensors.index.json` above `--max_shard_mb`) and
the run's tokenizer (below), which `transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads with the run's
logits. `export(workdir, out_dir, step=None)` is the library function.

Each family maps onto the `transformers` architecture that computes what it computes (one exporter each: a config
mapping and a weight mapping, the importer's read backwards; `transformers` Linear weights are [out, in], ours
[in, out]):
- `transformer` with RoPE: `LlamaForCausalLM` (GQA, SwiGLU, RMSNorm; RoPE plain or scaled: linear, dynamic NTK,
  YaRN; biases on all four projections with `attention_bias='all'`), `Qwen2ForCausalLM` for biases on the query,
  key and value only (`attention_bias='qkv'`), `Qwen3ForCausalLM` for QK-norm (`attention='qk_norm'`: a per-head
  RMSNorm of queries and keys before RoPE).
- `transformer` with learned positions: `GPT2LMHeadModel` (LayerNorm, GELU with the tanh approximation, biases on
  every projection; the three attention projections fused into c_attn).
- `mamba`: `MambaForCausalLM`; `ssd`: `Mamba2ForCausalLM`.
- MLA (`attention='mla'`, in the `moe` or the `transformer` family): `DeepseekV3ForCausalLM` (the sigmoid router
  with its groups, route_scale and score-correction biases, dense first blocks, shared experts; the rotary columns
  of the query and shared-key projections permuted back into DeepSeek's interleaved pairs). The multi-token-
  prediction modules are not part of that class: a run with `mtp_depth > 0` exports its main model and says so.

The other families (hybrid, MoD, MoR, DEQ, Coconut, SAE) and every option these classes do not compute (BitNet,
early exits, short convolutions, attention patterns other than causal, ALiBi / T5 / sinusoidal positions, ...)
are refused in one line naming it, before anything is read.

Tokenizer: a byte-level run (`data.tokenizer='byte'`) gets a `tokenizer.json` whose ids are the UTF-8 bytes
(a byte-level BPE without merges, `tokenizers`), a `data.tokenizer='hf'` run its own `tokenizer.json` (and the
tokenizer config files beside it), a SentencePiece run its model file as `tokenizer.model`; `AutoTokenizer` reads
the first two. Needs the `[hf]` extra (`safetensors`, `tokenizers`).
"""

import json
import os
import shutil

import numpy as np

from data.config_fields import ConfigError

NOT_IN_TRANSFORMERS = ("hybrid", "mod", "mor", "deq", "coconut", "sae")
INTERLEAVE_ROPE = True  # DeepSeek's released layout (rope_interleave=True)


def _refuse(key: str, value, valid: str):
    raise ConfigError(f"cannot export model.{key}={value!r}: {valid}")


def _require(m, expected: dict, architecture: str):
    """Refuses the first key whose value is not one `architecture` computes."""
    for key, valid in expected.items():
        if m.get(key, valid[0]) not in valid:
            _refuse(key, m[key], f"{architecture} needs {' or '.join(map(repr, valid))}")


def _common(m, architecture: str):
    """Options no exported architecture computes."""
    _require(m, {"bitnet": (False,), "exit_every": (0,), "short_conv": (0,), "attention_pattern": ("causal",),
                 "ffn": ("mlp",)}, architecture)


def architecture_of(m) -> str:
    """The `transformers` class that computes `config.model`; a one-line ConfigError if there is none."""
    if m.name in NOT_IN_TRANSFORMERS:
        _refuse("name", m.name, "transformers has no such architecture (exportable: transformer, moe with "
                "attention='mla', ssd, mamba)")
    if m.name == "mamba":
        return "MambaForCausalLM"
    if m.name == "ssd":
        return "Mamba2ForCausalLM"
    if m.attention == "mla":
        return "DeepseekV3ForCausalLM"
    if m.name == "moe":
        _refuse("attention", m.attention, "an MoE exports as DeepseekV3ForCausalLM, which needs attention='mla'")
    if m.positional == "learned":
        return "GPT2LMHeadModel"
    if m.positional != "rope":
        _refuse("positional", m.positional, "exportable positions are 'rope' (Llama, Qwen) and 'learned' (GPT-2)")
    if m.attention == "qk_norm":
        return "Qwen3ForCausalLM"
    if m.attention != "gqa":
        _refuse("attention", m.attention, "exportable attentions are 'gqa', 'qk_norm' and 'mla'")
    return "Qwen2ForCausalLM" if m.attention_bias == "qkv" else "LlamaForCausalLM"


def _np(tree):
    return {k: _np(v) for k, v in tree.items()} if isinstance(tree, dict) else np.asarray(tree, np.float32)


def _linear(kernel) -> np.ndarray:
    """Our [in, out] kernel (any trailing split of out) as a transformers Linear weight [out, in]."""
    return np.ascontiguousarray(kernel.reshape(kernel.shape[0], -1).T)


def _embeddings(params, m, prefix: str, names=("embed_tokens", "norm")) -> dict:
    """The input embedding, the final norm and (untied) the output projection."""
    tensors = {f"{prefix}{names[0]}.weight": params["embed"]["embedding"],
               f"{prefix}{names[1]}.weight": params["final_norm"]["scale"]}
    if not m.tie_embeddings:
        tensors["lm_head.weight"] = np.ascontiguousarray(params["unembed"]["kernel"].T)
    return tensors


def _swiglu(mlp: dict, prefix: str) -> dict:
    return {prefix + "gate_proj.weight": _linear(mlp["wg"]["kernel"]), prefix + "up_proj.weight": _linear(mlp["wi"]["kernel"]),
            prefix + "down_proj.weight": _linear(mlp["wo"]["kernel"])}


def _layer(stacked: dict, i: int) -> dict:
    return {k: _layer(v, i) if isinstance(v, dict) else v[i] for k, v in stacked.items()}


# Llama, Qwen2, Qwen3 ------------------------------------------------------------------------------------------

def _rope_parameters(m) -> tuple[dict, int]:
    """(transformers' rope_parameters, max_position_embeddings) of our RoPE keys (models/positions.py)."""
    if m.rope_fraction != 1.0:
        _refuse("rope_fraction", m.rope_fraction, "Llama and Qwen rotate whole heads (1.0)")
    rope = {"rope_type": "default", "rope_theta": float(m.rope_theta)}
    original = m.rope_original_max_len or m.max_len
    if m.rope_scaling == "none":
        return rope, m.max_len
    if m.rope_scaling == "linear":
        return {**rope, "rope_type": "linear", "factor": float(m.rope_factor)}, m.max_len
    if m.rope_scaling == "dynamic":  # transformers scales beyond max_position_embeddings: our trained context
        return {**rope, "rope_type": "dynamic", "factor": float(m.rope_factor)}, original
    if m.rope_scaling == "yarn":
        rope.update(rope_type="yarn", factor=float(m.rope_factor), original_max_position_embeddings=original,
                    beta_fast=float(m.rope_beta_fast), beta_slow=float(m.rope_beta_slow), truncate=True)
        if m.rope_attention_factor:
            rope["attention_factor"] = float(m.rope_attention_factor)
        return rope, m.max_len
    _refuse("rope_scaling", m.rope_scaling, "transformers has 'none', 'linear', 'dynamic' and 'yarn'")


def llama_checks(m, architecture: str):
    _common(m, architecture)
    _require(m, {"norm": ("rmsnorm",), "activation": ("swiglu",), "mlp_bias": (False,), "mtp_depth": (0,)}, architecture)
    if architecture == "Qwen3ForCausalLM":
        _require(m, {"attention_bias": ("none", "all"), "norm_eps": (1e-6,)}, architecture)  # q/k norms: 1e-6
    _rope_parameters(m)


def llama_config(m, architecture: str) -> dict:
    rope, max_positions = _rope_parameters(m)
    heads = m.num_heads
    config = {"architectures": [architecture], "model_type": {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                                                              "Qwen3ForCausalLM": "qwen3"}[architecture],
              "vocab_size": m.vocab_size, "hidden_size": m.d_model, "intermediate_size": m.d_mlp,
              "num_hidden_layers": m.num_layers, "num_attention_heads": heads,
              "num_key_value_heads": m.num_kv_heads or heads, "head_dim": m.head_dim or m.d_model // heads,
              "hidden_act": "silu", "max_position_embeddings": max_positions, "rms_norm_eps": m.norm_eps,
              "tie_word_embeddings": m.tie_embeddings, "rope_parameters": rope, "use_cache": True}
    if architecture == "LlamaForCausalLM":
        config.update(attention_bias=m.attention_bias == "all", mlp_bias=False, pretraining_tp=1)
    else:
        config.update(use_sliding_window=False, sliding_window=None)
    if architecture == "Qwen3ForCausalLM":
        config["attention_bias"] = m.attention_bias == "all"
    return config


def llama_tensors(params, m, architecture: str) -> dict:
    tensors = _embeddings(params, m, "model.")
    for i in range(m.num_layers):
        layer, prefix = _layer(params["layers"], i), f"model.layers.{i}."
        attention = layer["attention"]
        tensors.update({prefix + "input_layernorm.weight": layer["attention_norm"]["scale"],
                        prefix + "post_attention_layernorm.weight": layer["mlp_norm"]["scale"],
                        prefix + "self_attn.o_proj.weight": _linear(attention["out"].reshape(-1, m.d_model)),
                        **_swiglu(layer["mlp"], prefix + "mlp.")})
        for name, projection in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            tensors[f"{prefix}self_attn.{projection}.weight"] = _linear(attention[name])
            if m.attention_bias != "none":
                tensors[f"{prefix}self_attn.{projection}.bias"] = attention[f"{name}_bias"].reshape(-1)
        if m.attention_bias == "all":
            tensors[prefix + "self_attn.o_proj.bias"] = attention["out_bias"]
        if architecture == "Qwen3ForCausalLM":
            tensors[prefix + "self_attn.q_norm.weight"] = attention["query_norm"]["scale"]
            tensors[prefix + "self_attn.k_norm.weight"] = attention["key_norm"]["scale"]
    return tensors


# GPT-2 --------------------------------------------------------------------------------------------------------

def gpt2_checks(m, architecture: str):
    _common(m, architecture)
    _require(m, {"norm": ("layernorm",), "activation": ("gelu",), "mlp_bias": (True,), "attention_bias": ("all",),
                 "attention": ("gqa",), "num_kv_heads": (0, m.num_heads), "head_dim": (0, m.d_model // m.num_heads),
                 "mtp_depth": (0,)}, architecture)


def gpt2_config(m, architecture: str) -> dict:
    heads = m.num_heads
    return {"architectures": [architecture], "model_type": "gpt2", "vocab_size": m.vocab_size, "n_embd": m.d_model,
            "n_head": heads, "n_layer": m.num_layers, "n_positions": m.max_len, "n_inner": m.d_mlp,
            "activation_function": "gelu_new", "layer_norm_epsilon": m.norm_eps, "tie_word_embeddings": m.tie_embeddings,
            "scale_attn_weights": True, "bos_token_id": None, "eos_token_id": None, "use_cache": True}


def gpt2_tensors(params, m, architecture: str) -> dict:
    del architecture
    norm = lambda name, p: {name + ".weight": p["scale"], name + ".bias": p["bias"]}  # noqa: E731
    tensors = {"transformer.wte.weight": params["embed"]["embedding"],
               "transformer.wpe.weight": params["position_embedding"], **norm("transformer.ln_f", params["final_norm"])}
    if not m.tie_embeddings:
        tensors["lm_head.weight"] = np.ascontiguousarray(params["unembed"]["kernel"].T)
    for i in range(m.num_layers):  # Conv1D weights are [in, out], as ours
        layer, prefix = _layer(params["layers"], i), f"transformer.h.{i}."
        attention = layer["attention"]
        qkv = [attention[name].reshape(m.d_model, -1) for name in ("query", "key", "value")]
        tensors.update({
            **norm(prefix + "ln_1", layer["attention_norm"]), **norm(prefix + "ln_2", layer["mlp_norm"]),
            prefix + "attn.c_attn.weight": np.concatenate(qkv, axis=1),
            prefix + "attn.c_attn.bias": np.concatenate([attention[f"{n}_bias"].reshape(-1) for n in ("query", "key", "value")]),
            prefix + "attn.c_proj.weight": attention["out"].reshape(-1, m.d_model), prefix + "attn.c_proj.bias": attention["out_bias"],
            prefix + "mlp.c_fc.weight": layer["mlp"]["wi"]["kernel"], prefix + "mlp.c_fc.bias": layer["mlp"]["wi"]["bias"],
            prefix + "mlp.c_proj.weight": layer["mlp"]["wo"]["kernel"], prefix + "mlp.c_proj.bias": layer["mlp"]["wo"]["bias"]})
    return tensors


# Mamba-1 and Mamba-2 ------------------------------------------------------------------------------------------

def mamba_checks(m, architecture: str):
    _require(m, {"norm": ("rmsnorm",), "positional": ("none",), "mtp_depth": (0,)}, architecture)
    if architecture == "Mamba2ForCausalLM":
        _require(m, {"ssm_norm_eps": (m.norm_eps,)}, architecture + " (one epsilon for the block norms and the gated norm)")


def mamba_config(m, architecture: str) -> dict:
    return {"architectures": [architecture], "model_type": "mamba", "vocab_size": m.vocab_size, "hidden_size": m.d_model,
            "intermediate_size": m.expand * m.d_model, "expand": m.expand, "state_size": m.ssm_state,
            "num_hidden_layers": m.num_layers, "conv_kernel": m.conv_width, "layer_norm_epsilon": m.norm_eps,
            "time_step_rank": m.dt_rank or -(-m.d_model // 16), "use_bias": m.mamba1_bias, "use_conv_bias": True,
            "hidden_act": "silu", "residual_in_fp32": True, "tie_word_embeddings": m.tie_embeddings,
            "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}


def _mamba_tensors(params, m, member: str, own) -> dict:
    """The embeddings and every layer's norm and the mixer entries both Mamba versions share, plus `own(mixer)`:
    the version's other mixer entries (names after "mixer.")."""
    tensors = _embeddings(params, m, "backbone.", names=("embeddings", "norm_f"))
    for i in range(m.num_layers):
        layer, prefix = _layer(params["periods"], i)[member], f"backbone.layers.{i}."
        mixer = layer["mixer"]
        shared = {"in_proj.weight": _linear(mixer["in_proj"]), "out_proj.weight": _linear(mixer["out_proj"]),
                  "conv1d.weight": np.ascontiguousarray(mixer["conv_kernel"].T[:, None, :]),
                  "conv1d.bias": mixer["conv_bias"], "A_log": mixer["A_log"], "D": mixer["D"]}
        tensors[prefix + "norm.weight"] = layer["norm"]["scale"]
        tensors.update({prefix + "mixer." + name: value for name, value in {**shared, **own(mixer)}.items()})
    return tensors


def mamba_tensors(params, m, architecture: str) -> dict:
    del architecture

    def own(mixer):
        entries = {"x_proj.weight": _linear(mixer["x_proj"]), "dt_proj.weight": _linear(mixer["dt_proj"]),
                   "dt_proj.bias": mixer["dt_bias"]}
        if m.mamba1_bias:
            entries.update({"in_proj.bias": mixer["in_proj_bias"], "out_proj.bias": mixer["out_proj_bias"]})
        return entries

    return _mamba_tensors(params, m, "layer_0_mamba1", own)


def mamba2_config(m, architecture: str) -> dict:
    inner = m.expand * m.d_model
    return {"architectures": [architecture], "model_type": "mamba2", "vocab_size": m.vocab_size, "hidden_size": m.d_model,
            "expand": m.expand, "num_heads": inner // m.ssm_head_dim, "head_dim": m.ssm_head_dim,
            "state_size": m.ssm_state, "n_groups": m.ssm_groups, "num_hidden_layers": m.num_layers,
            "conv_kernel": m.conv_width, "layer_norm_epsilon": m.norm_eps, "chunk_size": m.chunk_size or 256,
            "time_step_limit": [float(m.dt_limit_min), float(m.dt_limit_max)], "use_bias": False, "use_conv_bias": True,
            "rms_norm": True, "hidden_act": "silu", "residual_in_fp32": True, "tie_word_embeddings": m.tie_embeddings,
            "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}


def mamba2_tensors(params, m, architecture: str) -> dict:
    del architecture
    return _mamba_tensors(params, m, "layer_0_ssm", lambda mixer: {"dt_bias": mixer["dt_bias"], "norm.weight": mixer["norm"]})


# DeepSeek-V3 --------------------------------------------------------------------------------------------------

def _mla_dims(params) -> dict:
    """(heads, d_nope, d_rope, d_v, kv rank, q rank or None) from the first block's shapes (0 keys derive them)."""
    stack = params.get("dense_layers") or params["layers"].get("block_0") or params["layers"]
    attention = stack["attention"]
    query = attention["query_up"] if "query_up" in attention else attention["query"]
    _, _, heads, d_query = query.shape
    d_rope = attention["key_rope"].shape[-1]
    return dict(heads=heads, d_nope=d_query - d_rope, d_rope=d_rope, d_v=attention["value_up"].shape[-1],
                rank=attention["kv_down"].shape[-1], q_rank=attention["query_down"].shape[-1] if "query_down" in attention
                else None)


def deepseek_v3_checks(m, architecture: str):
    _common(m, architecture)
    _require(m, {"norm": ("rmsnorm",), "norm_eps": (1e-6,), "activation": ("swiglu",), "mlp_bias": (False,),
                 "attention_bias": ("none",), "positional": ("rope",), "rope_scaling": ("none",)},
             architecture + " (its latent norms and ours use epsilon 1e-6)")
    if m.name == "moe":
        _require(m, {"router": ("sigmoid",), "moe_every": (1,)}, architecture)


def deepseek_v3_config(m, architecture: str, params) -> dict:
    dims = _mla_dims(params)
    moe = m.name == "moe"
    config = {"architectures": [architecture], "model_type": "deepseek_v3", "vocab_size": m.vocab_size,
              "hidden_size": m.d_model, "intermediate_size": m.d_mlp, "num_hidden_layers": m.num_layers,
              "num_attention_heads": dims["heads"], "num_key_value_heads": dims["heads"], "q_lora_rank": dims["q_rank"],
              "kv_lora_rank": dims["rank"], "qk_nope_head_dim": dims["d_nope"], "qk_rope_head_dim": dims["d_rope"],
              "qk_head_dim": dims["d_nope"] + dims["d_rope"], "head_dim": dims["d_rope"], "v_head_dim": dims["d_v"],
              "hidden_act": "silu", "max_position_embeddings": m.max_len, "rms_norm_eps": m.norm_eps,
              "rope_parameters": {"rope_type": "default", "rope_theta": float(m.rope_theta)},
              "rope_interleave": INTERLEAVE_ROPE, "attention_bias": False, "tie_word_embeddings": m.tie_embeddings,
              "first_k_dense_replace": m.first_k_dense_replace if moe else m.num_layers, "moe_layer_freq": 1,
              "num_nextn_predict_layers": 0, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if moe:
        config.update(n_routed_experts=m.num_experts, num_experts_per_tok=m.top_k, moe_intermediate_size=m.d_expert or m.d_mlp,
                      n_shared_experts=m.num_shared_experts, n_group=m.n_groups, topk_group=m.topk_groups,
                      routed_scaling_factor=float(m.route_scale), norm_topk_prob=bool(m.normalise_gates),
                      topk_method="noaux_tc", scoring_func="sigmoid")
    else:  # every block dense; transformers still reads the MoE keys
        config.update(n_routed_experts=1, num_experts_per_tok=1, moe_intermediate_size=m.d_mlp, n_shared_experts=0,
                      n_group=1, topk_group=1)
    return config


def _interleave(width: int) -> np.ndarray:
    """Column order that turns our rotary halves back into DeepSeek's interleaved pairs (the inverse of the importer's
    evens-then-odds permutation)."""
    return np.argsort(np.concatenate([np.arange(0, width, 2), np.arange(1, width, 2)]))


def _mla_tensors(attention: dict, prefix: str, dims: dict) -> dict:
    order = _interleave(dims["d_rope"]) if INTERLEAVE_ROPE else np.arange(dims["d_rope"])
    query_order = np.concatenate([np.arange(dims["d_nope"]), dims["d_nope"] + order])
    query = lambda w: _linear(w[..., query_order])  # noqa: E731  [in, H, d_n + d_r] -> [H * (d_n + d_r), in]
    tensors = {}
    if "query_down" in attention:
        tensors.update({prefix + "q_a_proj.weight": _linear(attention["query_down"]),
                        prefix + "q_a_layernorm.weight": attention["query_norm"]["scale"],
                        prefix + "q_b_proj.weight": query(attention["query_up"])})
    else:
        tensors[prefix + "q_proj.weight"] = query(attention["query"])
    kv_a = np.concatenate([attention["kv_down"], attention["key_rope"][:, order]], axis=1)  # [D, r + d_r]
    kv_b = np.concatenate([attention["key_up"], attention["value_up"]], axis=2)  # [r, H, d_n + d_v]
    tensors.update({prefix + "kv_a_proj_with_mqa.weight": _linear(kv_a),
                    prefix + "kv_a_layernorm.weight": attention["kv_norm"]["scale"],
                    prefix + "kv_b_proj.weight": _linear(kv_b),
                    prefix + "o_proj.weight": _linear(attention["out"].reshape(-1, attention["out"].shape[-1]))})
    return tensors


def deepseek_v3_tensors(params, m, architecture: str, router_bias: dict) -> dict:
    del architecture
    dims = _mla_dims(params)
    tensors = _embeddings(params, m, "model.")
    first_dense = m.first_k_dense_replace if m.name == "moe" else m.num_layers
    for i in range(m.num_layers):
        prefix = f"model.layers.{i}."
        if m.name != "moe":
            layer = _layer(params["layers"], i)
        elif i < first_dense:
            layer = _layer(params["dense_layers"], i)
        else:
            layer = _layer(params["layers"]["block_0"], i - first_dense)
        tensors.update({prefix + "input_layernorm.weight": layer["attention_norm"]["scale"],
                        prefix + "post_attention_layernorm.weight": layer["mlp_norm"]["scale"],
                        **_mla_tensors(layer["attention"], prefix + "self_attn.", dims)})
        if "mlp" in layer:
            tensors.update(_swiglu(layer["mlp"], prefix + "mlp."))
            continue
        moe = layer["moe"]
        tensors[prefix + "mlp.gate.weight"] = _linear(moe["router"])
        tensors[prefix + "mlp.gate.e_score_correction_bias"] = _layer(router_bias["layers"]["block_0"], i - first_dense)["moe"]["bias"]
        for e in range(m.num_experts):
            for name, ours in (("gate_proj", "w_gate"), ("up_proj", "w_in"), ("down_proj", "w_out")):
                tensors[f"{prefix}mlp.experts.{e}.{name}.weight"] = _linear(moe[ours][e])
        if "shared" in moe:
            tensors.update(_swiglu(moe["shared"], prefix + "mlp.shared_experts."))
    return tensors


# Writing ------------------------------------------------------------------------------------------------------

CHECKS = {"LlamaForCausalLM": llama_checks, "Qwen2ForCausalLM": llama_checks, "Qwen3ForCausalLM": llama_checks,
          "GPT2LMHeadModel": gpt2_checks, "MambaForCausalLM": mamba_checks, "Mamba2ForCausalLM": mamba_checks,
          "DeepseekV3ForCausalLM": deepseek_v3_checks}


def check(model_config) -> str:
    """The architecture `config.model` exports as; a one-line ConfigError naming the first key it cannot compute."""
    architecture = architecture_of(model_config)
    CHECKS[architecture](model_config, architecture)
    return architecture


def hf_checkpoint(model_config, variables: dict) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json's dict, {tensor name: float32 array}) of a model; a one-line ConfigError if it has no equivalent."""
    m = model_config
    architecture = check(m)
    params = _np(variables["params"])
    if architecture == "DeepseekV3ForCausalLM":
        return (deepseek_v3_config(m, architecture, params),
                deepseek_v3_tensors(params, m, architecture, _np(variables.get("router_bias", {}))))
    to_config, to_tensors = {"LlamaForCausalLM": (llama_config, llama_tensors), "Qwen2ForCausalLM": (llama_config, llama_tensors),
                             "Qwen3ForCausalLM": (llama_config, llama_tensors), "GPT2LMHeadModel": (gpt2_config, gpt2_tensors),
                             "MambaForCausalLM": (mamba_config, mamba_tensors),
                             "Mamba2ForCausalLM": (mamba2_config, mamba2_tensors)}[architecture]
    return to_config(m, architecture), to_tensors(params, m, architecture)


def write_safetensors(tensors: dict[str, np.ndarray], out_dir: str, max_shard_bytes: int) -> list[str]:
    """model.safetensors, or shards of at most `max_shard_bytes` (a larger tensor alone) with their index."""
    from safetensors.numpy import save_file

    shards, current, size = [], {}, 0
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name], np.float32)
        if current and size + array.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name], size = array, size + array.nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file(shard, os.path.join(out_dir, name), metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())},
             "weight_map": {tensor: name for name, shard in zip(names, shards) for tensor in shard}}
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=1)
    return names


def byte_tokenizer_json(path: str) -> None:
    """A tokenizer.json whose ids are the text's UTF-8 bytes: byte-level pre-tokenisation (each byte one symbol of
    GPT-2's printable alphabet, no regex split, no added prefix space) and a BPE without merges over the 256."""
    from tokenizers import Tokenizer, decoders, models as tokenizer_models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    by_byte = _bytes_to_unicode()
    assert sorted(by_byte.values()) == sorted(alphabet)
    tokenizer = Tokenizer(tokenizer_models.BPE(vocab={by_byte[b]: b for b in range(256)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(path)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the printable Latin-1 bytes stand for themselves, the others
    take the characters from U+0100 on), which the ByteLevel pre-tokeniser uses."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def write_tokenizer(data_config, out_dir: str) -> list[str]:
    """The run's tokenizer in `out_dir` (see the module docstring); the names written."""
    from data import text

    kind = data_config.get("tokenizer", "byte")
    if kind == "byte":
        byte_tokenizer_json(os.path.join(out_dir, "tokenizer.json"))
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}, f)
        return ["tokenizer.json", "tokenizer_config.json"]
    source = text.tokenizer_file(data_config)
    if kind == "sentencepiece":
        shutil.copyfile(source, os.path.join(out_dir, "tokenizer.model"))
        return ["tokenizer.model"]
    written = []
    for name in HF_TOKENIZER_FILES:
        path = os.path.join(os.path.dirname(source), name) if name != "tokenizer.json" else source
        if os.path.isfile(path):
            shutil.copyfile(path, os.path.join(out_dir, name))
            written.append(name)
    return written


def export(workdir: str, out_dir: str, step: int | None = None, max_shard_bytes: int = 2_000_000_000) -> str:
    """Writes the run's checkpoint (the newest intact, or `step`) as a transformers checkpoint folder `out_dir`
    (config.json, safetensors, the tokenizer); returns `out_dir`. ConfigError (one line) for a model transformers
    cannot compute; FileNotFoundError for a folder without a run or that step."""
    from experiments import restore

    config = restore.load_config(workdir)
    check(config.model)  # a refusal before the checkpoint is read
    _, variables = restore.load_variables(config, workdir, step)
    hf_config, tensors = hf_checkpoint(config.model, variables)
    hf_config["dtype"] = "float32"
    os.makedirs(out_dir, exist_ok=True)
    write_safetensors(tensors, out_dir, max_shard_bytes)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=1)
    write_tokenizer(config.data, out_dir)
    return out_dir


def main(argv):
    from absl import flags

    from experiments import restore
    from experiments.training import cli

    del argv
    f = flags.FLAGS
    try:
        out = export(f.workdir, f.out, f.step, max_shard_bytes=int(f.max_shard_mb * 1e6))
    except (ConfigError, FileNotFoundError) as e:
        cli.fail(str(e))
    with open(os.path.join(out, "config.json")) as file:
        hf_config = json.load(file)
    note, model_config = "", restore.load_config(f.workdir).model
    if model_config.get("mtp_depth", 0):
        note = f" (its {model_config.mtp_depth} multi-token-prediction modules left out: the class has none)"
    print(f"exported {f.workdir} as {hf_config['architectures'][0]} into {out}{note}")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("workdir", None, "The run folder to export.", required=True)
    flags.DEFINE_string("out", None, "The transformers checkpoint folder to write.", required=True)
    flags.DEFINE_integer("step", None, "The checkpoint step (default: the newest intact one).")
    flags.DEFINE_float("max_shard_mb", 2000.0, "Largest safetensors shard in MB (a larger tensor gets a shard alone).")
    app.run(main)
