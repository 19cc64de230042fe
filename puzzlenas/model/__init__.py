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


def _register_auto_classes() -> None:
    """Let transformers' Auto classes resolve "nemotron-nas" to these classes inside puzzlenas
    (no remote-code prompt when puzzlenas itself loads a checkpoint or its tokenizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        AutoConfig.register("nemotron-nas", DeciLMConfig)
        AutoModelForCausalLM.register(DeciLMConfig, DeciLMForCausalLM)
    except ValueError:  # already registered (e.g. a reload)
        pass


_register_auto_classes()

__all__ = [
    "AttentionConfig",
    "BlockConfig",
    "BlockConfigError",
    "DeciLMConfig",
    "DeciLMForCausalLM",
    "FFNConfig",
    "ffn_mult_to_intermediate_size",
]
