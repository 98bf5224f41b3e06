"""The process group: init, rank-0 output, model-folder agreement, a watchdog.

Everything here sits on ``mx.distributed`` (ring, MPI, NCCL, JACCL): no transport
of our own. ``mlx.launch`` sets ``MLX_RANK`` / ``MLX_HOSTFILE``; a bare
``python`` run is a group of one.
"""

import contextlib
import hashlib
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..safetensors_io import read_header

# Seconds a collective (a load's folder check, a decode step) may take before the
# watchdog ends the process; ring's TCP sockets report a dead peer at once, but a
# peer that hangs (or never connects) would block the others forever.
TIMEOUT_ENV = "MLX_MOE_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 600.0


class DistributedError(ValueError):
    """The ranks disagree (model folder, options): every rank refuses to run."""


def init(backend: str = "any", strict: bool = False):
    """``mx.distributed.init``; under ``mlx.launch`` this is the launched group."""
    return mx.distributed.init(strict=strict, backend=backend)


def describe(group) -> str:
    return f"rank {group.rank()}/{group.size()}"


def quiet_unless_rank0(group):
    """Rank 0 prints; the others' stdout goes to /dev/null (their errors still
    reach stderr, prefixed by ``describe``)."""
    if group is not None and group.size() > 1 and group.rank() != 0:
        sys.stdout.flush()
        sys.stdout = open(os.devnull, "w")


def folder_hash(folder) -> bytes:
    """SHA-256 of what decides a model: config.json, the safetensors index (or, without
    one, the names, shapes and dtypes in each shard's header) and the expert-file index."""
    folder = Path(folder)
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors.index.json", "expert_index.json"):
        f = folder / name
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes() + b"\0")
    if not (folder / "model.safetensors.index.json").is_file():
        for f in sorted(folder.glob("*.safetensors")):
            header = read_header(f)
            h.update(f.name.encode() + b"\0")
            h.update(json.dumps({k: [v["dtype"], v["shape"]] for k, v in sorted(header.items())}).encode())
    return h.digest()


def agree(group, what: str, digest: bytes):
    """Every rank passes its ``digest``; DistributedError on every rank, naming the
    ranks that differ from rank 0, unless all are equal (one all_gather)."""
    if group is None or group.size() == 1:
        return
    drain()
    mine = mx.array(list(digest[:32].ljust(32, b"\0")), dtype=mx.int32)
    with watch(f"agreeing on {what}"):
        everyone = np.array(mx.distributed.all_gather(mine, group=group)).astype(np.uint8).reshape(group.size(), -1)
    differ = [r for r in range(group.size()) if not np.array_equal(everyone[r], everyone[0])]
    if differ:
        raise DistributedError(
            f"{describe(group)}: {what} differs between ranks: ranks {differ} do not match rank 0 "
            f"(sha256 {everyone[0].tobytes().hex()[:16]}… on rank 0); every rank must load the same model"
        )


def drain():
    """Finish the work in flight on every stream we know of. mlx-lm's ``generate_step``
    evaluates one step ahead on its own stream; its collectives would otherwise
    interleave on the wire with a new one on the default stream."""
    mx.synchronize()
    try:
        from mlx_lm.generate import generation_stream
    except ImportError:
        return
    mx.synchronize(generation_stream)


def barrier(group):
    """Every rank gets here, with no work in flight, before any goes on."""
    if group is None or group.size() == 1:
        return
    drain()
    mx.eval(mx.distributed.all_sum(mx.array(1), group=group))


def common_seed(group, seed=None) -> int:
    """A seed every rank shares: ``seed``, or one rank 0 draws."""
    if seed is not None:
        return seed
    local = int.from_bytes(os.urandom(3), "little") if group is None or group.rank() == 0 else 0
    if group is None or group.size() == 1:
        return local
    drain()
    with watch("sharing the seed"):
        return int(mx.distributed.all_sum(mx.array(local, dtype=mx.int32), group=group).item())


def timeout_s() -> float:
    try:
        return float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT))
    except ValueError:
        return DEFAULT_TIMEOUT


class Watchdog:
    """Ends the process (exit 1, one line on stderr) when a watched section outlasts
    ``timeout`` seconds: a peer that hangs, or dies before connecting, would
    otherwise block a collective forever. ``beat()`` restarts the clock (one call per
    decoded token)."""

    def __init__(self, timeout=None, label="mlx_moe"):
        self.timeout = timeout_s() if timeout is None else timeout
        self.label = label
        self._what = None
        self._since = 0.0
        self._lock = threading.Lock()
        self._thread = None

    def _loop(self):
        while True:
            time.sleep(min(1.0, self.timeout / 4))
            with self._lock:
                what, since = self._what, self._since
            if what is not None and time.monotonic() - since > self.timeout:
                print(f"{self.label}: error: no progress for {self.timeout:.0f} s while {what}: a peer "
                      f"rank has hung or died (set {TIMEOUT_ENV} to wait longer); exiting",
                      file=sys.stderr, flush=True)
                os._exit(1)

    def start(self, what):
        with self._lock:
            self._what, self._since = what, time.monotonic()
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, daemon=True, name="mlx_moe-watchdog")
            self._thread.start()

    def beat_if_armed(self):
        """Progress: restart the clock of the watched section, if one is."""
        with self._lock:
            if self._what is not None:
                self._since = time.monotonic()

    def stop(self):
        with self._lock:
            self._what = None


WATCHDOG = Watchdog()


class watch:
    """``with watch("loading"):`` — the section runs under the process watchdog."""

    def __init__(self, what):
        self.what = what

    def __enter__(self):
        self.prev = WATCHDOG._what
        WATCHDOG.start(self.what)

    def __exit__(self, *exc):
        if self.prev is None:
            WATCHDOG.stop()
        else:
            WATCHDOG.start(self.prev)


def cli_setup(seed=None, backend="any"):
    """What a command line does first under ``--parallel``: join the group (bounded in
    time: a peer that never starts), silence ranks other than 0, share one seed.
    Returns ``(group, seed)``."""
    with watch("connecting to the other ranks"):
        group = init(backend)
    quiet_unless_rank0(group)
    return group, common_seed(group, seed)


@contextlib.contextmanager
def session(model):
    """Around a parallel model's generation: waits for every rank to finish loading
    (a barrier), then runs under the watchdog (``ShardedExperts`` beats it at each
    layer); a lost peer becomes a ``ConnectionError`` naming this rank. Nothing for
    a single-process model."""
    par = getattr(model, "parallel", None)
    if par is None or par.size == 1:
        yield
        return
    try:
        barrier(par.group)  # everyone has loaded
        with watch("generating"):
            yield
            # mlx-lm decodes a step ahead: finish it on every rank before any exits
            barrier(par.group)
    except RuntimeError as e:
        if "[ring]" in str(e) or "peer" in str(e):
            raise ConnectionError(f"{describe(par.group)}: {e}; another rank has died") from None
        raise


def free_ports(n: int) -> list:
    """``n`` TCP ports free on 127.0.0.1 right now (for local rings: tests, bench)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def write_local_hostfile(path, n: int) -> Path:
    """A ring hostfile (``MLX_HOSTFILE``) for ``n`` ranks on 127.0.0.1."""
    path = Path(path)
    path.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_ports(n)]))
    return path
