"""Run folders out to Hugging Face (experiments/export_hf.py): each exportable family, with random weights far from
their initial values, written, loaded by `transformers.AutoModelForCausalLM` and compared with our logits;
imported back (experiments/import_hf.py) to the same weights; the byte tokenizer's ids; the refusals in one line.
A trained LoRA run exports merged through the command line (slow). Needs the `[hf]` extra."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the [hf] extra (pip install -e '.[hf]')")
transformers = pytest.importorskip("transformers", reason="needs the [hf] extra (pip install -e '.[hf]')")

import models  # noqa: E402
from data.config_fields import ConfigError  # noqa: E402
from experiments import export_hf, import_hf, restore  # noqa: E402
from experiments.configs import base  # noqa: E402
from experiments.training import trainer  # noqa: E402
from tests.conftest import make_tiny_lm_config, slow  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKENS = np.random.default_rng(0).integers(0, 256, (2, 11))
MLA = dict(attention="mla", kv_lora_rank=16, qk_nope_head_dim=10, qk_rope_head_dim=8, v_head_dim=12, num_kv_heads=0,
           norm_eps=1e-6, activation="swiglu")
FAMILIES = {  # name -> (family, model keys, the architecture it exports as)
    "llama": ("transformer", dict(activation="swiglu", num_kv_heads=2), "LlamaForCausalLM"),
    "llama_yarn_tied_biases": ("transformer", dict(activation="swiglu", num_kv_heads=1, tie_embeddings=True,
                                                   attention_bias="all", rope_scaling="yarn", rope_factor=4.0,
                                                   rope_original_max_len=8, rope_theta=500.0), "LlamaForCausalLM"),
    "llama_dynamic": ("transformer", dict(activation="swiglu", rope_scaling="dynamic", rope_factor=2.0,
                                          rope_original_max_len=8, max_len=16), "LlamaForCausalLM"),
    "qwen2": ("transformer", dict(activation="swiglu", num_kv_heads=2, attention_bias="qkv"), "Qwen2ForCausalLM"),
    "qwen3": ("transformer", dict(activation="swiglu", attention="qk_norm", head_dim=16), "Qwen3ForCausalLM"),
    "gpt2": ("transformer", dict(norm="layernorm", positional="learned", activation="gelu", mlp_bias=True,
                                 attention_bias="all", num_kv_heads=0, norm_eps=1e-5), "GPT2LMHeadModel"),
    "mamba": ("mamba", dict(num_layers=2, ssm_state=8, dt_rank=3, mamba1_bias=True, positional="none"),
              "MambaForCausalLM"),
    "mamba2": ("ssd", dict(num_layers=2, ssm_head_dim=16, ssm_state=8, ssm_groups=2, chunk_size=8, positional="none",
                           ssm_norm_eps=1e-6, tie_embeddings=True), "Mamba2ForCausalLM"),
    "deepseek_v3": ("moe", dict(MLA, num_layers=3, first_k_dense_replace=1, num_experts=8, top_k=2, d_expert=16,
                                n_groups=4, topk_groups=2, route_scale=2.5, normalise_gates=False, dispatch="dense"),
                    "DeepseekV3ForCausalLM"),
    "deepseek_v3_low_rank_queries": ("moe", dict(MLA, q_lora_rank=24, num_layers=2, num_experts=4, top_k=2,
                                                 d_expert=16, num_shared_experts=0, dispatch="dense"),
                                     "DeepseekV3ForCausalLM"),
    "deepseek_v3_dense": ("transformer", dict(MLA, num_layers=2), "DeepseekV3ForCausalLM"),
}


def family_config(family: str, **keys):
    config = make_tiny_lm_config(steps=2)
    with config.unlocked():
        config.model = base.get_config(family, "text").model
    config.model.update({**dict(d_model=32, num_layers=2, num_heads=4, d_mlp=48, vocab_size=256, max_len=32), **keys})
    return config


def random_run(workdir, family: str, keys: dict):
    """A run folder at step 0 whose weights are drawn away from their initialisation (norm scales in [0.5, 1.5],
    everything else normal(0, 0.2); MoE score-correction biases normal(0, 0.05))."""
    config = family_config(family, **keys)
    model = models.build(config.model)
    variables = jax.tree.map(np.asarray, nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))))
    rng = np.random.default_rng(1)
    draw = lambda path, x: (rng.uniform(0.5, 1.5, x.shape) if "norm" in jax.tree_util.keystr(path) or "scale" in  # noqa: E731
                            jax.tree_util.keystr(path) else rng.normal(0.0, 0.2, x.shape)).astype(np.float32)
    variables = {"params": jax.tree_util.tree_map_with_path(draw, dict(variables["params"])),
                 **{k: jax.tree.map(lambda x: rng.normal(0.0, 0.05, x.shape).astype(np.float32), v)
                    for k, v in variables.items() if k == "router_bias"}}
    if family in ("mamba", "ssd"):  # positive decay rates and steps, as trained Mamba layers have
        variables["params"] = jax.tree_util.tree_map_with_path(
            lambda path, x: np.abs(x) + 0.5 if "A_log" in jax.tree_util.keystr(path) else x, variables["params"])
    restore.save_variables(config, variables, str(workdir))
    return config, variables


def _hf_logits(folder, tokens):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        return model, model(torch.tensor(np.asarray(tokens))).logits.numpy()


@pytest.mark.parametrize("name", [n if n == "llama" else slow(n) for n in FAMILIES])
def test_the_export_loads_in_transformers_with_our_logits_and_imports_back(tmp_path, name):
    family, keys, architecture = FAMILIES[name]
    config, variables = random_run(tmp_path / "run", family, keys)
    out = export_hf.export(str(tmp_path / "run"), str(tmp_path / "hf"))
    model, want = _hf_logits(out, TOKENS)
    assert type(model).__name__ == architecture
    got = np.asarray(models.build(config.model).apply(variables, jnp.asarray(TOKENS, jnp.int32)))
    np.testing.assert_allclose(want, got, rtol=1e-4, atol=1e-4 * np.abs(got).max())
    imported_config, imported = import_hf.convert(out)
    assert imported_config.name == config.model.name
    for key, ours in variables.items():
        chex_leaves = jax.tree_util.tree_leaves_with_path(ours)
        theirs = dict(jax.tree_util.tree_leaves_with_path(imported[key]))
        assert set(theirs) == {p for p, _ in chex_leaves}, key
        for path, value in chex_leaves:
            np.testing.assert_array_equal(theirs[path], value, err_msg=jax.tree_util.keystr(path))


def test_the_byte_tokenizer_exports_as_utf8_byte_ids(tmp_path):
    export_hf.byte_tokenizer_json(str(tmp_path / "tokenizer.json"))
    with open(tmp_path / "tokenizer_config.json", "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast"}, f)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    text = "ROMEO:\n  O, she doth teach the torches — to burn bright! ¿Qué? 東京 \t\x00"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids == list(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text


def test_large_exports_are_sharded_with_an_index(tmp_path):
    tensors = {f"w{i}": np.full((10, 10), i, np.float32) for i in range(5)}  # 400 bytes each
    names = export_hf.write_safetensors(tensors, str(tmp_path), max_shard_bytes=900)
    assert names == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    with open(tmp_path / "model.safetensors.index.json") as f:
        index = json.load(f)
    assert index["metadata"]["total_size"] == 2000 and sorted(index["weight_map"]) == sorted(tensors)
    assert np.array_equal(import_hf.read_weights(str(tmp_path))["w3"], tensors["w3"])


@pytest.mark.parametrize("family,keys,message", [
    ("hybrid", {}, "cannot export model.name='hybrid': transformers has no such architecture"),
    ("mod", {}, "cannot export model.name='mod'"),
    ("transformer", dict(positional="alibi"), "cannot export model.positional='alibi'"),
    ("transformer", dict(bitnet=True, activation="swiglu"), "cannot export model.bitnet=True"),
    ("transformer", dict(activation="gelu"), "cannot export model.activation='gelu': LlamaForCausalLM needs 'swiglu'"),
    ("transformer", dict(activation="swiglu", rope_scaling="ntk", rope_factor=2.0), "model.rope_scaling='ntk'"),
    ("moe", dict(num_experts=4, top_k=2), "cannot export model.attention='gqa': an MoE exports as DeepseekV3"),
])
def test_what_transformers_cannot_compute_is_refused_in_one_line(tmp_path, family, keys, message):
    config = family_config(family, **keys)
    os.makedirs(tmp_path / "run")
    with open(tmp_path / "run" / "config.json", "w") as f:
        json.dump(config.to_dict(), f)
    with pytest.raises(ConfigError) as error:
        export_hf.export(str(tmp_path / "run"), str(tmp_path / "hf"))
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not os.path.exists(tmp_path / "hf")


@pytest.mark.slow  # trains, then the command in a subprocess and a transformers load
def test_a_trained_lora_run_exports_merged_through_the_command_line(tmp_path):
    config = family_config("transformer", activation="swiglu", num_kv_heads=2)
    config.train.lora.update(rank=4, alpha=8.0)
    config.data.seq_len = 16
    trainer.train_and_evaluate(config, str(tmp_path / "run"), devices=jax.devices()[:1], verbose=False)
    done = subprocess.run([sys.executable, "-m", "experiments.export_hf", f"--workdir={tmp_path / 'run'}",
                           f"--out={tmp_path / 'hf'}"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0 and "as LlamaForCausalLM" in done.stdout, done.stderr[-2000:]
    model, variables = restore.load_variables(restore.load_config(str(tmp_path / "run")), str(tmp_path / "run"))
    got = np.asarray(model.apply(variables, jnp.asarray(TOKENS, jnp.int32)))
    _, want = _hf_logits(tmp_path / "hf", TOKENS)
    np.testing.assert_allclose(want, got, rtol=1e-4, atol=1e-4 * np.abs(got).max())
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert tokenizer.encode("ROMEO:", add_special_tokens=False) == list(b"ROMEO:")
