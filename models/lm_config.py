"""The keys every language-model family shares (`config.model`); families subclass `LMConfig` and add theirs.

Each key declares its valid values beside its default (data/config_fields.py); `0` means "derive
it" where noted. `attention` names the token mixer of attention blocks (models/blocks.ATTENTIONS),
and the attention and MLP keys below configure those blocks in every family.
"""

import dataclasses

import jax.numpy as jnp

from data.config_fields import field
from models.attention import IMPLS as ATTENTION_IMPLS
from models.attention_patterns import PATTERNS
from models.kv_cache import DTYPES as KV_CACHE_DTYPES
from models.layers import ACTIVATIONS, NORMS, REMAT_POLICIES
from models.positions import POSITIONALS, ROPE_SCALINGS
from models.quantization import QUANTIZATIONS


@dataclasses.dataclass(frozen=True)
class LMConfig:
    name: str = "transformer"
    vocab_size: int = field(0, min=0)  # 0: the dataset's vocabulary size
    max_len: int = field(0, min=0)  # 0: the dataset's sequence length (bounds learned positions and the KV cache)
    d_model: int = field(128, min=1)
    num_layers: int = field(2, min=1)
    norm: str = field("rmsnorm", choices=NORMS)
    norm_eps: float = field(1e-6, above=0)  # epsilon of the blocks' and the final norm (Llama / GPT-2 checkpoints: 1e-5)
    positional: str = field("rope", choices=POSITIONALS)  # models/positions.py
    rope_theta: float = field(10000.0, above=0)
    rope_fraction: float = field(1.0, above=0, max=1)  # partial rotary: the leading fraction of each head rotated
    rope_scaling: str = field("none", choices=ROPE_SCALINGS)  # context extension: linear | ntk | dynamic | yarn
    rope_factor: float = field(1.0, min=1)  # s: the context grows s-fold
    rope_original_max_len: int = field(0, min=0)  # L, the trained context the scaling extends; 0: max_len
    rope_beta_fast: float = field(32.0, above=0)  # YaRN: dimensions turning more than this often in L extrapolate
    rope_beta_slow: float = field(1.0, above=0)  # YaRN: ... fewer than this interpolate (a linear ramp between)
    rope_attention_factor: float = field(0.0, min=0)  # YaRN's cos/sin factor; 0: 0.1 ln s + 1
    t5_buckets: int = field(32, min=2)  # positional = "t5": relative-position buckets per head
    t5_max_distance: int = field(128, min=1)  # ... the distance where the last (logarithmic) bucket starts
    tie_embeddings: bool = False
    dtype: str = field("float32", choices=("float32", "bfloat16"))  # compute dtype; parameters stay float32
    remat: str = field("none", choices=REMAT_POLICIES)
    scan_unroll: int = field(1, min=1)  # units per scan iteration; the unit count unrolls it (faster on CPU)
    ffn: str = "mlp"  # the FFN of the blocks that do not name their own (models/blocks.FFNS; checked there)
    # attention blocks
    attention: str = "gqa"  # the attention kind (models/blocks.ATTENTIONS; checked there)
    short_conv: int = field(0, min=0)  # w > 0: a causal depthwise conv of width w before each attention (models/short_conv.py)
    num_heads: int = field(4, min=1)
    num_kv_heads: int = field(0, min=0)  # 0: num_heads (plain multi-head attention)
    head_dim: int = field(0, min=0)  # 0: d_model // num_heads
    attention_bias: str = field("none", choices=("none", "qkv", "all"))  # biases of the query / key / value
    # projections (Qwen2: "qkv"), and of the output projection too ("all": GPT-2, Llama's attention_bias)
    attention_impl: str = field("xla", choices=ATTENTION_IMPLS)  # xla | pallas (kernels_pallas flash attention)
    attention_pattern: str = field("causal", choices=PATTERNS)  # which keys a query sees (models/attention_patterns.py)
    attention_window: int = field(0, min=0)  # sliding: W, the keys each query sees (itself included); the ring cache's size
    sparse_stride: int = field(0, min=0)  # strided / fixed: Child et al.'s l (stride, or block length)
    sparse_summary: int = field(1, min=1)  # fixed: c, the last positions of each block that every later query sees
    # linear attention (attention = "linear", models/linear_attention.py)
    linear_gate: bool = False  # a data-dependent decay per head and token (gated linear attention); False: plain
    linear_chunk: int = field(64, min=1)  # positions per chunk of the training scan
    # multi-head latent attention (attention = "mla", models/mla.py); 0 derives DeepSeek-V2's ratios from head_size
    q_lora_rank: int = field(0, min=0)  # width of the compressed query latent; 0: queries projected directly
    kv_lora_rank: int = field(0, min=0)  # width of the joint key/value latent c_kv; 0: 4 * head_size
    qk_nope_head_dim: int = field(0, min=0)  # per-head query/key width without position; 0: head_size
    qk_rope_head_dim: int = field(0, min=0)  # rotary width of each query head and of the shared key; 0: head_size // 2
    v_head_dim: int = field(0, min=0)  # per-head value width; 0: head_size
    kv_cache_dtype: str = field("float", choices=KV_CACHE_DTYPES)  # decoding cache: float | int8 (absmax per token, head)
    mla_absorb: bool = True  # decode in the latent space (W_uk folded into the query, W_uv into the output)
    # MLPs
    d_mlp: int = field(512, min=1)
    activation: str = field("gelu", choices=ACTIVATIONS)
    mlp_bias: bool = False
    bitnet: bool = False  # BitNet b1.58: ternary weights, 8-bit activations in the blocks' matmuls (models/bitnet.py)
    # the blocks' matmuls quantized through qwix in training (QAT) and inference: "" | int8 | int4 | w8a8 | fp8
    quantization: str = field("", choices=QUANTIZATIONS)  # (models/quantization.py)
    mtp_depth: int = field(0, min=0)  # D multi-token-prediction modules trained beside the model (models/mtp.py)
    # dropout (training only: active when the forward pass is given a "dropout" rng, as the trainer's step is)
    embed_dropout: float = field(0.0, min=0, below=1)  # on the input embeddings
    attention_dropout: float = field(0.0, min=0, below=1)  # on the attention probabilities (attention_impl xla)
    residual_dropout: float = field(0.0, min=0, below=1)  # on each branch before it joins the residual stream

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)
