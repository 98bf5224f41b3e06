"""Reader threads and expert predictors.

``ReaderThreads`` runs the expert reads: demand loads (the layer being computed
needs them) and prefetches (the likely experts of the next layer, read while
this one computes). Jobs sit in one priority queue, demand first. The threads
touch no MLX state: they ``pread`` into a private page-aligned staging buffer
and copy into numpy views of the preallocated slot pool, so they overlap with
MLX compute (both release the GIL).

Faults: a bad expert record (``ExpertFileError``) fails only that job -- the
layer that needs the expert raises it. Any other exception stops all threads
cleanly (the queue is dropped, every thread exits) and is re-raised on the main
thread at the next expert lookup; ``close()`` (also run on Ctrl-C) stops and
joins them.

Predictors (``PREDICTORS``), evaluated on every decode step whichever one
drives the prefetch, so their accuracies can be compared on one run:

* ``router``: layer L+1's router applied to layer L's MoE input (the hidden
  state the layer sees); falls back to ``prev`` across the token boundary.
* ``prev``: the experts layer L+1 chose for the previous token.
* ``union``: both sets.
* ``none``: no prefetch.
"""

import heapq
import itertools
import threading
from typing import Callable, Dict, List, Optional

import numpy as np

PREDICTORS = ("router", "prev", "union", "none")


class ReaderThreads:
    """``n`` daemon threads running ``work(job)`` for queued jobs, demand first.

    ``lock`` is a ``threading.Condition`` shared with the cache: the queue and
    the cache state change under it; ``work`` runs without it.
    """

    def __init__(self, cond: threading.Condition, work: Callable, n: int = 2, name="mlx-moe-reader"):
        self.cond, self.work, self.n, self.name = cond, work, max(1, n), name
        self.heap: List = []
        self.seq = itertools.count()
        self.threads: List[threading.Thread] = []
        self.stop = False
        self.error: Optional[BaseException] = None

    # Called with cond held.
    def push(self, priority, job):
        heapq.heappush(self.heap, (priority, next(self.seq), job))
        self.cond.notify()

    def start(self):
        with self.cond:
            if self.alive():
                return
            self.stop = False
            self.threads = [
                threading.Thread(target=self._loop, name=f"{self.name}-{i}", daemon=True)
                for i in range(self.n)
            ]
        for t in self.threads:
            t.start()

    def alive(self):
        return any(t.is_alive() for t in self.threads)

    def _loop(self):
        while True:
            with self.cond:
                while not self.stop and not self.heap:
                    self.cond.wait()
                if self.stop:
                    return
                _, _, job = heapq.heappop(self.heap)
            try:
                self.work(job)
            except BaseException as e:  # noqa: BLE001 -- any failure stops the readers
                with self.cond:
                    if self.error is None:
                        self.error = e
                    self.stop = True
                    self.heap.clear()
                    self.cond.notify_all()
                return

    def close(self, timeout=10.0):
        """Stop and join every thread; queued jobs are dropped (returned)."""
        with self.cond:
            self.stop = True
            dropped = [j for _, _, j in self.heap]
            self.heap.clear()
            self.cond.notify_all()
        me = threading.current_thread()
        for t in self.threads:
            if t is not me:
                t.join(timeout)
        return dropped


class PredictionStats:
    """Per-predictor recall: |predicted ∩ used| / |used| over decode layer calls."""

    def __init__(self):
        self.hit = {p: 0 for p in PREDICTORS if p != "none"}
        self.total = {p: 0 for p in PREDICTORS if p != "none"}

    def add(self, name, predicted, actual):
        if predicted is None:
            return
        self.hit[name] += len(np.intersect1d(predicted, actual, assume_unique=True))
        self.total[name] += len(actual)

    def summary(self):
        return {p: (self.hit[p] / self.total[p] if self.total[p] else None) for p in self.hit}


class Planner:
    """Turns what each layer used (and the router's guess) into prefetch lists.

    ``order``: MoE layers in forward order. ``observe`` is called once per layer
    call with the experts it uses; ``predict`` returns the experts to prefetch
    for the next ``lookahead`` layers.
    """

    def __init__(self, order: List[int], predictor: str = "router", lookahead: int = 1):
        if predictor not in PREDICTORS:
            raise ValueError(f"Unknown expert predictor '{predictor}'; expected one of {PREDICTORS}")
        self.order, self.predictor, self.lookahead = list(order), predictor, max(1, lookahead)
        self.pos = {l: i for i, l in enumerate(self.order)}
        self.prev: Dict[int, np.ndarray] = {}  # layer -> experts at the previous decode step
        self.pending: Dict[int, Dict[str, np.ndarray]] = {}  # layer -> predictor -> guess
        self.stats = PredictionStats()

    def reset(self):
        self.prev.clear()
        self.pending.clear()

    def next_layers(self, layer):
        i = self.pos[layer]
        n = len(self.order)
        return [self.order[(i + d) % n] for d in range(1, min(self.lookahead, n) + 1)]

    def observe(self, layer, used: np.ndarray, decode: bool):
        guesses = self.pending.pop(layer, None)
        if decode and guesses:
            for name, g in guesses.items():
                self.stats.add(name, g, used)
        if decode:
            self.prev[layer] = used
        else:
            self.prev.pop(layer, None)

    def predict(self, layer, router_guess: Optional[np.ndarray]) -> List[tuple]:
        """``[(layer, experts, distance)]`` to prefetch after ``layer``'s call."""
        out = []
        for d, nxt in enumerate(self.next_layers(layer), start=1):
            wraps = self.pos[nxt] <= self.pos[layer]  # next token's layer: no router guess
            prev = self.prev.get(nxt)
            router = router_guess if (d == 1 and not wraps) else None
            if router is None:
                router = prev
            guesses = {"prev": prev, "router": router}
            if prev is not None or router is not None:
                parts = [g for g in (prev, router) if g is not None]
                guesses["union"] = np.unique(np.concatenate(parts))
            self.pending[nxt] = {k: v for k, v in guesses.items() if v is not None}
            if self.predictor != "none":
                g = guesses.get(self.predictor)
                if g is not None and len(g):
                    out.append((nxt, g, d))
        return out
