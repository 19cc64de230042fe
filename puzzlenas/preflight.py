"""Check at a command's start that every input it will need can be reached, so a missing one stops it
with one line (exit 2) before any expensive stage instead of 25 minutes later.

    check_inputs(cfg, workdir, stages=["data", ..., "report"])   # PuzzleError naming the first problem

What each stage reads from outside the work directory:
  parent      the parent (HF folder, .gguf or a bundled name): every stage that loads it
  data.path   a local file/folder, or a HF dataset name (then the hub, unless tokens are cached)
  engine      target.engine installed: costs measured here, eval's speed, measure
  eval        WikiText-2 and the lm-eval tasks: a local copy or the hub (eval/data.py), lm-eval itself
Checks are cheap (file tests, one TCP probe of the hub only when the hub is needed) and read no file
that could run code.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import PuzzleError

# stages that load the parent, and those that also load the distillation data (pipeline.load_context);
# search and report read only the work directory
PARENT_STAGES = {"data", "bld", "score", "costs", "realize", "gkd", "baselines", "eval", "measure"}
DATA_STAGES = PARENT_STAGES - {"measure"}


def check_inputs(cfg, workdir: Path | str, stages: list[str], lm_eval: bool = True) -> None:
    """Raise PuzzleError (one line) for the first input of `stages` that cannot be reached."""
    stages = set(stages)
    if "search" in stages and cfg.search.refine_rounds:
        stages.add("score")  # refining re-scores inside children: the parent and data, as scoring
    if stages & PARENT_STAGES:
        _check_parent(cfg.parent)
    if stages & DATA_STAGES:
        _check_data(cfg.data, Path(workdir))
    measured_costs = "costs" in stages and cfg.costs.device == "auto"  # a roofline estimate times nothing
    if measured_costs or stages & {"eval", "measure"}:
        from .engines import get_engine

        get_engine(cfg.target.engine).check_available()
    if "eval" in stages:
        check_eval_inputs(cfg.eval, lm_eval)


# the pipeline stages a single command runs (`run` checks its own selection in run_pipeline)
COMMAND_STAGES = {"bld": ["bld"], "score": ["score"], "costs": ["costs"], "search": ["search"], "measure": ["measure"],
                  "realize": ["realize"], "distill": ["gkd"], "eval": ["eval"]}


def check_command(args, cfg) -> None:
    """check_inputs for CLI command `args.command`, its flags applied (`eval --parent`, `--no-lm-eval`,
    `costs --device` estimates: no engine needed)."""
    stages = COMMAND_STAGES.get(args.command)
    if stages is None:
        return
    if getattr(args, "parent", None) or getattr(args, "device", None):
        cfg = cfg.model_copy(deep=True)
        if args.command == "eval" and args.parent:
            cfg.parent = args.parent
        if args.command == "costs" and args.device:
            cfg.costs.device = args.device
    check_inputs(cfg, args.workdir, stages, lm_eval=not getattr(args, "no_lm_eval", False))


def _check_parent(parent: str) -> None:
    from .checkpoint.convert import resolve_parent_path

    resolve_parent_path(parent)  # raises the one-line "parent ... not found"


def _check_data(d, workdir: Path) -> None:
    if d.path is None:
        return  # the parent writes its own text
    path = Path(d.path).expanduser()
    if path.exists():
        return
    # the same rule prepare_data applies: what looks like a path is one, anything else a hub dataset name
    if d.path.startswith(("/", ".", "~")) or path.suffix in (".txt", ".jsonl", ".json", ".parquet"):
        raise PuzzleError(f"data.path {d.path!r} does not exist (a .txt/.jsonl/.parquet file or folder, "
                          "or a Hugging Face dataset name)")
    from .eval.data import hub_problem

    if any((workdir / "data").glob("tokens-*.safetensors")):
        return  # tokenized before: prepare_data may not need the hub again
    reason = hub_problem()
    if reason:
        raise PuzzleError(f"data.path {d.path!r} is not a local path, so it is a Hugging Face dataset, and the hub "
                          f"is not usable ({reason}); give a local file or folder")


def check_eval_inputs(e, lm_eval: bool = True) -> None:
    """WikiText-2 and the lm-eval tasks of eval config `e` reachable, lm-eval installed, task names known."""
    from .eval.data import local_task_files, resolve_eval_data, unknown_lm_eval_tasks

    tasks = list(e.tasks) if lm_eval else []
    if tasks and importlib.util.find_spec("lm_eval") is None:
        raise PuzzleError("eval.tasks needs lm-eval, which is not installed: pip install -e '.[eval]' "
                          "(or set eval.tasks: [] to skip the tasks)")
    data = resolve_eval_data(e)
    problem = data.problem(tasks)
    if problem:
        raise PuzzleError(problem)
    other = [t for t in tasks if t not in local_task_files()]
    if other:  # known to lm-eval? (its task index takes ~10 s to build: only when a name needs it)
        unknown = unknown_lm_eval_tasks(other)
        if unknown:
            raise PuzzleError(f"eval.tasks: {', '.join(map(repr, unknown))} {'is' if len(unknown) == 1 else 'are'} "
                              "not an lm-eval task or group (list them with `lm-eval ls tasks`)")
