"""The language-model skeleton every family shares; a family supplies only its unit (or its fixed point).

    x_0 = E[tokens] (+ P[positions] for learned or sinusoidal positions: models/positions.py)
    x_L = Stack(x_0)            `num_units` copies of the family's unit, scanned with nn.scan
    logits = norm(x_L) U        (U = E^T when embeddings are tied)

Packed rows (`segment_ids`, `positions`: models/packing.py) reach every unit as `segments`; positions tables are
read at each document's positions.

The unit is a module `(cfg, **unit_kwargs)` with `__call__(x, cache, start, key_mask, segments) -> (x, cache)` and
`init_cache(cfg, batch, max_len, dtype, **unit_kwargs)`: a block (models/blocks.Block) or a period of
layers (models/blocks.Period). Dropout (`embed_dropout` here, `attention_dropout` and `residual_dropout` in
the blocks) draws from the "dropout" rng, split per scanned unit. The stack stacks the unit's parameters and
model state ("router_bias"), sown losses, metrics and monitors along a leading `layers` axis, under `nn.remat`
when `remat` is set, with `scan_unroll` units per scan iteration. Decoding caches are the unit's cache stacked over units.
A family may put `num_dense_blocks` plain blocks before the stack (their own scan, `dense_layers`; the cache is then
the pair (dense blocks' cache, stack's cache)).

Families override `unit()` (what is scanned), `stack_name` (the parameter path of the stack), `num_dense_blocks`, and, for
a family without a stack (the DEQ's fixed point), `hidden`.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import blocks, layers, mtp, packing, positions
from models.lm_config import LMConfig

STACKED_COLLECTIONS = ("params", "router_bias", "metrics", "losses", "monitors", "intermediates", "patches", "steering",
                       "lora", "calibration")


class Capabilities:
    """What a family declares for the code outside it; every module of models.MODELS has these (the defaults here:
    each parameter used once per token, no warm start from another family)."""

    @staticmethod
    def example_inputs(cfg, batch: int) -> jax.ShapeDtypeStruct:
        """What `__call__` takes: int32 tokens [batch, max_len]."""
        return jax.ShapeDtypeStruct((batch, cfg.max_len), jnp.int32)

    @staticmethod
    def active_share(cfg, path: tuple) -> float:
        """How much of a token's compute the parameter at `path` takes, as a multiple of one use
        (`models.parameter_count(active=True)`: routed depths, shared stacks, fixed-point cells)."""
        return 1.0

    @staticmethod
    def from_family(source: str, params: dict, cfg) -> dict:
        """The parameters of a run of family `source` in this family's layout, for `train.init_from`
        (experiments/training/warm_start.py); None when this family cannot start from that one."""
        return None

    @staticmethod
    def starts_fresh(source: str, path: str) -> bool:
        """Whether this family's parameter at `path` (a keystr) may be absent from a `source` run and start fresh."""
        return False

    @staticmethod
    def initial_from_data(cfg, train: dict) -> dict:
        """{top-level parameter name: value} that the training examples decide at a fresh start (an SAE's b_dec at
        the data's geometric median); {} when initialisation does not read the data."""
        return {}


