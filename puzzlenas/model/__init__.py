"""The heterogeneous model: configuration + modeling, transformers-style (one file each)."""

from .configuration_decilm import (
    AttentionConfig,
    BlockConfig,
    BlockConfigError,
    DeciLMConfig,
    FFNConfig,
    ffn_mult_to_intermediate_size,
)
from .modeling_decilm import DeciLMForCausalLM

__all__ = [
    "AttentionConfig",
    "BlockConfig",
    "BlockConfigError",
    "DeciLMConfig",
    "DeciLMForCausalLM",
    "FFNConfig",
    "ffn_mult_to_intermediate_size",
]
