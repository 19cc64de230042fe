"""Where evaluation data comes from: a local copy when one is configured, else the Hugging Face hub.

    data = resolve_eval_data(cfg.eval)           # EvalData(local=Path or None, source="...")
    problem = data.problem(cfg.eval.tasks)       # None, or one line: what is missing and how to fix it
    text = data.wikitext_text()                  # the WikiText-2 raw test set, byte for byte

The first of these that is set wins:
  1. eval.task_data_dir   a folder named in the config: whoever writes one means it
  2. $PUZZLENAS_DATA      the machine's copy, set once (tests, CI and machines without network)
  3. the hub              WikiText-2 from the `Salesforce/wikitext` dataset (wikitext-2-raw-v1, test split) and
                          every task from lm-eval's own configs, downloaded on first use and cached by `datasets`
There is no default relative to the current folder: a run started from another folder would only find out
in its eval stage, after everything expensive.

A local folder holds wikitext-2-raw/wiki.test.raw and the files of the shipped tasks (tasks/*.yaml:
lambada_openai, arc_challenge, boolq, openbookqa; the layout of ../shared/data). Any other lm-eval task name
(mmlu, hellaswag, gsm8k, ...) is read from the hub, local folder or not.
"""

from __future__ import annotations

import functools
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from ..errors import PuzzleError

ENV = "PUZZLENAS_DATA"
TASK_DIR = Path(__file__).parent / "tasks"
WIKITEXT_FILE = Path("wikitext-2-raw") / "wiki.test.raw"
WIKITEXT_HUB = ("Salesforce/wikitext", "wikitext-2-raw-v1")  # the hub's id for the `wikitext` dataset since 2024
FIX = f"set {ENV}=/path/to/data (or eval.task_data_dir) to a local copy such as the project's shared/data"


def local_task_files() -> dict[str, Path]:
    """Shipped task -> its data file relative to a local data folder, read from the template itself
    so the check and the template cannot disagree."""
    files = {}
    for template in sorted(TASK_DIR.glob("*.yaml")):
        m = re.search(r"\{data_dir\}/([^\"'\s]+)", template.read_text())
        if m:
            files[template.stem] = Path(m.group(1))
    return files


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")  # huggingface_hub's reading


@functools.lru_cache(maxsize=1)
def hub_problem() -> str | None:
    """Why the hub cannot be used from here, or None. A TCP connection to the endpoint (or the HTTPS
    proxy) within 3 s: cheap, and it fails at once on a machine without network instead of after
    `datasets` has retried for minutes. Cached: one probe per process."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if _truthy(name):
            return f"{name}={os.environ[name]}"
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urlparse(proxy or os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as exc:
        return f"{host}:{port} is unreachable: {exc.strerror or type(exc).__name__}"
    return None


@dataclass(frozen=True)
class EvalData:
    local: Path | None  # None: the hub
    source: str  # where `local` came from, for messages

    def has_local(self, task: str) -> bool:
        return self.local is not None and task in local_task_files()

    def hub_tasks(self, tasks: list[str]) -> list[str]:
        return [t for t in tasks if not self.has_local(t)]

    def problem(self, tasks: list[str], wikitext: bool = True) -> str | None:
        """One line naming what evaluation needs and cannot reach (and how to fix it), or None."""
        if self.local is not None:
            if not self.local.is_dir():
                return f"evaluation data folder {self.local} ({self.source}) does not exist; {FIX}"
            needed = [WIKITEXT_FILE] if wikitext else []
            files = local_task_files()
            needed += [files[t] for t in tasks if t in files]  # in the order the config lists them
            missing = [str(self.local / f) for f in needed if not (self.local / f).is_file()]
            if missing:
                return (f"evaluation file {missing[0]} not found" + (f" (and {len(missing) - 1} more)" if len(missing) > 1
                        else "") + f" in {self.source}; point it at a complete copy, or {FIX}")
        hub = self.hub_tasks(tasks)
        if self.local is None and wikitext:
            hub = ["wikitext-2", *hub]
        if not hub:
            return None
        reason = hub_problem()
        if reason is None:
            return None
        if self.local is None:
            return (f"evaluation data: no local copy is configured (eval.task_data_dir and {ENV} unset) and the "
                    f"Hugging Face hub is not usable ({reason}); {FIX}, or run where the hub is reachable")
        return (f"eval.tasks: {', '.join(hub)} {'has' if len(hub) == 1 else 'have'} no local copy in {self.source} "
                f"(local tasks: {', '.join(local_task_files())}) and the Hugging Face hub is not usable ({reason}); "
                f"remove {'it' if len(hub) == 1 else 'them'} from eval.tasks or run where the hub is reachable")

    def wikitext_text(self) -> str:
        """The WikiText-2 raw test set as the canonical wiki.test.raw file, from either source."""
        if self.local is not None:
            path = self.local / WIKITEXT_FILE
            if not path.is_file():
                raise PuzzleError(f"WikiText-2 test file {path} not found ({self.source}); {FIX}")
            return path.read_text(encoding="utf-8")
        try:
            import datasets
        except ImportError:
            raise PuzzleError("WikiText-2 from the hub needs the `datasets` package: pip install -e '.[eval]'") from None
        try:
            rows = datasets.load_dataset(*WIKITEXT_HUB, split="test")["text"]
        except Exception as exc:  # the hub raises many types; all mean "cannot get it"
            raise PuzzleError(f"WikiText-2 could not be loaded from the hub ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}); {FIX}") from None
        return wikitext_from_rows(rows)


def wikitext_from_rows(rows: list[str]) -> str:
    """The hub's rows (one per line of wiki.test.raw, each non-empty row keeps its "\\n", blank lines are
    empty rows) back into the file's bytes, where a blank line is " \\n": the same text, hence the
    same tokens and perplexity, whichever source was used."""
    return "".join(row if row else " \n" for row in rows)


def resolve_eval_data(e) -> EvalData:
    """`e`: the eval config section. Explicit config > $PUZZLENAS_DATA > the hub (module docstring)."""
    if e.task_data_dir:
        return EvalData(Path(e.task_data_dir).expanduser().resolve(), f"eval.task_data_dir={e.task_data_dir}")
    env = os.environ.get(ENV, "").strip()
    if env:
        return EvalData(Path(env).expanduser().resolve(), f"{ENV}={env}")
    return EvalData(None, "the Hugging Face hub")


def unknown_lm_eval_tasks(names: list[str]) -> list[str]:
    """Those of `names` that lm-eval knows neither as a task nor as a group (indexing its task configs
    takes ~10 s: asked only for names that are not shipped here)."""
    from lm_eval.tasks import TaskManager

    known = set(TaskManager().all_tasks)
    return [n for n in names if n not in known]
