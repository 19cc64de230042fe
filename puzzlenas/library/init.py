"""Initialize every alternative from the parent's weights (before BLD).

Each method is a function (block, alt, parent_layer, calibration, cfg) -> None registered in
INITIALIZERS under a name; `initialize` picks the one for an alternative's kind.

  ffn mlp (smaller)  keep the channels with the largest contribution |act_j| * ||W_down[:, j]||
                     averaged over calibration tokens (Puzzle), or by weight norm
  attention gqa      mean-pool the K and V projections of each group of merged KV heads
  linear             ridge least-squares fit of the sub-block's output from its normed input
  no_op              nothing
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import InitConfig
from .space import Alternative, SubBlock


@dataclass
class LayerActivations:
    """Calibration tensors of one parent layer, flattened over tokens: (N, C) each."""

    attn_in: torch.Tensor  # residual stream entering the attention sub-block
    attn_out: torch.Tensor  # what the parent's attention adds
    ffn_in: torch.Tensor
    ffn_out: torch.Tensor


@torch.no_grad()
def trace_parent(parent, input_ids: torch.Tensor, layers: set[int] | None = None):
    """Run the DeciLM parent layer by layer; yield (layer, attn_in, attn_out, ffn_in, ffn_out,
    position_embeddings), each (B, T, C). Stops after the last requested layer."""
    model = parent.model
    h = model.embed_tokens(input_ids)
    B, T = input_ids.shape
    pos = torch.arange(T, device=input_ids.device)[None].expand(B, -1)
    pe = model.rotary_emb(h, pos)
    last = max(layers) if layers else len(model.layers) - 1
    for i, layer in enumerate(model.layers[: last + 1]):
        attn_in = h
        attn_out = layer.self_attn(layer.input_layernorm(h), pe) if layer.self_attn is not None else torch.zeros_like(h)
        h = h + attn_out
        ffn_in = h
        ffn_out = layer.mlp(layer.post_attention_layernorm(h)) if layer.mlp is not None else torch.zeros_like(h)
        h = h + ffn_out
        if layers is None or i in layers:
            yield i, attn_in, attn_out, ffn_in, ffn_out, pe


def collect_calibration(parent, input_ids: torch.Tensor, layers: set[int]) -> dict[int, LayerActivations]:
    acts: dict[int, LayerActivations] = {}
    for i, a_in, a_out, f_in, f_out, _ in trace_parent(parent, input_ids, layers):
        acts[i] = LayerActivations(*(t.flatten(0, 1).float() for t in (a_in, a_out, f_in, f_out)))
    return acts


# --- methods --------------------------------------------------------------------------------


def copy_norm(block: SubBlock, parent_layer) -> None:
    name = "input_layernorm" if block.sub == "attention" else "post_attention_layernorm"
    getattr(block, name).weight.data.copy_(getattr(parent_layer, name).weight.data)


def ffn_channel_scores(parent_layer, ffn_in: torch.Tensor, method: str) -> torch.Tensor:
    """(I,) importance of each intermediate channel of the parent's gated MLP."""
    mlp = parent_layer.mlp
    down_norm = mlp.down_proj.weight.float().norm(dim=0)  # (I,)
    if method == "weight_norm":
        return mlp.gate_proj.weight.float().norm(dim=1) * mlp.up_proj.weight.float().norm(dim=1) * down_norm
    x = parent_layer.post_attention_layernorm(ffn_in.to(mlp.gate_proj.weight.dtype))
    act = F.silu(mlp.gate_proj(x)) * mlp.up_proj(x)  # (N, I)
    # removing channel j changes the output by act_j * W_down[:, j]; average its size
    return act.float().abs().mean(0) * down_norm


@torch.no_grad()
def init_ffn_pruned(block: SubBlock, alt: Alternative, parent_layer, acts: LayerActivations, cfg: InitConfig, method=None):
    copy_norm(block, parent_layer)
    scores = ffn_channel_scores(parent_layer, acts.ffn_in, method or cfg.ffn_channels)
    keep = scores.topk(alt.size).indices.sort().values
    src, dst = parent_layer.mlp, block.mlp
    dst.gate_proj.weight.copy_(src.gate_proj.weight[keep])
    dst.up_proj.weight.copy_(src.up_proj.weight[keep])
    dst.down_proj.weight.copy_(src.down_proj.weight[:, keep])
    if src.gate_proj.bias is not None:
        dst.gate_proj.bias.copy_(src.gate_proj.bias[keep])
        dst.up_proj.bias.copy_(src.up_proj.bias[keep])
        dst.down_proj.bias.copy_(src.down_proj.bias)


