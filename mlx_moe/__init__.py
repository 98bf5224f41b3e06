"""mlx-moe: Mixture-of-Experts LLM inference on MLX."""

from . import distributed, gguf, kernels, offload
from .experts import MoEExperts
from .loading import load, load_model, register_folder_loader, register_parallel_loader

# The fused kernels join the expert backends; expert-file folders and GGUF files
# join load_model, and so does loading a rank's share (parallel=...).
kernels.register()
register_folder_loader("expert_files", offload.FOLDER_LOADER)
register_folder_loader("gguf", gguf.FOLDER_LOADER)
register_parallel_loader(distributed.load_parallel)

__version__ = "0.1.0"
__all__ = ["MoEExperts", "load", "load_model", "__version__"]
