"""mlx-moe: Mixture-of-Experts LLM inference on MLX."""

from . import gguf, kernels, offload
from .experts import MoEExperts
from .loading import load, load_model, register_folder_loader

# The fused kernels join the expert backends; expert-file folders join load_model.
kernels.register()
register_folder_loader("expert_files", offload.FOLDER_LOADER)
register_folder_loader("gguf", gguf.FOLDER_LOADER)

__version__ = "0.1.0"
__all__ = ["MoEExperts", "load", "load_model", "__version__"]
