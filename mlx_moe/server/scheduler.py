"""Continuous batching: one thread owns the model and runs mlx-lm's ``BatchGenerator``.

HTTP threads hand in :class:`Job` objects and read their events from ``job.events``;
requests join the batch and leave it between decode steps (``BatchGenerator.insert`` /
``remove``), each with its own sampler (temperature, top-p, top-k, min-p and a seeded
key of its own, so a seed gives the same tokens whatever else is in the batch).

Stop strings are matched on the decoded text here, not on token ids, so a stop string
is found whatever tokens spell it and is never emitted: text that could be the start
of a stop string is held back until it is known not to be.

Prefix cache: when a request ends, its KV cache (prompt + generated tokens) goes into
mlx-lm's ``LRUPromptCache``; a later prompt sharing a prefix with it (a conversation's
next turn) starts from a copy of that cache, trimmed to the shared prefix, and only
the rest is prefilled.
"""

import logging
import queue
import threading
import time
from typing import List

import mlx.core as mx
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

log = logging.getLogger("mlx_moe.server")


class ShuttingDown(Exception):
    pass


def make_sampler(temperature, top_p=1.0, top_k=0, min_p=0.0, seed=None):
    """A per-request sampler (log-probs [1, V] -> token [1]); None means greedy (shared)."""
    if temperature == 0:
        return None
    methods = []
    if 0 < top_p < 1.0:
        methods.append(lambda x: apply_top_p(x, top_p))
    if min_p > 0:
        methods.append(lambda x: apply_min_p(x, min_p))
    if top_k > 0:
        methods.append(lambda x: apply_top_k(x, top_k))
    state = {"key": None}
    inv_t = 1.0 / temperature

    def sampler(logprobs):  # called on the scheduler's thread only
        for m in methods:
            logprobs = m(logprobs)
        if seed is None:
            return mx.random.categorical(logprobs * inv_t)
        if state["key"] is None:
            state["key"] = mx.random.key(seed)
        state["key"], sub = mx.random.split(state["key"])
        return mx.random.categorical(logprobs * inv_t, key=sub)

    return sampler


def held_back(text: str, stops: List[str]) -> int:
    """How many trailing characters of ``text`` could begin a stop string."""
    n = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), n, -1):
            if text.endswith(s[:k]):
                n = k
                break
    return n


class Job:
    """One request as the scheduler sees it. Events put on ``events``:
    ``("delta", text, logprob_items)``, ``("end", finish_reason, usage_counts)``, ``("error", message)``."""

    def __init__(self, prompt_ids, max_tokens, sampler=None, stop=(), logprobs=False, top_logprobs=0):
        self.prompt_ids = list(prompt_ids)
        self.max_tokens = max_tokens
        self.sampler = sampler
        self.stop = list(stop)
        self.logprobs = logprobs
        self.top_logprobs = top_logprobs
        self.events = queue.Queue()
        self.cancelled = False
        self.uid = None
        self.cached_tokens = 0
        self.completion_tokens = 0
        self.t_submit = time.perf_counter()
        self.t_first = None
        # scheduler-side text state
        self._detok = None
        self._text = ""
        self._sent = 0

    def counts(self):
        return {"prompt_tokens": len(self.prompt_ids), "completion_tokens": self.completion_tokens,
                "cached_tokens": self.cached_tokens}


