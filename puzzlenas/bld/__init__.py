"""Blockwise local distillation (BLD): train every alternative to imitate its parent sub-block.

    puzzlenas bld CONFIG --workdir W
    torchrun --nproc-per-node 2 -m puzzlenas bld CONFIG --workdir W

One streaming pass per batch: the frozen parent runs layer by layer and hands each layer's
alternatives the parent's own input to that sub-block (the residual stream) and its output as the
target; each alternative minimizes ||y_child - y_parent||^2 / ||y_parent||^2 (normalized MSE).
The graphs are disjoint, so training them together is exactly training them apart (decoupled
BLD); every alternative has its own AdamW and gradient clipping.

Resumable: each rank checkpoints its alternatives (weights, optimizer, step) atomically every
`bld.checkpoint_every` steps; rerunning the same command continues from there, and finished
blocks (a record in library/blocks/ and an intact block file) are never retrained. A run killed
while saving its blocks at the end saves the rest from its final state on the next start. A
state file is loaded with `weights_only=True`: a file that would run code is refused. With torchrun the alternatives are
split across ranks (gloo on CPU, NCCL on GPU); each rank writes its own blocks, rank 0 the index.

`bld.alternatives_per_pass`: a rank trains its alternatives in groups, one full pass over the
tokens each, so only one group's weights and AdamW state are on the device. Every group sees the
same batches with its own optimizers, so the blocks equal training all at once, bit for bit; a
finished pass is saved, and a rerun resumes in the pass it was killed in.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import PuzzleConfig
from ..library.init import LayerActivations, initialize_unit, trace_parent
from ..library.space import (
    Alternative,
    build_subblock,
    build_unit,
    enumerate_pairs,
    is_parent_alternative,
    target_alternatives,
)
from ..library.store import Library
from ..training import (
    adamw,
    autocast,
    barrier,
    batch_indices,
    load_state,
    lr_at,
    optimizer_step,
    rank_world,
    reduce_int,
    save_state,
)
from ..utils import kill_point, pick_device
from .pipeline import LayerPipeline

log = logging.getLogger(__name__)


def nmse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    pred, target = pred.float(), target.float()
    return (pred - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-12)


@torch.no_grad()
def validation_nmse(blocks: dict[Alternative, torch.nn.Module], parent, val_ids: torch.Tensor, batch_size: int = 8,
                    trace=trace_parent) -> dict:
    """Normalized MSE of each block on validation sequences, in fp32: sum of squared errors over
    all tokens / sum of squared targets. `trace`: trace_parent, or a LayerPipeline rank's."""
    if not blocks and not getattr(trace, "relays", False):
        return {}
    device = next(parent.parameters()).device
    err = {a: 0.0 for a in blocks}
    ref = {a: 0.0 for a in blocks}
    layers = {a.layer for a in blocks}
    by_layer: dict[int, list[Alternative]] = {}
    for a in blocks:
        by_layer.setdefault(a.layer, []).append(a)
    for start in range(0, len(val_ids), batch_size):
        ids = val_ids[start : start + batch_size].to(device)
        for layer, a_in, a_out, f_in, f_out, pe in trace(parent, ids, layers):
            for alt in by_layer[layer]:
                h, y = unit_io(alt, a_in, a_out, f_in, f_out)
                pred = blocks[alt](h, pe).float()
                err[alt] += (pred - y.float()).pow(2).sum().item()
                ref[alt] += y.float().pow(2).sum().item()
    return {a: err[a] / max(ref[a], 1e-12) for a in blocks}


def unit_io(unit, a_in, a_out, f_in, f_out):
    """(input, target) of a unit: a sub-block sees the residual entering it and imitates what the
    parent's sub-block adds; a coupled pair sees the layer's input and imitates the whole layer."""
    if unit.sub == "attention":
        return a_in, a_out
    if unit.sub == "ffn":
        return f_in, f_out
    return a_in, a_out + f_out


