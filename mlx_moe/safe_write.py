"""Writing an output folder without ever losing a folder we did not create.

``staged_folder(dst, src, force)`` is the one way our writers (``mlx_moe.convert``,
plain or expert-file layout; the offload bench's model) produce ``dst``, and
``writing(path)`` wraps each file they write:

* ``dst`` must not be the source, contain it or lie inside it (``--force`` would
  otherwise delete the weights being read);
* a lock file beside ``dst`` (``.NAME.lock``, ``flock``: released by the kernel
  even on SIGKILL) makes a second writer to the same ``dst`` fail at once;
* output goes to ``.NAME.tmp-PID`` beside ``dst`` and is renamed into place only
  when complete; ``dst`` is checked again at the rename, so a folder that
  appeared meanwhile is never replaced without ``--force``;
* temporary folders of writers that died (SIGKILL, power loss) are removed by
  the next writer to the same ``dst``, which says so;
* SIGTERM is turned into ``KeyboardInterrupt``, like Ctrl-C, so the temporary
  folder is removed on both;
* a full disk names ``dst`` and says "no space left", and leaves nothing behind.
"""

import errno
import os
import re
import shutil
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

from .cli import UsageError

try:
    import fcntl
except ImportError:  # pragma: no cover -- Windows: no locking, the rest still holds
    fcntl = None


class NoSpaceError(OSError):
    """The file system of ``path`` is full; one line naming it."""

    def __init__(self, path, detail="", free=""):
        super().__init__(errno.ENOSPC, f"no space left on device{detail}", str(path))
        self.path, self.free = Path(path), free  # free: measured when the write failed

    def __str__(self):
        return f"{self.filename}: {self.strerror}"


def _free(path) -> str:
    try:
        return f"{shutil.disk_usage(path).free:,} bytes free"
    except OSError:
        return "free space unknown"


@contextmanager
def writing(path):
    """Around one file write: a full disk becomes ``NoSpaceError(path)`` (MLX says only
    ``[write] Unable to write N bytes to file.``), and the partial file is removed."""
    path = Path(path)
    try:
        yield path
    except BaseException as e:
        full = _is_disk_full(e, path.parent)  # before removing frees the space
        free = _free(path.parent) if full else ""
        _remove(path)
        if full:
            raise NoSpaceError(path, f" ({free})", free) from None
        if isinstance(e, RuntimeError) and str(e).startswith("[write]"):
            raise OSError(f"{path}: could not write ({e})") from None
        raise


def _is_disk_full(e, folder) -> bool:
    if isinstance(e, NoSpaceError) or (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)):
        return True
    # MLX's writers raise RuntimeError without errno; a nearly full file system is the tell.
    return isinstance(e, RuntimeError) and str(e).startswith("[write]") and _nearly_full(folder)


def _nearly_full(folder) -> bool:
    try:
        return shutil.disk_usage(folder).free < (1 << 20)
    except OSError:
        return False


