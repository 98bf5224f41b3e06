"""The grouped-GEMM prefill kernels (m > 8 tokens): their sources and ``backend``."""
