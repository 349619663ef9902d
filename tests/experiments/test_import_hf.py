"""Checkpoints from Hugging Face (experiments/import_hf.py, docs/interfaces.md): tiny random `transformers` models
saved as safetensors, imported, and compared with `transformers`' own logits; the run folder restores and
decodes; what cannot be reproduced is refused in one line. Needs the `[hf]` extra."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the [hf] extra (pip install -e '.[hf]')")
transformers = pytest.importorskip("transformers", reason="needs the [hf] extra (pip install -e '.[hf]')")

import models  # noqa: E402
from data.config_fields import ConfigError  # noqa: E402
from experiments import import_hf, restore  # noqa: E402
from tests.conftest import slow  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOCAB = 61


def deepseek_v3(folder, *, q_lora_rank, first_k_dense_replace, n_group=4, topk_group=2, layers=3, vocab=VOCAB,
                eps=1e-5, **extra):
    """A tiny random DeepseekV3ForCausalLM (3 heads, d_n=10, d_r=8, d_v=12, r=16, 8 experts, 2 per token), with
    weights and the routers' score-correction biases drawn away from their initial values, saved to `folder`."""
    config = transformers.DeepseekV3Config(
        vocab_size=vocab, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=layers,
        num_attention_heads=3, num_key_value_heads=3, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2,
        routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=q_lora_rank, qk_rope_head_dim=8, v_head_dim=12,
        qk_nope_head_dim=10, n_group=n_group, topk_group=topk_group, first_k_dense_replace=first_k_dense_replace,
        max_position_embeddings=32, rms_norm_eps=eps, **extra)
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0.0, 0.2)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.normal_(0.0, 0.05)
    model.save_pretrained(folder)
    return model


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens))).logits.numpy()


TOKENS = np.random.default_rng(0).integers(0, VOCAB, (2, 9))


@pytest.mark.parametrize("q_lora_rank,first_k,n_group,topk_group,norm_topk_prob", [
    (None, 1, 4, 2, True),  # queries projected directly; one dense block, then MoE with 2 of 4 groups eligible
    (24, 0, 2, 1, False),  # low-rank queries; every block MoE, one of 2 groups; gates not renormalised
    (24, 3, 1, 1, True),  # every block dense: imported as a transformer with MLA
])
def test_deepseek_v3_logits_equal_transformers(tmp_path, q_lora_rank, first_k, n_group, topk_group, norm_topk_prob):
    hf = deepseek_v3(tmp_path, q_lora_rank=q_lora_rank, first_k_dense_replace=first_k, n_group=n_group,
                     topk_group=topk_group, norm_topk_prob=norm_topk_prob)
    model_config, variables = import_hf.convert(str(tmp_path))
    assert model_config.name == ("transformer" if first_k == 3 else "moe")
    assert first_k == 3 or model_config.normalise_gates == norm_topk_prob
    assert model_config.attention == "mla" and model_config.norm_eps == 1e-5
    got = models.build(model_config).apply(variables, jnp.asarray(TOKENS, jnp.int32))
    want = _hf_logits(hf, TOKENS)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.slow
