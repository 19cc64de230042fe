"""Choose among the search's diverse solutions by measured quality (gkd.solution: auto).

    puzzlenas realize CONFIG --workdir W        # with gkd.solution: auto (the default)

The summed replace-1-block damage ranks alternatives well but the K diverse solutions poorly:
their predicted damages differ by less than the error of that sum. So each candidate is
assembled from the library (no GKD) and its KL to the parent measured on held-out text of two
kinds, then the lowest mixed KL is carried forward:

  domain      the data stage's validation sequences that evaluation does not use
              (val[eval.kl_sequences:]; all of val, flagged, when none are left)
  wikitext2   as many sequences of data.seq_len tokens from the end of the WikiText-2 raw test
              file (the eval data location: eval.task_data_dir, else $PUZZLENAS_DATA); eval's
              perplexity reads the file's first eval.ppl_max_tokens tokens, so the two do not
              overlap unless the file is short or ppl_max_tokens is None (flagged)

mixed = the mean of the per-source KLs (each source weighs the same). Without WikiText-2 the
choice rests on domain text alone, and search/selection.json says so.

Results per candidate are kept in search/selection.partial.json as they are measured, so a
killed realize resumes after the last measured candidate; search/selection.json is written last.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch

from ..errors import PuzzleError
from ..utils import atomic_write_json, fingerprint
from ..workdir import (
    SELECTION,
    SELECTION_PARTIAL,
    Candidate,
    Selection,
    read_selection,
    read_solutions,
    write_selection,
)

log = logging.getLogger(__name__)

MAX_SEQUENCES = 64  # per source: enough to rank K children, seconds even at 8B


def solutions_fingerprint(workdir: Path) -> str:
    """Identity of the search result that a selection was made from (layers of every solution)."""
    return fingerprint(read_solutions(workdir).layers_json())


def chosen_solution(cfg, workdir: str | Path) -> int:
    """The search solution that realize, GKD and eval use: gkd.solution when it is a number, else
    (auto) the one search/selection.json chose from the current search result."""
    k = cfg.gkd.solution
    if k != "auto":
        return int(k)
    path = Path(workdir) / SELECTION
    if not path.is_file():
        raise PuzzleError(f"gkd.solution=auto: {path} not found; run `puzzlenas realize` first "
                          "(it measures the candidate solutions and picks one)")
    selection = read_selection(workdir)
    if selection.solutions_fingerprint != solutions_fingerprint(Path(workdir)):
        raise PuzzleError(f"{path} was made from an earlier search result; rerun `puzzlenas realize`")
    return selection.chosen


def selection_sequences(cfg, val: torch.Tensor, tokenizer) -> tuple[dict[str, torch.Tensor], dict]:
    """The held-out token sequences per source, (n, seq_len) int64 each, and what they are."""
    from ..eval.data import resolve_eval_data

    kl = cfg.eval.kl_sequences
    seq_len = val.shape[1]
    if len(val) > kl:
        domain = val[kl : kl + MAX_SEQUENCES]
        sources = {"domain": {"what": f"data validation sequences {kl}..{kl + len(domain) - 1} "
                                      f"(eval's KL uses 0..{kl - 1})", "overlaps_eval": False}}
    else:
        domain = val[:MAX_SEQUENCES]
        sources = {"domain": {"what": f"all {len(domain)} data validation sequences; eval's KL uses the same "
                                      f"(data.val_sequences={len(val)} <= eval.kl_sequences={kl})",
                              "overlaps_eval": True}}
    seqs = {"domain": domain}
    sources["domain"].update(sequences=len(domain), tokens=int(domain.numel()))
    data = resolve_eval_data(cfg.eval)
    why_not = None
    if data.local is None:
        why_not = "no local evaluation data (eval.task_data_dir and $PUZZLENAS_DATA unset)"
    else:
        why_not = data.problem([], wikitext=True)
    if why_not is None and tokenizer is None:
        why_not = "the parent has no tokenizer"
    if why_not is None:
        ids = tokenizer(data.wikitext_text(), return_tensors="pt").input_ids[0]
        n = min(len(domain), len(ids) // seq_len)
        if n == 0:
            why_not = f"the WikiText-2 test file has fewer than {seq_len} tokens"
        else:
            start = len(ids) - n * seq_len
            seqs["wikitext2"] = ids[start:].reshape(n, seq_len).long()
            ppl_end = len(ids) if cfg.eval.ppl_max_tokens is None else min(len(ids), cfg.eval.ppl_max_tokens)
            sources["wikitext2"] = {"what": f"WikiText-2 raw test tokens {start}..{len(ids) - 1} ({data.source})",
                                    "sequences": n, "tokens": n * seq_len, "overlaps_eval": start < ppl_end}
    if why_not is not None:
        sources["wikitext2"] = {"unavailable": why_not}
        log.warning("selection: WikiText-2 not used (%s); choosing on domain text only", why_not)
    return seqs, sources


def measure(child, parent, seqs: dict[str, torch.Tensor], batch_size: int) -> dict:
    """KL(parent || child) and top-1 agreement per source, and their means over the sources."""
    from ..eval import kl_and_agreement

    per = {name: kl_and_agreement(child, parent, ids, batch_size) for name, ids in seqs.items()}
    kl = {name: r["kl"] for name, r in per.items()}
    agreement = {name: r["agreement"] for name, r in per.items()}
    kl["mixed"] = sum(kl.values()) / len(kl)
    agreement["mixed"] = sum(agreement.values()) / len(agreement)
    return {"kl": kl, "agreement": agreement}


def select(cfg, workdir: str | Path, parent, build_child, val: torch.Tensor, tokenizer) -> Selection:
    """Measure every search solution's child (`build_child(solution)`: assembled from the library)
    and write search/selection.json; returns it."""
    from ..workdir import output_fingerprint

    workdir = Path(workdir)
    solutions = read_solutions(workdir).solutions
    seqs, sources = selection_sequences(cfg, val, tokenizer)
    # the candidates, their blocks and the text: a partial result of other inputs is measured again
    key = fingerprint(solutions_fingerprint(workdir), output_fingerprint(workdir, "library/index.json"),
                      *[seqs[s] for s in sorted(seqs)])
    partial_file = workdir / SELECTION_PARTIAL
    done: dict = {}
    if partial_file.is_file():
        with contextlib.suppress(OSError, ValueError, AttributeError):  # unreadable: measure again
            with_key = json.loads(partial_file.read_text())
            if with_key.get("key") == key:  # same candidates, same text: keep what was measured
                done = dict(with_key["candidates"])
    parent.eval()
    for s in solutions:
        rank = str(s.rank)
        if rank in done:
            continue
        log.info("selection: measuring solution %s of %d", rank, len(solutions))
        child = build_child(s)
        done[rank] = measure(child, parent, seqs, cfg.eval.batch_size)
        del child
        atomic_write_json(partial_file, {"key": key, "candidates": done})
    candidates = [Candidate(s.rank, s.predicted_speedup, s.damage, **done[str(s.rank)]) for s in solutions]
    # lowest mixed KL; on a tie the better predicted rank (candidates are in rank order)
    best = min(candidates, key=lambda c: c.kl["mixed"])
    predicted = min(candidates, key=lambda c: c.damage)
    used = " + ".join(n for n in seqs)
    reason = (f"lowest mixed KL to the parent ({best.kl['mixed']:.4g}) on {used} text, measured before GKD")
    if best.rank != predicted.rank:
        reason += (f"; the lowest predicted damage, solution {predicted.rank}, measured "
                   f"{predicted.kl['mixed']:.4g}")
    selection = Selection(best.rank, reason, predicted.rank, "wikitext2" not in seqs, sources, f"mean of {used} KL",
                          solutions_fingerprint(workdir), tuple(candidates))
    write_selection(workdir, selection)
    partial_file.unlink(missing_ok=True)
    log.info("selection: solution %d (%s)", best.rank, reason)
    return selection


def format_selection(selection: Selection) -> str:
    """A markdown table of the candidates: predicted speed-up and damage, measured KL and agreement."""
    names = [n for n in ("domain", "wikitext2") if n in selection.candidates[0].kl]
    head = ["solution", "predicted speed-up", "predicted damage"] + [f"KL {n}" for n in names] + ["KL mixed",
                                                                                                   "agreement mixed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in selection.candidates:
        mark = " (chosen)" if c.rank == selection.chosen else ""
        row = [f"{c.rank}{mark}", f"{c.predicted_speedup:.2f}x", f"{c.damage:.4g}"]
        row += [f"{c.kl[n]:.4g}" for n in names] + [f"{c.kl['mixed']:.4g}", f"{c.agreement['mixed']:.3f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
