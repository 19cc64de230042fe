"""The pipeline stages in order, each a function (cfg, workdir) that reads and writes the work dir.

    workdir/
      config.yaml             the resolved configuration of the last stage that finished
      stages/<stage>.json     each finished stage: input fingerprint, output fingerprints, its config
      parent/                 the parent converted to DeciLM (+ tokenizer, source.json)
      data/                   tokenized, split distillation data
      library/                index.json, blocks/*.safetensors + *.json   (bld)
      scores/replace1.json    replace-1-block metrics per alternative       (score)
      costs/<device>.json     measured or estimated cost profile           (costs)
      search/solutions.json   the MIP's solutions                          (search)

Stages talk only through these files (their paths, and typed readers and writers of the artifacts
between stages, are in workdir.py); `puzzlenas <stage>` runs one of them.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from .config import PuzzleConfig, save_config
from .errors import PuzzleError
from .stages import STAGES

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
    parent, tokenizer, fp = prepare_parent(cfg.parent, workdir)
    if _split is not None:  # torchrun, data/eval.parallel=layers: the parent is rank 0's SplitLM from here on
        parent = _split.share(parent, f"parent={cfg.parent}")
    parent.to(device or pick_device())  # before the data: the parent writes its text on the device it runs on
    data = prepare_data(cfg.data, tokenizer, workdir, model=parent, model_fingerprint=fp)
    return Context(parent, tokenizer, fp, data)


# --- the parent's layers split over the torchrun ranks (data.parallel, eval.parallel = layers) --------

_split = None  # rank 0's model.split.LayerSplit while run_split runs a stage, else None


def load_split_model(key: str, workdir: Path):
    """A model as rank 0 names it to the other ranks: "parent=SOURCE" (prepare_parent, from the
    work directory's converted copy that rank 0 made first), "checkpoint=FOLDER" (a DeciLM
    checkpoint) or "convert=FOLDER" (a Llama-family folder, converted as `puzzlenas eval` does)."""
    from .checkpoint.io import load_checkpoint
    from .checkpoint.parent import prepare_parent

    kind, _, value = key.partition("=")
    if kind == "parent":
        return prepare_parent(value, workdir)[0]
    if kind == "convert":  # a plain Llama-family folder (`puzzlenas eval` compares any checkpoint)
        from .checkpoint import convert_parent, load_parent

        return convert_parent(load_parent(value)[0], copy=False)
    return load_checkpoint(value)


def place_model(model, key: str, device):
    """`model` (on the CPU) on `device`; while run_split runs, rank 0's SplitLM of it instead, the
    other ranks loading it by `key` (load_split_model)."""
    return _split.share(model, key) if _split is not None else model.to(device)


def run_split(cfg: PuzzleConfig, workdir: Path, stage: str, body):
    """`body()` on rank 0 of the torchrun group (already joined), the models it loads split over
    the ranks by their layers (model/split.py); the other ranks serve them until it returns. For the
    stages that only run models forward: data (the parent writes its text) and eval."""
    from .model.split import LayerSplit

    global _split
    if getattr(cfg, stage).parallel != "layers":
        raise PuzzleError(f"under torchrun the {stage} stage runs with the parent's layers split over the ranks: set "
                          f"{stage}.parallel=layers, or run it in one process")
    split = LayerSplit(lambda key: load_split_model(key, workdir), f"{stage}.parallel=layers")
    if split.rank > 0:
        split.serve()
        return None
    _split = split
    try:
        return body()
    finally:
        _split = None
        split.stop()


def open_library(workdir: Path, ctx: Context):
    from .library.store import Library

    if not (workdir / "library" / "index.json").is_file():
        raise PuzzleError(f"{workdir}: no block library yet; run `puzzlenas bld` first")
    return Library(workdir / "library", ctx.parent_fingerprint, ctx.data.fingerprint)




def parent_config(workdir: Path):
    from .checkpoint.io import load_config

    if not (workdir / "parent" / "config.json").is_file():
        raise PuzzleError(f"{workdir}: no converted parent yet; run `puzzlenas bld` first")
    return load_config(workdir / "parent")


def stage_search(cfg: PuzzleConfig, workdir: Path, device: str | None = None, refine=None):
    from . import search
    from .library.space import target_alternatives
    from .workdir import read_cost_profile, read_scores

    scores = read_scores(workdir)
    profile = read_cost_profile(workdir, device)
    alternatives = [a.name for a in target_alternatives(cfg, parent_config(workdir))]
    missing = [a for a in alternatives if a not in scores.scores or a not in profile.alternatives]
    if missing:
        raise PuzzleError(f"scores or costs lack {len(missing)} alternatives (first: {missing[0]}); rerun score and costs")
    return search.run(cfg, workdir, scores, profile, alternatives, refine)


def measure_solutions(cfg: PuzzleConfig, workdir: Path, repeats: int = 3) -> list[dict]:
    """Build each solution's child (random weights: speed only) and time it against the parent in
    the target engine, all models in turns in one run; speed-up = median of per-round ratios."""
    import shutil

    from .checkpoint.io import save_checkpoint
    from .checkpoint.parent import prepare_parent
    from .engines import Scenario, get_engine, speedup_stats
    from .realize import assemble_child, choices_from_solution
    from .workdir import read_solutions

    result = read_solutions(workdir)
    engine = get_engine(cfg.target.engine)
    engine.check_available()
    parent, _, _ = prepare_parent(cfg.parent, workdir)
    sc = cfg.costs.scenario
    scenario = Scenario(sc.batch_size, sc.prompt_len, sc.generate_len)
    scratch = workdir / "measure.tmp"
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        models: dict = {"parent": workdir / "parent" if engine.name != "torch" else parent}
        for s in result.solutions:
            child = assemble_child(parent, choices_from_solution(s), random_weights=True)
            if engine.name == "torch":
                models[f"solution{s.rank}"] = child
            else:
                models[f"solution{s.rank}"] = save_checkpoint(child, scratch / f"solution{s.rank}")
                del child
        timings = engine.time_models(models, scenario, repeats=repeats, warmup=1,
                                     dtype=engine.serving_dtype(cfg.costs.dtype))[0]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rows = []
    for s in result.solutions:
        t = timings[f"solution{s.rank}"]
        ratio = speedup_stats(timings["parent"], t)["total"]
        rows.append({"rank": s.rank, "predicted_speedup": s.predicted_speedup, "measured_speedup": ratio["median"],
                     "measured_min": ratio["min"], "measured_max": ratio["max"],
                     "error": s.predicted_speedup / ratio["median"] - 1, "engine": engine.name,
                     "parent_s": timings["parent"].summary()["total_s"], "child_s": t.summary()["total_s"]})
    return rows


def format_measurements(rows: list[dict]) -> str:
    lines = [f"| {'solution':>8} | {'predicted':>9} | {'measured (min-max)':>20} | {'error':>7} |",
             f"|{'-' * 10}|{'-' * 11}|{'-' * 22}|{'-' * 9}|"]
    for r in rows:
        spread = f"{r['measured_speedup']:.2f}x ({r['measured_min']:.2f}-{r['measured_max']:.2f})"
        lines.append(f"| {r['rank']:>8} | {r['predicted_speedup']:>8.2f}x | {spread:>20} | {r['error']:>+6.1%} |")
    return "\n".join(lines)


# --- the stages: one function each, (cfg, workdir) -> what its stage marker records -------------
#
# `puzzlenas run` runs them in STAGES order and the per-stage commands (bld, score, costs, search,
# realize, gkd, baselines, report) run the same functions, so a stage does the same work and leaves
# the same marker whichever way it was started.

_shared: dict | None = None  # while a run holds the parent in memory: its context, by inputs


@contextlib.contextmanager
def shared_context():
    """Within this block every stage of one process gets the same loaded parent and data (the
    parent is loaded once per run, not once per stage); outside it each call loads afresh."""
    global _shared
    outer = _shared
    _shared = {} if outer is None else outer
    try:
        yield
    finally:
        _shared = outer


def context(cfg: PuzzleConfig, workdir: Path) -> Context:
    """The parent (converted and cached in workdir/parent), its tokenizer and the token data."""
    key = (str(Path(workdir).resolve()), cfg.parent, cfg.dtype, cfg.data.model_dump_json())
    if _shared is None:
        return load_context(cfg, workdir)
    if key not in _shared:
        _shared.clear()  # one parent in memory at a time
        _shared[key] = load_context(cfg, workdir)
    return _shared[key]


def run_data(cfg: PuzzleConfig, workdir: Path, progress: bool = True) -> dict:
    return data_record(context(cfg, workdir).data)


def data_record(data) -> dict:
    return {"tokens": int(data.train.numel() + data.val.numel()), "source": data.source}


def run_bld(cfg: PuzzleConfig, workdir: Path, progress: bool = True) -> dict:
    from . import bld

    c = context(cfg, workdir)
    hard = _bld_hard_fp(cfg)
    old = _marker(workdir, "bld")
    if old.is_file():
        prev = json.loads(old.read_text()).get("hard")
        if prev is not None and prev != hard:
            _set_aside(workdir / "library")  # data or training settings changed: retrain
    return bld_record(cfg, bld.run(cfg, workdir, c.parent, c.data, c.parent_fingerprint, progress))


def bld_record(cfg: PuzzleConfig, library) -> dict:
    records = library.records().values()
    return {"hard": _bld_hard_fp(cfg), "tokens": max((r.get("tokens", 0) for r in records), default=0),
            "blocks_trained": sum(1 for r in records if r.get("file"))}


def run_score(cfg: PuzzleConfig, workdir: Path, progress: bool = True) -> dict:
    from . import score

    c = context(cfg, workdir)
    result = score.run(cfg, workdir, c.parent, c.data, open_library(workdir, c), progress)
    return {"tokens": result.tokens}


def run_costs(cfg: PuzzleConfig, workdir: Path, progress: bool = True) -> dict:
    from . import costs
    from .checkpoint.parent import prepare_parent
    from .utils import pick_device

    if cfg.costs.device != "auto" and (workdir / "parent" / "config.json").is_file():
        # a roofline preset estimates from the architecture alone: no weights loaded (a 70B parent
        # fits no single device)
        parent = SimpleNamespace(config=parent_config(workdir))
    elif _shared is not None:
        parent = context(cfg, workdir).parent
    else:  # alone, costs needs only the parent, not the distillation data
        parent = prepare_parent(cfg.parent, workdir)[0].to(pick_device())
    profile = costs.run(cfg, workdir, parent, progress)
    return {"device": profile.device}


def run_search(cfg: PuzzleConfig, workdir: Path, progress: bool = True) -> dict:
    from .utils import pick_device

    hook = None
    if cfg.search.refine_rounds:  # interaction-corrected search re-scores inside children: it needs the models
        from .search.refine import make_hook

        c = context(cfg, workdir)
        hook = make_hook(cfg, workdir, c.parent, c.data, open_library(workdir, c), progress)
    result = stage_search(cfg, workdir, _profile_name(cfg, pick_device()), hook)
    return {"solutions": len(result.solutions)}


def run_realize(cfg: PuzzleConfig, workdir: Path, progress: bool = True) -> dict:
    from . import realize
    from .realize.selection import chosen_solution

    c = context(cfg, workdir)
    path = realize.run(cfg, workdir, c.parent, open_library(workdir, c), c.tokenizer, c.data.val)
    return {"path": str(path), "solution": chosen_solution(cfg, workdir)}


def run_gkd(cfg: PuzzleConfig, workdir: Path, progress: bool = True) -> dict:
    from . import gkd

    c = context(cfg, workdir)
    gkd.run(cfg, workdir, c.parent, c.data, c.tokenizer, progress)
    done = workdir / "gkd" / "done.json"  # rank 0 writes it; under torchrun the other ranks may not see it yet
    return {"tokens": json.loads(done.read_text())["tokens"]} if done.is_file() else {}


def run_baselines(cfg: PuzzleConfig, workdir: Path, progress: bool = True) -> dict:
    from .utils import pick_device

    return {"tokens": _run_baselines(cfg, workdir, context(cfg, workdir), pick_device(), progress)}


def run_eval(cfg: PuzzleConfig, workdir: Path, progress: bool = True) -> dict:
    _run_eval(cfg, workdir, context(cfg, workdir))
    return {}


def run_report(cfg: PuzzleConfig, workdir: Path, progress: bool = True) -> dict:
    from . import report

    return {"path": str(report.write_report(workdir))}


STAGE_RUNNERS = {"data": run_data, "bld": run_bld, "score": run_score, "costs": run_costs, "search": run_search,
                 "realize": run_realize, "gkd": run_gkd, "baselines": run_baselines, "eval": run_eval,
                 "report": run_report}
assert list(STAGE_RUNNERS) == STAGES


# --- the whole pipeline ----------------------------------------------------------------------


def stage_fingerprints(cfg: PuzzleConfig, device_name: str) -> dict[str, str]:
    """Each stage's inputs: its config sections and its upstream stages' fingerprints.

    Fields left at their defaults are not hashed, so a new option added to a later release (with
    a default that keeps the old behaviour) does not invalidate finished work.
    """
    from .utils import fingerprint

    d = cfg.model_dump(mode="json", exclude_defaults=True)
    sec = lambda name: d.get(name, {})  # noqa: E731
    fp = {}
    # how the ranks share the parent (data.parallel, eval.parallel) does not change what a stage makes
    fp["data"] = fingerprint(cfg.parent, _without_parallel(sec("data")), cfg.seed)
    fp["bld"] = fingerprint(fp["data"], sec("init"), sec("bld"), sec("search_space"), sec("target"))
    # how the ranks share the scoring, and how often it saves its progress, do not change the scores
    fp["score"] = fingerprint(fp["bld"], {k: v for k, v in sec("score").items() if k not in ("parallel", "checkpoint_seconds")})
    fp["costs"] = fingerprint(cfg.parent, sec("search_space"), sec("costs"), device_name, sec("target"))
    fp["search"] = fingerprint(fp["score"], fp["costs"], sec("search"))
    fp["realize"] = fingerprint(fp["search"], cfg.gkd.solution)
    fp["gkd"] = fingerprint(fp["realize"], sec("gkd"))
    fp["baselines"] = fingerprint(fp["score"], fp["costs"], cfg.search.throughput, sec("gkd"))
    # where the eval data lies is not what it is: moving the folder does not redo the evaluation
    eval_inputs = {k: v for k, v in _without_parallel(sec("eval")).items() if k != "task_data_dir"}
    fp["eval"] = fingerprint(fp["gkd"], fp["baselines"], eval_inputs, sec("costs").get("scenario", {}))
    fp["report"] = fingerprint(fp["eval"])
    return fp


def _without_parallel(section: dict) -> dict:
    return {k: v for k, v in section.items() if k != "parallel"}


def _marker(workdir: Path, stage: str) -> Path:
    return workdir / "stages" / f"{stage}.json"


def stage_done(workdir: Path, stage: str, fp: str) -> bool:
    m = _marker(workdir, stage)
    return m.is_file() and json.loads(m.read_text()).get("fingerprint") == fp


def _set_aside(path: Path) -> None:
    """Keep a stale artifact under another name instead of deleting it: nothing computed is lost."""
    import time

    if path.exists():
        path.rename(path.with_name(f"{path.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}"))


def run_pipeline(cfg: PuzzleConfig, workdir: Path, from_stage: str | None = None, only: str | None = None,
                 progress: bool = True, stages: list[str] | None = None) -> dict:
    """Every stage in order; finished stages with unchanged inputs are skipped, killed ones resume.

    from_stage / only: start at, or run just, that stage, redoing it even when it is done.
    stages: run these (a command's stages, e.g. data + bld for `puzzlenas bld`), skipping the done ones.
    """
    import time

    from .costs import device_name
    from .utils import pick_device
    from .workdir import stage_problem

    for name in (from_stage, only):
        if name is not None and name not in STAGES:
            raise PuzzleError(f"unknown stage {name!r} (stages: {', '.join(STAGES)})")
    workdir.mkdir(parents=True, exist_ok=True)
    device = pick_device()
    fps = stage_fingerprints(cfg, device_name(device))
    profile_name, k = _profile_name(cfg, device), cfg.gkd.solution
    for name in stages or []:
        if name not in STAGES:
            raise PuzzleError(f"unknown stage {name!r} (stages: {', '.join(STAGES)})")
    if stages:
        selected = [s for s in STAGES if s in stages]
    else:
        selected = [only] if only else STAGES[STAGES.index(from_stage) :] if from_stage else STAGES
    from .preflight import check_inputs

    check_inputs(cfg, workdir, selected)  # every input of every selected stage reachable, before the first starts
    from .plan import check_run_fits  # and, on a GPU, memory for every stage that will run (puzzlenas plan)

    check_run_fits(cfg, [s for s in selected if s in (from_stage, only) or not stage_done(workdir, s, fps[s])], device)
    for stage in STAGES[: STAGES.index(selected[0])]:
        if not _marker(workdir, stage).is_file():
            command = "bld" if stage == "data" else stage
            raise PuzzleError(f"stage {stage!r} has not run yet in {workdir}; run `puzzlenas {command}` (or `puzzlenas run`) first")
        problem = stage_problem(workdir, stage, None, k, profile_name)  # its outputs, whatever config made them
        if problem:
            raise PuzzleError(f"stage {stage!r} in {workdir}: {problem}; run without --from/--only to redo it")
    summary = {}
    with shared_context():  # the parent and data loaded once for all stages of this run
        for stage in selected:
            forced = stage in (from_stage, only)
            problem = stage_problem(workdir, stage, fps[stage], k, profile_name, set_aside=not forced)
            if problem is None and not forced:
                log.info("stage %-9s done (inputs unchanged)", stage)
                summary[stage] = "skipped"
                continue
            if problem not in (None, "not finished", "inputs changed"):
                log.warning("stage %s: redoing it: %s", stage, problem)
            log.info("stage %-9s running", stage)
            t0 = time.perf_counter()
            info = STAGE_RUNNERS[stage](cfg, workdir, progress=progress)
            info = record_stage(cfg, workdir, stage, info, time.perf_counter() - t0)
            summary[stage] = f"done in {info['seconds']:.0f} s"
    return summary


def record_stage(cfg: PuzzleConfig, workdir: Path, stage: str, info: dict, seconds: float) -> dict:
    """Mark `stage` finished: its inputs' fingerprint, its outputs' fingerprints, its config. Also
    for a stage run outside run_pipeline (`puzzlenas bld` under torchrun, on rank 0)."""
    from .costs import device_name
    from .utils import atomic_write_json, pick_device
    from .workdir import stage_record

    device = pick_device()
    fp = stage_fingerprints(cfg, device_name(device))[stage]
    info = {**info, "fingerprint": fp, "seconds": round(seconds, 1)}
    info.update(stage_record(workdir, stage, cfg.gkd.solution, _profile_name(cfg, device)), config=cfg.model_dump(mode="json"))
    atomic_write_json(_marker(workdir, stage), info)
    save_config(cfg, workdir / "config.yaml")  # written on success only: a failed run leaves the last good one
    return info


def _bld_hard_fp(cfg: PuzzleConfig) -> str:
    from .utils import fingerprint

    d = cfg.model_dump(mode="json", exclude_defaults=True)
    data_fp = fingerprint(cfg.parent, _without_parallel(d.get("data", {})), cfg.seed)  # = stage_fingerprints(...)["data"]
    return fingerprint(data_fp, d.get("init", {}), d.get("bld", {}))  # the search space only adds blocks


def _profile_name(cfg: PuzzleConfig, device) -> str:
    from .costs import profile_name

    return profile_name(cfg, device)


def _run_baselines(cfg: PuzzleConfig, workdir: Path, ctx: Context, device, progress: bool) -> int:
    from . import baselines, gkd
    from .checkpoint.io import save_checkpoint
    from .library.space import target_alternatives
    from .realize import assemble_child, choices_from_solution
    from .utils import atomic_write_json
    from .workdir import baseline_dir, read_cost_profile, read_scores

    scores = read_scores(workdir)
    profile = read_cost_profile(workdir, _profile_name(cfg, device))
    alternatives = [a.name for a in target_alternatives(cfg, ctx.parent.config)]
    library = open_library(workdir, ctx)
    tokens = 0
    for name, sol in baselines.run(cfg, workdir, scores, profile, alternatives).items():
        folder = workdir / baseline_dir(name)
        if isinstance(sol, str):  # cannot reach the target: why
            log.warning("%s", sol)
            _set_aside(folder / "child")  # a child from an earlier target must not be evaluated as this one's
            continue
        realized = folder / "realized"
        built_from = folder / "realized_from.json"
        # re-realize only for a new solution: a resumed run must find the same source to resume GKD
        if not (realized / "config.json").is_file() or not built_from.is_file() or json.loads(built_from.read_text()) != sol.layers_json():
            save_checkpoint(assemble_child(ctx.parent, choices_from_solution(sol), library), realized, ctx.tokenizer,
                            overwrite=True)
            atomic_write_json(built_from, sol.layers_json())
        gkd.distill(cfg, realized, folder / "child", folder / "gkd", ctx.parent, ctx.data, ctx.tokenizer, progress)
        tokens += json.loads((folder / "gkd" / "done.json").read_text())["tokens"]
    return tokens


def _run_eval(cfg: PuzzleConfig, workdir: Path, ctx: Context) -> dict:
    from .checkpoint.io import load_checkpoint
    from .eval import evaluate_models
    from .realize.selection import chosen_solution
    from .workdir import BASELINES, baseline_dir, baseline_file, read_baseline, realized_dir

    device = next(ctx.parent.parameters()).device
    k = chosen_solution(cfg, workdir)
    models = {"parent": ctx.parent}
    candidates = {f"child (solution {k}) before GKD": workdir / realized_dir(k), "child": workdir / "child"}
    for name in BASELINES:
        if (workdir / baseline_file(name)).is_file() and not isinstance(read_baseline(workdir, name), str):
            candidates[f"{name} baseline"] = workdir / baseline_dir(name) / "child"
    for name, path in candidates.items():
        if not (path / "config.json").is_file():  # never evaluate without a model silently
            raise PuzzleError(f"{path} is missing, so the {name} cannot be evaluated; run without --only to rebuild it")
        models[name] = place_model(load_checkpoint(path), f"checkpoint={path}", device)
    paths = {"parent": workdir / "parent", **candidates}
    return evaluate_models(models, "parent", ctx.tokenizer, cfg, ctx.data.val, workdir / "eval", paths=paths,
                           memo_dir=workdir / "eval-memo")
