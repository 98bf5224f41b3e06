"""Checks on a model's config.json before anything is built from it.

Each error names the file and the key: a config that would otherwise build a
model that silently routes wrong (top-k 0 or −1) or fails deep inside MLX
(top-k > number of experts: ``[argpartition] invalid kth``) is refused here.
"""

import dataclasses
from pathlib import Path

from .models import ARCHITECTURES

# model_type -> the key holding the number of routed experts (mlx-lm's ModelArgs
# names, see mlx_moe/models/*.py); the top-k key is num_experts_per_tok for all.
EXPERTS_KEY = {
    "qwen3_moe": "num_experts",
    "qwen2_moe": "num_experts",
    "olmoe": "num_experts",
    "mixtral": "num_local_experts",
    "gpt_oss": "num_local_experts",
    "deepseek_v3": "n_routed_experts",
}
TOP_K_KEY = "num_experts_per_tok"
# Sizes that must be positive integers wherever present.
POSITIVE_INTS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "vocab_size", "intermediate_size", "moe_intermediate_size", "max_position_embeddings")


class ConfigError(ValueError):
    """A config.json that cannot describe a model we can run."""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _defaults(arch) -> tuple:
    """``(required keys, {key: default})`` of the architecture's ModelArgs."""
    required, defaults = [], {}
    for f in dataclasses.fields(arch.module.ModelArgs):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is dataclasses.MISSING:
            required.append(f.name)
    return required, defaults


def check_config(config: dict, source) -> None:
    """Raise ``ConfigError`` naming ``source`` (the config file) if ``config`` is unusable."""
    where = Path(source)
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: expected a JSON object, found {type(config).__name__}")
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ConfigError(
            f"{where}: Unsupported architecture model_type={model_type!r}; mlx-moe supports {sorted(ARCHITECTURES)}"
        )
    arch = ARCHITECTURES[model_type]
    required, defaults = _defaults(arch)
    missing = [k for k in required if k not in config]
    if missing:
        raise ConfigError(f"{where}: {model_type} config lacks {', '.join(missing)}")

    def value(key):
        return config[key] if config.get(key) is not None else defaults.get(key)

    for key in POSITIVE_INTS:
        v = config.get(key)
        if v is not None and (not _is_int(v) or v < 1):
            raise ConfigError(f"{where}: {key} must be a positive integer, got {v!r}")

    e_key = EXPERTS_KEY[model_type]
    n = value(e_key)
    if n is None:
        raise ConfigError(f"{where}: {model_type} config lacks {e_key} (the number of routed experts)")
    if not _is_int(n) or n < 1:
        raise ConfigError(f"{where}: {e_key} (number of experts) must be an integer >= 1, got {n!r}")
    k = value(TOP_K_KEY)
    if k is None:
        raise ConfigError(f"{where}: {model_type} config lacks {TOP_K_KEY}")
    if not _is_int(k) or not 1 <= k <= n:
        raise ConfigError(
            f"{where}: {TOP_K_KEY} (experts per token) must be an integer from 1 to {e_key} = {n}, got {k!r}"
        )
    if model_type == "deepseek_v3":  # group-limited routing
        groups, topk_groups = value("n_group"), value("topk_group")
        if not _is_int(groups) or groups < 1 or n % groups:
            raise ConfigError(f"{where}: n_group must be an integer >= 1 dividing {e_key} = {n}, got {groups!r}")
        if not _is_int(topk_groups) or not 1 <= topk_groups <= groups:
            raise ConfigError(f"{where}: topk_group must be an integer from 1 to n_group = {groups}, got {topk_groups!r}")
        if k > topk_groups * (n // groups):
            raise ConfigError(
                f"{where}: {TOP_K_KEY} = {k} exceeds the experts of topk_group = {topk_groups} groups "
                f"of {n // groups}"
            )
