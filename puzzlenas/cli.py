"""The `puzzlenas` command line: one function per command, mapped in COMMANDS.

    puzzlenas convert PARENT OUT [--dtype float32] [--overwrite]
    puzzlenas info CHECKPOINT
    puzzlenas plan [CONFIG] [--gpus 8 --gpu-memory 80GiB] [--arch llama-3.1-70b]
    puzzlenas bld CONFIG --workdir W [--set key=value ...]
    puzzlenas score CONFIG --workdir W
    puzzlenas costs CONFIG --workdir W [--device h100-sxm]
    puzzlenas search CONFIG --workdir W --throughput 1.5x --memory 40GiB --solutions 5
    puzzlenas measure CONFIG --workdir W
    puzzlenas realize CONFIG --workdir W
    puzzlenas gkd CONFIG --workdir W          (alias: distill)
    puzzlenas baselines CONFIG --workdir W
    puzzlenas report CONFIG --workdir W
    puzzlenas eval CHECKPOINT [--parent PARENT] [--config CONFIG] [--workdir W]
    puzzlenas serve CHECKPOINT [--host 127.0.0.1] [--port 8000]
    puzzlenas export CHECKPOINT OUT.gguf [--type q8_0] [--tokenizer PARENT]
    puzzlenas run [CONFIG] [--preset quick] [--from STAGE | --only STAGE] [--set key=value] [--workdir W]
"""

from __future__ import annotations

import argparse
import logging
import sys

from .errors import PuzzleError
from .model import BlockConfigError


def cmd_convert(args: argparse.Namespace) -> None:
    from .checkpoint import convert_parent, load_parent, save_checkpoint
    from .checkpoint.io import check_replaceable, parse_dtype

    dtype = parse_dtype(args.dtype)
    check_replaceable(args.out, args.overwrite)  # before the slow part
    parent, tokenizer = load_parent(args.parent, dtype=dtype)
    child = convert_parent(parent, copy=False)
    out = save_checkpoint(child, args.out, tokenizer, overwrite=args.overwrite)
    print(f"wrote {out}")


def cmd_info(args: argparse.Namespace) -> None:
    from .checkpoint import checkpoint_summary

    print(checkpoint_summary(args.checkpoint).format())


def cmd_plan(args: argparse.Namespace) -> None:
    """Peak memory per device of every stage, from the parent's shape alone (nothing loaded)."""
    from .config import load_config
    from .plan import format_plan, plan_for

    cfg = load_config(args.config, args.set)  # no input check: planning for a parent not on this machine is fine
    print(format_plan(plan_for(cfg, args.gpus, args.gpu_memory, args.arch), formulas=not args.brief))


def _load_cfg(args):
    from .config import load_config
    from .preflight import check_command

    cfg = load_config(args.config, args.set)
    check_command(args, cfg)  # every input it needs reachable before the slow part, else one line
    return cfg


def _config_or_preset(args: argparse.Namespace) -> str:
    """The config file of `run` and `sweep`: CONFIG, else the bundled preset (--preset, default 'default')."""
    from .config import preset_path
    from .errors import PuzzleError

    if args.config and args.preset:
        raise PuzzleError(f"give a CONFIG or --preset, not both (got {args.config} and --preset {args.preset})")
    return args.config or str(preset_path(args.preset or "default"))