def run(cfg: PuzzleConfig, workdir: str | Path, parent, data, parent_fingerprint: str, progress: bool = True) -> Library:
    """Train the library in `workdir/library`; returns it. Safe to call again after a kill."""
    workdir = Path(workdir)
    rank, world = rank_world()
    pipeline = LayerPipeline(parent) if world > 1 and cfg.bld.parallel == "layers" else None
    if pipeline is not None:
        pipeline.drop_others(parent)  # before the move: the device holds this rank's layers only
    device = pick_device()
    parent.to(device)
    library = Library(workdir / "library", parent_fingerprint, data.fingerprint)
    alternatives = target_alternatives(cfg, parent.config)
    trainable = [a for a in alternatives if a.trainable and not is_parent_alternative(a, parent.config)]
    pairs = enumerate_pairs(cfg.bld.coupled, cfg.search_space, parent.config)
    problems = {a: library.block_problem(a) for a in [*trainable, *pairs]}
    for a, problem in problems.items():
        if problem not in (None, "not trained"):
            log.warning("training %s again: %s", a.name, problem)
    per_pass = cfg.bld.alternatives_per_pass
    if pipeline is not None:  # every rank trains what is left of its own layers
        groups = _passes([a for a in problems if pipeline.owns(a.layer)], per_pass, library)
        # every rank relays the stream for the others: all run as many passes as the rank with most
        for k in range(reduce_int(len(groups), "max")):
            _train(cfg, parent, data, library, groups[k] if k < len(groups) else [], rank, world, device, progress,
                   pipeline)
        _finish(library, alternatives, trainable, parent.config, rank)
        return library
    # a run killed while saving its trained blocks: save the rest from its final state (no retraining)
    unsaved = _unsaved_of_finished_state(library.state_dir / f"rank{rank}-of{world}.pt", problems)
    if unsaved:
        log.info("saving %d blocks trained before the last run was killed", len(unsaved))
        _train(cfg, parent, data, library, unsaved, rank, world, device, progress)
    barrier()
    if per_pass is None:
        todo = [a for a in problems if not library.is_done(a)]
        groups = [todo[rank::world]]
    else:  # dealt from all of them, so a rerun after a kill forms the same groups and resumes its pass
        groups = _passes(list(problems)[rank::world], per_pass, library)
    for group in groups:
        if group:
            _train(cfg, parent, data, library, group, rank, world, device, progress)
    _finish(library, alternatives, trainable, parent.config, rank)
    return library


def _passes(alternatives: list, per_pass: int | None, library: Library) -> list[list]:
    """bld.alternatives_per_pass: this rank's alternatives in consecutive groups, each trained over
    the whole token budget on its own, less those already done; groups left empty are dropped."""
    size = per_pass or max(1, len(alternatives))
    groups = [alternatives[i : i + size] for i in range(0, len(alternatives), size)]
    groups = [[a for a in group if not library.is_done(a)] for group in groups]
    groups = [group for group in groups if group]
    if per_pass is not None and len(groups) > 1:
        log.info("BLD in %d passes of at most %d alternatives (bld.alternatives_per_pass)", len(groups), per_pass)
    return groups


def _finish(library: Library, alternatives, trainable, config, rank: int) -> None:
    barrier()
    if rank == 0:
        _record_untrained(library, alternatives, trainable, config)
        library.write_index({"alternatives": [a.name for a in alternatives]})
    barrier()


def _unsaved_of_finished_state(state_file: Path, problems: dict) -> list:
    """The alternatives of this rank's state file that finished training but have no saved block."""
    if not state_file.is_file():
        return []
    state = load_state(state_file, map_location="cpu", mmap=True)  # mmap: reads only what is used
    if state.get("step") != state.get("total_steps"):
        return []
    by_name = {a.name: a for a in problems}
    return [by_name[n] for n in state.get("names", []) if n in by_name and problems[by_name[n]] is not None]


