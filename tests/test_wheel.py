"""The built wheel is self-contained: everything read at run time ships in it.

Builds the wheel from a copy of the package (so no ``build/`` or stale files
of the working tree leak in), unzips it, and in a fresh interpreter that sees
the unzipped wheel but not the repository checks that

* every kernel's ``header`` / ``source`` strings, as the fused and prefill
  backends hand them to ``mx.fast.metal_kernel`` and ``mx.fast.cuda_kernel``,
  assemble from files inside the wheel (no GPU needed: the two constructors
  are replaced by recorders);
* the default model loads and produces finite logits.
"""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHILD = r'''
import os, re, sys
from pathlib import Path

site = Path(os.environ["PYTHONPATH"]).resolve()
import mlx.core as mx

made = []


def recorder(platform):
    def make(**kw):
        made.append((platform, kw))
        return object()
    return make


mx.fast.metal_kernel, mx.fast.cuda_kernel = recorder("metal"), recorder("cuda")

import mlx_moe
from mlx_moe.kernels.fused import backend as fused, sources as fused_sources
from mlx_moe.kernels.prefill import backend as prefill, sources as prefill_sources

for platform in ("metal", "cuda"):
    for kernel in fused_sources.KERNELS:
        fused.kernel_object(kernel, platform)
    for kernel in prefill_sources.KERNEL_SPECS:
        for bk in (32, 64):
            prefill._mlx_kernel(platform, kernel, bk)
assert len(made) == 2 * (len(fused_sources.KERNELS) + 2 * len(prefill_sources.KERNEL_SPECS))
for platform, kw in made:
    for part in ("header", "source"):
        text = kw[part]
        assert text.strip(), (platform, kw["name"], part)
        # only system headers: every file of ours is inlined
        for inc in re.findall(r"#\s*include\s*(\S+)", text):
            assert inc.startswith("<"), (platform, kw["name"], inc)
    assert "PF_BK" in kw["header"] or "moe_" in kw["header"], kw["name"]

model, tokenizer = mlx_moe.load(progress=False)
tokens = mx.array([tokenizer.encode("The wheel ships its own kernels and model")])
logits = model(tokens)
mx.eval(logits)
assert logits.shape[:2] == tokens.shape and mx.all(mx.isfinite(logits)).item()

loaded = [m.__file__ for n, m in list(sys.modules.items())
          if n.split(".")[0] == "mlx_moe" and getattr(m, "__file__", None)]
outside = [f for f in loaded if not Path(f).resolve().is_relative_to(site)]
assert not outside, outside
print("OK", len(made), "kernel objects,", len(loaded), "modules from the wheel")
'''


def _pip_wheel(src, out, isolated):
    flags = [] if isolated else ["--no-build-isolation"]
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", *flags, "-w", str(out), str(src)]
    return subprocess.run(cmd, capture_output=True, text=True)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "mlx_moe", src / "mlx_moe",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp / "dist"
    # Without isolation when this environment can build (no network); the
    # venv's setuptools may be too old for pyproject's build requirements.
    res = _pip_wheel(src, out, isolated=False)
    if res.returncode:
        res = _pip_wheel(src, out, isolated=True)
    assert res.returncode == 0, res.stderr[-3000:]
    (whl,) = out.glob("*.whl")
    return whl


@pytest.mark.slow
def test_wheel_runs_without_the_repository(wheel, tmp_path):
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    assert not (site / "metal_kernels").exists()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(site)
    # -s: no user site; -P (3.11+): no cwd on sys.path, and cwd is the tmp dir anyway.
    flags = ["-s"] + (["-P"] if sys.version_info >= (3, 11) else [])
    res = subprocess.run([sys.executable, *flags, "-c", CHILD], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert res.stdout.startswith("OK")