def cmd_run(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .config import load_config
    from .pipeline import run_pipeline

    cfg = load_config(_config_or_preset(args), args.set)
    workdir = Path(args.workdir)
    if _torchrun():
        summary = _run_split_stage(args, cfg, workdir)
        if summary is None:  # a rank > 0: it served rank 0's models
            return
    else:
        summary = run_pipeline(cfg, workdir, args.from_stage, args.only, progress=not args.quiet)
    for stage, status in summary.items():
        print(f"{stage:<10} {status}")
    report = workdir / "report" / "report.md"
    results = workdir / "eval" / "results.md"
    if results.is_file():
        print()
        print(results.read_text())
    if report.is_file():
        print(f"report: {report}")
    if cfg.target.engine == "llama.cpp" and (workdir / "child" / "config.json").is_file():
        print(f"llama.cpp GGUF: {_export_child_gguf(cfg, workdir)}")


def _torchrun() -> bool:
    import os

    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _run_split_stage(args: argparse.Namespace, cfg, workdir):
    """`torchrun -m puzzlenas run CONFIG --only data|eval`: the stage on rank 0 with the parent's
    layers (and eval's children's) split over the ranks (data/eval.parallel=layers); None on the
    other ranks, which serve them. BLD, scoring and GKD have torchrun commands of their own."""
    from .pipeline import run_pipeline, run_split
    from .training import init_distributed, teardown

    if args.only not in ("data", "eval") or args.from_stage:
        raise PuzzleError("under torchrun `puzzlenas run` runs one stage with the parent's layers split over the "
                          "ranks: --only data or --only eval (bld, score and gkd are torchrun commands of their own)")
    init_distributed()
    try:
        return run_split(cfg, workdir, args.only, lambda: run_pipeline(cfg, workdir, only=args.only,
                                                                        progress=not args.quiet))
    finally:
        teardown()


def _export_child_gguf(cfg, workdir):
    """workdir/export/child.<gguf_type>.gguf, what a llama.cpp user serves: written again only when
    the child changed; the tokenizer copied from a GGUF parent, else the child's own converted."""
    from .checkpoint.convert import resolve_parent_path
    from .export import export_gguf

    child = workdir / "child"
    out = workdir / "export" / f"child.{cfg.target.gguf_type}.gguf"
    if out.is_file() and out.stat().st_mtime >= max(f.stat().st_mtime for f in child.iterdir()):
        return out
    try:
        parent = resolve_parent_path(cfg.parent)
    except PuzzleError:
        parent = None
    tokenizer = parent if parent is not None and parent.is_file() and parent.suffix == ".gguf" else None
    return export_gguf(child, out, cfg.target.gguf_type, tokenizer=tokenizer)


def cmd_bld(args: argparse.Namespace) -> None:
    import os
    import time
    from pathlib import Path

    import torch.distributed as dist

    from . import bld
    from .training import init_distributed

    cfg = _load_cfg(args)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:  # one process: the pipeline's data and bld stages
        from .library.store import Library
        from .pipeline import context

        _run_stages(args, cfg, "data", "bld")
        ctx = context(cfg, Path(args.workdir))
        print(bld.summary_table(Library(Path(args.workdir) / "library", ctx.parent_fingerprint, ctx.data.fingerprint)))
        return
    init_distributed()  # joins the torchrun group
    rank = dist.get_rank() if dist.is_initialized() else 0
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    parent, tokenizer, fp, data = _prepare_on_ranks(cfg, workdir, rank, "bld" if cfg.bld.parallel == "layers" else None)
    # bld.run moves the parent to the device (with bld.parallel=layers, only this rank's layers)
    library = bld.run(cfg, workdir, parent, data, fp, progress=not args.quiet)
    if rank == 0:  # the same stage markers as `puzzlenas run`, so later commands and runs build on this
        from .pipeline import bld_record, data_record, record_stage

        record_stage(cfg, workdir, "data", data_record(data), 0)
        record_stage(cfg, workdir, "bld", bld_record(cfg, library), time.perf_counter() - t0)
        print(bld.summary_table(library))
    if dist.is_initialized():
        dist.destroy_process_group()


def _prepare_on_ranks(cfg, workdir, rank: int, split: str | None = None):
    """(parent on the CPU, tokenizer, parent fingerprint, data) on every torchrun rank: rank 0
    converts and caches them first, the others then read its cache.

    split: "bld" or "score" when that stage splits the parent's layers over the ranks: each rank
    then reads only the tensors it holds (bld.pipeline.parent_part) from the cached parent's
    safetensors. The whole parent is loaded only on rank 0 and only to make a missing cache: the
    converted parent, or distillation text the parent must generate."""
    from functools import partial

    from .bld.pipeline import parent_part
    from .checkpoint.io import PartialParentError
    from .checkpoint.parent import prepare_parent
    from .data import prepare_data
    from .training import barrier, rank_world

    part = None
    if split is not None:
        part = partial(parent_part, rank=rank, world=rank_world()[1], setting=f"{split}.parallel=layers",
                       head=split == "score")

    def load(part):
        parent, tokenizer, fp = prepare_parent(cfg.parent, workdir, part=part)
        # data.parallel=layers: the tokens are cached by `torchrun ... run --only data`; generating
        # here would hold the whole parent on rank 0
        writer = _GenerateWithTheSplit(parent) if cfg.data.parallel == "layers" else parent
        return parent, tokenizer, fp, prepare_data(cfg.data, tokenizer, workdir, model=writer, model_fingerprint=fp)

    first = None
    if rank == 0:
        try:
            first = load(part)
        except PartialParentError:  # the data is the parent's own text, not generated yet: the whole parent writes it
            load(None)
            first = load(part)
    barrier()
    first = first or load(part)
    loaded = getattr(first[0], "loaded_part", None)
    if loaded is not None:
        logging.getLogger(__name__).info(
            "%s.parallel=layers: rank %d read %s of the parent from its safetensors: %s of its %s parameters "
            "(%.1f of %.1f MiB); holds %s", split, rank, loaded.part.describe(), f"{loaded.params:,}",
            f"{loaded.whole_params:,}", loaded.bytes / 2**20, loaded.whole_bytes / 2**20,
            f"{sum(p.numel() for p in first[0].parameters()):,}")
    return first


class _GenerateWithTheSplit:
    """The parent as prepare_data sees it when data.parallel=layers outside `run --only data`: its
    config for the checks, and one line instead of generating."""

    def __init__(self, parent):
        self.config = parent.config

    def __call__(self, *args, **kwargs):
        raise PuzzleError("data.parallel=layers: the parent writes its distillation text with its layers split over "
                          "the ranks; run `torchrun --nproc-per-node N -m puzzlenas run CONFIG --only data` first")

    parameters = __call__


def _run_stages(args: argparse.Namespace, cfg, *stages: str) -> None:
    """A command's stages through the pipeline: the same functions and stage markers as `run`."""
    from pathlib import Path

    from .pipeline import run_pipeline

    for stage, status in run_pipeline(cfg, Path(args.workdir), stages=list(stages), progress=not args.quiet).items():
        print(f"{stage:<10} {status}")


def cmd_score(args: argparse.Namespace) -> None:
    import os
    import time
    from pathlib import Path

    from .score import format_scores
    from .workdir import read_scores

    cfg = _load_cfg(args)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        _run_stages(args, cfg, "score")
        print(format_scores(read_scores(args.workdir)))
        return
    # torchrun: score.parallel deals the alternatives, or splits the parent's layers, over the ranks;
    # score.run moves the parent to the device (with score.parallel=layers, only this rank's layers)
    from . import score
    from .pipeline import Context, open_library, record_stage
    from .training import init_distributed, rank_world, teardown

    init_distributed()
    rank = rank_world()[0]
    workdir = Path(args.workdir)
    t0 = time.perf_counter()
    parent, tokenizer, fp, data = _prepare_on_ranks(cfg, workdir, rank, "score" if cfg.score.parallel == "layers" else None)
    library = open_library(workdir, Context(parent, tokenizer, fp, data))
    result = score.run(cfg, workdir, parent, data, library, progress=not args.quiet)
    if rank == 0:  # the stage marker `puzzlenas run` leaves, so later commands build on it
        record_stage(cfg, workdir, "score", {"tokens": result.tokens}, time.perf_counter() - t0)
        print(format_scores(result))
    teardown()


def cmd_costs(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    from .workdir import COSTS, read_cost_profile

    cfg = _load_cfg(args)
    if args.device:
        _set_flag(cfg.costs, "device", args.device, f"--device {args.device}")
    _run_stages(args, cfg, "costs")
    profile = read_cost_profile(args.workdir, _profile_name(cfg))
    label = " (estimated)" if profile.estimated else " (measured)"
    print(f"cost profile for {profile.device}{label}: {len(profile.alternatives)} alternatives, "
          f"scenario {json.dumps(profile.scenario)}, written to {Path(args.workdir) / COSTS}")


def _profile_name(cfg) -> str:
    from .costs import profile_name
    from .utils import pick_device

    return profile_name(cfg, pick_device())

def cmd_search(args: argparse.Namespace) -> None:
    from .search import format_solutions
    from .workdir import read_solutions

    cfg = _load_cfg(args)
    if args.device:  # search on another stored profile (e.g. a roofline preset's): costs.device names it
        _set_flag(cfg.costs, "device", args.device, f"--device {args.device}")
    if args.throughput is not None:
        _set_flag(cfg.search, "throughput", None if args.throughput == "none" else _factor(args.throughput),
                  f"--throughput {args.throughput}")
    if args.memory is not None:
        _set_flag(cfg.search, "memory_bytes", _size(args.memory), f"--memory {args.memory}")
    if args.solutions is not None:
        _set_flag(cfg.search, "solutions", args.solutions, f"--solutions {args.solutions}")
    _run_stages(args, cfg, "search")
    print(format_solutions(read_solutions(args.workdir)))

def _set_flag(section, field: str, value, flag: str) -> None:
    """Assign a flag's value to a config field; a value the field refuses is one line naming the flag."""
    from pydantic import ValidationError

    try:
        setattr(section, field, value)
    except ValidationError as exc:
        raise PuzzleError(f"{flag}: {exc.errors()[0]['msg']}") from None


def _factor(text):
    from .search import parse_factor

    return parse_factor(text)


def _size(text):
    from .search import parse_size

    return parse_size(text)


def cmd_measure(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .pipeline import format_measurements, measure_solutions

    print(format_measurements(measure_solutions(_load_cfg(args), Path(args.workdir), args.repeats)))


def cmd_sweep(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .sweep import run_sweep

    # Without a CONFIG the sweep takes the same preset as `puzzlenas run`, so a sweep over a run's
    # work directory reuses its data, library and scores instead of redoing them at other settings,
    # and the run's own target (its child and baselines) instead of distilling it again.
    args.config = _config_or_preset(args)
    run_sweep(_load_cfg(args), Path(args.workdir), args.targets, progress=not args.quiet)
    print((Path(args.workdir) / "report" / "sweep.md").read_text())


def cmd_realize(args: argparse.Namespace) -> None:
    _run_stages(args, _load_cfg(args), "realize")


def cmd_baselines(args: argparse.Namespace) -> None:
    _run_stages(args, _load_cfg(args), "baselines")


def cmd_report(args: argparse.Namespace) -> None:
    from pathlib import Path

    _run_stages(args, _load_cfg(args), "report")
    print(f"report: {Path(args.workdir) / 'report' / 'report.md'}")

def cmd_distill(args: argparse.Namespace) -> None:
    import time
    from pathlib import Path

    import torch.distributed as dist

    from .pipeline import record_stage, run_gkd
    from .training import init_distributed

    cfg = _load_cfg(args)
    init_distributed()  # joins the torchrun group, if any
    workdir = Path(args.workdir)
    t0 = time.perf_counter()
    # the pipeline's gkd stage itself; it needs the realized child, not the upstream stage markers
    info = run_gkd(cfg, workdir, progress=not args.quiet)
    if not dist.is_initialized() or dist.get_rank() == 0:
        record_stage(cfg, workdir, "gkd", info, time.perf_counter() - t0)
        print(f"wrote {workdir / 'child'}")
    if dist.is_initialized():
        dist.destroy_process_group()


def checkpoint_labels(paths: list[str]) -> list[str]:
    """The name of each compared checkpoint in the results table: its folder's name, or as many of
    its last path parts as tell it from the others and from the reference "parent" (two work
    directories' `child/` folders become `s12/child` and `b2/child`, not one overwritten row)."""
    from pathlib import Path

    resolved = [Path(p).resolve() if Path(p).exists() else Path(p) for p in paths]
    for i, p in enumerate(resolved):
        if p in resolved[:i]:
            raise PuzzleError(f"checkpoint {paths[i]!r} is given twice")
    labels = []
    for i, p in enumerate(resolved):
        for depth in range(1, len(p.parts) + 1):
            label = "/".join(p.parts[-depth:])
            if label != "parent" and all("/".join(q.parts[-depth:]) != label for j, q in enumerate(resolved) if j != i):
                break
        labels.append(label)
    return labels


def cmd_eval(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .checkpoint import convert_parent, load_checkpoint, load_parent
    from .checkpoint.convert import BUNDLED
    from .checkpoint.parent import prepare_parent
    from .config import load_config
    from .data import prepare_data
    from .eval import evaluate_models
    from .utils import pick_device

    for path in args.checkpoint:
        if not Path(path).exists() and path not in BUNDLED:
            raise PuzzleError(f"checkpoint {path!r} not found (give a checkpoint folder, e.g. {Path(args.workdir) / 'child'})")
    labels = checkpoint_labels(args.checkpoint)
    cfg = load_config(args.config, args.set)
    from .preflight import check_command

    check_command(args, cfg)
    workdir = Path(args.workdir)

    def evaluate():
        from .pipeline import place_model

        device = pick_device()
        source = args.parent or cfg.parent
        parent, tokenizer, fp = prepare_parent(source, workdir)
        data = prepare_data(cfg.data, tokenizer, workdir, model=parent, model_fingerprint=fp)
        # under torchrun (eval.parallel=layers) every model is split over the ranks
        models = {"parent": place_model(parent, f"parent={source}", device)}
        paths = {"parent": workdir / "parent"}
        for label, path in zip(labels, args.checkpoint):
            p = Path(path)
            if (p / "config.json").is_file() and '"nemotron-nas"' in (p / "config.json").read_text():
                models[label] = place_model(load_checkpoint(p), f"checkpoint={p}", device)
            else:
                models[label] = place_model(convert_parent(load_parent(p)[0], copy=False), f"convert={p}", device)
            paths[label] = p  # an engine serving from folders reads a plain Llama folder natively
        return evaluate_models(models, "parent", tokenizer, cfg, data.val, workdir / "eval",
                               skip_lm_eval=args.no_lm_eval, paths=paths, memo_dir=workdir / "eval-memo")

    if _torchrun():
        from .pipeline import run_split
        from .training import init_distributed, teardown

        init_distributed()
        try:
            report = run_split(cfg, workdir, "eval", evaluate)
        finally:
            teardown()
        if report is None:  # a rank > 0: it served rank 0's models
            return
    else:
        report = evaluate()
    from .eval import format_results

    print(format_results(report))


def cmd_serve(args: argparse.Namespace) -> None:
    """An OpenAI-compatible server for a checkpoint, in vLLM (replaces this process: vLLM gets the signals)."""
    import os
    from pathlib import Path

    from .checkpoint.io import load_config
    from .engines import get_engine

    engine = get_engine("vllm")
    engine.check_available()
    path = Path(args.checkpoint)
    config = load_config(path)
    for layer, block in enumerate(config.block_configs):
        for sub, kind in (("attention", block.attention.kind), ("ffn", block.ffn.kind)):
            if kind not in engine.kinds[sub]:
                raise PuzzleError(f"{path}: layer {layer} has a {kind} {sub} block, which vLLM cannot serve; "
                                  "search with target.engine: vllm to get a child it can")
    cmd = engine.serve_command(path, args.host, args.port, args.dtype, args.max_model_len)
    if args.print_command:
        print(" ".join(cmd))
        return
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    sys.stdout.flush()
    os.execv(cmd[0], cmd)


def cmd_export(args: argparse.Namespace) -> None:
    """A checkpoint as a GGUF file for llama.cpp (its `deci` architecture)."""
    from pathlib import Path

    from .export import export_gguf

    if args.tokenizer is None and not (Path(args.checkpoint) / "tokenizer_config.json").is_file():
        print(f"warning: {args.checkpoint} has no tokenizer and --tokenizer was not given: the GGUF gets a "
              "placeholder vocabulary (it can be timed, not prompted with text)", file=sys.stderr)
    out = export_gguf(args.checkpoint, args.out, args.type, tokenizer=args.tokenizer)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {args.type})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="puzzlenas", description="Distillation-based NAS for Llama-family LLMs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a parent (HF directory, .gguf, or 'smollm2') to DeciLM format")
    p.add_argument("parent")
    p.add_argument("out")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 (default float32)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT even if puzzlenas did not write it (deletes its contents)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("info", help="per-layer table and totals of a DeciLM checkpoint")
    p.add_argument("checkpoint")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("plan", help="peak memory per device of every stage, and whether it fits (nothing loaded)")
    p.add_argument("config", nargs="?", default=None, help="YAML config (default: built-in defaults)")
    p.add_argument("--gpus", type=int, help="devices (default: the CUDA devices here, else 1 CPU with its RAM)")
    p.add_argument("--gpu-memory", help="memory of each device, e.g. 80GiB (default: this machine's)")
    p.add_argument("--arch", help="the parent's shape: a folder with config.json or a preset (llama-3.1-8b, -70b, -405b, smollm2)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--brief", action="store_true", help="the table only, without the arithmetic")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("run", help="the whole pipeline (data .. report); reruns skip finished stages")
    _stage_arguments(p)
    p.add_argument("--preset", choices=["default", "quick"], help="bundled SmolLM2-135M preset (default: 'default')")
    p.add_argument("--from", dest="from_stage", metavar="STAGE", help="rerun from this stage on")
    p.add_argument("--only", metavar="STAGE", help="run only this stage")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("bld", help="initialize and train the block library (blockwise local distillation)")
    _stage_arguments(p)
    p.set_defaults(func=cmd_bld)

    p = sub.add_parser("score", help="replace-1-block scores of every alternative (KL, LM loss, agreement)")
    _stage_arguments(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("costs", help="measure (or estimate for a preset device) each alternative's time and memory")
    _stage_arguments(p)
    p.add_argument("--device", help="a roofline preset to estimate for instead of measuring: h100-sxm, h200, a100-80gb, l40s, cpu-roofline")
    p.set_defaults(func=cmd_costs)

    p = sub.add_parser("search", help="solve the MIP for a target; writes search/solutions.json")
    _stage_arguments(p)
    p.add_argument("--throughput", help="at least this many times the parent's throughput, e.g. 1.5x ('none': no limit)")
    p.add_argument("--memory", help="total memory budget (weights + KV cache), e.g. 40GiB")
    p.add_argument("--solutions", type=int, help="number of diverse solutions")
    p.add_argument("--device", help="which cost profile in costs/ to use (default: the only one)")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("measure", help="time each solution's child against the parent: predicted vs measured speed-up")
    _stage_arguments(p)
    p.add_argument("--repeats", type=int, default=3)
    p.set_defaults(func=cmd_measure)

    p = sub.add_parser("sweep", help="several throughput targets from one library and score set: child and "
                                     "baselines at each, distilled and evaluated; table and plot in report/")
    _stage_arguments(p)
    p.add_argument("--targets", nargs="+", type=_factor, required=True, help="throughput targets, e.g. 1.2 1.5x 2")
    p.add_argument("--preset", choices=["default", "quick"],
                   help="bundled SmolLM2-135M preset when no CONFIG is given (default: 'default', as for run)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("realize", help="assemble search solution gkd.solution (auto: the best measured of them) from the library into realized/")
    _stage_arguments(p)
    p.set_defaults(func=cmd_realize)

    # `gkd`, as the stage and its package are named; `distill` is the name it had first
    p = sub.add_parser("gkd", aliases=["distill"], help="global knowledge distillation of the realized child into child/")
    _stage_arguments(p)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("baselines", help="width and depth baselines at the search target, distilled like the child")
    _stage_arguments(p)
    p.set_defaults(func=cmd_baselines)

    p = sub.add_parser("report", help="report/report.md and the plots, from the work directory's results")
    _stage_arguments(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("eval", help="perplexity, KL, agreement, lm-eval accuracy and speed vs the parent")
    p.add_argument("checkpoint", nargs="+", help="checkpoint folder(s) to compare with the parent")
    p.add_argument("--parent", help="the reference parent (default: the config's)")
    p.add_argument("--config", default=None, help="YAML config (eval, data and costs.scenario sections)")
    p.add_argument("--workdir", default="work")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--no-lm-eval", action="store_true", help="skip the lm-eval tasks")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("serve", help="serve a checkpoint with vLLM's OpenAI-compatible server")
    p.add_argument("checkpoint", help="a checkpoint folder (e.g. work/child)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--max-model-len", type=int, default=None, help="longest prompt + completion (default: the model's)")
    p.add_argument("--print-command", action="store_true", help="print the vllm serve command instead of running it")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("export", help="write a checkpoint as a GGUF file that llama.cpp (and ollama) run")
    p.add_argument("checkpoint", help="a checkpoint folder (e.g. work/child)")
    p.add_argument("out", help="the .gguf file to write")
    p.add_argument("--type", default="q8_0", help="f32 | f16 | bf16 | q8_0 | q5_1 | q5_0 | q4_1 | q4_0 (default q8_0)")
    p.add_argument("--tokenizer", default=None,
                   help="the parent (a .gguf file or 'smollm2': tokenizer copied) or a folder with a HF tokenizer "
                        "(converted); default: the checkpoint's own tokenizer")
    p.set_defaults(func=cmd_export)
    return parser


def _stage_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default=None, help="YAML config (default: built-in defaults)")
    p.add_argument("--workdir", default="work", help="work directory (default: ./work)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


# commands that write their --workdir: each holds the work directory's lock while it runs
WRITES_WORKDIR = {"run", "sweep", "bld", "score", "costs", "search", "measure", "realize", "gkd", "distill", "baselines",
                  "eval", "report"}


def _workdir_lock(args: argparse.Namespace, argv: list[str] | None):
    import contextlib
    import shlex

    if args.command not in WRITES_WORKDIR:
        return contextlib.nullcontext()
    from .workdir import lock_workdir

    return lock_workdir(args.workdir, shlex.join(["puzzlenas", *(sys.argv[1:] if argv is None else argv)]))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        with _workdir_lock(args, argv):
            args.func(args)
    except (PuzzleError, BlockConfigError) as exc:
        print(f"puzzlenas: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        import errno

        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            print(f"puzzlenas: error: {exc.filename or 'a file'}: {exc.strerror}; check its permissions", file=sys.stderr)
            return 2
        if exc.errno != errno.ENOSPC:
            raise
        print(f"puzzlenas: error: disk full ({exc.filename or 'writing'}); free space and rerun: finished work is kept",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("puzzlenas: interrupted", file=sys.stderr)
        return 130
    return 0
