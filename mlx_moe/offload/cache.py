"""The budgeted expert cache: a preallocated slot pool, its policy and its reads.

One ``SlotPool`` per expert shape (usually one for the whole model): MLX arrays
``[S, out, in_packed]`` for every expert tensor (gate/up/down weight, scales,
biases), allocated and touched once. An expert of any layer can live in any
slot; ``gather_qmm`` runs over the pool with slot indices. Reads go straight
into numpy views of those arrays' memory (no allocation per token, no MLX op).

Policy (``ExpertCache.victim``): LRFU -- each expert carries a use score that
gains 1 per layer call using it and halves every ``half_life`` decode tokens
(``half_life`` → 0 is LRU, → ∞ is LFU); the lowest score is evicted, empty
slots first. Never evicted: slots the pending computation reads (``in_use``),
slots being read, experts pinned as hot across the prompt, and prefetched
experts whose layer has not run yet.

Pins: the experts each layer used during the prompt (prefill calls) are
counted; at the first decode step the ones used most -- at least
``pin_ratio`` times their uniform share -- are pinned, up to ``pin_fraction``
of the slots beyond two layers' working sets.

Reads: ``io_mode`` ``direct`` (O_DIRECT into a page-aligned staging buffer,
then copied into the slot: no page cache, so memory stays at the budget),
``buffered`` (page cache, dropped after each read with POSIX_FADV_DONTNEED; on
macOS F_NOCACHE), ``cached`` (plain page cache: tests) or ``mmap`` (the
baseline: no slot cache at all, every use copies from an mmap of the file so
the kernel's page cache is the only cache). ``auto`` = ``direct`` where the
filesystem allows it, else ``buffered``.
"""

import mmap
import os
import sys
import threading
import time
import zlib
from typing import Dict, List, Optional

import mlx.core as mx
import numpy as np

from .layout import ExpertFileError, ExpertIndex, LayerEntry, corrupt
from .prefetch import Planner, ReaderThreads

EMPTY, LOADING, READY = 0, 1, 2
KEY_SHIFT = 20  # key = layer << KEY_SHIFT | expert
VERIFY = ("first", "always", "none")
IO_MODES = ("auto", "direct", "buffered", "cached", "mmap")
F_NOCACHE = 48  # macOS fcntl


def key_of(layer, expert):
    return (int(layer) << KEY_SHIFT) | int(expert)


def split_keys(keys: np.ndarray):
    """(layers, experts, valid) of a key array; empty slots (-1) map to (0, 0)."""
    valid = keys >= 0
    k = np.where(valid, keys, 0)
    return k >> KEY_SHIFT, k & ((1 << KEY_SHIFT) - 1), valid


class SlotPool:
    """``slots`` preallocated expert slots for layers sharing one tensor table."""

    def __init__(self, entry: LayerEntry, slots: int, layers: List[int]):
        self.tensors = entry.tensors
        self.quantization = entry.quantization
        self.record_bytes = entry.record_bytes
        self.data_bytes = entry.data_bytes
        self.slot_bytes = sum(t.nbytes for t in entry.tensors)
        self.layers = list(layers)
        self.num_experts = entry.num_experts
        self.S = slots
        self.arrays: Dict[str, mx.array] = {}
        self.views: Dict[str, np.ndarray] = {}
        self._raw = []
        for t in self.tensors:
            store = mx.uint16 if t.dtype == "bfloat16" else t.mx_dtype
            raw = mx.zeros((slots, *t.shape), dtype=store)
            mx.eval(raw)
            arr = raw.view(t.mx_dtype) if t.dtype == "bfloat16" else raw
            mx.eval(arr)
            view = np.array(raw, copy=False)
            if not view.flags["C_CONTIGUOUS"] or not view.flags["WRITEABLE"]:
                raise RuntimeError("MLX returned a non-contiguous or read-only slot pool buffer")
            self._raw.append(raw)
            self.arrays[t.name] = arr
            self.views[t.name] = view.reshape(slots, -1).view(np.uint8)
        self.key = np.full(slots, -1, np.int64)
        self.state = np.zeros(slots, np.int8)
        self.in_use = np.zeros(slots, bool)
        self.claimed = np.zeros(slots, bool)
        self.protected = np.zeros(slots, bool)
        self.from_prefetch = np.zeros(slots, bool)
        self.last_use = np.zeros(slots, np.int64)
        self.where: Dict[int, int] = {}

    @property
    def nbytes(self):
        return self.S * self.slot_bytes

    def fill(self, slot, record: np.ndarray):
        for t in self.tensors:
            self.views[t.name][slot] = record[t.offset:t.offset + t.nbytes]


