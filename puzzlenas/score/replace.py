"""One block replaced in the otherwise intact parent: the stream leaving its layer, the parent's
layers after it, and the metrics against the parent's logits. Shared by one-process scoring
(score/__init__.py) and scoring with the parent's layers split over the ranks (score/pipeline.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..library.space import Alternative, CoupledPair, build_unit, is_parent_alternative
from ..library.store import Library


def compare_logits(parent_logp: torch.Tensor, child_logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """Summed (not averaged) KL, child NLL and agreement over the (N, V) positions."""
    child_logp = F.log_softmax(child_logits.float(), dim=-1)
    kl = (parent_logp.exp() * (parent_logp - child_logp)).sum(-1)
    nll = F.nll_loss(child_logp, labels, reduction="sum")
    agree = (child_logp.argmax(-1) == parent_logp.argmax(-1)).sum()
    return {"kl": kl.sum().item(), "nll": nll.item(), "agree": agree.item(), "n": labels.numel()}


def mean_metrics(sums: dict, parent_loss: float) -> dict:
    """Per-token metrics from compare_logits's sums over all tokens; parent_loss: the parent's mean NLL."""
    lm_loss = sums["nll"] / sums["n"]
    return {"kl": sums["kl"] / sums["n"], "lm_loss": lm_loss, "lm_loss_delta": lm_loss - parent_loss,
            "agreement": sums["agree"] / sums["n"]}


def run_tail(parent, h: torch.Tensor, start_layer: int, pe) -> torch.Tensor:
    """Layers start_layer..N of the parent, then the final norm and LM head: (B, T, V) logits."""
    for layer in parent.model.layers[start_layer:]:
        h = layer(h, pe)
    return parent.lm_head(parent.model.norm(h))


def load_blocks(parent, library: Library, alternatives) -> dict:
    """The trained blocks of `alternatives` on the parent's device and dtype (none for a no-op)."""
    p = next(parent.parameters())
    blocks = {}
    for a in alternatives:
        block = build_unit(parent.config, a)
        if block is not None:
            block.load_state_dict(library.load_block(a))
            blocks[a] = block.to(device=p.device, dtype=p.dtype).eval()
    return blocks


def leave_layer(parent_layer, a: Alternative, block, h_attn: torch.Tensor, h_ffn: torch.Tensor, pe) -> torch.Tensor:
    """The (B, T, C) stream leaving layer a.layer with `block` (None: a no-op) in place of that
    layer's own sub-block; h_attn / h_ffn: the stream entering its attention / FFN (the parent's when
    scoring, a child's when refine re-scores inside it)."""
    if a.sub == "attention":
        h2 = h_attn if block is None else h_attn + block(h_attn, pe)
        if parent_layer.mlp is not None:
            h2 = h2 + parent_layer.mlp(parent_layer.post_attention_layernorm(h2))
        return h2
    if a.sub == "ffn":
        return h_ffn if block is None else h_ffn + block(h_ffn, pe)
    return h_attn + block(h_attn, pe)  # a coupled pair replaces the whole layer


def to_run(alternatives: list[Alternative], config) -> list[Alternative]:
    """The alternatives that are run (parent alternatives score 0 by definition)."""
    return [a for a in alternatives if isinstance(a, CoupledPair) or not is_parent_alternative(a, config)]