def _record_untrained(library: Library, alternatives, trainable, config) -> None:
    """No-op and parent alternatives need no training; they get a record without a file."""
    from ..utils import atomic_write_json

    for a in alternatives:
        if a in trainable or library.is_done(a):
            continue
        init = "parent" if a.trainable else "no_op"
        atomic_write_json(
            library.record_path(a),
            {"name": a.name, "layer": a.layer, "sub": a.sub, "kind": a.kind, "size": a.size, "init": init,
             "tokens": 0, "file": None},
        )


def steps(bld, seq_len: int) -> int:
    """Optimizer steps of a BLD run (the `bld` config section) over sequences of `seq_len` tokens."""
    return max(1, math.ceil(bld.tokens / (bld.batch_size * seq_len)))


def _train(cfg, parent, data, library: Library, mine: list[Alternative], rank: int, world: int, device, progress,
           pipeline: LayerPipeline | None = None):
    """Train `mine` to the end and save them. With a pipeline, every rank calls this (`mine` may be
    empty) and runs the same passes: a rank relays the passes it does not need itself."""
    bld = cfg.bld
    trace = pipeline or trace_parent
    seq_len = data.train.shape[1]
    total_steps = steps(bld, seq_len)
    state_file = library.state_dir / (f"rank{rank}-of{world}.pt" if pipeline is None else f"rank{rank}-of{world}-layers.pt")
    names = [a.name for a in mine]
    blocks = {a: build_unit(parent.config, a).to(device) for a in mine}
    state = None
    if state_file.is_file() and mine:  # a rank that only relays never resumes a left-over state
        state = load_state(state_file, map_location=device)
        # a state holding more alternatives than are left (the others were saved) resumes those left:
        # every alternative trains on its own graph and optimizer, so a subset trains exactly alike.
        # Passes (bld.alternatives_per_pass) share the file: their groups are disjoint, so pass k+1
        # finds none of its names in a pass-k state and starts afresh
        if not set(names) <= set(state.get("names", [])) or state.get("total_steps") != total_steps:
            log.warning("ignoring %s: it was written for other alternatives or another budget", state_file)
            state = None
        else:
            state["names"] = names
    fresh = state is None and bool(mine)
    others_fresh = pipeline is not None and reduce_int(fresh, "max")  # collective: every rank asks
    if others_fresh and not fresh:
        _fresh_state(cfg, parent, data, {}, [], total_steps, device, trace)  # the others initialize: relay
    if fresh:
        state = _fresh_state(cfg, parent, data, blocks, names, total_steps, device, trace)
        save_state(state, state_file)
    elif state is not None:
        log.info("resuming BLD from step %d/%d (%s)", state["step"], total_steps, state_file.name)
    else:  # a pipeline rank whose layers are all trained: it only relays
        state = {"step": total_steps, "blocks": {}, "optim": {}}
    for a in mine:
        blocks[a].load_state_dict(state["blocks"][a.name])
        blocks[a].train()
    optimizers = {a: adamw(blocks[a].parameters(), bld.optim) for a in mine}
    for a in mine:
        if a.name in state["optim"]:
            optimizers[a].load_state_dict(state["optim"][a.name])
    by_layer: dict[int, list[Alternative]] = {}
    for a in mine:
        by_layer.setdefault(a.layer, []).append(a)
    amp = autocast(bld.dtype, device)
    tokens_per_step = bld.batch_size * seq_len
    bar = tqdm(total=total_steps, initial=state["step"], desc=f"BLD rank {rank}" if world > 1 else "BLD",
               unit="step", disable=not progress, dynamic_ncols=True)
    t0, steps_done = time.perf_counter(), 0
    state["seconds_before"] = state.get("seconds", 0.0)
    # pipeline ranks resumed at different steps: all run from the earliest, those ahead only relay
    first = state["step"] if pipeline is None else reduce_int(state["step"], "min")
    for step in range(first, total_steps):
        training = step >= state["step"]
        lr = lr_at(step, total_steps, bld.optim)
        ids = data.train[batch_indices(step, bld.batch_size, len(data.train), cfg.seed)].to(device)
        losses = []
        with amp():
            stream = trace(parent, ids, set(by_layer) if training else set())
            for layer, a_in, a_out, f_in, f_out, pe in stream:
                layer_loss = 0.0
                for alt in by_layer[layer]:
                    h, y = unit_io(alt, a_in, a_out, f_in, f_out)
                    loss = nmse(blocks[alt](h, pe), y)
                    layer_loss = layer_loss + loss
                    state["train_nmse"][alt.name] = loss.item()
                    losses.append(loss.item())
                layer_loss.backward()  # frees this layer's graphs before the next layer runs
        if not training:
            continue
        for alt in mine:  # each alternative clips and steps on its own (decoupled BLD)
            optimizer_step(optimizers[alt], blocks[alt].parameters(), lr, bld.optim.grad_clip)
        state["step"] += 1
        steps_done += 1
        elapsed = time.perf_counter() - t0
        state["seconds"] = state.get("seconds_before", 0.0) + elapsed
        bar.set_postfix_str(
            f"nmse {sum(losses) / max(1, len(losses)):.4f} | {steps_done * tokens_per_step / elapsed:,.0f} tok/s | lr {lr:.1e}"
        )
        bar.update(1)
        if state["step"] % bld.checkpoint_every == 0 or state["step"] == total_steps:
            state["blocks"] = {a.name: blocks[a].state_dict() for a in mine}
            state["optim"] = {a.name: optimizers[a].state_dict() for a in mine}
            save_state(state, state_file)
    bar.close()
    for b in blocks.values():
        b.eval()
    final_val = validation_nmse(blocks, parent, data.val.to(device), trace=trace)
    trained_val = _keep_initialization_where_better(cfg, parent, data, blocks, final_val, state, device, trace, pipeline)
    for a in mine:
        described = {"attention": a.attention.name, "ffn": a.ffn.name} if a.sub == "pair" else {"kind": a.kind, "size": a.size}
        record = {
            "layer": a.layer, "sub": a.sub, **described,
            "init": state["init_method"][a.name],
            "tokens": total_steps * tokens_per_step,
            "train_seconds": round(state.get("seconds", 0.0), 3),  # this rank's whole loop, all its blocks
            "params": sum(p.numel() for p in blocks[a].parameters()),
            "train_nmse": state["train_nmse"].get(a.name),
            "val_nmse_init": state["val_init"][a.name],
            "val_nmse": final_val[a],
            "file": library.block_path(a).name,
        }
        record.update(state["extra"].get(a.name, {}))
        if a in trained_val:
            record.update(kept_initialization=True, val_nmse_trained=trained_val[a])
        kill_point("bld.save_block", a.name)
        library.save_block(a, {k: v.float() if v.is_floating_point() else v for k, v in blocks[a].state_dict().items()}, record)
    state_file.unlink(missing_ok=True)


