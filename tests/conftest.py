import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # so tests can `import fixtures`

import fixtures  # noqa: E402
from mlx_moe import experts  # noqa: E402


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """``checkpoint(arch, layout=None, dtype="float32", shards=1, seed=0, mlx_lm_rope=True) -> Path``.

    ``mlx_lm_rope``: gpt-oss checkpoints use YaRN ``truncate: true``, which mlx-lm
    implements too; pass False for the real gpt-oss setting (HF comparisons).

    Written once per session per argument set and shared: tests must not modify it
    (error-case tests write their own with ``fixtures.write_checkpoint``).
    """
    cache = {}

    def make(arch, layout=None, dtype="float32", shards=1, seed=0, mlx_lm_rope=True):
        layout = layout or fixtures.reference_layout(arch)
        key = (arch, layout, dtype, shards, seed, mlx_lm_rope)
        if key not in cache:
            path = tmp_path_factory.mktemp(f"{arch}-{layout}-{dtype}-{shards}-{seed}")
            overrides = None
            if mlx_lm_rope and arch == "gpt_oss":
                # mlx-lm ignores YaRN's truncate: false (we follow HF); compare on
                # the variant both implement. The HF tests cover truncate: false.
                rope = {**fixtures.tiny_config(arch)["rope_scaling"], "truncate": True}
                overrides = {"rope_scaling": rope}
            cache[key] = fixtures.write_checkpoint(path, arch, layout, dtype, shards, seed, overrides=overrides)
        return cache[key]

    return make


@pytest.fixture(autouse=True)
def _seed():
    mx.random.seed(0)
    np.random.seed(0)


@pytest.fixture(autouse=True)
def _no_kernel_selfcheck(monkeypatch):
    """On a GPU, ``auto`` checks each kernel once before first use (kernels/selfcheck.py);
    tests that count kernel calls must not see that extra call. tests/test_selfcheck.py
    turns it back on for itself."""
    monkeypatch.setenv("MLX_MOE_SELFCHECK", "0")


@pytest.fixture(autouse=True)
def _backend_registry():
    """A test that registers or removes an expert backend does so for itself only."""
    backends, order = dict(experts.BACKENDS), list(experts.AUTO_ORDER)
    yield
    experts.BACKENDS.clear()
    experts.BACKENDS.update(backends)
    experts.AUTO_ORDER[:] = order
