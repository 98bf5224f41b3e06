"""Experts across processes and machines on ``mx.distributed`` (launched with ``mlx.launch``).

``mlx_moe.load(path, group=mx.distributed.init(), parallel="ep")``: expert
parallel — each rank holds and reads only its E/N routed experts, computes them
for every token, and ``all_sum`` combines the ranks (``experts.py``,
``loader.py``). ``group.py``: rank-0 output, model-folder agreement, watchdog.
"""

from .experts import ShardedExperts, expert_range, shard_experts
from .group import DistributedError, agree, barrier, cli_setup, common_seed, session, folder_hash, init, quiet_unless_rank0, watch
from .tensor import tensor_parallel
from .loader import PARALLEL, Parallel, expert_bytes, load_parallel

__all__ = ["DistributedError", "PARALLEL", "Parallel", "ShardedExperts", "agree", "barrier", "cli_setup", "common_seed", "session",
           "expert_bytes", "expert_range", "folder_hash", "init", "load_parallel", "quiet_unless_rank0",
           "shard_experts", "tensor_parallel", "watch"]
