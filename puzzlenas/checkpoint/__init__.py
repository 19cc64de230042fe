"""Loading parents (HF directories, GGUF), converting them, and saving/loading DeciLM checkpoints."""

from .convert import convert_parent, decilm_config_from_parent, load_parent
from .io import checkpoint_summary, load_checkpoint, save_checkpoint

__all__ = [
    "checkpoint_summary",
    "convert_parent",
    "decilm_config_from_parent",
    "load_checkpoint",
    "load_parent",
    "save_checkpoint",
]
