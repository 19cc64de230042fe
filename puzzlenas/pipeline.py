"""The pipeline stages in order, each a function (cfg, workdir) that reads and writes the work dir.

    workdir/
      config.yaml             the resolved configuration
      parent/                 the parent converted to DeciLM (+ tokenizer, source.json)
      data/                   tokenized, split distillation data
      library/                index.json, blocks/*.safetensors + *.json   (bld)
      scores/replace1.json    replace-1-block metrics per alternative       (score)
      costs/<device>.json     measured or estimated cost profile           (costs)
      search/solutions.json   the MIP's solutions                          (search)

Stages talk only through these files; `puzzlenas <stage>` runs one of them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import PuzzleConfig, save_config
from .errors import PuzzleError

log = logging.getLogger(__name__)


@dataclass
class Context:
    parent: torch.nn.Module
    tokenizer: object
    parent_fingerprint: str
    data: object


def load_context(cfg: PuzzleConfig, workdir: Path, device: torch.device | None = None) -> Context:
    from .checkpoint.parent import prepare_parent
    from .data import prepare_data
    from .utils import pick_device

    workdir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, workdir / "config.yaml")
    parent, tokenizer, fp = prepare_parent(cfg.parent, workdir)
    data = prepare_data(cfg.data, tokenizer, workdir, model=parent, model_fingerprint=fp)
    parent.to(device or pick_device())
    return Context(parent, tokenizer, fp, data)


def open_library(workdir: Path, ctx: Context):
    from .library.store import Library

    if not (workdir / "library" / "index.json").is_file():
        raise PuzzleError(f"{workdir}: no block library yet; run `puzzlenas bld` first")
    return Library(workdir / "library", ctx.parent_fingerprint, ctx.data.fingerprint)


def stage_score(cfg: PuzzleConfig, workdir: Path, progress: bool = True) -> dict:
    from . import scoring

    ctx = load_context(cfg, workdir)
    return scoring.run(cfg, workdir, ctx.parent, ctx.data, open_library(workdir, ctx), progress)


def stage_costs(cfg: PuzzleConfig, workdir: Path, progress: bool = True) -> dict:
    from . import costs
    from .checkpoint.parent import prepare_parent
    from .utils import pick_device

    parent, _, _ = prepare_parent(cfg.parent, workdir)
    return costs.run(cfg, workdir, parent.to(pick_device()), progress)


def parent_config(workdir: Path):
    from .checkpoint.io import load_config

    if not (workdir / "parent" / "config.json").is_file():
        raise PuzzleError(f"{workdir}: no converted parent yet; run `puzzlenas bld` first")
    return load_config(workdir / "parent")


def load_profile(workdir: Path, device: str | None = None) -> dict:
    folder = workdir / "costs"
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if device:
        files = [f for f in files if f.stem == device]
    if not files:
        raise PuzzleError(f"{folder}: no cost profile{' for ' + device if device else ''}; run `puzzlenas costs` first")
    if len(files) > 1:
        raise PuzzleError(f"{folder} holds several profiles ({', '.join(f.stem for f in files)}); choose one with --device")
    return json.loads(files[0].read_text())


def stage_search(cfg: PuzzleConfig, workdir: Path, device: str | None = None) -> dict:
    from . import search
    from .library.space import enumerate_alternatives

    scores_file = workdir / "scores" / "replace1.json"
    if not scores_file.is_file():
        raise PuzzleError(f"{scores_file} not found; run `puzzlenas score` first")
    scores = json.loads(scores_file.read_text())
    profile = load_profile(workdir, device)
    alternatives = [a.name for a in enumerate_alternatives(cfg.search_space, parent_config(workdir))]
    missing = [a for a in alternatives if a not in scores["scores"] or a not in profile["alternatives"]]
    if missing:
        raise PuzzleError(f"scores or costs lack {len(missing)} alternatives (first: {missing[0]}); rerun score and costs")
    return search.run(cfg, workdir, scores, profile, alternatives)


def measure_solutions(cfg: PuzzleConfig, workdir: Path, repeats: int = 3) -> list[dict]:
    """Build each solution's child (random weights: speed only) and time it against the parent
    with the same harness, in the same run."""
    from .checkpoint.parent import prepare_parent
    from .costs import Scenario, measure_model_scenario, serving_dtype
    from .library.space import Alternative
    from .realize import assemble_child
    from .utils import pick_device

    solutions_file = workdir / "search" / "solutions.json"
    if not solutions_file.is_file():
        raise PuzzleError(f"{solutions_file} not found; run `puzzlenas search` first")
    result = json.loads(solutions_file.read_text())
    device = pick_device()
    parent, _, _ = prepare_parent(cfg.parent, workdir)
    dtype = getattr(torch, serving_dtype(cfg.costs.dtype, device))
    parent = parent.to(device=device, dtype=dtype)
    sc = cfg.costs.scenario
    scenario = Scenario(sc.batch_size, sc.prompt_len, sc.generate_len)
    rows = []
    parent_time = measure_model_scenario(parent, scenario, warmup=1, repeats=repeats)["total_s"]
    for s in result["solutions"]:
        choices = [(Alternative.from_name(x["attention"]), Alternative.from_name(x["ffn"])) for x in s["layers"]]
        child = assemble_child(parent, choices, random_weights=True)
        child_time = measure_model_scenario(child, scenario, warmup=1, repeats=repeats)["total_s"]
        measured = parent_time / child_time
        rows.append({"rank": s["rank"], "predicted_speedup": s["predicted_speedup"], "measured_speedup": measured,
                     "error": s["predicted_speedup"] / measured - 1, "parent_s": parent_time, "child_s": child_time})
        del child
    return rows


def format_measurements(rows: list[dict]) -> str:
    lines = [f"| {'solution':>8} | {'predicted':>9} | {'measured':>8} | {'error':>7} |", f"|{'-' * 10}|{'-' * 11}|{'-' * 10}|{'-' * 9}|"]
    for r in rows:
        lines.append(f"| {r['rank']:>8} | {r['predicted_speedup']:>8.2f}x | {r['measured_speedup']:>7.2f}x | "
                     f"{r['error']:>+6.1%} |")
    return "\n".join(lines)