def _remove(path: Path):
    """Remove a file, symlink or folder; nothing if absent."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def check_destination(dst, src=None):
    """Refuse a destination that would destroy the source or cannot be renamed into."""
    dst = Path(os.path.abspath(Path(dst).expanduser()))
    if dst.name == "" or dst == dst.parent:
        raise UsageError(f"destination {dst} is a file-system root; name a folder to write")
    if src is not None:
        s, d = Path(src).resolve(), dst.resolve()
        if d == s:
            raise UsageError(f"destination {dst} is the source folder; choose another destination")
        if d in s.parents:
            raise UsageError(f"destination {dst} contains the source folder {s}; choose a destination outside it")
        if s in d.parents:
            raise UsageError(f"destination {dst} lies inside the source folder {s}; choose a destination outside it")
    return dst


def refuse_existing(dst, force):
    dst = Path(dst)
    if os.path.lexists(dst) and not force:
        raise UsageError(f"{dst} already exists; pass --force to replace it")


# -------------------------------------------------------------- lock


class _Lock:
    """An exclusive ``flock`` on ``.NAME.lock`` beside ``dst``; refuses, never waits."""

    def __init__(self, dst: Path):
        self.path = dst.parent / f".{dst.name}.lock"
        self.fd = None

    def acquire(self, dst):
        if fcntl is None:
            return
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise UsageError(
                    f"{dst} is being written by another process (pid {owner}, lock {self.path}); "
                    "wait for it to finish or choose another destination"
                ) from None
            # The holder before us unlinks the file when done: make sure we locked
            # the file that is at the path now, not an unlinked one.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                self.fd = fd
                return
            os.close(fd)
        raise UsageError(f"{dst}: could not take the lock {self.path}")

    def release(self):
        if self.fd is not None:
            try:
                os.unlink(self.path)  # while still held: see acquire
            except FileNotFoundError:
                pass
            os.close(self.fd)
            self.fd = None


# -------------------------------------------------------------- stale temporaries


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def clean_stale(dst: Path, out=None):
    """Remove ``.NAME.tmp-PID`` / ``.NAME.old-PID`` left beside ``dst`` by writers that died.

    Called with the lock held, so no live writer to ``dst`` owns them; a PID that
    is alive (reused by another process) is left alone, to be safe.
    """
    pattern = re.compile(rf"^\.{re.escape(dst.name)}\.(tmp|old)-(\d+)$")
    removed = []
    for p in dst.parent.iterdir():
        m = pattern.match(p.name)
        if m and int(m.group(2)) != os.getpid() and not _alive(int(m.group(2))):
            _remove(p)
            removed.append(p)
            print(
                f"mlx_moe: removed {p}, left by an earlier write to {dst} "
                f"(process {m.group(2)}, no longer running)",
                file=out or sys.stderr,
            )
    return removed


# -------------------------------------------------------------- signals


@contextmanager
def _sigterm_as_interrupt():
    """SIGTERM raises KeyboardInterrupt while we write (the cleanup then runs), unless
    someone else already handles it (``mlx_moe.cli.run`` does the same)."""
    main = threading.current_thread() is threading.main_thread()
    if not main or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


# -------------------------------------------------------------- the folder


@contextmanager
def staged_folder(dst, src=None, force=False):
    """``with staged_folder(dst, src, force) as tmp: write into tmp`` -> ``dst``.

    On a clean exit ``tmp`` becomes ``dst``; on any exception (Ctrl-C, SIGTERM, disk
    full, bad input) ``tmp`` is removed and ``dst`` is as it was.
    """
    dst = check_destination(dst, src)
    refuse_existing(dst, force)
    dst.parent.mkdir(parents=True, exist_ok=True)
    lock = _Lock(dst)
    lock.acquire(dst)
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    try:
        with _sigterm_as_interrupt():
            clean_stale(dst)
            refuse_existing(dst, force)  # it may have appeared while we took the lock
            _remove(tmp)
            tmp.mkdir()
            try:
                yield tmp
                with _signals_deferred():
                    old = _swap(tmp, dst, force)
                if old is not None:
                    _remove(old)  # interrupted here, the next run removes the rest
            except BaseException as e:
                full = _is_disk_full(e, dst.parent)  # before removing frees the space
                if full:
                    where = e.path.name if isinstance(e, NoSpaceError) else (getattr(e, "filename", None) or "")
                    free = (e.free if isinstance(e, NoSpaceError) else "") or _free(dst.parent)
                    e = NoSpaceError(
                        dst,
                        f" (writing {Path(where).name or 'the output'}, {free}); nothing was written",
                    )
                _remove(tmp)
                if full:
                    raise e from None
                raise
    finally:
        lock.release()


def _swap(tmp: Path, dst: Path, force: bool):
    """``tmp`` -> ``dst``; returns the renamed old ``dst`` to remove, if any."""
    if not os.path.lexists(dst):
        # A folder created at ``dst`` after this check is not lost: rename(2) over
        # a directory succeeds only when that directory is empty.
        try:
            os.rename(tmp, dst)
            return None
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise
    if not force:
        raise UsageError(
            f"{dst} appeared while writing it (not created by this run) and was left untouched; "
            "pass --force to replace it"
        )
    old = dst.parent / f".{dst.name}.old-{os.getpid()}"
    _remove(old)
    os.replace(dst, old)
    try:
        os.rename(tmp, dst)
    except OSError:
        os.replace(old, dst)  # put back what was there
        raise
    return old


@contextmanager
def _signals_deferred():
    """Ctrl-C / SIGTERM between the two renames of a swap would leave neither the
    old folder nor the new one at ``dst``: hold them until both are done. The
    output is complete by then, so finishing is the safe outcome of such a signal."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = []
    previous = {s: signal.signal(s, lambda signum, frame: held.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
