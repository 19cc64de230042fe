"""Exports of a DeciLM checkpoint for other runtimes: GGUF for llama.cpp."""

from .gguf import GGUF_TYPES, export_gguf, unsupported_reason

__all__ = ["GGUF_TYPES", "export_gguf", "unsupported_reason"]
