"""Token generation with a compiled decode step.

Decode of an MoE model is dominated by building the graph in Python: 48 layers
times ~50 ops per token. We prefill with mlx-lm's caches, then move the KV cache
into fixed-capacity buffers whose write position is an array, so one
``mx.compile``d step serves every token (it retraces only when the buffers
grow, in powers of two).
"""

from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional

import mlx.core as mx
from mlx_lm.models.cache import KVCache, make_prompt_cache

from .kernels.common import pow2_ceil

MIN_CAPACITY = 256


class StaticKVCache:
    """KV cache in preallocated ``[B, heads, capacity, dim]`` buffers.

    ``offset`` is an int32 array, so rope, the cache write and the mask all take
    it as data and a compiled step never sees a new shape. The arrays live in the
    list ``state`` so ``mx.compile`` can swap them in and out.
    """

    def __init__(self, cache: KVCache, capacity: int):
        n = cache.offset
        self.state = [
            self._grow(cache.keys[..., :n, :], capacity),
            self._grow(cache.values[..., :n, :], capacity),
            mx.array(n, dtype=mx.int32),
        ]

    keys = property(lambda self: self.state[0])
    values = property(lambda self: self.state[1])
    offset = property(lambda self: self.state[2])

    @staticmethod
    def _grow(a, capacity):
        pad = capacity - a.shape[2]
        return mx.concatenate([a, mx.zeros((*a.shape[:2], pad, a.shape[3]), a.dtype)], axis=2)

    @property
    def capacity(self):
        return self.state[0].shape[2]

    def grow(self, capacity):
        self.state[0] = self._grow(self.state[0], capacity)
        self.state[1] = self._grow(self.state[1], capacity)

    def advance(self):
        self.state[2] = self.state[2] + 1

    def update_and_fetch(self, keys, values):
        at = self.offset[None]
        self.state[0] = mx.slice_update(self.state[0], keys, at, axes=(2,))
        self.state[1] = mx.slice_update(self.state[1], values, at, axes=(2,))
        return self.state[0], self.state[1]

    def make_mask(self, N, return_array=False, window_size=None):
        if N != 1 or window_size is not None:
            raise ValueError("StaticKVCache serves single-token decode steps only")
        return (mx.arange(self.capacity) <= self.offset)[None]


def supports_compiled_decode(model) -> bool:
    """Plain full-attention KV caches only (sliding-window layers keep mlx-lm's path)."""
    return all(type(c) is KVCache for c in make_prompt_cache(model))


class CompiledDecoder:
    """``step(token [1, 1]) -> logits [1, vocab]`` over static caches, compiled once per capacity."""

    def __init__(self, model, caches: List[KVCache]):
        self.position = caches[0].offset
        capacity = max(MIN_CAPACITY, pow2_ceil(self.position + 1))
        self.caches = [StaticKVCache(c, capacity) for c in caches]
        state = [c.state for c in self.caches]

        def step(tokens):
            logits = model(tokens, cache=self.caches)[:, -1, :]
            for c in self.caches:
                c.advance()
            return logits

        self._step = mx.compile(step, inputs=state, outputs=state)

    def __call__(self, tokens):
        if self.position + 1 > self.caches[0].capacity:
            for c in self.caches:
                c.grow(2 * c.capacity)
        self.position += 1
        return self._step(tokens)


@dataclass
class StepResult:
    token: int
    logprobs: mx.array


def generate_step(
    prompt: mx.array,
    model,
    max_tokens: int = 256,
    sampler: Optional[Callable] = None,
    prefill_step_size: int = 2048,
    compiled: bool = True,
) -> Iterator[StepResult]:
    """Yield generated tokens for ``prompt`` (1-D ids), like ``mlx_lm.generate.generate_step``."""
    sampler = sampler or (lambda lp: mx.argmax(lp, axis=-1))
    caches = make_prompt_cache(model)
    prompt = prompt.reshape(-1)
    while prompt.size > 1:
        n = min(prefill_step_size, prompt.size - 1)
        model(prompt[None, :n], cache=caches)
        mx.eval([c.state for c in caches])
        prompt = prompt[n:]
        mx.clear_cache()

    use_compiled = compiled and supports_compiled_decode(model)
    decoder = None

    def forward(tokens):
        nonlocal decoder
        # The static caches copy what the prompt left: a 1-token prompt runs
        # its first step eagerly so there is something to copy.
        if use_compiled and decoder is None and caches[0].offset > 0:
            decoder = CompiledDecoder(model, caches)
        if decoder is not None:
            return decoder(tokens)
        return model(tokens, cache=caches)[:, -1, :]

    def next_token(tokens):
        logits = forward(tokens[None])
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return sampler(logprobs), logprobs.squeeze(0)

    y, logprobs = next_token(prompt)
    mx.async_eval(y, logprobs)
    for n in range(max_tokens):
        if n + 1 < max_tokens:
            next_y, next_logprobs = next_token(y)
            mx.async_eval(next_y, next_logprobs)
        yield StepResult(int(y.item()), logprobs)
        if n + 1 < max_tokens:
            y, logprobs = next_y, next_logprobs
