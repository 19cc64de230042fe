"""Serving engines: where a child is served, so where its speed is measured.

    engine = get_engine("vllm")
    engine.check_available()                       # one-line error naming the install command
    engine.unsupported(alternative, parent_config)  # why this block cannot be served, or None
    engine.time_models({"parent": dir1, "child": dir2}, scenario, repeats=5)

Adding an engine is one module with an `Engine` subclass plus one line in ENGINES below.
"""

from __future__ import annotations

from ..errors import PuzzleError
from .base import Engine, ModelTimings, Scenario, speedup_stats
from .llamacpp_engine import LlamaCppEngine
from .torch_engine import TorchEngine
from .vllm_engine import VLLMEngine

ENGINES: dict[str, type[Engine]] = {"torch": TorchEngine, "vllm": VLLMEngine, "llama.cpp": LlamaCppEngine}


def get_engine(name: str) -> Engine:
    if name not in ENGINES:
        raise PuzzleError(f"target.engine={name!r} is unknown (accepted: auto, {', '.join(ENGINES)})")
    return ENGINES[name]()


def resolve_engine_name(name: str) -> str:
    """'auto': the engine a user of this machine would serve with, if it is installed: on a CPU
    llama.cpp (SmolLM2-135M, batch 1, 128 + 64 tokens: ~0.9 s in llama.cpp q8_0 against ~4.5 s in
    vLLM's CPU build, fp32; README "Serving engines"), else vLLM; torch when neither is."""
    if name != "auto":
        get_engine(name)
        return name
    import torch

    if not torch.cuda.is_available() and LlamaCppEngine.installed():
        return "llama.cpp"
    return "vllm" if VLLMEngine.installed() else "torch"


__all__ = ["ENGINES", "Engine", "LlamaCppEngine", "ModelTimings", "Scenario", "get_engine", "resolve_engine_name",
           "speedup_stats"]