class RecordReader:
    """Reads whole expert records, one ``pread`` each."""

    def __init__(self, index: ExpertIndex, io_mode="auto"):
        if io_mode not in IO_MODES:
            raise ValueError(f"Unknown io_mode '{io_mode}'; expected one of {IO_MODES}")
        self.index = index
        self.fds: Dict[int, int] = {}
        self.maps: Dict[int, np.ndarray] = {}
        self.mode = io_mode
        if io_mode == "auto":
            self.mode = "direct" if self._direct_ok() else "buffered"
        for layer, e in index.layers.items():
            path = str(index.path(e))
            flags = os.O_RDONLY
            if self.mode == "direct":
                flags |= os.O_DIRECT
            try:
                fd = os.open(path, flags)
            except FileNotFoundError:
                self.close()
                index.check_file(e)
                raise
            self.fds[layer] = fd
            if self.mode == "buffered" and sys.platform == "darwin":
                import fcntl

                fcntl.fcntl(fd, F_NOCACHE, 1)
            if self.mode == "mmap":
                m = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
                self.maps[layer] = np.frombuffer(m, np.uint8)

    def _direct_ok(self):
        if not hasattr(os, "O_DIRECT") or not self.index.layers:
            return False
        e = next(iter(self.index.layers.values()))
        try:
            fd = os.open(str(self.index.path(e)), os.O_RDONLY | os.O_DIRECT)
        except OSError:
            return False
        try:
            buf = mmap.mmap(-1, e.record_bytes)
            os.preadv(fd, [buf], e.offset(0))
            return True
        except OSError:
            return False
        finally:
            os.close(fd)

    def read(self, entry: LayerEntry, expert: int, buf) -> None:
        """Read the record into ``buf`` (page-aligned, ``record_bytes`` long)."""
        fd = self.fds[entry.layer]
        off, want = entry.offset(expert), entry.record_bytes
        mv = memoryview(buf)[:want]
        got = 0
        while got < want:
            n = os.preadv(fd, [mv[got:]], off + got)
            if n <= 0:
                raise ExpertFileError(
                    f"layer {entry.layer} expert {expert}: short read from "
                    f"{self.index.path(entry)} ({got} of {want} bytes at byte {off}): "
                    "the expert file was truncated",
                    layer=entry.layer, expert=expert,
                )
            got += n
        if self.mode == "buffered" and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, off, want, os.POSIX_FADV_DONTNEED)

    def record_view(self, entry: LayerEntry, expert: int) -> np.ndarray:
        """mmap mode: the record as a view of the mapped file (faults on use)."""
        m = self.maps[entry.layer]
        off = entry.offset(expert)
        if off + entry.record_bytes > m.size:
            raise ExpertFileError(
                f"layer {entry.layer} expert {expert}: {self.index.path(entry)} is truncated",
                layer=entry.layer, expert=expert,
            )
        return m[off:off + entry.record_bytes]

    def close(self):
        self.maps.clear()
        for fd in self.fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds.clear()