def _keep_initialization_where_better(cfg, parent, data, blocks, final_val, state, device, trace, pipeline) -> dict:
    """Put back the initialization of every block whose held-out nmse training made worse.

    A learning rate that suits most blocks can overshoot a few: a linear block starts at its
    least-squares fit, where a large step leads away. Such a block is initialized again (the
    same deterministic fit) and `final_val` updated; returns {block: its trained val nmse}. The
    choice rests on the validation sequences, as the records' val_nmse always has."""
    worse = [a for a in blocks if final_val[a] > state["val_init"][a.name]]
    # collective under a pipeline: a rank with none of its own still runs the passes the others need
    if not (reduce_int(bool(worse), "max") if pipeline is not None else worse):
        return {}
    fresh = {a: build_unit(parent.config, a).to(device) for a in worse}
    again = _fresh_state(cfg, parent, data, fresh, [a.name for a in worse], 0, device, trace, compare_channels=False)
    trained_val = {}
    for a in worse:
        trained_val[a] = final_val[a]
        blocks[a] = fresh[a].eval()
        final_val[a] = again["val_init"][a.name]
    if worse:
        log.warning("%d of %d blocks keep their initialization: training raised their held-out nmse (%s); "
                    "a lower bld.optim.lr may train them", len(worse), len(blocks),
                    ", ".join(f"{a.name} {state['val_init'][a.name]:.4f} -> {trained_val[a]:.4f}" for a in worse[:4])
                    + (", ..." if len(worse) > 4 else ""))
    return trained_val


