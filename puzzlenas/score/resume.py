"""Scoring resumed mid-stage: the sums of the alternatives scored so far, saved while scoring runs.

    scores/replace1.partial/<who>.json   {"key", "batch", "done", "parent_nll", "n_tokens",
                                          "totals": {alternative: {"kl", "nll", "agree", "n"}}}

Scoring walks the validation batches in order and, in each, the alternatives in one fixed order.
The file says where the walk got to: every batch before `batch` is finished, and of batch `batch`
the first `done` alternatives (the parent's own sums of that batch are in when `done` > 0). It is
written atomically at the end of every batch and, inside one, after an alternative once
`score.checkpoint_seconds` have passed since the last write. A rerun reads it, runs the parent over
the batch it stopped in again (to compare with) and goes on with the next alternative.

Exact: the sums are Python floats (float64) and ints, written with the shortest digits that read
back to the same bits, and every alternative's sum is its own, added batch by batch in the same
order; so a resumed run ends with the numbers of an uninterrupted one. `key` covers the scores' own
cache key (library, data, sequences), the batch size and the alternatives walked, in order: a file
written for anything else is ignored and scoring starts over.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from pathlib import Path

from ..utils import atomic_write_json, fingerprint, kill_point
from ..workdir import SCORES

log = logging.getLogger(__name__)

PARTIAL = SCORES.removesuffix(".json") + ".partial"  # scores/replace1.partial/: one file per writer


class ScoreProgress:
    """Where the walk over (batch, alternative) stands, with the sums so far, and its state file
    (`workdir` None: none, nothing is saved or restored).

    begin() gives it the walk: the alternatives in order and `totals`, alternative -> {"kl", "nll",
    "agree", "n"}, the dict scoring adds into (restored in place)."""

    def __init__(self, workdir: str | Path | None = None, who: str = "", key: str = "", every_s: float = 60.0):
        self.file = None if workdir is None else Path(workdir) / PARTIAL / f"{who}.json"
        self.base_key, self.every_s = key, every_s
        self.batch, self.done, self.parent_nll, self.n_tokens = 0, 0, 0.0, 0
        self.ran, self.total = 0, 0  # alternative runs done in this process; in the whole walk

    def begin(self, order: list, totals: dict, batch_size: int, batches: int) -> bool:
        """Start the walk over `batches` batches of `batch_size` sequences and, in each, `order`; True
        when the state file's position and sums were taken up."""
        self.order, self.totals, self.total = order, totals, batches * len(order)
        self.key = fingerprint(self.base_key, batch_size, [a.name for a in order])
        self.last_write = time.monotonic()
        restored = self.file is not None and self.file.is_file() and self._restore()
        self.start = (self.batch, self.done)
        if restored:
            log.info("resuming scoring at batch %d, alternative %d of %d: %d of %d alternative runs done (%s)",
                     self.batch, self.done, len(order), self.position(), self.total, self.file.name)
        return restored

    def _restore(self) -> bool:
        try:
            state = json.loads(self.file.read_text())
            if state.get("key") != self.key:
                log.warning("ignoring %s: written for other alternatives, data or batch size", self.file)
                return False
            by_name = {a.name: a for a in self.order}
            totals = {by_name[name]: dict(sums) for name, sums in state["totals"].items()}
            batch, done, parent_nll, n_tokens = state["batch"], state["done"], state["parent_nll"], state["n_tokens"]
            if set(totals) != set(self.order) or not 0 <= done < len(self.order) or batch < 0:
                raise ValueError(f"position batch {batch}, alternative {done} or its sums do not fit the walk")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:  # an unreadable file: start over
            log.warning("ignoring %s: %s", self.file, exc)
            return False
        for a, sums in totals.items():
            self.totals[a].update(sums)
        self.batch, self.done, self.parent_nll, self.n_tokens = batch, done, parent_nll, n_tokens
        return True

    def position(self) -> int:
        """Alternative runs done so far, over all batches (the progress bar's count)."""
        return self.batch * len(self.order) + self.done

    def start_at(self, batch: int, done: int) -> None:
        """Walk on from (batch, done), the position another process restored (score.parallel=layers)."""
        self.batch, self.done = self.start = (batch, done)

    def skips(self, batch: int, j: int) -> bool:
        """Whether the j-th alternative of `batch` was scored before this run."""
        return (batch, j) < self.start

    def parent_counted(self, batch: int) -> bool:
        """Whether the parent's own sums of `batch` were added before this run (it stopped inside it)."""
        return batch < self.start[0] or (batch == self.start[0] and self.start[1] > 0)

    def advance(self, batch: int, j: int, parent_nll: float, n_tokens: int, save: bool = True) -> None:
        """Alternative j of `batch` is scored (its sums and the parent's added); write the state file
        at the batch's end or when score.checkpoint_seconds have passed."""
        self.ran += 1
        self.batch, self.done = (batch + 1, 0) if j + 1 == len(self.order) else (batch, j + 1)
        self.parent_nll, self.n_tokens = parent_nll, n_tokens
        if save and (self.done == 0 or time.monotonic() - self.last_write >= self.every_s):
            self.save()

    def save(self) -> None:
        if self.file is None:
            return
        atomic_write_json(self.file, {"key": self.key, "batch": self.batch, "done": self.done,
                                      "parent_nll": self.parent_nll, "n_tokens": self.n_tokens,
                                      "totals": {a.name: self.totals[a] for a in self.order}})
        self.last_write = time.monotonic()
        kill_point("score.state", f"batch={self.batch} done={self.done};")


def clear_partial(workdir: str | Path) -> None:
    """Delete the state files once scores/replace1.json holds the result."""
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(Path(workdir) / PARTIAL)
