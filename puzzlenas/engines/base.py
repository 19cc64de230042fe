"""What every serving engine provides: the block kinds it runs and a timer for whole models.

An engine times whole checkpoints (folders puzzlenas wrote), never sub-blocks in isolation: the
point is to see the costs the engine really has (its kernels, its scheduler, its per-step
overhead). Models are timed in rounds, A B C A B C ..., so a drift in machine speed hits all of
them alike; speed-ups are computed per round and summarized by their median and spread.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from ..model import DeciLMConfig


@dataclass(frozen=True)
class Scenario:
    """`batch_size` requests, each a `prompt_len`-token prompt followed by `generate_len` new tokens."""

    batch_size: int
    prompt_len: int
    generate_len: int

    @property
    def decode_context(self) -> int:
        return self.prompt_len + self.generate_len // 2


@dataclass
class ModelTimings:
    """One model's rounds, in seconds. prefill_s: up to the first generated token; total_s: the whole
    scenario; the `decode_steps` forwards in between are the decode phase."""

    decode_steps: int
    prefill_s: list[float] = field(default_factory=list)
    total_s: list[float] = field(default_factory=list)

    def add(self, prefill: float, total: float) -> None:
        self.prefill_s.append(prefill)
        self.total_s.append(total)

    @property
    def decode_s(self) -> list[float]:
        return [t - p for p, t in zip(self.prefill_s, self.total_s)]

    def summary(self) -> dict:
        return {"prefill_s": statistics.median(self.prefill_s), "decode_s": statistics.median(self.decode_s),
                "total_s": statistics.median(self.total_s), "decode_steps": self.decode_steps,
                "rounds": len(self.total_s)}

    def to_dict(self) -> dict:
        return {"decode_steps": self.decode_steps, "prefill_s": self.prefill_s, "total_s": self.total_s}

    @classmethod
    def from_dict(cls, d: dict) -> ModelTimings:
        """The inverse of to_dict: how a worker process's timings come back."""
        out = cls(decode_steps=d["decode_steps"])
        for prefill, total in zip(d["prefill_s"], d["total_s"]):
            out.add(prefill, total)
        return out


def speedup_stats(reference: ModelTimings, other: ModelTimings) -> dict:
    """Speed-ups of `other` over `reference` round by round (both timed in the same rounds):
    median, min and max of the per-round ratios, for the prefill, decode and whole scenario."""

    def stats(ref: list[float], oth: list[float]) -> dict:
        ratios = [r / o for r, o in zip(ref, oth) if o > 0] or [float("nan")]
        return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}

    return {"total": stats(reference.total_s, other.total_s), "prefill": stats(reference.prefill_s, other.prefill_s),
            "decode": stats(reference.decode_s, other.decode_s)}


class Engine:
    """A serving engine. Subclasses set `name`, `kinds` and implement `time_models`."""

    name = "engine"
    # the sub-block kinds the engine can run: {"attention": {...}, "ffn": {...}}
    kinds: dict[str, set[str]] = {"attention": {"gqa", "linear", "no_op"}, "ffn": {"mlp", "linear", "no_op"}}
    # True where costs come from timing whole models (synthetic variants), False: per-block harness
    profiles_by_variants = True

    # the Python module the engine needs (None: nothing beyond puzzlenas) and how to install it
    module: str | None = None
    package = ""  # its name as users install it
    install_hint = ""

    @classmethod
    def installed(cls) -> bool:
        import importlib.util

        return cls.module is None or importlib.util.find_spec(cls.module) is not None

    def check_available(self) -> None:
        """Raise PuzzleError (one line, naming the install command) when the engine cannot run here."""
        if not self.installed():
            from ..errors import PuzzleError

            raise PuzzleError(f"target.engine={self.name} but {self.package} is not installed: {self.install_hint}")

    def unsupported(self, alt, config: DeciLMConfig) -> str | None:
        """Why the engine cannot serve alternative `alt` in its layer, or None when it can."""
        if alt.kind not in self.kinds[alt.sub]:
            return f"{self.name} has no {alt.kind} {alt.sub} blocks"
        return None

    def unsupported_pair(self, attention, ffn, config: DeciLMConfig) -> str | None:
        """Why the engine cannot serve this (attention, FFN) pair in one layer, or None when it can."""
        return None

    def serving_dtype(self, choice: str) -> str:
        return "float32" if choice == "auto" else choice

    @classmethod
    def profile_tag(cls, target) -> str:
        """What the name of a cost profile measured in this engine opens with, before the hardware's
        (costs.profile_name); `target` is the config's target section."""
        return cls.name

    def time_models(self, models: dict[str, Path], scenario: Scenario, repeats: int, warmup: int = 1,
                    groups: list[list[str]] | None = None, dtype: str = "float32",
                    progress: bool = False) -> list[dict[str, ModelTimings]]:
        """Time checkpoint folders for the scenario, interleaved within each group (default: one group
        of all models). Returns one {name: ModelTimings} per group. A model listed in consecutive
        groups stays loaded between them (a reference measured beside each variant)."""
        raise NotImplementedError