def _fresh_state(cfg, parent, data, blocks, names, total_steps, device, trace=trace_parent,
                 compare_channels: bool = True) -> dict:
    """Initialize every block from the parent and measure its validation NMSE at init; with
    `compare_channels` also that of pruned FFNs initialized by the other channel criterion."""
    calib_ids = data.train[: cfg.init.calibration_sequences].to(device)
    if compare_channels and calib_ids.numel() < 4 * parent.config.hidden_size:  # said once, at the first init
        log.warning("only %d calibration tokens for hidden size %d: linear fits may overfit (raise "
                    "init.calibration_sequences)", calib_ids.numel(), parent.config.hidden_size)
    layers = {a.layer for a in blocks}
    acts = {i: LayerActivations(*(t.flatten(0, 1).float() for t in io)) for i, *io, _ in trace(parent, calib_ids, layers)}
    init_method, extra = {}, {}
    for a, block in blocks.items():
        layer = parent.model.layers[a.layer]
        init_method[a.name] = initialize_unit(block, a, layer, acts[a.layer], cfg.init, parent.config)
    val_init = validation_nmse(blocks, parent, data.val.to(device), trace=trace)
    # Channel selection: also measure the other criterion, so the choice is backed by numbers.
    other = "weight_norm" if cfg.init.ffn_channels == "contribution" else "contribution"
    ffn_pruned = {a: b for a, b in blocks.items() if a.sub == "ffn" and a.kind == "mlp"}
    # a pipeline rank runs this pass for the others too (every rank passes the same compare_channels)
    if compare_channels and (ffn_pruned or getattr(trace, "relays", False)):
        from ..library.init import init_ffn_pruned

        alt_blocks = {}
        for a in ffn_pruned:
            b = build_subblock(parent.config, a).to(device)
            init_ffn_pruned(b, a, parent.model.layers[a.layer], acts[a.layer], cfg.init, method=other)
            alt_blocks[a] = b
        other_val = validation_nmse(alt_blocks, parent, data.val.to(device), trace=trace)
        for a in ffn_pruned:
            extra[a.name] = {
                f"val_nmse_init_{cfg.init.ffn_channels}": val_init[a],
                f"val_nmse_init_{other}": other_val[a],
            }
    del acts
    return {
        "names": names,
        "total_steps": total_steps,
        "step": 0,
        "blocks": {a.name: b.state_dict() for a, b in blocks.items()},
        "optim": {},
        "init_method": init_method,
        "val_init": {a.name: v for a, v in val_init.items()},
        "train_nmse": {},
        "extra": extra,
    }


def summary_table(library: Library) -> str:
    rows = [r for r in library.records().values() if r.get("file")]  # trained alternatives and pairs
    lines = [f"{'alternative':<28} {'init':<22} {'val nmse init':>13} {'val nmse':>10}"]
    for r in rows:
        lines.append(f"{r['name']:<28} {r['init']:<22} {r['val_nmse_init']:>13.5f} {r['val_nmse']:>10.5f}")
    return "\n".join(lines)


__all__ = ["run", "steps", "nmse", "validation_nmse", "summary_table"]
