"""puzzlenas: distillation-based neural architecture search that makes a Llama-family LLM cheaper to serve."""

__version__ = "0.1.0"
