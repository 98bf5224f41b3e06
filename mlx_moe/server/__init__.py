"""``mlx_moe.server``: OpenAI-compatible HTTP server with continuous batching.

``app.py`` the HTTP layer and the command line, ``api.py`` request validation and
response objects, ``scheduler.py`` the thread that owns the model (mlx-lm's
``BatchGenerator`` + a prefix cache).
"""

from .app import main, serve

__all__ = ["main", "serve"]