def test_the_imported_run_folder_restores_and_decodes_like_transformers(tmp_path):
    """The CLI writes a run folder; its checkpoint restores to the same logits, and cached (absorbed MLA)
    decoding after a prompt of 4 gives them too."""
    hf = deepseek_v3(tmp_path / "hf", q_lora_rank=24, first_k_dense_replace=1)
    result = subprocess.run([sys.executable, "-m", "experiments.import_hf", f"--hf_dir={tmp_path / 'hf'}",
                             f"--workdir={tmp_path / 'run'}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    config = restore.load_config(str(tmp_path / "run"))
    assert config.model.first_k_dense_replace == 1 and config.model.route_scale == 2.5
    model, variables = restore.load_variables(config, str(tmp_path / "run"))
    want = _hf_logits(hf, TOKENS)
    tol = dict(rtol=1e-4, atol=1e-4 * np.abs(want).max())
    np.testing.assert_allclose(model.apply(variables, jnp.asarray(TOKENS, jnp.int32)), want, **tol)
    decode = jax.jit(lambda t, c, s: model.apply(variables, t, c, s, method=model.decode))
    logits, cache = decode(jnp.asarray(TOKENS[:, :4], jnp.int32), model.init_cache(2, 16), 0)
    pieces = [logits]
    for t in range(4, TOKENS.shape[1]):
        logits, cache = decode(jnp.asarray(TOKENS[:, t:t + 1], jnp.int32), cache, t)
        pieces.append(logits)
    np.testing.assert_allclose(jnp.concatenate(pieces, 1), want, **tol)


def llama(folder, rope_parameters: dict, max_position_embeddings: int = 16):
    """A tiny random LlamaForCausalLM (4 heads over 2 kv heads of width 8, 2 layers) saved to `folder`."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-5,
        rope_parameters={"rope_theta": 100.0, **rope_parameters})
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0.0, 0.3)
    model.save_pretrained(folder)
    return model


LONG_TOKENS = np.random.default_rng(1).integers(0, VOCAB, (2, 40))  # 2.5x the original context of 16


@pytest.mark.parametrize("rope,max_positions", [
    ({"rope_type": "default"}, 64),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}, 64),
    slow({"rope_type": "linear", "factor": 4.0}, 64),
    slow({"rope_type": "dynamic", "factor": 4.0}, 16),  # transformers rescales past max_position_embeddings
])
def test_llama_logits_equal_transformers_beyond_the_original_context(tmp_path, rope, max_positions):
    hf = llama(tmp_path, rope, max_positions)
    model_config, variables = import_hf.convert(str(tmp_path))
    assert model_config.get("rope_scaling", "none") == ("none" if rope["rope_type"] == "default" else rope["rope_type"])
    got = models.build(model_config).apply(variables, jnp.asarray(LONG_TOKENS, jnp.int32))
    want = _hf_logits(hf, LONG_TOKENS)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def _randomised(model, folder):
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if ("norm" in name or name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight"))) \
                else p.normal_(0.0, 0.3)
    model.save_pretrained(folder)
    return model


def _decoded(model, variables, tokens, prompt: int):
    decode = jax.jit(lambda t, c, s: model.apply(variables, t, c, s, method=model.decode))
    logits, cache = decode(jnp.asarray(tokens[:, :prompt], jnp.int32), model.init_cache(len(tokens), tokens.shape[1]), 0)
    pieces = [logits]
    for t in range(prompt, tokens.shape[1]):
        logits, cache = decode(jnp.asarray(tokens[:, t:t + 1], jnp.int32), cache, t)
        pieces.append(logits)
    return jnp.concatenate(pieces, 1)


@pytest.mark.parametrize("tied", [True, False])
def test_gpt2_logits_and_decoding_equal_transformers(tmp_path, tied):
    """A tiny random GPT2LMHeadModel (3 heads of width 8: an odd head count; 2 layers; 16 learned positions),
    biases and LayerNorm shifts random too, tied and untied."""
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=24, n_layer=2, n_head=3,
                                     tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0)
    hf = _randomised(transformers.GPT2LMHeadModel(config).eval(), tmp_path)
    model_config, variables = import_hf.convert(str(tmp_path))
    assert (model_config.norm, model_config.positional, model_config.norm_eps) == ("layernorm", "learned", 1e-5)
    model = models.build(model_config)
    tokens = TOKENS[:, :9]
    want = _hf_logits(hf, tokens)
    tol = dict(rtol=1e-4, atol=1e-4 * np.abs(want).max())
    np.testing.assert_allclose(model.apply(variables, jnp.asarray(tokens, jnp.int32)), want, **tol)
    np.testing.assert_allclose(_decoded(model, variables, tokens, 4), want, **tol)


@pytest.mark.slow
def test_an_imported_checkpoint_samples_through_its_own_tokenizer_like_transformers(tmp_path):
    """A GPT-2 folder with its tokenizer.json (a byte-level BPE): import_hf's run folder reads text with it, and
    experiments.sample's greedy continuation is transformers' greedy generate, decoded by the same tokenizer."""
    from tests.data.test_text import hf_tokenizer_json
    from tokenizers import Tokenizer

    folder = hf_tokenizer_json(tmp_path / "hf", "byte_bpe")
    tokenizer = Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    config = transformers.GPT2Config(vocab_size=tokenizer.get_vocab_size(), n_positions=32, n_embd=24, n_layer=2,
                                     n_head=3, bos_token_id=0, eos_token_id=0)
    hf = _randomised(transformers.GPT2LMHeadModel(config).eval(), folder)
    run = lambda *args: subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True,  # noqa: E731
                                       timeout=300)
    imported = run("experiments.import_hf", f"--hf_dir={folder}", f"--workdir={tmp_path / 'run'}")
    assert imported.returncode == 0, imported.stderr
    assert restore.load_config(str(tmp_path / "run")).data.tokenizer == "hf"
    prompt = "ROMEO: But"
    sampled = run("experiments.sample", f"--workdir={tmp_path / 'run'}", f"--prompt={prompt}", "--num_tokens=10",
                  "--temperature=0")
    assert sampled.returncode == 0, sampled.stderr
    ids = torch.tensor([tokenizer.encode(prompt).ids])
    with torch.no_grad():
        greedy = hf.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)[0, ids.shape[1]:]
    assert sampled.stdout.split("--- sample 0 ---\n", 1)[1].rstrip("\n") == prompt + tokenizer.decode(greedy.tolist())


@pytest.mark.parametrize("architecture", ["qwen2", "llama_bias", slow("mistral")])
def test_llama_layouts_with_biases_equal_transformers(tmp_path, architecture):
    """Qwen2 (query / key / value biases), Llama with attention_bias (the output's too) and Mistral, with GQA
    (4 query heads over 2) and untied embeddings."""
    shared = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=32, rms_norm_eps=1e-5, tie_word_embeddings=False)
    config, cls = {"qwen2": (transformers.Qwen2Config(**shared), transformers.Qwen2ForCausalLM),
                   "llama_bias": (transformers.LlamaConfig(**shared, head_dim=8, attention_bias=True),
                                  transformers.LlamaForCausalLM),
                   "mistral": (transformers.MistralConfig(**shared, sliding_window=None), transformers.MistralForCausalLM),
                   }[architecture]
    hf = _randomised(cls(config).eval(), tmp_path)
    model_config, variables = import_hf.convert(str(tmp_path))
    assert model_config.attention_bias == {"qwen2": "qkv", "llama_bias": "all", "mistral": "none"}[architecture]
    want = _hf_logits(hf, TOKENS)
    got = models.build(model_config).apply(variables, jnp.asarray(TOKENS, jnp.int32))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("use_bias", [False, slow(True)])
def test_mamba_logits_and_decoding_equal_transformers(tmp_path, use_bias):
    """A tiny random MambaForCausalLM (Mamba-1: width 32, state 8, 2 layers, dt rank 2): logits at 40 tokens, and the
    imported model's constant-state decoding gives them too."""
    config = transformers.MambaConfig(vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2,
                                      conv_kernel=4, use_bias=use_bias, layer_norm_epsilon=1e-5)
    torch.manual_seed(0)
    hf = transformers.MambaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif not name.endswith(("A_log", "dt_proj.bias")):  # keep the S4D-real A and the dt range
                p.normal_(0.0, 0.3)
    hf.save_pretrained(tmp_path)
    model_config, variables = import_hf.convert(str(tmp_path))
    assert (model_config.name, model_config.dt_rank, model_config.expand) == ("mamba", 2, 2)
    model = models.build(model_config)
    want = _hf_logits(hf, LONG_TOKENS)
    got = model.apply(variables, jnp.asarray(LONG_TOKENS, jnp.int32))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    decode = jax.jit(lambda t, c, s: model.apply(variables, t, c, s, method=model.decode))
    logits, cache = decode(jnp.asarray(LONG_TOKENS[:, :7], jnp.int32), model.init_cache(2, 40), 0)
    pieces = [logits]
    for t in range(7, 12):
        logits, cache = decode(jnp.asarray(LONG_TOKENS[:, t:t + 1], jnp.int32), cache, t)
        pieces.append(logits)
    np.testing.assert_allclose(jnp.concatenate(pieces, 1), want[:, :12], rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("groups,tied", [(2, False), slow(1, True)])
def test_mamba2_logits_and_decoding_equal_transformers(tmp_path, groups, tied):
    """A tiny random Mamba2ForCausalLM (width 32, 4 heads of 16, state 8, B / C in `groups` groups, 2 layers): logits
    at 40 tokens (not a multiple of its chunk of 16), and the imported model's constant-state decoding."""
    config = transformers.Mamba2Config(vocab_size=VOCAB, hidden_size=32, num_heads=4, head_dim=16, state_size=8,
                                       n_groups=groups, expand=2, conv_kernel=4, num_hidden_layers=2, chunk_size=16,
                                       layer_norm_epsilon=1e-5, tie_word_embeddings=tied)
    torch.manual_seed(0)
    hf = transformers.Mamba2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("dt_bias"):
                p.uniform_(-4.0, -1.0)  # dt = softplus(.) in ~[0.02, 0.3]
            elif name.endswith("A_log"):
                p.uniform_(0.0, 2.0)
            else:
                p.normal_(0.0, 0.3)
    hf.save_pretrained(tmp_path)
    model_config, variables = import_hf.convert(str(tmp_path))
    assert (model_config.name, model_config.ssm_groups, model_config.ssm_head_dim) == ("ssd", groups, 16)
    model = models.build(model_config)
    want = _hf_logits(hf, LONG_TOKENS)
    tol = dict(rtol=1e-4, atol=1e-4 * np.abs(want).max())
    np.testing.assert_allclose(model.apply(variables, jnp.asarray(LONG_TOKENS, jnp.int32)), want, **tol)
    np.testing.assert_allclose(_decoded(model, variables, LONG_TOKENS[:, :12], 7), want[:, :12], **tol)


def _folder(tmp_path, config: dict, files=("model.safetensors",)):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(config))
    for name in files:
        (tmp_path / name).write_bytes(b"")
    return str(tmp_path)


def test_what_cannot_be_reproduced_is_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"architecture='BertForMaskedLM' is not supported \(supported: "):
        import_hf.convert(_folder(tmp_path / "a", {"architectures": ["BertForMaskedLM"]}))
    with pytest.raises(ConfigError, match=r"holds only pickle weights \(pytorch_model.bin\)"):
        import_hf.read_weights(_folder(tmp_path / "b", {}, files=("pytorch_model.bin",)))
    fp8 = {**_tiny_hf_config(), "quantization_config": {"quant_method": "fp8"}}
    with pytest.raises(ConfigError, match="quantization_config='fp8' is not supported"):
        import_hf.convert(_folder(tmp_path / "c", fp8))
    with pytest.raises(ConfigError, match="has no config.json"):
        import_hf.convert(str(tmp_path / "missing"))
    yarn = {"rope_parameters": {"rope_type": "yarn", "factor": 40.0, "rope_theta": 10000.0}}
    with pytest.raises(ConfigError, match="rope type='yarn' is not supported"):
        import_hf.deepseek_v3_config({**_tiny_hf_config(), **yarn})
    with pytest.raises(ConfigError, match="rope type='longrope' is not supported"):
        import_hf.llama_config({**_tiny_hf_config(), "rope_parameters": {"rope_type": "longrope", "factor": 4.0}})
    with pytest.raises(ConfigError, match="sliding_window=8 is not supported"):
        import_hf.llama_config({**_tiny_hf_config(), "model_type": "mistral", "sliding_window": 8})
    with pytest.raises(ConfigError, match="activation_function='relu' is not supported"):
        import_hf.gpt2_config({"activation_function": "relu"})


def _tiny_hf_config():
    return dict(architectures=["DeepseekV3ForCausalLM"], vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=3, n_routed_experts=8,
                num_experts_per_tok=2, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, v_head_dim=12,
                qk_nope_head_dim=10, max_position_embeddings=32, rms_norm_eps=1e-6, first_k_dense_replace=1)


def _compressed_on_a_store_decodes_and_exports(tmp_path, method: str, **flags) -> dict:
    """The run folder tmp_path/run (an import of 256 ids) compressed on a prepared byte-level store: the compressed
    run decodes with a cache as its full pass does and its export loads in transformers with its logits. The report."""
    from data import prepare
    from experiments import compress, export_hf

    with open(tmp_path / "text.jsonl", "w") as f:
        for i in range(40):
            f.write(json.dumps({"text": f"document {i}: " + "the quick brown fox " * (i % 7 + 1)}) + "\n")
    prepare.prepare([str(tmp_path / "text.jsonl")], str(tmp_path / "store"), documents_per_shard=16)
    report = compress.compress_run(str(tmp_path / "run"), str(tmp_path / "compressed"), method,
                                   calibration=str(tmp_path / "store"), calibration_rows=16, **flags)
    compressed = str(tmp_path / "compressed")
    model, variables = restore.load_variables(restore.load_config(compressed), compressed)
    tokens = np.random.default_rng(3).integers(0, 256, (2, 12))
    full = np.asarray(model.apply(variables, jnp.asarray(tokens, jnp.int32)))
    decoded = _decoded(model, variables, tokens, prompt=5)
    np.testing.assert_allclose(decoded, full, rtol=1e-4, atol=1e-4 * np.abs(full).max())
    export_hf.export(compressed, str(tmp_path / "exported"))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    np.testing.assert_allclose(_hf_logits(loaded, tokens), full, rtol=1e-4, atol=1e-4 * np.abs(full).max())
    return report


@pytest.mark.slow  # an import, a prepared store, a GPTQ compression, an export and a transformers load
def test_an_imported_llama_compresses_on_a_token_store_decodes_and_exports_to_transformers(tmp_path):
    """A tiny random Llama of 256 ids (so that a byte-level store's ids fit) imported and compressed by GPTQ at 4 bits
    on a prepared token store decodes and exports (above); a 61-id Llama calibrated on its run's byte data is refused
    in one line."""
    from experiments import compress

    config = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      max_position_embeddings=64, rope_parameters={"rope_theta": 100.0})
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).eval().save_pretrained(tmp_path / "hf")
    import_hf.write_run_folder(str(tmp_path / "hf"), str(tmp_path / "run"))
    report = _compressed_on_a_store_decodes_and_exports(tmp_path, "gptq", bits=4)
    assert len(report["kernels"]) == 7 * 2 and all(k["relative_error"] < 0.1 for k in report["kernels"])

    llama(tmp_path / "hf61", {"rope_type": "default"}, 64)
    import_hf.write_run_folder(str(tmp_path / "hf61"), str(tmp_path / "run61"))
    with pytest.raises(ConfigError, match="token id .* outside the model's vocabulary of 61: calibrate on a store"):
        compress.compress_run(str(tmp_path / "run61"), str(tmp_path / "out61"), "rtn", bits=4)


@pytest.mark.slow  # an import, a store, a sequential GPTQ of MLA and the experts, an export and a transformers load
def test_an_imported_deepseek_v3_moe_compresses_sequentially_decodes_and_exports_to_transformers(tmp_path):
    """MLA attention (low-rank queries), a dense block, then routed and shared experts: every kernel is compressed,
    each routed expert on the tokens routed to it, block after block; the run decodes and exports (above)."""
    deepseek_v3(tmp_path / "hf", q_lora_rank=24, first_k_dense_replace=1, layers=2, vocab=256, eps=1e-6)
    import_hf.write_run_folder(str(tmp_path / "hf"), str(tmp_path / "run"))
    report = _compressed_on_a_store_decodes_and_exports(tmp_path, "gptq", bits=4, group_size=4, sequential=True)
    kernels = {k["kernel"] for k in report["kernels"]}
    assert {"dense_layers/attention/kv_down", "dense_layers/mlp/wo", "layers/block_0/attention/query_up",
            "layers/block_0/moe/w_out", "layers/block_0/moe/shared/wi"} <= kernels, kernels
    assert report["calibration"] == "sequential" and report["stored"]["bytes"] < report["stored"]["float32_bytes"]
