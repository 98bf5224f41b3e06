"""The fused decode kernels (m <= 8 tokens): their sources and ``backend``."""
