"""A trained policy as a step problem (experiments/test_time): reasoning steps sampled with the decoding cache.

A state is a token sequence (the prompt, then whole steps) with the cache that holds it and the logits of the token
after it. The prompt runs once (`root`); a state's n children start from n copies of its cache (`tile`), so the N
samples of a problem share their prompt's cache and a beam's children their parent's: no prefix runs twice. A step
is sampled token by token, all n children in one batch, until each row emits a step's last token (`step_ends`; all
tokens when None: every token a step) or `max_step_tokens`; a row whose step has ended keeps its cache and logits
(every cache entry selected per row), so each child's cache holds exactly its own tokens, whatever the cache kind
(KV, ring, int8, SSM states). A state is finished when its last token is in `finish_ids` or its response has
`max_response_tokens`.

    tile(cache, n)            every row of a cache repeated n times (axis found by comparing batch 1 with 2)
    PolicySteps               the step problem; its `value` is the verifier given (a callable on token sequences)
"""

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from models import sampling


@dataclasses.dataclass(frozen=True, eq=False)
class State:
    tokens: tuple[int, ...]  # the prompt, then the steps
    cache: Any  # the decoding cache holding `tokens`, batch 1
    logits: Any  # float32[V]: the next token's


def batch_axes(model) -> Any:
    """The batch axis of every cache entry: where a batch-1 cache's shape differs from a batch-2 one's."""
    one, two = (jax.eval_shape(lambda b=b: model.init_cache(b, 2)) for b in (1, 2))
    return jax.tree.map(lambda a, b: next(i for i, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y), one, two)


def tile(cache, n: int, axes):
    """Every row of `cache` repeated n times along its batch axis: row r becomes rows r n .. r n + n - 1."""
    return jax.tree.map(lambda x, axis: jnp.repeat(x, n, axis=axis), cache, axes)


def take(cache, row: int, axes):
    """Row `row` of `cache`, as a batch of 1."""
    return jax.tree.map(lambda x, axis: jax.lax.slice_in_dim(x, row, row + 1, axis=axis), cache, axes)


@dataclasses.dataclass(eq=False)
class PolicySteps:
    """The step problem of one prompt under a policy (module doc); `verifier(list of token tuples) -> float[n]`."""

    model: Any
    variables: dict
    prompt: tuple[int, ...]
    verifier: Callable
    max_len: int  # the cache's positions: prompt and response
    max_step_tokens: int
    max_response_tokens: int
    step_ends: frozenset | None = None
    finish_ids: frozenset = frozenset()
    temperature: float = 1.0

    def __post_init__(self):
        self.axes = batch_axes(self.model)
        logits, cache = prefill(self.model, self.variables, jnp.asarray([self.prompt], jnp.int32), self.max_len)
        self.root = State(tuple(self.prompt), cache, logits[0, -1])
        self._ends = None if self.step_ends is None else tuple(sorted(self.step_ends | self.finish_ids))
        self.tokens_generated = 0

    def response(self, state: State) -> tuple[int, ...]:
        return state.tokens[len(self.prompt):]

    def finished(self, state: State) -> bool:
        response = self.response(state)
        return bool(response) and (response[-1] in self.finish_ids or len(response) >= self.max_response_tokens)

    def value(self, states) -> np.ndarray:
        return np.asarray(self.verifier([s.tokens for s in states]), np.float64)

    def expand(self, states, n: int, rng, temperature=None) -> list[list[State]]:
        return [self._children(state, n, rng, self.temperature if temperature is None else temperature)
                for state in states]

    def sample(self, n: int, rng) -> list[State]:
        """n whole responses of the prompt, one batch from n copies of its cache (best-of-N and voting)."""
        room = self.max_response_tokens
        return self._children(self.root, n, rng, self.temperature, tuple(sorted(self.finish_ids)), room)

    def rollout(self, states, steps: int) -> list[State]:
        """Each state continued greedily (temperature 0) by `steps` steps, or until finished."""
        ahead = []
        for state in states:
            for _ in range(steps):
                if self.finished(state):
                    break
                state = self._children(state, 1, None, 0.0)[0]
            ahead.append(state)
        return ahead

    def _children(self, state: State, n: int, rng, temperature: float, ends="step", tokens=None) -> list[State]:
        """n continuations of `state`, each to its first token in `ends` ("step": a step's end, or every token when
        step_ends is None) or `tokens` tokens (default: max_step_tokens), within the response's and cache's room."""
        ends = self._ends if ends == "step" else ends
        room = min(self.max_step_tokens if tokens is None else tokens,
                   self.max_response_tokens - len(self.response(state)), self.max_len - len(state.tokens))
        cache, logits = tile(state.cache, n, self.axes), jnp.repeat(state.logits[None], n, axis=0)
        ended, steps = np.zeros(n, bool), []  # on the host: one transfer a token (which rows ended), not two
        key = jax.random.key(0) if rng is None else jax.random.key(int(rng.integers(2**31)))
        for t in range(room):
            token, logits, cache, newly = advance(self.model, self.variables, cache, logits, ended,
                                                  jax.random.fold_in(key, t), len(state.tokens) + t,
                                                  temperature=temperature, ends=ends)
            steps.append(token)
            self.tokens_generated += int(n - ended.sum())
            ended = ended | np.asarray(newly)
            if ended.all():
                break
        steps = np.stack(steps, axis=1)
        return [State(state.tokens + tuple(int(k) for k in _until(steps[row], ends)), take(cache, row, self.axes),
                      logits[row]) for row in range(n)]


def _until(tokens, ends) -> np.ndarray:
    """A row's sampled tokens through its first one in `ends` (None: the first token; all when none is in it)."""
    for i, token in enumerate(tokens):
        if ends is None or int(token) in ends:
            return tokens[:i + 1]
    return tokens


@functools.partial(jax.jit, static_argnames=("model", "max_len"))
def prefill(model, variables, prompt, max_len: int):
    """(the logits of the prompt int32 [B, T], the cache of `max_len` positions holding it)."""
    return model.apply(variables, prompt, model.init_cache(prompt.shape[0], max_len), 0, method=model.decode)


@functools.partial(jax.jit, static_argnames=("model", "temperature", "ends"))
def advance(model, variables, cache, logits, ended, key, start, *, temperature: float, ends):
    """One token of every row not `ended`, sampled from `logits` and run at position `start`: (the tokens, the next
    logits, the cache, whether each token ends the row's continuation: it is in `ends`, or any token when None); an
    ended row keeps its logits and its cache."""
    token = sampling.sample_token(key, logits, temperature=temperature, top_k=0, top_p=1.0)
    new_logits, new_cache = model.apply(variables, token[:, None], cache, start, method=model.decode)
    cache = jax.tree.map(lambda old, new, axis: jnp.where(
        ended.reshape([-1 if i == axis else 1 for i in range(new.ndim)]), old, new), cache, new_cache,
        batch_axes(model))
    ends_step = jnp.ones_like(ended) if ends is None else jnp.isin(token, jnp.asarray(ends, jnp.int32))
    return token, jnp.where(ended[:, None], logits, new_logits[:, -1]), cache, ends_step
