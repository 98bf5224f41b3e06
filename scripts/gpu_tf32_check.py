"""float32 matmul on the default device vs a float64 numpy product: an error near 1e-3 relative (M > 1)
means TF32 (H200, 2026-12-01: docs/runs/2026-12-01-h200/tf32.log). Usage: python3 scripts/gpu_tf32_check.py"""
import numpy as np, mlx.core as mx
rng = np.random.default_rng(0)
for (m, k, n) in [(1, 64, 64), (4, 64, 64), (16, 2048, 768)]:
    a = rng.standard_normal((m, k)).astype(np.float32); b = rng.standard_normal((k, n)).astype(np.float32)
    ref = a.astype(np.float64) @ b.astype(np.float64)
    y = np.array(mx.array(a) @ mx.array(b))
    print(f"float32 matmul {m}x{k}x{n} on {mx.default_device()}: max |err|/max|ref| = {np.abs(y-ref).max()/np.abs(ref).max():.2e}")
