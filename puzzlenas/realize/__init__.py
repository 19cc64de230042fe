"""Assemble a child model: one (attention, FFN) alternative per layer, weights from the library.

The parent's embeddings, final norm and LM head are always kept. A layer whose alternative is
the parent's own sub-block copies the parent's weights; a trained alternative loads its block
file from the library; with `random_weights=True` (cost measurement only) blocks keep their
random initialization.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import PuzzleError
from ..library.space import SUBBLOCK_MODULES, Alternative, CoupledPair, is_parent_alternative, parent_subblock_state
from ..library.store import Library
from ..model import BlockConfig, DeciLMConfig, DeciLMForCausalLM
from ..workdir import SolutionRecord

LayerChoice = tuple[Alternative, Alternative]  # (attention alternative, FFN alternative)


def child_config(parent_config: DeciLMConfig, choices: Sequence[LayerChoice]) -> DeciLMConfig:
    if len(choices) != parent_config.num_hidden_layers:
        raise PuzzleError(f"a child needs one choice per layer: got {len(choices)} for {parent_config.num_hidden_layers} layers")
    raw = parent_config.to_dict()
    blocks = []
    for layer, (attn, ffn) in enumerate(choices):
        if attn.layer != layer or ffn.layer != layer or attn.sub != "attention" or ffn.sub != "ffn":
            raise PuzzleError(f"layer {layer}: choice ({attn.name}, {ffn.name}) does not belong to this layer")
        blocks.append(BlockConfig(attn.block_config(), ffn.block_config()).to_dict(parent_config.num_attention_heads, parent_config.hidden_size))
    raw["block_configs"] = blocks
    for key in ("model_type", "transformers_version", "architectures", "auto_map"):
        raw.pop(key, None)
    return DeciLMConfig(**raw)


@torch.no_grad()
def assemble_child(
    parent: DeciLMForCausalLM,
    choices: Sequence[LayerChoice],
    library: Library | None = None,
    random_weights: bool = False,
) -> DeciLMForCausalLM:
    config = child_config(parent.config, choices)
    dtype = next(parent.parameters()).dtype
    device = next(parent.parameters()).device
    torch.manual_seed(0)
    child = DeciLMForCausalLM(config).to(dtype=dtype, device=device)
    child.model.embed_tokens.weight.copy_(parent.model.embed_tokens.weight)
    child.model.norm.weight.copy_(parent.model.norm.weight)
    if not config.tie_word_embeddings:
        child.lm_head.weight.copy_(parent.lm_head.weight)
    for layer, (attn, ffn) in enumerate(choices):
        target = child.model.layers[layer]
        pair = CoupledPair(attn, ffn)
        if library is not None and not random_weights and library.is_done(pair):
            # a pair trained together (coupled BLD) is used as a unit: both halves from its file
            missing, unexpected = target.load_state_dict(library.load_block(pair), strict=False)
            if unexpected or missing:
                raise PuzzleError(f"block {pair.name} does not fit layer {layer}: missing {missing}, unexpected {unexpected}")
            continue
        for alt in (attn, ffn):
            if alt.kind == "no_op":
                continue
            if is_parent_alternative(alt, parent.config):
                state = parent_subblock_state(parent, alt)
            elif random_weights:
                continue
            else:
                if library is None:
                    raise PuzzleError(f"{alt.name} is not the parent's block: assembling it needs the library")
                state = library.load_block(alt)
            missing, unexpected = target.load_state_dict(state, strict=False)
            prefix = SUBBLOCK_MODULES[alt.sub]
            if unexpected or any(m.startswith(prefix) for m in missing):
                raise PuzzleError(f"block {alt.name} does not fit layer {layer}: missing {missing}, unexpected {unexpected}")
    child.config.dtype = dtype
    return child.eval()


def parent_choices(parent_config: DeciLMConfig) -> list[LayerChoice]:
    out = []
    for layer, b in enumerate(parent_config.block_configs):
        out.append(
            (
                Alternative(layer, "attention", b.attention.kind, b.attention.num_key_value_heads),
                Alternative(layer, "ffn", b.ffn.kind, b.ffn.intermediate_size),
            )
        )
    return out


def choices_from_solution(solution: SolutionRecord) -> list[LayerChoice]:
    return [(Alternative.from_name(a), Alternative.from_name(f)) for a, f in solution.layers]


def run(cfg, workdir, parent, library: Library, tokenizer=None, val=None):
    """Assemble the chosen search solution from the library and save it as a checkpoint in
    workdir/realized/solution<k>/ (the child before global distillation). gkd.solution: auto
    first measures every solution's child on held-out text (`val`: the data's validation
    sequences) and chooses the best (selection.py)."""
    from pathlib import Path

    from ..checkpoint.io import save_checkpoint
    from ..workdir import read_solutions, realized_dir
    from .selection import chosen_solution, select

    workdir = Path(workdir)
    solutions = read_solutions(workdir).solutions
    if cfg.gkd.solution == "auto":
        if val is None:
            raise PuzzleError("gkd.solution=auto needs the validation sequences to measure the candidates")
        select(cfg, workdir, parent, lambda s: assemble_child(parent, choices_from_solution(s), library), val, tokenizer)
    k = chosen_solution(cfg, workdir)
    if k >= len(solutions):
        raise PuzzleError(f"gkd.solution={k} but the search found {len(solutions)} solution(s)")
    child = assemble_child(parent, choices_from_solution(solutions[k]), library)
    out = workdir / realized_dir(k)
    save_checkpoint(child, out, tokenizer, overwrite=True)  # the work directory's own folder
    return out
