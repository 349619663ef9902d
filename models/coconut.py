"""Coconut (Hao et al. 2024): a transformer that reasons in continuous thoughts.

At every `<thought>` position t the input embedding is not E[<thought>] but the last layer's hidden
state (after the final norm) at position t - 1:

    x_t = h_{t-1}                     if token_t = <thought>      ("latent" thoughts)
    x_t = E[token_t]                  otherwise (and always, for "pause" thoughts: pause tokens)

so the thoughts form a recurrence through the whole network. Rows are laid out by `data/reasoning.py`:
`<bot>` at one position P of every row (questions left-padded; `<pad>` keys are masked out of attention)
and up to K = `max_thoughts` thoughts right after it. A forward pass runs

    positions 0 .. P              in one pass, filling a KV cache
    positions P+1 .. P+K          one at a time against the cache (nn.scan), each thought fed its predecessor
    positions P+K+1 .. L-1        in one pass against the cache

which gives the logits of the naive loop that reruns the whole prefix for every thought (tests check it),
with gradients through every thought. Rows with fewer than K thoughts run their `<eot>` and first steps in
the middle segment as ordinary tokens. `generate` runs the same loop batched: the question, K thoughts,
`<eot>`, then greedy tokens.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import lm, transformer
from data.config_fields import field


@dataclasses.dataclass(frozen=True)
class CoconutConfig(transformer.TransformerConfig):
    """The transformer's keys and the layout's; -1 means "from the data" (`data/reasoning.py`)."""

    name: str = "coconut"
    attention_impl: str = field("xla", choices=("xla",))  # padded keys are masked: only the xla attention can
    thoughts: str = field("latent", choices=("latent", "pause"))  # latent (continuous thoughts) | pause tokens
    bot_position: int = field(-1, min=-1)  # where <bot> sits in every row
    max_thoughts: int = field(-1, min=-1)  # K: positions after <bot> run one at a time (0: a plain causal pass)
    thought_token: int = field(-1, min=-1)
    pad_token: int = field(-1, min=-1)
    eot_token: int = field(-1, min=-1)


class Coconut(nn.Module, lm.Capabilities):
    cfg: CoconutConfig

    def setup(self):
        self.transformer = transformer.Transformer(self.cfg)

    def embed(self, tokens, start=0):
        return self.transformer.embed_tokens(tokens, start)

    def run(self, x, cache, start, key_mask):
        """Embeddings x [B, T, D] at positions start.. -> (final hidden [B, T, D], cache)."""
        return self.transformer.hidden(x, cache, start, key_mask)

    def logits(self, h):
        return self.transformer.logits(h)

    def feed_back(self, h_prev, x, tokens):
        """The input at a position: h_prev where the token is <thought> (latent mode), else its embedding x."""
        if self.cfg.thoughts != "latent":
            return x
        return jnp.where((tokens == self.cfg.thought_token)[:, :, None], h_prev.astype(x.dtype), x)

    def __call__(self, tokens, *, segment_ids=None, positions=None):
        """int32[B, L] -> float32 logits [B, L, V], the thoughts run as a latent recurrence."""
        cfg = self.cfg
        if segment_ids is not None or positions is not None:
            raise ValueError("model.name='coconut' reads one question per row (its thoughts start at model.bot_position); "
                             "it takes no packed rows (segment_ids / positions)")
        key_mask = jnp.not_equal(tokens, cfg.pad_token)
        x = self.embed(tokens)
        if cfg.max_thoughts == 0:
            return self.logits(self.run(x, None, 0, key_mask)[0])
        first, last = cfg.bot_position + 1, cfg.bot_position + 1 + cfg.max_thoughts  # the thought segment
        cache = self.transformer.init_cache(tokens.shape[0], tokens.shape[1], cfg.compute_dtype)
        h_prefix, cache = self.run(x[:, :first], cache, 0, key_mask)

        def thought_step(model, carry, position):
            h_prev, cache = carry
            x_t = jax.lax.dynamic_slice_in_dim(x, position, 1, axis=1)
            x_t = model.feed_back(h_prev, x_t, jax.lax.dynamic_slice_in_dim(tokens, position, 1, axis=1))
            h_t, cache = model.run(x_t, cache, position, key_mask)
            return (h_t, cache), h_t[:, 0]

        scan = nn.scan(thought_step, variable_broadcast="params", split_rngs={"params": False})
        (_, cache), h_thoughts = scan(self, (h_prefix[:, -1:], cache), jnp.arange(first, last))
        h_rest, _ = self.run(x[:, last:], cache, last, key_mask)
        return self.logits(jnp.concatenate([h_prefix, h_thoughts.transpose(1, 0, 2), h_rest], axis=1))

    def decode(self, tokens, cache, start):
        """Plain cached decoding of tokens int32[B, T] (every token embedded), as the other families."""
        return self.transformer.decode(tokens, cache, start)

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32):
        return transformer.Transformer(self.cfg, parent=None).init_cache(batch, max_len, dtype)


@functools.partial(jax.jit, static_argnames=("model", "num_thoughts", "num_tokens"))
def generate(model: Coconut, variables, prompt, *, num_thoughts: int, num_tokens: int):
    """Greedy continuations int32[B, num_tokens] of left-padded prompts int32[B, T0], batched.

    With num_thoughts > 0 the prompt ends in <bot>: the model then runs num_thoughts thoughts (its own hidden
    states fed back, or pause tokens), reads <eot>, and generates; otherwise it generates right away."""
    cfg = model.cfg
    batch, prompt_len = prompt.shape
    total = prompt_len + num_thoughts + 1 + num_tokens
    key_mask = jnp.concatenate([prompt != cfg.pad_token, jnp.ones((batch, total - prompt_len), bool)], axis=1)
    apply = functools.partial(model.apply, variables)
    run = lambda x, cache, start: apply(x, cache, start, key_mask, method=Coconut.run)  # noqa: E731
    embed = lambda tokens, start: apply(tokens, start, method=Coconut.embed)  # noqa: E731
    cache = model.init_cache(batch, total, cfg.compute_dtype)
    h, cache = run(embed(prompt, 0), cache, 0)
    h_last, position = h[:, -1:], prompt_len
    if num_thoughts:
        def thought(carry, i):
            h_prev, cache = carry
            thought_tokens = jnp.full((batch, 1), cfg.thought_token, jnp.int32)
            x = apply(h_prev, embed(thought_tokens, position + i), thought_tokens, method=Coconut.feed_back)
            return run(x, cache, position + i), None

        (h_last, cache), _ = jax.lax.scan(thought, (h_last, cache), jnp.arange(num_thoughts))
        position += num_thoughts
        h_last, cache = run(embed(jnp.full((batch, 1), cfg.eot_token, jnp.int32), position), cache, position)
        position += 1

    def token_step(carry, i):
        h_prev, cache = carry
        token = jnp.argmax(apply(h_prev, method=Coconut.logits)[:, -1], axis=-1).astype(jnp.int32)
        h, cache = run(embed(token[:, None], position + i), cache, position + i)
        return (h, cache), token

    _, tokens = jax.lax.scan(token_step, (h_last, cache), jnp.arange(num_tokens))
    return tokens.T


def validate(m) -> list[str]:
    """Cross-field problems of a Coconut config.model (each key's range is declared with it; layout keys left
    at -1 are refused once the data has had its say, by experiments/training/validation.py)."""
    p = transformer.validate(m)
    if m.max_len and m.bot_position >= 0 and m.max_thoughts > 0 and m.bot_position + 1 + m.max_thoughts > m.max_len:
        p.append(f"model.bot_position={m.bot_position} + model.max_thoughts={m.max_thoughts} + 1 exceeds the row "
                 f"length model.max_len={m.max_len}")
    return p
