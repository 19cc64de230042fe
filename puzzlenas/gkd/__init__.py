"""Global knowledge distillation (GKD): fine-tune the whole child against the frozen parent.

    puzzlenas distill CONFIG --workdir W
    torchrun --nproc-per-node 2 -m puzzlenas distill CONFIG --workdir W

loss = kl_weight * KL(parent || child) over next-token distributions
     + cosine_weight * mean over layers of (1 - cos(h_child, h_parent)) after each layer
     + lm_weight * next-token cross-entropy (off by default)
(the Puzzle paper found KL + hidden-state cosine best; LM loss alone drifts from the parent).

Token budget, AdamW (`gkd.optim`), linear warm-up + cosine decay, gradient accumulation, bf16
autocast where the device runs it natively, validation KL every `val_every` steps, checkpoints
every `checkpoint_every` steps (weights + optimizer + step) with automatic resume, optional
activation checkpointing. The plumbing is shared with BLD (`puzzlenas.training`).

Under torchrun the child is sharded with FSDP2 (fully_shard per decoder layer + root; bf16 as
its mixed-precision policy), the parent too (`gkd.teacher: shard`) or copied whole per rank
(`replicate`); the global batch is split across ranks, so N processes compute what one does.
Sharded runs checkpoint with torch.distributed.checkpoint under gkd/sharded/step-N/ (any world
size resumes it) and gather the child into one ordinary checkpoint folder at the end.

Reads workdir/realized/solution<k>/, writes workdir/child/ (the distilled checkpoint) and
workdir/gkd/log.jsonl. The state file is loaded with `weights_only=True`: a file that would run
code is refused. gkd/done.json records the child's fingerprint: a child that went missing or
changed is distilled again.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..checkpoint.io import load_checkpoint, save_checkpoint
from ..errors import PuzzleError
from ..library.space import SUBBLOCK_MODULES
from ..training import (
    adamw,
    autocast,
    autocast_dtype,
    barrier,
    batch_indices,
    fsdp,
    load_state,
    lr_at,
    optimizer_step,
    rank_share,
    rank_world,
    save_state,
)
from ..training import state as states

log = logging.getLogger(__name__)


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
    from ..eval import kl_and_agreement

    was_training = child.training
    child.eval()
    with torch.no_grad():  # no graph: FSDP would wait for a backward that never comes
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


# GKD settings that only decide where and how often work is saved or logged, or how memory is
# spent, never what the distilled weights are
_NOT_IN_RECIPE = ("solution", "teacher", "offload", "activation_checkpointing", "val_every", "checkpoint_every")


# GKD settings added later, at the value that trains what the runs before them trained: left out of
# the recipe there, so a finished child stays finished
_RECIPE_NEUTRAL = {"untouched_lr_scale": 1.0}


def untouched_parameters(child, parent_config) -> set[str]:
    """Names of the child's parameters it shares with the parent: the embeddings, final norm and
    head, and every sub-block (norm included) whose configuration is the parent's. A sub-block of
    the parent's shape inside a coupled BLD pair counts as untouched too (its config says nothing
    of where its weights came from)."""
    names = set()
    for name, _ in child.named_parameters():
        parts = name.split(".")
        if parts[:2] != ["model", "layers"]:
            names.add(name)
            continue
        layer, module = int(parts[2]), parts[3]
        sub = next((sub for sub, modules in SUBBLOCK_MODULES.items() if module in modules), None)
        if sub is None:
            raise PuzzleError(f"GKD: parameter {name} belongs to no attention or FFN sub-block")
        # BlockConfig's fields are named as the sub-blocks are: .attention, .ffn
        if getattr(child.config.block_configs[layer], sub) == getattr(parent_config.block_configs[layer], sub):
            names.add(name)
    return names


def parameter_groups(child, untouched: set[str], untouched_lr_scale: float) -> list[dict]:
    """AdamW groups: the new blocks at the full learning rate, the untouched parameters at
    untouched_lr_scale of it (frozen ones, requires_grad False, are left out)."""
    if untouched_lr_scale == 1:  # one group, in the order the optimizer state had before groups
        return [{"params": [p for p in child.parameters() if p.requires_grad]}]
    new = [p for n, p in child.named_parameters() if n not in untouched and p.requires_grad]
    shared = [p for n, p in child.named_parameters() if n in untouched and p.requires_grad]
    groups = [{"params": new}, {"params": shared, "lr_scale": untouched_lr_scale}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise PuzzleError("GKD: nothing to train (the child is the parent and gkd.untouched_lr_scale is 0)")
    return groups


def recipe_id(cfg, data) -> str:
    """What decides the distilled weights besides the source checkpoint: the training settings, the
    data and the seed. A finished child or a saved state is reused only for the same recipe, so
    `--set gkd.tokens=...` on a finished run distills again instead of keeping the old child."""
    from ..utils import fingerprint

    settings = {k: v for k, v in cfg.gkd.model_dump(mode="json").items()
                if k not in _NOT_IN_RECIPE and not (k in _RECIPE_NEUTRAL and v == _RECIPE_NEUTRAL[k])}
    return fingerprint(settings, cfg.seed, getattr(data, "fingerprint", None), tuple(data.train.shape))


def _read_done(path: Path) -> dict:
    try:
        done = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        return {}  # unreadable: distill again (the old file is overwritten only when that finishes)
    return done if isinstance(done, dict) else {}


def run(cfg, workdir: str | Path, parent, data, tokenizer=None, progress: bool = True) -> Path:
    """Distill workdir/realized/solution<k> into workdir/child; resumes after a kill."""
    from ..realize.selection import chosen_solution
    from ..workdir import realized_dir

    workdir = Path(workdir)
    source = workdir / realized_dir(chosen_solution(cfg, workdir))
    return distill(cfg, source, workdir / "child", workdir / "gkd", parent, data, tokenizer, progress)


def distill(cfg, source: Path, out: Path, state_dir: Path, parent, data, tokenizer=None, progress: bool = True) -> Path:
    """Distill the checkpoint in `source` into `out`; state, log and done marker in `state_dir`.

    Under torchrun (world > 1) the parent is sharded in place when gkd.teacher is "shard"."""
    g = cfg.gkd
    rank, world = rank_world()
    sharded = world > 1
    done_file = state_dir / "done.json"
    if not (source / "config.json").is_file():
        raise PuzzleError(f"{source} not found; run `puzzlenas realize` first")
    source_ids = _checkpoint_ids(source)  # a re-realized source (new solution, same path) restarts GKD
    source_id = source_ids[0]
    recipe = recipe_id(cfg, data)
    if done_file.is_file() and (out / "config.json").is_file():
        from ..workdir import path_fingerprint

        done = _read_done(done_file)
        # a done.json from before recipes were recorded: distill again, the settings may have changed
        if (done.get("source_id") in source_ids and done.get("recipe") == recipe
                and done.get("child_fingerprint") in (None, path_fingerprint(out))):
            return out
        if rank == 0:
            log.info("%s was distilled from another source or with other settings; distilling again", out)
    if g.batch_size % world:
        raise PuzzleError(f"gkd.batch_size={g.batch_size} must be divisible by the {world} torchrun processes")
    device = next(parent.parameters()).device
    amp_dtype = autocast_dtype(g.dtype, device)
    # sharded: loaded on the CPU, each layer moves to the device as it is sharded (never the whole child)
    child = load_checkpoint(source).to("cpu" if sharded else device)
    child.train()
    untouched = untouched_parameters(child, parent.config)
    if g.untouched_lr_scale == 0:  # before sharding: fully_shard keeps each parameter's requires_grad
        for name, param in child.named_parameters():
            param.requires_grad_(name not in untouched)
    if g.activation_checkpointing:
        fsdp.checkpoint_activations(child)
    if sharded:
        mesh = fsdp.mesh()
        fsdp.shard(child, amp_dtype, mesh, offload=g.offload)
        if g.teacher == "shard":
            parent.requires_grad_(False)
            fsdp.shard(parent, amp_dtype, mesh)
    seq_len = data.train.shape[1]
    tokens_per_step = g.batch_size * g.grad_accum * seq_len
    total_steps = max(1, math.ceil(g.tokens / tokens_per_step))
    optimizer = adamw(parameter_groups(child, untouched, g.untouched_lr_scale), g.optim)
    step, history = 0, []
    if not sharded:
        step, history = _resume_single(state_dir, child, optimizer, recipe, source_ids, device)
    if not step:  # torchrun's sharded state: resumed on any number of processes (DCP reshards)
        step, history = _resume_sharded(state_dir, child, optimizer, recipe, source_ids, device)
    if step and rank == 0:
        log.info("resuming GKD from step %d/%d", step, total_steps)
    if not step and sharded and rank == 0 and (state_dir / "state.pt").is_file():
        log.warning("not resuming %s under torchrun (it was written by one process); starting over", state_dir / "state.pt")
    amp = autocast(g.dtype, device)
    val_ids = data.val[: cfg.eval.kl_sequences]
    if step == 0:
        history.append({"step": 0, "val_kl": validation_kl(child, parent, val_ids)})
    bar = tqdm(total=total_steps, initial=step, desc="GKD", unit="step", disable=not progress or rank != 0,
               dynamic_ncols=True)
    t0, done_here = time.perf_counter(), 0
    while step < total_steps:
        lr = lr_at(step, total_steps, g.optim)
        for micro in range(g.grad_accum):
            idx = batch_indices(step * g.grad_accum + micro, g.batch_size, len(data.train), cfg.seed + 1)
            ids = data.train[rank_share(idx, rank, world)].to(device)
            with torch.no_grad(), amp():
                parent_out = parent(ids, use_cache=False, output_hidden_states=True)
            if sharded:  # reduce-scatter the gradients only after the last micro-batch
                child.set_requires_gradient_sync(micro == g.grad_accum - 1)
            with amp():
                child_out = child(ids, use_cache=False, output_hidden_states=True)
                loss, parts = distill_loss(child_out, parent_out, ids, g)
                (loss / g.grad_accum).backward()
        optimizer_step(optimizer, child.parameters(), lr, g.optim.grad_clip)
        if sharded:  # the logged loss is the global batch's, as one process would log it
            parts = _mean_over_ranks(parts, world, device)
        step += 1
        done_here += 1
        elapsed = time.perf_counter() - t0
        bar.set_postfix_str(f"kl {parts['kl']:.4f} | cos {parts['cos']:.4f} | "
                            f"{done_here * tokens_per_step / elapsed:,.0f} tok/s | lr {lr:.1e}")
        bar.update(1)
        entry = {"step": step, "lr": lr, **parts}
        if step % g.val_every == 0 or step == total_steps:
            entry["val_kl"] = validation_kl(child, parent, val_ids)
        history.append(entry)
        if step % g.checkpoint_every == 0 or step == total_steps:
            meta = {"total_steps": total_steps, "source_id": source_id, "recipe": recipe, "history": history}
            if sharded:
                states.save_sharded(state_dir / "sharded", step, _sharded_state(child, optimizer), meta)
            elif rank == 0:
                save_state({"model": child.state_dict(), "optim": optimizer.state_dict(), "step": step, **meta},
                           state_dir / "state.pt")
    bar.close()
    weights = fsdp.full_state_dict(child) if sharded else None  # collective: every rank gathers
    if rank == 0:
        if sharded:  # an ordinary, unsharded model to save
            child = load_checkpoint(source)
            child.load_state_dict(weights)
        child.eval()
        save_checkpoint(child, out, tokenizer, overwrite=True)  # the work directory's own folder
        from ..utils import atomic_write_json, atomic_write_text
        from ..workdir import path_fingerprint

        atomic_write_text(state_dir / "log.jsonl", "".join(json.dumps(h) + "\n" for h in history))
        atomic_write_json(done_file, {"source": str(source), "source_id": source_id, "recipe": recipe,
                                      "child_fingerprint": path_fingerprint(out),
                                      "steps": total_steps, "tokens": total_steps * tokens_per_step,
                                      "seconds": round(time.perf_counter() - t0, 1),
                                      "val_kl_before": history[0].get("val_kl"), "val_kl_after": history[-1].get("val_kl")})
        (state_dir / "state.pt").unlink(missing_ok=True)
        import shutil

        shutil.rmtree(state_dir / "sharded", ignore_errors=True)
    if sharded:
        dist.barrier()
    return out


def _resume_single(state_dir: Path, child, optimizer, recipe: str, source_ids, device) -> tuple[int, list]:
    state_file = state_dir / "state.pt"
    if not state_file.is_file():
        return 0, []
    state = load_state(state_file, map_location=device)
    if state.get("recipe") != recipe or state.get("source_id") not in source_ids:
        return 0, []
    child.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optim"])
    return state["step"], state["history"]


def _sharded_state(child, optimizer) -> dict:
    """This rank's shards of the weights and optimizer moments, keyed as DCP stores them."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(child, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def _resume_sharded(state_dir: Path, child, optimizer, recipe: str, source_ids, device) -> tuple[int, list]:
    """Collective: load the newest complete sharded state, if it was written for this run."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    root = state_dir / "sharded"
    if rank_world()[0] == 0:
        states.clean_partial(root)
    barrier()
    folder = states.latest_sharded(root)
    if folder is None:
        return 0, []
    meta = states.read_meta(folder)
    if meta.get("recipe") != recipe or meta.get("source_id") not in source_ids:
        return 0, []
    state = _sharded_state(child, optimizer)
    states.load_sharded(folder, state)
    set_state_dict(child, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return meta["step"], meta["history"]


def _mean_over_ranks(parts: dict, world: int, device) -> dict:
    values = torch.tensor([parts[k] for k in parts], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    return {k: v / world for k, v in zip(parts, values.tolist())}