@torch.no_grad()
def init_attention_pooled(block: SubBlock, alt: Alternative, parent_layer, acts, cfg):
    """Merge consecutive KV heads by averaging their K and V projections. Consecutive groups keep
    each query head attached to the (merged) KV head it used before."""
    copy_norm(block, parent_layer)
    src, dst = parent_layer.self_attn, block.self_attn
    old_kv, new_kv, d = src.num_key_value_heads, alt.size, src.head_dim
    if old_kv % new_kv:
        raise ValueError(f"cannot mean-pool {old_kv} KV heads into {new_kv}")
    g = old_kv // new_kv
    for name in ("k_proj", "v_proj"):
        w = getattr(src, name).weight  # (old_kv * d, C)
        getattr(dst, name).weight.copy_(w.view(new_kv, g, d, -1).mean(1).reshape(new_kv * d, -1))
        if getattr(src, name).bias is not None:
            getattr(dst, name).bias.copy_(getattr(src, name).bias.view(new_kv, g, d).mean(1).reshape(-1))
    dst.q_proj.load_state_dict(src.q_proj.state_dict())
    dst.o_proj.load_state_dict(src.o_proj.state_dict())
    if src.q_norm is not None:
        dst.q_norm.load_state_dict(src.q_norm.state_dict())
        dst.k_norm.load_state_dict(src.k_norm.state_dict())


@torch.no_grad()
def init_linear_ridge(block: SubBlock, alt: Alternative, parent_layer, acts: LayerActivations, cfg: InitConfig):
    """W = argmin ||X W - Y||^2 + lambda ||W||^2 with X the normed input, Y the parent's output."""
    copy_norm(block, parent_layer)
    if alt.sub == "attention":
        norm, x_in, y = parent_layer.input_layernorm, acts.attn_in, acts.attn_out
        linear = block.self_attn.linear_attn
    else:
        norm, x_in, y = parent_layer.post_attention_layernorm, acts.ffn_in, acts.ffn_out
        linear = block.mlp.linear_mlp
    x = norm(x_in.to(norm.weight.dtype)).double()
    y = y.double()
    xtx = x.T @ x
    ridge = cfg.linear_ridge * xtx.diagonal().mean()  # scale-free regularization
    w = torch.linalg.solve(xtx + ridge * torch.eye(x.shape[1], dtype=x.dtype), x.T @ y)  # (C_in, C_out)
    linear.weight.copy_(w.T.to(linear.weight.dtype))


INITIALIZERS: dict[tuple[str, str], Callable] = {
    ("ffn", "mlp"): init_ffn_pruned,
    ("attention", "gqa"): init_attention_pooled,
    ("ffn", "linear"): init_linear_ridge,
    ("attention", "linear"): init_linear_ridge,
}
INIT_NAMES = {
    ("attention", "gqa"): "kv-mean-pool",
    ("ffn", "linear"): "ridge",
    ("attention", "linear"): "ridge",
}


def init_method_name(alt: Alternative, cfg: InitConfig) -> str:
    if (alt.sub, alt.kind) == ("ffn", "mlp"):
        return f"channels-{cfg.ffn_channels}"
    return INIT_NAMES[(alt.sub, alt.kind)]


def initialize(block: SubBlock, alt: Alternative, parent_layer, acts: LayerActivations, cfg: InitConfig) -> str:
    INITIALIZERS[(alt.sub, alt.kind)](block, alt, parent_layer, acts, cfg)
    return init_method_name(alt, cfg)


def initialize_unit(block, unit, parent_layer, acts: LayerActivations, cfg: InitConfig, config) -> str:
    """Initialize an alternative, or each half of a coupled pair the way it is initialized alone
    (the parent's own sub-block copied as is)."""
    from .space import CoupledPair, build_subblock, is_parent_alternative

    if not isinstance(unit, CoupledPair):
        return initialize(block, unit, parent_layer, acts, cfg)
    methods = []
    for alt in (unit.attention, unit.ffn):
        if alt.kind == "no_op":
            methods.append("no_op")
            continue
        part = build_subblock(config, alt).to(next(block.parameters()).device)
        if is_parent_alternative(alt, config):
            part.load_state_dict({k: v for k, v in parent_layer.state_dict().items() if k in part.state_dict()})
            methods.append("parent")
        else:
            methods.append(initialize(part, alt, parent_layer, acts, cfg))
        missing, unexpected = block.load_state_dict(part.state_dict(), strict=False)
        assert not unexpected, unexpected
    return "coupled(" + ", ".join(methods) + ")"
