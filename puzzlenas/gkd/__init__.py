"""Global knowledge distillation (GKD): fine-tune the whole child against the frozen parent.

    puzzlenas distill CONFIG --workdir W
    torchrun --nproc-per-node 2 -m puzzlenas distill CONFIG --workdir W

loss = kl_weight * KL(parent || child) over next-token distributions
     + cosine_weight * mean over layers of (1 - cos(h_child, h_parent)) after each layer
     + lm_weight * next-token cross-entropy (off by default)
(the Puzzle paper found KL + hidden-state cosine best; LM loss alone drifts from the parent).

Token budget, AdamW, linear warm-up + cosine decay, gradient accumulation, bf16 autocast where
supported, validation KL every `val_every` steps, atomic checkpoints every `checkpoint_every`
steps (weights + optimizer + step) with automatic resume, and DDP under torchrun: the global
batch is split across ranks, so N processes compute what one process with the same config does.

Reads workdir/realized/solution<k>/, writes workdir/child/ (the distilled checkpoint) and
workdir/gkd/log.jsonl. The state file is loaded with `weights_only=True`: a file that would run
code is refused. gkd/done.json records the child's fingerprint: a child that went missing or
changed is distilled again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..bld import batch_indices
from ..checkpoint.io import load_checkpoint, save_checkpoint
from ..errors import PuzzleError
from ..utils import atomic_torch_save, autocast_dtype, load_training_state, warmup_cosine_lr

log = logging.getLogger(__name__)


def lr_at(step: int, total: int, cfg) -> float:
    return warmup_cosine_lr(step, total, cfg.lr, cfg.warmup_fraction, cfg.min_lr_fraction)


def distill_loss(child_out, parent_out, input_ids, cfg) -> tuple[torch.Tensor, dict]:
    """Per-token mean KL(parent || child) + mean hidden cosine distance (+ optional LM loss)."""
    child_logp = F.log_softmax(child_out.logits[:, :-1].float(), dim=-1)
    parent_logp = F.log_softmax(parent_out.logits[:, :-1].float(), dim=-1)
    kl = F.kl_div(child_logp, parent_logp, log_target=True, reduction="none").sum(-1).mean()
    # hidden_states[0] is the shared embedding; compare after every layer
    cos = torch.stack([
        (1 - F.cosine_similarity(hc.float(), hp.float(), dim=-1)).mean()
        for hc, hp in zip(child_out.hidden_states[1:], parent_out.hidden_states[1:])
    ]).mean()
    loss = cfg.kl_weight * kl + cfg.cosine_weight * cos
    lm = None
    if cfg.lm_weight > 0:
        lm = F.nll_loss(child_logp.flatten(0, 1), input_ids[:, 1:].flatten())
        loss = loss + cfg.lm_weight * lm
    return loss, {"kl": kl.item(), "cos": cos.item(), **({"lm": lm.item()} if lm is not None else {})}


def validation_kl(child, parent, val_ids: torch.Tensor, batch_size: int = 8) -> float:
    """Mean per-token KL(parent || child) on validation sequences, fp32, in eval mode."""
    from ..evaluate import kl_and_agreement

    was_training = child.training
    child.eval()
    kl = kl_and_agreement(child, parent, val_ids, batch_size)["kl"]
    child.train(was_training)
    return kl


def _checkpoint_ids(path: Path) -> tuple[str, str]:
    """(content id, legacy id) of a source checkpoint: the content id survives a re-save of the
    same weights; the legacy id (file stamps) is what done.json / state.pt recorded before."""
    from ..utils import fingerprint
    from ..workdir import path_fingerprint

    files = sorted(path.glob("*.safetensors"))
    legacy = fingerprint((path / "config.json").read_text(), [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files])
    return path_fingerprint(path), legacy


def _read_done(path: Path) -> dict:
    try:
        done = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        return {}  # unreadable: distill again (the old file is overwritten only when that finishes)
    return done if isinstance(done, dict) else {}


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def run(cfg, workdir: str | Path, parent, data, tokenizer=None, progress: bool = True) -> Path:
    """Distill workdir/realized/solution<k> into workdir/child; resumes after a kill."""
    workdir = Path(workdir)
    source = workdir / "realized" / f"solution{cfg.gkd.solution}"
    return distill(cfg, source, workdir / "child", workdir / "gkd", parent, data, tokenizer, progress)


def distill(cfg, source: Path, out: Path, state_dir: Path, parent, data, tokenizer=None, progress: bool = True) -> Path:
    """Distill the checkpoint in `source` into `out`; state, log and done marker in `state_dir`."""
    g = cfg.gkd
    rank, world = _dist()
    done_file = state_dir / "done.json"
    if not (source / "config.json").is_file():
        raise PuzzleError(f"{source} not found; run `puzzlenas realize` first")
    source_ids = _checkpoint_ids(source)  # a re-realized source (new solution, same path) restarts GKD
    source_id = source_ids[0]
    if done_file.is_file() and (out / "config.json").is_file():
        from ..workdir import path_fingerprint

        done = _read_done(done_file)
        if done.get("source_id") in source_ids and done.get("child_fingerprint") in (None, path_fingerprint(out)):
            return out
    if g.batch_size % world:
        raise PuzzleError(f"gkd.batch_size={g.batch_size} must be divisible by the {world} torchrun processes")
    device = next(parent.parameters()).device
    child = load_checkpoint(source).to(device)
    child.train()
    seq_len = data.train.shape[1]
    tokens_per_step = g.batch_size * g.grad_accum * seq_len
    total_steps = max(1, math.ceil(g.tokens / tokens_per_step))
    state_file = state_dir / "state.pt"
    optimizer = torch.optim.AdamW(child.parameters(), lr=g.lr, weight_decay=g.weight_decay)
    step, history = 0, []
    if state_file.is_file():
        state = load_training_state(state_file, map_location=device)
        if state.get("total_steps") == total_steps and state.get("source_id") in source_ids:
            child.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optim"])
            step, history = state["step"], state["history"]
            if rank == 0:
                log.info("resuming GKD from step %d/%d", step, total_steps)
    model = child
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(child)
    amp = autocast_dtype(g.dtype, device)
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp is not None else contextlib.nullcontext
    if step == 0 and rank == 0:
        history.append({"step": 0, "val_kl": validation_kl(child, parent, data.val[: cfg.eval.kl_sequences])})
    bar = tqdm(total=total_steps, initial=step, desc="GKD", unit="step", disable=not progress or rank != 0,
               dynamic_ncols=True)
    t0, done_here = time.perf_counter(), 0
    per_rank = g.batch_size // world
    while step < total_steps:
        lr = lr_at(step, total_steps, g)
        for group in optimizer.param_groups:
            group["lr"] = lr
        parts = {}
        for micro in range(g.grad_accum):
            idx = batch_indices(step * g.grad_accum + micro, g.batch_size, len(data.train), cfg.seed + 1)
            ids = data.train[idx[rank * per_rank : (rank + 1) * per_rank]].to(device)
            with torch.no_grad(), autocast():
                parent_out = parent(ids, use_cache=False, output_hidden_states=True)
            sync = model.no_sync() if world > 1 and micro < g.grad_accum - 1 else contextlib.nullcontext()
            with sync, autocast():
                child_out = model(ids, use_cache=False, output_hidden_states=True)
                loss, parts = distill_loss(child_out, parent_out, ids, g)
                (loss / g.grad_accum).backward()
        if g.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(child.parameters(), g.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        done_here += 1
        elapsed = time.perf_counter() - t0
        bar.set_postfix_str(f"kl {parts['kl']:.4f} | cos {parts['cos']:.4f} | "
                            f"{done_here * tokens_per_step / elapsed:,.0f} tok/s | lr {lr:.1e}")
        bar.update(1)
        entry = {"step": step, "lr": lr, **parts}
        if rank == 0 and (step % g.val_every == 0 or step == total_steps):
            entry["val_kl"] = validation_kl(child, parent, data.val[: cfg.eval.kl_sequences])
        history.append(entry)
        if rank == 0 and (step % g.checkpoint_every == 0 or step == total_steps):
            atomic_torch_save({"model": child.state_dict(), "optim": optimizer.state_dict(), "step": step,
                               "total_steps": total_steps, "source_id": source_id, "history": history}, state_file)
        if world > 1:
            dist.barrier()
    bar.close()
    if rank == 0:
        child.eval()
        save_checkpoint(child, out, tokenizer, overwrite=True)  # the work directory's own folder
        from ..utils import atomic_write_json, atomic_write_text
        from ..workdir import path_fingerprint

        atomic_write_text(state_dir / "log.jsonl", "".join(json.dumps(h) + "\n" for h in history))
        atomic_write_json(done_file, {"source": str(source), "source_id": source_id, "child_fingerprint": path_fingerprint(out),
                                      "steps": total_steps, "tokens": total_steps * tokens_per_step,
                                      "seconds": round(time.perf_counter() - t0, 1),
                                      "val_kl_before": history[0].get("val_kl"), "val_kl_after": history[-1].get("val_kl")})
        state_file.unlink(missing_ok=True)
    if world > 1:
        dist.barrier()
    return out
