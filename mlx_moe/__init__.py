"""mlx-moe: Mixture-of-Experts LLM inference on MLX."""

from .experts import MoEExperts
from .loading import load, load_model

__version__ = "0.1.0"
__all__ = ["MoEExperts", "load", "load_model", "__version__"]
