"""Autoregressive sampling with the KV cache: one pass over the prompt, then one token per step.

    logits_t / temperature  ->  keep the top_k largest  ->  keep the smallest set whose
    probability reaches top_p  ->  sample (temperature 0: argmax)

Works for any model with `decode(tokens, cache, start) -> (logits, cache)` (models/transformer.py).
"""

import functools

import jax
import jax.numpy as jnp


def filter_logits(logits, *, top_k: int = 0, top_p: float = 1.0):
    """float32[B, V] -> the same with every token outside the top-k / nucleus set at -inf."""
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of the tokens ranked above
        cutoff = jnp.min(jnp.where(mass_before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def sample_token(rng, logits, *, temperature: float, top_k: int, top_p: float):
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits / temperature, top_k=top_k, top_p=top_p)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "num_tokens", "temperature", "top_k", "top_p"))
def generate(model, variables, prompt, cache, rng, *, num_tokens: int, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0):
    """Continues int32[B, T0] prompts by num_tokens tokens -> int32[B, num_tokens].

    `variables`: {"params": ..., **model state}; `cache` is an empty cache with room for T0 + num_tokens
    positions (`model.init_cache`)."""
    apply = functools.partial(model.apply, variables, method=model.decode)
    pick = functools.partial(sample_token, temperature=temperature, top_k=top_k, top_p=top_p)
    logits, cache = apply(prompt, cache, 0)
    first = pick(jax.random.fold_in(rng, 0), logits[:, -1])

    def step(carry, i):
        token, cache = carry
        logits, cache = apply(token[:, None], cache, prompt.shape[1] + i)
        next_token = pick(jax.random.fold_in(rng, i + 1), logits[:, -1])
        return (next_token, cache), token

    _, tokens = jax.lax.scan(step, (first, cache), jnp.arange(num_tokens))
    return tokens.T
