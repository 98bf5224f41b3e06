"""mlx-moe: Mixture-of-Experts LLM inference on MLX."""

from . import kernels
from .experts import MoEExperts
from .loading import load, load_model

kernels.register()

__version__ = "0.1.0"
__all__ = ["MoEExperts", "load", "load_model", "__version__"]
