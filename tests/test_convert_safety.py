"""mlx_moe.convert never loses what it did not create (issue 11, part 1).

A destination that appears mid-run, a second convert to the same destination,
``--force`` aimed at the source, SIGKILL / SIGTERM mid-run and a full disk:
each leaves the source and any foreign folder intact, and no temporary folder
behind (or the next run removes it and says so).
"""

import contextlib
import errno
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fixtures import write_checkpoint
from mlx_moe import cli
from mlx_moe import convert as convert_module
from mlx_moe.convert import convert, main

OVERRIDES = dict(num_hidden_layers=2, mlp_only_layers=[], moe_intermediate_size=64)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("hf") / "src", "qwen3_moe", overrides=OVERRIDES)


@pytest.fixture
def src(tmp_path):
    """A source of this test's own, inside ``tmp_path`` (tests that aim --force at it)."""
    return write_checkpoint(tmp_path / "models" / "src", "qwen3_moe", overrides=OVERRIDES)


def snapshot(folder: Path):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder: Path):
    """Hidden temporaries, old copies and locks beside the destination."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def run_cli(argv):
    """``mlx_moe.convert`` as a user runs it: (exit code, its one error line or "").

    The progress bar also writes to stderr; anything else there fails the test.
    """
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = cli.run("mlx_moe.convert", main, argv)
    lines = [l for l in err.getvalue().replace("\r", "\n").splitlines() if l and not l.startswith("Loading")]
    assert len(lines) <= 1, err.getvalue()
    return rc, "".join(l + "\n" for l in lines)


# ----------------------------------------------------------- concurrent writers


def test_destination_appearing_mid_run_is_never_replaced(hf, tmp_path, monkeypatch):
    dst = tmp_path / "out"
    real = convert_module.save_sharded

    def save_then_someone_creates_dst(*a, **k):
        real(*a, **k)
        dst.mkdir()
        (dst / "theirs.txt").write_text("not yours")

    monkeypatch.setattr(convert_module, "save_sharded", save_then_someone_creates_dst)
    rc, err = run_cli(["--hf-path", str(hf), "--mlx-path", str(dst)])
    assert rc == 2
    assert err.count("\n") == 1 and f"{dst} appeared while writing it" in err and "--force" in err
    assert snapshot(dst) == {Path("theirs.txt"): b"not yours"}
    assert leftovers(tmp_path) == []


def _child(tmp_path, src, dst, via_cli=False):
    """A convert in a child process that pauses inside the staged folder until
    ``go`` exists; returns (process, marker, go)."""
    marker, go = tmp_path / "child-writing", tmp_path / "child-go"
    script = tmp_path / "child.py"
    call = (
        "sys.exit(run('mlx_moe.convert', main, ['--hf-path', src, '--mlx-path', dst]))"
        if via_cli else "c.convert(src, dst, progress=False); print('Saved')"
    )
    script.write_text(
        "import sys, time, pathlib\n"
        "sys.path.insert(0, %r)\n" % str(Path(__file__).parent)
        + "import mlx_moe.convert as c\n"
        "from mlx_moe.convert import main\n"
        "from mlx_moe.cli import run\n"
        "src, dst, marker, go = sys.argv[1:]\n"
        "real = c.save_sharded\n"
        "def paused(*a, **k):\n"
        "    pathlib.Path(marker).write_text('writing')\n"
        "    while not pathlib.Path(go).exists():\n"
        "        time.sleep(0.02)\n"
        "    return real(*a, **k)\n"
        "c.save_sharded = paused\n"
        + call + "\n"
    )
    proc = subprocess.Popen(
        [sys.executable, str(script), str(src), str(dst), str(marker), str(go)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 120
    while not marker.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"child convert did not start: {proc.communicate()}")
        time.sleep(0.05)
    return proc, go


def test_second_convert_to_the_same_destination_is_refused(hf, tmp_path):
    dst = tmp_path / "out"
    proc, go = _child(tmp_path, hf, dst)
    try:
        rc, err = run_cli(["--hf-path", str(hf), "--mlx-path", str(dst)])
        assert rc == 2
        assert err.count("\n") == 1
        assert f"{dst} is being written by another process (pid {proc.pid}" in err
        assert not dst.exists()
    finally:
        go.write_text("go")
        out, child_err = proc.communicate(timeout=120)
    assert proc.returncode == 0, child_err
    assert "Saved" in out
    assert (dst / "model.safetensors").exists() and (dst / "config.json").exists()
    assert [p for p in leftovers(tmp_path) if p.startswith(".out")] == []


# ----------------------------------------------------------- --force and the source


@pytest.mark.parametrize("where", ["same", "parent", "inside"])
def test_force_never_aims_at_the_source(src, where):
    dst = {"same": src, "parent": src.parent, "inside": src / "mlx"}[where]
    (src.parent / "sibling.txt").write_text("a sibling of the source")
    before, siblings = snapshot(src), snapshot(src.parent)
    rc, err = run_cli(["--hf-path", str(src), "--mlx-path", str(dst), "--force"])
    assert rc == 2 and err.count("\n") == 1
    word = {"same": "is the source folder", "parent": "contains the source folder",
            "inside": "lies inside the source folder"}[where]
    assert word in err
    assert snapshot(src) == before and snapshot(src.parent) == siblings
    assert leftovers(src.parent) == [] and leftovers(src) == []


def test_dot_as_destination_with_force(hf, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "old.txt").write_text("replaced on purpose")
    monkeypatch.chdir(work)
    rc, err = run_cli(["--hf-path", str(hf), "--mlx-path", ".", "--force"])
    assert rc == 0, err
    assert (work / "model.safetensors").exists() and not (work / "old.txt").exists()
    assert leftovers(tmp_path) == [] and leftovers(work) == []


def test_force_over_a_file_leaves_no_old_copy(hf, tmp_path):
    dst = tmp_path / "out"
    dst.write_text("a file")
    convert(hf, dst, force=True, progress=False)
    assert (dst / "model.safetensors").exists()
    assert leftovers(tmp_path) == []


# ----------------------------------------------------------- killed mid-run


def test_sigkill_leaves_a_temporary_the_next_run_removes_and_names(hf, tmp_path, capsys):
    dst = tmp_path / "out"
    proc, _ = _child(tmp_path, hf, dst)
    proc.kill()
    proc.communicate(timeout=60)
    stale = tmp_path / f".out.tmp-{proc.pid}"
    assert stale.is_dir()  # SIGKILL cannot be handled: the next run cleans up
    convert(hf, dst, progress=False)
    err = capsys.readouterr().err
    assert f"removed {stale}" in err and f"process {proc.pid}, no longer running" in err
    assert leftovers(tmp_path) == []
    assert (dst / "model.safetensors").exists()


@pytest.mark.parametrize("via_cli", [False, True], ids=["convert()", "mlx_moe.convert"])
def test_sigterm_is_handled_like_ctrl_c(hf, tmp_path, via_cli):
    dst = tmp_path / "out"
    proc, _ = _child(tmp_path, hf, dst, via_cli=via_cli)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != -signal.SIGTERM, "SIGTERM killed the writer before it could clean up"
    if via_cli:
        assert proc.returncode == 130 and err.strip().splitlines()[-1] == "mlx_moe.convert: interrupted"
    assert not dst.exists()
    assert leftovers(tmp_path) == []


# ----------------------------------------------------------- disk full


@pytest.fixture
def small_fs(tmp_path):
    """A 256 KiB tmpfs (needs root; skipped elsewhere -- the injected cases below run everywhere)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