class LM(nn.Module, Capabilities):
    cfg: LMConfig

    stack_name = "layers"  # the stack's name in the parameter tree (checkpoints depend on it)

    def unit(self):
        """(module class, its extra keyword arguments) scanned `num_units` times; None: no stack."""
        return blocks.Block, {}

    @property
    def num_units(self) -> int:
        return self.cfg.num_layers

    @property
    def num_dense_blocks(self) -> int:
        """Plain blocks run before the stack, scanned as `dense_layers` (DeepSeek-V3's first_k_dense_replace)."""
        return 0

    def setup(self):
        cfg, dtype = self.cfg, self.cfg.compute_dtype
        self.embed = layers.token_embedding(cfg.vocab_size, cfg.d_model, dtype)
        if cfg.positional == "learned":
            self.position_embedding = layers.learned_positions(self, cfg.max_len, cfg.d_model)
        if self.num_dense_blocks:
            self.dense_stack = self.scanned(blocks.Block, {}, self.num_dense_blocks, "dense_layers")
        if (stacked := self.unit()) is not None:
            self.stack = self.scanned(*stacked, self.num_units, self.stack_name)
        self.final_norm = layers.Norm(cfg.norm, dtype, "final_norm", cfg.norm_eps)
        self.unembed = None if cfg.tie_embeddings else layers.unembedding(cfg.vocab_size, dtype)
        self.mtp = [mtp.MTPModule(cfg, name=f"mtp_{k}") for k in range(1, cfg.mtp_depth + 1)]

    def scanned(self, unit, kwargs, length: int, name: str):
        """`length` copies of unit(cfg, **kwargs) as one nn.scan (remat when configured)."""
        if self.cfg.remat != "none":
            unit = nn.remat(unit, policy=layers.remat_policy(self.cfg.remat), prevent_cse=False)
        return nn.scan(
            unit, variable_axes={c: 0 for c in STACKED_COLLECTIONS}, split_rngs={"params": True, "dropout": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=length, unroll=self.cfg.scan_unroll,
            metadata_params={nn.PARTITION_NAME: "layers"})(self.cfg, **kwargs, name=name)

    def embed_tokens(self, tokens, start=0, segments=None):
        """int32[B, T] -> [B, T, D] input embeddings of tokens at positions start..start+T-1 (packed rows: at
        segments.positions)."""
        x = self.embed(tokens)
        if self.cfg.positional == "learned":
            if tokens.shape[1] > self.cfg.max_len:  # (decoding past the table: refused by experiments/sample.py)
                raise ValueError(f"{tokens.shape[1]} tokens exceed the learned position table (model.max_len="
                                 f"{self.cfg.max_len}); positional 'rope', 'alibi', 't5', 'sinusoidal' or 'none' have no table")
            if segments is None:
                x = layers.add_positions(x, self.position_embedding, start)
            else:
                x = x + jnp.take(self.position_embedding, segments.positions, axis=0).astype(x.dtype)
        elif self.cfg.positional == "sinusoidal":
            at = start + jnp.arange(tokens.shape[1]) if segments is None else segments.positions
            table = positions.sinusoidal(at, self.cfg.d_model)
            x = x + (table * self.cfg.d_model**-0.5).astype(x.dtype)
        x = layers.dropout(self, x, self.cfg.embed_dropout)
        return nn.with_logical_constraint(x, blocks.ACTIVATION)

    def hidden(self, x, cache=None, start=0, key_mask=None, segments=None):
        """Runs the stack over embeddings x [B, T, D]; returns (final-norm hidden [B, T, D], cache).
        key_mask: None, or bool[B, keys] (T keys, or the cache's length when decoding); segments: None, or a full
        pass's packed rows (models/packing.py)."""
        if not self.num_dense_blocks:
            x, cache = self.stack(x, cache, start, key_mask, segments)
            return self.final_norm(x), cache
        dense_cache, cache = (None, None) if cache is None else cache
        x, dense_cache = self.dense_stack(x, dense_cache, start, key_mask, segments)
        x, cache = self.stack(x, cache, start, key_mask, segments)
        return self.final_norm(x), None if cache is None else (dense_cache, cache)

    def logits(self, h):
        """[B, T, D] -> float32 logits [B, T, V]."""
        return layers.vocab_logits(h, self.embed, self.unembed)

    def lens_logits(self, x):
        """The logit lens: a residual stream [B, T, D] read through the final norm and the unembedding."""
        return self.logits(self.final_norm(x))

    def __call__(self, tokens, *, segment_ids=None, positions=None):
        """int32[B, L] -> float32 logits [B, L, V] of the next token at every position. Packed rows: segment_ids
        int32[B, L] (1, 2, ... per document, 0 padding) and positions int32[B, L] (0.. in each document) make each
        document's logits its logits alone (models/packing.py). With MTP modules and a mutable "mtp" collection
        (training), also sows depth k's logits [B, L - k, V] of token i + k + 1."""
        segments = packing.make(segment_ids, positions)
        h, _ = self.hidden(self.embed_tokens(tokens, segments=segments), segments=segments)
        if self.mtp and self.is_mutable_collection(mtp.COLLECTION):
            if segments is not None:
                raise ValueError("model.mtp_depth > 0 reads tokens across a packed row's document boundaries; "
                                 "train MTP on unpacked rows (model.mtp_depth=0 with packed rows)")
            depth_h = h
            for k, module in enumerate(self.mtp, 1):  # h^k at positions 0..L-k-1 reads Emb(t_{i+k})
                depth_h, head_input, _ = module(depth_h[:, :-1], self.embed(tokens[:, k:]))
                self.sow(mtp.COLLECTION, "logits", self.logits(head_input))
        return self.logits(h)

    def decode_hidden(self, tokens, cache, start):
        """`decode`, also returning the final-norm hidden states [B, T, D] (what MTP drafting reads)."""
        h, cache = self.hidden(self.embed_tokens(tokens, start), cache, start)
        return h, self.logits(h), cache

    def mtp_step(self, h, next_tokens, cache, start):
        """MTP module 1 with its cache at positions start..: h [B, T, D] of the main model and the tokens after
        them [B, T] -> (logits [B, T, V] of the tokens two ahead, cache)."""
        _, head_input, cache = self.mtp[0](h, self.embed(next_tokens), cache, start)
        return self.logits(head_input), cache

    def init_mtp_cache(self, batch: int, max_len: int, dtype=jnp.float32):
        return blocks.Block.init_cache(self.cfg, batch, max_len, dtype)

    def decode(self, tokens, cache, start):
        """Runs tokens int32[B, T] at positions start.. after `cache`; returns (logits, new cache)."""
        h, cache = self.hidden(self.embed_tokens(tokens, start), cache, start)
        return self.logits(h), cache

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32):
        """An empty decoding cache: the unit's, stacked over the units."""
        def stacked(unit, kwargs, copies):
            one = unit.init_cache(self.cfg, batch, max_len, dtype, **kwargs)
            return jax.tree.map(lambda v: jnp.broadcast_to(v, (copies, *v.shape)), one)
        cache = stacked(*self.unit(), self.num_units)
        if not self.num_dense_blocks:
            return cache
        return stacked(blocks.Block, {}, self.num_dense_blocks), cache
