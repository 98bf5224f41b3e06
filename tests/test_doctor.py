"""``mlx_moe.doctor``: environment and per-kernel report; exit 1 when a kernel fails.

No GPU here: the kernel rows are checked by injecting kernels (a correct one
returning the NumPy reference, a broken one raising) behind a pretended GPU
backend; the real CPU run must say "not applicable" and exit 0.
"""

import subprocess
import sys
import tomllib
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_moe import doctor
from mlx_moe.kernels.fused import backend as fused
from mlx_moe.kernels.prefill import backend as prefill
from mlx_moe.kernels.router import backend as router
from mlx_moe.testing.reference import reference, reference_router

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_run_reports_kernels_not_applicable_and_exits_0():
    out = subprocess.run([sys.executable, "-m", "mlx_moe.doctor"], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert f"mlx        {mx.__version__}; default device Device(cpu, 0); GPU backend none" in text
    assert "platform   Linux" in text or "platform   macOS" in text
    assert "backends   registered: fused, gather, loop, prefill; auto order: fused, prefill, gather" in text
    for k in ("fused", "prefill", "router"):
        assert any(line.startswith(f"{k} ") and "n/a" in line and "not applicable" in line
                   for line in text.splitlines()), text
    assert out.stderr == ""


def test_console_script_is_declared():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["mlx_moe.doctor"] == "mlx_moe.doctor:main"


def test_bad_flag_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        doctor.main(["--nope"])
    assert e.value.code == 2
    assert "unrecognized arguments: --nope" in capsys.readouterr().err


def _exact_fused(e, x, w, ids):
    return mx.array(reference(e, x, w, ids).astype(np.float32)).astype(x.dtype)


def _exact_router(gate, r, x):
    rw, rids = reference_router(gate, r, x)
    return mx.array(rw.astype(np.float32)), mx.array(rids.astype(np.uint32))


@pytest.fixture
def pretend_gpu(monkeypatch):
    monkeypatch.setattr(doctor, "gpu_backend", lambda: "metal")
    monkeypatch.setattr(doctor, "_device", lambda: mx.cpu)


def test_all_kernels_ok_exits_0(pretend_gpu, monkeypatch, capsys):
    monkeypatch.setattr(fused, "run_fused", _exact_fused)
    monkeypatch.setattr(prefill, "run_prefill", lambda e, x, w, ids: _exact_fused(e, x, w, ids).astype(mx.float32))
    monkeypatch.setattr(router, "route", _exact_router)
    doctor.doctor([])  # returns: exit 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[6:]}
    for k in ("fused", "prefill", "router"):
        assert rows[k].split()[1:3] == ["ok", "yes"], rows[k]
        assert " ms " in rows[k] + " "
    assert "auto: no (Metal prefill is opt-in: MLX_MOE_PREFILL_METAL=1)" in rows["prefill"]
    assert "auto: yes" in rows["fused"]


def test_failing_kernel_is_named_and_exits_1(pretend_gpu, monkeypatch, capsys):
    def broken(*a):
        raise RuntimeError("[metal::Device] Unable to build metal library from source\nerror: ...")

    monkeypatch.setattr(fused, "run_fused", broken)
    monkeypatch.setattr(prefill, "run_prefill",
                        lambda e, x, w, ids: _exact_fused(e, x, w, ids).astype(mx.float32) * 1.5)
    monkeypatch.setattr(router, "route", _exact_router)
    with pytest.raises(SystemExit) as e:
        doctor.main([])
    assert e.value.code == 1
    out, err = capsys.readouterr()
    rows = {line.split()[0]: line for line in out.splitlines()[6:]}
    assert rows["fused"].split()[1:3] == ["FAIL", "no"]
    assert "RuntimeError: [metal::Device] Unable to build metal library from source" in rows["fused"]
    assert rows["prefill"].split()[1:3] == ["FAIL", "yes"] and "error 0.50" in rows["prefill"] and "> 0.08" in rows["prefill"]
    assert rows["router"].split()[1] == "ok"
    assert "2 kernel(s) failed: fused, prefill" in err


def test_runtime_does_not_import_the_doctor():
    code = ("import sys, mlx_moe, mlx_moe.generate, mlx_moe.convert\n"
            "print([m for m in sys.modules if m.startswith(('mlx_moe.doctor', 'mlx_moe.testing'))])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