@pytest.mark.parametrize("layout", [[], ["--expert-file-layout"]], ids=["safetensors", "expert-files"])
def test_disk_full_names_the_destination_and_leaves_nothing(hf, small_fs, layout):
    dst = small_fs / "out"
    rc, err = run_cli(["--hf-path", str(hf), "--mlx-path", str(dst), *layout])
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith(f"mlx_moe.convert: error: {dst}: no space left on device"), err
    assert "nothing was written" in err
    assert sorted(small_fs.iterdir()) == []


def _full_disk(monkeypatch):
    real = convert_module.shutil.disk_usage
    monkeypatch.setattr(
        convert_module.shutil, "disk_usage", lambda p: real(p)._replace(free=3000)
    )


def test_disk_full_in_mlx_writer_is_named(hf, tmp_path, monkeypatch):
    """MLX says only ``[write] Unable to write N bytes to file.``"""
    import mlx.core as mx

    def full(path, *a, **k):
        Path(path).write_bytes(b"partial")
        raise RuntimeError("[write] Unable to write 3178 bytes to file.")

    monkeypatch.setattr(mx, "save_safetensors", full)
    _full_disk(monkeypatch)
    dst = tmp_path / "out"
    rc, err = run_cli(["--hf-path", str(hf), "--mlx-path", str(dst)])
    assert rc == 2 and err.count("\n") == 1, err
    assert f"{dst}: no space left on device (writing shard-00000.tmp.safetensors, " in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_disk_full_in_expert_file_writer_is_named(hf, tmp_path, monkeypatch):
    from mlx_moe.offload import layout

    def full(entry):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(layout, "_header_bytes", full)
    dst = tmp_path / "out"
    rc, err = run_cli(["--hf-path", str(hf), "--mlx-path", str(dst), "--expert-file-layout"])
    assert rc == 2 and err.count("\n") == 1, err
    assert f"{dst}: no space left on device (writing .layer-00000.bin.tmp, " in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ----------------------------------------------------------- the offload bench's model writer


def test_bench_model_writer_replaces_only_its_own_folders(tmp_path):
    import fixtures
    from mlx_moe.bench.offload import make_model

    config = fixtures.tiny_config("qwen3_moe")
    mine = tmp_path / "models"
    mine.mkdir()
    (mine / "weights.safetensors").write_text("a user's model")
    with pytest.raises(cli.UsageError, match="not an expert-file model folder"):
        make_model(mine, config, group_size=32, progress=False)
    assert snapshot(mine) == {Path("weights.safetensors"): b"a user's model"}
    bench = make_model(tmp_path / "bench", config, group_size=32, progress=False)
    make_model(bench, config, group_size=32, seed=1, progress=False)  # regenerating its own: fine
    assert (bench / "experts" / "index.json").exists()
    assert leftovers(tmp_path) == []