class Scheduler:
    """Owns the model. ``run()`` is the loop, on the thread that loaded the model (the main
    thread in ``mlx_moe.server``); ``submit`` / ``cancel`` / ``stop`` are for any thread."""

    def __init__(self, model, tokenizer, max_batch=16, prefill_batch=8, prefill_step_size=2048,
                 prompt_cache_size=16, prompt_cache_bytes=None):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch = max_batch
        self.prefill_batch = max(1, min(prefill_batch, max_batch))
        self.prefill_step_size = prefill_step_size
        self.prompt_cache = LRUPromptCache(max_size=prompt_cache_size,
                                           max_bytes=prompt_cache_bytes if prompt_cache_bytes else 1 << 63)
        self.inbox = queue.Queue()
        # Hugging Face fast tokenizers may refuse concurrent use ("Already borrowed"): HTTP threads
        # encode and this thread decodes under this lock
        self.tokenizer_lock = threading.Lock()
        self.closing = False
        self.running = False
        self.active = 0
        self.steps = 0

    # ---- any thread ----
    def submit(self, job: Job):
        if self.closing:
            raise ShuttingDown()
        self.inbox.put(("add", job))

    def cancel(self, job: Job):
        if not job.cancelled:
            job.cancelled = True
            self.inbox.put(("cancel", job))

    def stop(self):
        """Stop taking jobs; ``run()`` ends every job in flight (finish_reason "length") and returns.
        Safe in a signal handler."""
        self.closing = True
        self.inbox.put(("stop", None))

    @property
    def healthy(self):
        return self.running and not self.closing

    # ---- the owner thread ----
    def run(self, until_idle=False):
        """The loop; returns after ``stop()`` or, with ``until_idle``, once no job is left."""
        self.running = True
        try:
            self._loop(until_idle)
        finally:
            self.running = False

    def _new_generator(self):
        return BatchGenerator(
            self.model, stop_tokens=[[t] for t in self.tokenizer.eos_token_ids],
            completion_batch_size=self.max_batch, prefill_batch_size=self.prefill_batch,
            prefill_step_size=self.prefill_step_size, stream=mx.default_stream(mx.default_device()))

    def _loop(self, until_idle=False):
        gen = self._new_generator()
        jobs = {}  # uid -> Job
        waiting = []  # jobs not yet in the generator (batch full)
        stopping = False
        while True:
            # 1. take requests: block only while idle
            block = not jobs and not waiting and not until_idle
            while True:
                try:
                    kind, job = self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
                except queue.Empty:
                    break
                block = False
                if kind == "stop":
                    stopping = True
                elif kind == "add":
                    waiting.append(job)
                elif kind == "cancel" and job.uid in jobs:
                    gen.remove([job.uid])
                    del jobs[job.uid]
                    self.active = len(jobs)
            if until_idle and not jobs and not waiting and self.inbox.empty():
                stopping = True
            if stopping:
                for job in list(jobs.values()) + waiting:
                    if job._detok is not None:  # what the detokenizer still holds
                        job._detok.finalize()
                        job._text += job._detok.last_segment
                    self._finish(job, "length")
                gen.close()
                del gen
                mx.synchronize()  # no async work left behind
                return
            waiting = [j for j in waiting if not j.cancelled]
            while waiting and len(jobs) < self.max_batch:
                job = waiting.pop(0)
                try:
                    self._insert(gen, job)
                    jobs[job.uid] = job
                except Exception as e:
                    log.exception("insert failed")
                    job.events.put(("error", f"{type(e).__name__}: {e}"))
            self.active = len(jobs)
            if not jobs:
                continue

            # 2. one step: prefill of newcomers (a chunk) and/or one decode step of the batch
            try:
                _, responses = gen.next()
            except Exception as e:
                log.exception("generation step failed")
                for job in jobs.values():
                    job.events.put(("error", f"generation failed: {type(e).__name__}: {e}"))
                jobs.clear()
                gen.close()
                gen = self._new_generator()
                continue
            self.steps += 1
            remove = []
            for r in responses:
                job = jobs.get(r.uid)
                if job is None:
                    continue
                with self.tokenizer_lock:
                    over = self._on_token(job, r)
                if over:
                    del jobs[r.uid]
                    if r.finish_reason is None:  # ended by a stop string: leave the batch now
                        remove.append(r.uid)
                    else:
                        self._keep_cache(r.all_tokens, r.prompt_cache)
            if remove:
                for uid, (cache, tokens) in gen.remove(remove, return_prompt_caches=True).items():
                    self._keep_cache(tokens, cache)
            self.active = len(jobs)

    def _insert(self, gen, job):
        prompt = job.prompt_ids
        cache, rest = self.prompt_cache.fetch_nearest_cache("model", prompt)
        if cache is not None and not rest:  # exact hit: the last token must still be run for its logits
            if can_trim_prompt_cache(cache):
                trim_prompt_cache(cache, 1)
                rest = prompt[-1:]
            else:
                cache, rest = None, prompt
        if cache is None:
            rest = prompt
        job.cached_tokens = len(prompt) - len(rest)
        job._detok = self.tokenizer.detokenizer
        (job.uid,) = gen.insert(
            [rest], max_tokens=[job.max_tokens], caches=[cache] if cache is not None else None,
            all_tokens=[prompt[:job.cached_tokens]], samplers=[job.sampler])

    def _keep_cache(self, tokens, cache):
        if tokens and cache:
            self.prompt_cache.insert_cache("model", list(tokens), cache)

    def _logprob_item(self, job, r):
        tok = self.tokenizer
        lp = r.logprobs
        item_top = []
        if job.top_logprobs:
            top = mx.argpartition(-lp, kth=job.top_logprobs - 1)[: job.top_logprobs]
            vals = lp[top]
            order = mx.argsort(-vals)
            ids, vals = top[order].tolist(), vals[order].tolist()
            item_top = [(tok.decode([i]), v) for i, v in zip(ids, vals)]
        return (tok.decode([r.token]), lp[r.token].item(), item_top)

    def _on_token(self, job, r) -> bool:
        """Handle one generated token; True when the job is over."""
        if job.t_first is None:
            job.t_first = time.perf_counter()
        job.completion_tokens += 1
        items = [self._logprob_item(job, r)] if job.logprobs else []
        finish = r.finish_reason
        if finish == "stop":  # EOS: not part of the text
            job._detok.finalize()
        else:
            job._detok.add_token(r.token)
            if finish == "length":
                job._detok.finalize()
        job._text += job._detok.last_segment
        if job.stop:
            hits = [i for i in (job._text.find(s, max(0, job._sent - len(s))) for s in job.stop) if i >= 0]
            if hits:
                job._text = job._text[: min(hits)]
                self._finish(job, "stop", items=items)
                return True
        if finish is not None:
            self._finish(job, finish, items=items)
            return True
        keep = held_back(job._text, job.stop) if job.stop else 0
        end = len(job._text) - keep
        job.events.put(("delta", job._text[job._sent:end], items))
        job._sent = end
        return False

    def _finish(self, job, reason, items=()):
        text = job._text[job._sent:]
        job._sent = len(job._text)
        if text or items:
            job.events.put(("delta", text, list(items)))
        job.events.put(("end", reason, job.counts()))