class Stats:
    FIELDS = ("lookups", "hits", "misses", "prefetch_hits", "late_prefetch_hits",
              "prefetch_issued", "prefetch_wasted", "prefetch_cancelled",
              "reads", "bytes_read", "read_s", "verify_s", "stall_s", "calls", "tokens")

    def __init__(self):
        self.d = {"prefill": dict.fromkeys(self.FIELDS, 0), "decode": dict.fromkeys(self.FIELDS, 0)}

    def add(self, phase, **kw):
        d = self.d[phase]
        for k, v in kw.items():
            d[k] += v


class ExpertCache:
    """The expert cache of one model: slot pools, policy, reader threads, stats."""

    def __init__(
        self,
        index: ExpertIndex,
        budget_bytes: int,
        top_k: int,
        io_threads: int = 2,
        io_mode: str = "auto",
        verify: str = "first",
        predictor: str = "router",
        lookahead: int = 1,
        half_life: float = 32.0,
        pin_fraction: float = 0.25,
        pin_ratio: float = 2.0,
        decode_max_tokens: int = 1,
        track_all_predictors: bool = True,
    ):
        if verify not in VERIFY:
            raise ValueError(f"Unknown verify '{verify}'; expected one of {VERIFY}")
        self.index = index
        self.top_k = top_k
        self.verify = verify
        self.half_life = float(half_life)
        self.pin_fraction, self.pin_ratio = pin_fraction, pin_ratio
        self.decode_max_tokens = decode_max_tokens
        self.track_all_predictors = track_all_predictors
        self.entries = dict(sorted(index.layers.items()))
        self.order = list(self.entries)
        self.slots_for_budget(budget_bytes)  # validates before anything is allocated
        self.reader = RecordReader(index, io_mode)
        self.mmap_mode = self.reader.mode == "mmap"
        if self.mmap_mode:
            predictor = "none"
        self.pools: List[SlotPool] = []
        self.pool_of: Dict[int, SlotPool] = {}
        for (entry, layers), slots in zip(self.groups, self.group_slots):
            pool = SlotPool(entry, slots, layers)
            self.pools.append(pool)
            for l in layers:
                self.pool_of[l] = pool
        self.budget_bytes = budget_bytes
        n_layers = max(self.order) + 1 if self.order else 0
        e_max = max((e.num_experts for e in self.entries.values()), default=0)
        self.score = np.zeros((n_layers, e_max), np.float64)
        self.score_tick = np.zeros((n_layers, e_max), np.float64)
        self.verified = np.zeros((n_layers, e_max), bool)
        self.pinned = np.zeros((n_layers, e_max), bool)
        self.prompt_counts = np.zeros((n_layers, e_max), np.int64)
        self.prompt_tokens = 0
        self.failed: Dict[int, ExpertFileError] = {}
        self.cond = threading.Condition()
        self.readers = ReaderThreads(self.cond, self._work, io_threads)
        self._staging = threading.local()
        self.planner = Planner(self.order, predictor, lookahead)
        self.stats = Stats()
        self.token = 0
        self.calls = 0
        self.phase = "prefill"
        self.pending_output = None  # the last lazy output; evaluated before slots are reused
        self.closed = False
        self.trace = None  # a list to record (layer, ids, router guess, decode) per call
        self.full = all(p.S >= len(p.layers) * p.num_experts for p in self.pools)
        if not self.mmap_mode:
            self.readers.start()

    # ---------------------------------------------------------------- sizing

    def slots_for_budget(self, budget_bytes):
        """Split the budget over pools (one per expert shape); refuse too small."""
        groups: Dict[tuple, list] = {}
        for l, e in self.entries.items():
            groups.setdefault(e.signature, []).append(l)
        self.groups = [(self.entries[ls[0]], ls) for ls in groups.values()]
        slot_bytes = [sum(t.nbytes for t in e.tensors) for e, _ in self.groups]
        need = [len(ls) * e.num_experts for e, ls in self.groups]
        k = self.top_k
        minimum = sum(k * b for b in slot_bytes)
        if budget_bytes < minimum:
            raise ValueError(
                f"expert budget {budget_bytes / 1e9:.4g} GB is below the minimum of "
                f"{minimum / 1e9:.4g} GB ({minimum} bytes): one layer's top-{k} working set "
                f"({k} experts x {slot_bytes[0]} bytes) must fit"
            )
        total = sum(n * b for n, b in zip(need, slot_bytes))
        out = []
        for n, b in zip(need, slot_bytes):
            share = budget_bytes * (n * b) / total
            out.append(int(max(k, min(n, share // b))))
        self.group_slots = out
        return out

    @property
    def slot_count(self):
        return sum(p.S for p in self.pools)

    # ---------------------------------------------------------------- threads

    def _staging_buf(self, size):
        buf = getattr(self._staging, "buf", None)
        if buf is None or len(buf) < size:
            buf = mmap.mmap(-1, size)
            self._staging.buf = buf
            self._staging.np = np.frombuffer(buf, np.uint8)
        return self._staging.buf, self._staging.np

    def _work(self, job):
        pool, slot, key, entry, expert = job
        with self.cond:
            if pool.key[slot] != key or pool.state[slot] != LOADING or pool.claimed[slot]:
                return  # cancelled, done, or taken by another thread
            pool.claimed[slot] = True
            phase = self.phase
        err = None
        t0 = time.perf_counter()
        try:
            nbytes, verify_s = self._load(pool, slot, entry, expert)
        except ExpertFileError as e:
            err = e
            nbytes, verify_s = 0, 0.0
        except BaseException:
            with self.cond:
                pool.claimed[slot] = False
                self._drop(pool, slot)
            raise
        dt = time.perf_counter() - t0
        with self.cond:
            pool.claimed[slot] = False
            if err is not None:
                self._drop(pool, slot)
                self.failed[key] = err
            else:
                pool.state[slot] = READY
                self.stats.add(phase, reads=1, bytes_read=nbytes, read_s=dt, verify_s=verify_s)
            self.cond.notify_all()

    def _load(self, pool: SlotPool, slot, entry: LayerEntry, expert):
        """Read one record into ``slot``; returns (bytes read, seconds verifying)."""
        verify_s = 0.0
        if self.mmap_mode:
            rec = self.reader.record_view(entry, expert)
        else:
            buf, rec = self._staging_buf(entry.record_bytes)
            self.reader.read(entry, expert, buf)
        check = self.verify == "always" or (self.verify == "first" and not self.verified[entry.layer, expert])
        if check:
            t = time.perf_counter()
            crc = zlib.crc32(memoryview(rec[:entry.data_bytes]))
            verify_s = time.perf_counter() - t
            if crc != entry.crc32[expert]:
                raise corrupt(self.index.path(entry), entry, expert, crc)
            self.verified[entry.layer, expert] = True
        pool.fill(slot, rec)
        return entry.record_bytes, verify_s

    def _drop(self, pool, slot):
        k = int(pool.key[slot])
        if k >= 0 and pool.where.get(k) == slot:
            del pool.where[k]
        pool.key[slot] = -1
        pool.state[slot] = EMPTY
        pool.protected[slot] = False
        pool.from_prefetch[slot] = False

    def _check(self):
        err = self.readers.error
        if err is not None:
            raise RuntimeError(f"the expert reader thread failed and stopped: {err!r}") from err
        if self.closed:
            raise RuntimeError("the expert cache is closed")

    def close(self):
        """Stop and join the reader threads; loads in flight are abandoned."""
        self.readers.close()
        with self.cond:
            for pool in self.pools:
                for s in np.nonzero(pool.state == LOADING)[0]:
                    pool.claimed[s] = False
                    self._drop(pool, s)

    def shutdown(self):
        """Close for good: threads joined, files closed."""
        if self.closed:
            return
        self.close()
        self.closed = True
        self.reader.close()

    def ensure_running(self):
        if self.mmap_mode or self.readers.error is not None or self.closed:
            return
        if not self.readers.alive():
            self.readers.start()

    # ---------------------------------------------------------------- policy

    def _scores(self, keys):
        layers, experts, _ = split_keys(keys)
        age = self.token - self.score_tick[layers, experts]
        if self.half_life <= 0:
            return -age.astype(np.float64)
        return self.score[layers, experts] * np.exp2(-age / self.half_life)

    def _touch(self, layer, experts):
        age = self.token - self.score_tick[layer, experts]
        decay = np.exp2(-age / self.half_life) if self.half_life > 0 else 0.0
        self.score[layer, experts] = self.score[layer, experts] * decay + 1.0
        self.score_tick[layer, experts] = self.token

    def victim(self, pool: SlotPool, for_prefetch=False) -> Optional[int]:
        """A slot to (re)fill, or None if every slot is held."""
        free = np.nonzero((pool.state == EMPTY) & ~pool.in_use)[0]
        if len(free):
            return int(free[0])
        keys = pool.key
        held = pool.in_use | (pool.state == LOADING) | pool.protected
        layers, experts, valid = split_keys(keys)
        held |= self.pinned[layers, experts] & valid
        cand = np.nonzero(~held)[0]
        if not len(cand):
            return None
        scores = self._scores(keys[cand])
        # lowest score; among equals, least recently used
        i = np.lexsort((pool.last_use[cand], scores))[0]
        return int(cand[i])

    def _evict(self, pool, slot):
        if pool.state[slot] == READY and pool.from_prefetch[slot]:
            self.stats.add(self.phase, prefetch_wasted=1)
        self._drop(pool, slot)

    def _assign(self, pool, slot, layer, expert, prefetch):
        self._evict(pool, slot)
        key = key_of(layer, expert)
        pool.key[slot] = key
        pool.state[slot] = LOADING
        pool.from_prefetch[slot] = prefetch
        pool.protected[slot] = prefetch
        pool.where[key] = slot
        return key

    def capacity(self, layer, experts) -> int:
        """How many of ``experts`` one call can hold at once (slots not pinned by others)."""
        pool = self.pool_of[layer]
        ls, es, valid = split_keys(pool.key)
        pinned_other = self.pinned[ls, es] & valid & ~((ls == layer) & np.isin(es, experts))
        return int(pool.S - pinned_other.sum())

    # ---------------------------------------------------------------- the call

    def start_call(self, layer, ids_np: np.ndarray, guess: Optional[np.ndarray], decode: bool):
        """Host side of a layer call, once its ids are known: bookkeeping, predictor
        scoring, prompt counts. Returns ``(used experts, capacity)``."""
        used = np.unique(ids_np)
        if self.trace is not None:
            self.trace.append((layer, ids_np.copy(), guess, decode))
        self.begin_call(layer, decode)
        self.planner.observe(layer, used, decode)
        if not decode:
            self.count_prompt(layer, ids_np)
        return used, self.capacity(layer, used)

    def after_acquire(self, layer, guess: Optional[np.ndarray], decode: bool):
        """Queue the prefetches for the next layer(s) (decode only)."""
        if decode:
            for nxt, experts, dist in self.planner.predict(layer, guess):
                self.prefetch(nxt, experts, dist)

    def groups_for(self, layer, used, cap):
        """``used`` split in groups of at most ``cap`` experts, resident ones first."""
        where = self.pool_of[layer].where
        resident = np.array([key_of(layer, e) in where for e in used], bool)
        ordered = np.concatenate([used[resident], used[~resident]])
        return [np.sort(ordered[g0:g0 + cap]) for g0 in range(0, len(ordered), cap)]

    def begin_call(self, layer, decode):
        """Bookkeeping at the start of a layer call (after ``ids`` were evaluated)."""
        if layer == self.order[0]:
            if decode:
                if self.phase == "prefill" and self.prompt_tokens:
                    self._pin_from_prompt()
                self.token += 1
                self.stats.add("decode", tokens=1)
            elif self.phase == "decode":  # a new prompt
                self.prompt_counts[:] = 0
                self.prompt_tokens = 0
                self.pinned[:] = False
                self.planner.reset()
            self.phase = "decode" if decode else "prefill"
        self.calls += 1

    def count_prompt(self, layer, ids_np):
        e, c = np.unique(ids_np, return_counts=True)
        self.prompt_counts[layer, e] += c
        if layer == self.order[0]:
            self.prompt_tokens += ids_np.size // ids_np.shape[-1]
            self.stats.add("prefill", tokens=ids_np.size // ids_np.shape[-1])

    def _pin_from_prompt(self):
        """Pin the experts used most across the prompt."""
        self.pinned[:] = False
        k = self.top_k
        for pool in self.pools:
            room = pool.S - 2 * k
            n = int(self.pin_fraction * room) if room > 0 else 0
            if n <= 0:
                continue
            layers = np.array(pool.layers)
            counts = self.prompt_counts[layers, :pool.num_experts].astype(np.float64)
            share = self.prompt_tokens * k / pool.num_experts
            counts[counts < self.pin_ratio * share] = 0
            flat = np.argsort(-counts, axis=None, kind="stable")[:n]
            li, ei = np.unravel_index(flat, counts.shape)
            keep = counts[li, ei] > 0
            self.pinned[layers[li[keep]], ei[keep]] = True

    def acquire(self, layer, experts: np.ndarray) -> np.ndarray:
        """Make ``experts`` (unique) of ``layer`` resident; return their slots.

        Blocks until every one is READY. The slots stay ``in_use`` until the
        next call (whose ids evaluation finishes the computation reading them).
        """
        self._check()
        self.ensure_running()
        pool = self.pool_of[layer]
        entry = self.entries[layer]
        phase = self.phase
        slots = np.empty(len(experts), np.int64)
        hits = misses = pf_hits = late = 0
        t0 = time.perf_counter()
        try:
            with self.cond:
                pool.in_use[:] = False
                # prefetches for this layer are either used now or no longer protected
                lay = pool.key >> KEY_SHIFT
                mine = (lay == layer) & (pool.key >= 0)
                pool.protected[mine] = False
                wanted = set(int(key_of(layer, e)) for e in experts)
                # cancel queued (not yet started) prefetches of this layer nobody needs
                stale = np.nonzero(mine & (pool.state == LOADING) & ~pool.claimed)[0]
                for s in stale:
                    if int(pool.key[s]) not in wanted:
                        self._drop(pool, s)
                        self.stats.add(phase, prefetch_cancelled=1)
                jobs = []
                for i, e in enumerate(experts):
                    key = key_of(layer, e)
                    err = self.failed.pop(key, None)
                    if err is not None:
                        raise err
                    s = pool.where.get(key)
                    if s is not None:
                        if pool.state[s] == READY:
                            hits += 1
                            pf_hits += bool(pool.from_prefetch[s])
                        else:  # a prefetch still reading: count it, and make it urgent
                            late += 1
                            if not pool.claimed[s]:
                                jobs.append((pool, s, key, entry, int(e)))
                        pool.from_prefetch[s] = False
                        pool.in_use[s] = True
                        slots[i] = s
                        continue
                    slots[i] = -1
                for i, e in enumerate(experts):
                    if slots[i] >= 0:
                        continue
                    misses += 1
                    while True:
                        s = self.victim(pool)
                        if s is not None:
                            break
                        if not (pool.state == LOADING).any():
                            raise RuntimeError(
                                f"layer {layer}: no free expert slot for {len(experts)} experts "
                                f"({pool.S} slots, {int(pool.in_use.sum())} in use)"
                            )
                        self.cond.wait(0.05)
                        self._check()
                    key = self._assign(pool, s, layer, e, prefetch=False)
                    pool.in_use[s] = True
                    slots[i] = s
                    jobs.append((pool, s, key, entry, int(e)))
                if self.mmap_mode:
                    for j in jobs:
                        pool.state[j[1]] = READY
                else:
                    for j in jobs:
                        self.readers.push(0, j)
                pool.last_use[slots] = self.calls
                self._touch(layer, experts)
                keys = [key_of(layer, e) for e in experts]
                while not (pool.state[slots] == READY).all():
                    for k in keys:
                        if k in self.failed:
                            raise self.failed.pop(k)
                    self._check()
                    self.cond.wait(0.1)
            if self.mmap_mode:
                # plain mmap paging: copy from the mapping (page faults) on every use
                t1 = time.perf_counter()
                nb = 0
                for i, e in enumerate(experts):
                    nb += self._load(pool, int(slots[i]), entry, int(e))[0]
                self.stats.add(phase, reads=len(experts), bytes_read=nb, read_s=time.perf_counter() - t1)
        except KeyboardInterrupt:
            self.close()
            raise
        finally:
            stall = time.perf_counter() - t0
        if self.mmap_mode:
            hits, misses = 0, len(experts)
        self.stats.add(phase, lookups=len(experts), hits=hits, misses=misses,
                       prefetch_hits=pf_hits, late_prefetch_hits=late, stall_s=stall, calls=1)
        return slots

    def prefetch(self, layer, experts: np.ndarray, distance: int):
        """Queue reads of ``experts`` of ``layer`` (not resident) into evictable slots."""
        if self.mmap_mode or self.readers.error is not None or self.closed:
            return
        pool = self.pool_of[layer]
        entry = self.entries[layer]
        issued = 0
        with self.cond:
            for e in experts:
                key = key_of(layer, e)
                if key in pool.where or key in self.failed:
                    continue
                s = self.victim(pool, for_prefetch=True)
                if s is None:
                    break
                self._assign(pool, s, layer, e, prefetch=True)
                self.readers.push(distance, (pool, s, key, entry, int(e)))
                issued += 1
        self.stats.add(self.phase, prefetch_issued=issued)

    def preload_all(self, progress=False):
        """Budget covers every expert: read them all now (one sequential pass per layer)."""
        for layer in self.order:
            e = self.entries[layer]
            self.acquire(layer, np.arange(e.num_experts))
        with self.cond:
            for p in self.pools:
                p.in_use[:] = False
        # loading is not a "run": keep stats for what follows
        self.stats = Stats()

    # ---------------------------------------------------------------- report

    def summary(self) -> dict:
        out = {
            "budget_gb": self.budget_bytes / 1e9,
            "pool_gb": sum(p.nbytes for p in self.pools) / 1e9,
            "routed_gb": self.index.routed_bytes() / 1e9,
            "slots": self.slot_count,
            "experts": sum(len(p.layers) * p.num_experts for p in self.pools),
            "io_mode": self.reader.mode,
            "verify": self.verify,
            "predictor": self.planner.predictor,
            "io_threads": self.readers.n,
            "pinned": int(self.pinned.sum()),
            "prediction_accuracy": self.planner.stats.summary(),
        }
        for phase, d in self.stats.d.items():
            s = dict(d)
            s["hit_rate"] = d["hits"] / d["lookups"] if d["lookups"] else None
            s["read_gbps"] = d["bytes_read"] / d["read_s"] / 1e9 if d["read_s"] else None
            s["stall_ms_per_token"] = 1e3 * d["stall_s"] / d["tokens"] if d["tokens"] else None
            s["bytes_read_per_token"] = d["bytes_read"] / d["tokens"] if d["tokens"] else None
            used = d["prefetch_hits"] + d["late_prefetch_hits"]
            s["prefetch_used"] = used
            out[phase] = s
        return out
