"""The search space: per layer, the attention and FFN alternatives, and the modules that hold them.

An alternative is a sub-block *with its norm*: the module maps the residual stream h to the
delta the sub-block adds to it, exactly like the parent's
    attention: h -> self_attn(input_layernorm(h))
    ffn:       h -> mlp(post_attention_layernorm(h))
Its parameter names are the decoder layer's own (`input_layernorm.weight`, `self_attn.k_proj.weight`,
`mlp.down_proj.weight`...), so a trained alternative drops into a DeciLM layer with load_state_dict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import PuzzleError
from ..model import AttentionConfig, DeciLMConfig, FFNConfig
from ..model.modeling_decilm import DeciLMRMSNorm, build_attention, build_ffn

if TYPE_CHECKING:  # annotations only: config imports this module to check choices against engines
    from ..config import SearchSpaceConfig

KINDS = ("gqa", "mlp", "linear", "no_op")
# a decoder layer's modules per sub-block (its norm first): the names its tensors start with
SUBBLOCK_MODULES = {"attention": ("input_layernorm", "self_attn"), "ffn": ("post_attention_layernorm", "mlp")}


@dataclass(frozen=True, order=True)
class Alternative:
    """One sub-block choice of one layer. The only place its name is formatted (`name`, `short`)
    and parsed (`from_name`): `layer007.ffn.mlp768` is layer 7, FFN, kind mlp, size 768."""

    layer: int
    sub: str  # "attention" | "ffn"
    kind: str  # attention: gqa | linear | no_op; ffn: mlp | linear | no_op
    size: int | None = None  # KV heads (gqa) or intermediate size (mlp)

    @property
    def name(self) -> str:
        return f"layer{self.layer:03d}.{self.sub}.{self.short}"

    @property
    def short(self) -> str:
        """The name's last part, kind and size: `gqa2`, `mlp768`, `linear`, `no_op`."""
        return self.format_short(self.kind, self.size)

    @staticmethod
    def format_short(kind: str, size: int | None) -> str:
        return f"{kind}{size}" if size is not None else kind

    @property
    def shape(self) -> tuple[str, str, int | None]:
        """(sub, kind, size): what its cost depends on (same-shaped alternatives of any layer cost the same)."""
        return (self.sub, self.kind, self.size)

    @property
    def trainable(self) -> bool:
        return self.kind != "no_op"

    def block_config(self) -> AttentionConfig | FFNConfig:
        if self.sub == "attention":
            return AttentionConfig(self.kind, self.size if self.kind == "gqa" else None)
        return FFNConfig(self.kind, self.size if self.kind == "mlp" else None)

    @classmethod
    def from_name(cls, name: str) -> Alternative:
        layer, sub, short = name.split(".")
        for kind in KINDS:
            if short.startswith(kind):
                rest = short[len(kind) :]
                return cls(int(layer[5:]), sub, kind, int(rest) if rest else None)
        raise ValueError(name)


def is_parent_alternative(alt: Alternative, config: DeciLMConfig) -> bool:
    """The alternative that equals the parent's own sub-block (kept as is, never trained)."""
    block = config.block_configs[alt.layer]
    return (alt.sub == "attention" and alt.block_config() == block.attention) or (
        alt.sub == "ffn" and alt.block_config() == block.ffn
    )


def default_kv_choices(num_heads: int, num_kv: int) -> list[int]:
    choices, kv = [num_kv], num_kv
    while kv > 1:
        kv //= 2
        if kv >= 1 and num_heads % kv == 0 and kv not in choices:
            choices.append(kv)
    if 1 not in choices:
        choices.append(1)
    return choices


def _attention_alternatives(layer: int, choices, config: DeciLMConfig) -> list[Alternative]:
    out = []
    for c in choices:
        if c in ("linear", "no_op"):
            out.append(Alternative(layer, "attention", c))
        else:
            if c <= 0 or config.num_attention_heads % c:
                raise PuzzleError(
                    f"search_space: layer {layer}: {c} KV heads does not divide num_attention_heads="
                    f"{config.num_attention_heads}"
                )
            if c > config.num_attention_heads:
                raise PuzzleError(f"search_space: layer {layer}: {c} KV heads > {config.num_attention_heads} query heads")
            out.append(Alternative(layer, "attention", "gqa", int(c)))
    return out


def _ffn_alternatives(layer: int, choices, parent_size: int, multiple: int) -> list[Alternative]:
    out = []
    for c in choices:
        if c in ("linear", "no_op"):
            out.append(Alternative(layer, "ffn", c))
            continue
        if isinstance(c, float):
            if not 0 < c <= 1:
                raise PuzzleError(f"search_space: layer {layer}: FFN fraction {c} must be in (0, 1]")
            size = parent_size if c == 1.0 else max(multiple, int(round(parent_size * c / multiple)) * multiple)
        else:
            size = int(c)
        if size <= 0 or size > parent_size:
            raise PuzzleError(f"search_space: layer {layer}: FFN size {size} must be in 1..{parent_size} (the parent's)")
        out.append(Alternative(layer, "ffn", "mlp", size))
    return out


def enumerate_alternatives(space: SearchSpaceConfig, config: DeciLMConfig, engine=None) -> list[Alternative]:
    """Every alternative of every layer (the parent's own sub-blocks included), deduplicated; with
    an `engine`, only those it can serve."""
    alts: set[Alternative] = set()
    for layer, block in enumerate(config.block_configs):
        if block.attention.kind != "gqa" or block.ffn.kind != "mlp":
            raise PuzzleError(f"the parent's layer {layer} is not a full attention + MLP layer; search needs a uniform parent")
        if space.only_layers is not None and layer not in space.only_layers:
            alts.add(Alternative(layer, "attention", "gqa", block.attention.num_key_value_heads))
            alts.add(Alternative(layer, "ffn", "mlp", block.ffn.intermediate_size))
            continue
        override = space.layers.get(layer)
        attn = (override.attention if override and override.attention is not None else None) or space.attention
        if attn is None:
            attn = [*default_kv_choices(config.num_attention_heads, block.attention.num_key_value_heads), "linear", "no_op"]
        ffn = (override.ffn if override and override.ffn is not None else None) or space.ffn
        alts.update(_attention_alternatives(layer, attn, config))
        alts.update(_ffn_alternatives(layer, ffn, block.ffn.intermediate_size, space.ffn_multiple_of))
        # the parent's own sub-blocks are always available: the search may keep a layer intact
        alts.add(Alternative(layer, "attention", "gqa", block.attention.num_key_value_heads))
        alts.add(Alternative(layer, "ffn", "mlp", block.ffn.intermediate_size))
    for layer in [*space.layers, *(space.only_layers or [])]:
        if not 0 <= layer < config.num_hidden_layers:
            raise PuzzleError(f"search_space.layers: layer {layer} does not exist (the parent has {config.num_hidden_layers})")
    if engine is not None:  # what the serving engine cannot run never enters the search
        alts = {a for a in alts if engine.unsupported(a, config) is None}
    return sorted(alts)


def target_alternatives(cfg, config: DeciLMConfig) -> list[Alternative]:
    """The search space of `cfg` on the parent `config`, less what cfg.target.engine cannot serve."""
    from ..engines import get_engine

    return enumerate_alternatives(cfg.search_space, config, get_engine(cfg.target.engine))


class SubBlock(nn.Module):
    """norm + attention or FFN variant: h (B, T, C) -> delta (B, T, C)."""

    def __init__(self, config: DeciLMConfig, alt: Alternative):
        super().__init__()
        self.alt = alt
        self.sub = alt.sub
        if alt.sub == "attention":
            self.input_layernorm = DeciLMRMSNorm(config.hidden_size, config.rms_norm_eps)
            self.self_attn = build_attention(config, alt.block_config(), cache_index=0)
        else:
            self.post_attention_layernorm = DeciLMRMSNorm(config.hidden_size, config.rms_norm_eps)
            self.mlp = build_ffn(config, alt.block_config())

    def forward(self, h: torch.Tensor, position_embeddings=None) -> torch.Tensor:
        if self.sub == "attention":
            return self.self_attn(self.input_layernorm(h), position_embeddings)
        return self.mlp(self.post_attention_layernorm(h))


def build_subblock(config: DeciLMConfig, alt: Alternative) -> SubBlock | None:
    return None if alt.kind == "no_op" else SubBlock(config, alt)


def parent_subblock_state(parent, alt: Alternative) -> dict[str, torch.Tensor]:
    """The parent layer's tensors for `alt`'s sub-block (norm included), layer-relative names."""
    prefixes = tuple(m + "." for m in SUBBLOCK_MODULES[alt.sub])
    layer = parent.model.layers[alt.layer]
    return {k: v for k, v in layer.state_dict().items() if k.startswith(prefixes)}


@dataclass(frozen=True, order=True)
class CoupledPair:
    """An attention and an FFN alternative of one layer, trained together (coupled BLD)."""

    attention: Alternative
    ffn: Alternative
    sub = "pair"

    @property
    def layer(self) -> int:
        return self.attention.layer

    @property
    def name(self) -> str:
        return pair_name(self.attention, self.ffn)


def pair_name(attention: Alternative, ffn: Alternative) -> str:
    return f"layer{attention.layer:03d}.pair.{attention.short}+{ffn.short}"


def enumerate_pairs(coupled, space: SearchSpaceConfig, config: DeciLMConfig) -> list[CoupledPair]:
    """The coupled pairs named in bld.coupled, each checked against the layer's alternatives."""
    alternatives = set(enumerate_alternatives(space, config))
    pairs = []
    for entry in coupled:
        layer = entry.layer
        if layer >= config.num_hidden_layers:
            raise PuzzleError(f"bld.coupled: layer {layer} does not exist (the parent has {config.num_hidden_layers})")
        parent_ffn = config.block_configs[layer].ffn.intermediate_size
        (attn,) = _attention_alternatives(layer, [entry.attention], config)
        (ffn,) = _ffn_alternatives(layer, [entry.ffn], parent_ffn, space.ffn_multiple_of)
        for alt in (attn, ffn):
            if alt not in alternatives:
                raise PuzzleError(f"bld.coupled: {alt.name} is not in the search space of layer {layer}")
        if attn.kind == "no_op" and ffn.kind == "no_op":
            raise PuzzleError(f"bld.coupled: layer {layer}: a pair of two no-ops has nothing to train")
        pairs.append(CoupledPair(attn, ffn))
    return sorted(set(pairs))


class PairBlock(nn.Module):
    """A whole layer made of one attention and one FFN alternative: h -> layer(h) - h.
    Its parameter names are the decoder layer's own, like a SubBlock's."""

    def __init__(self, config: DeciLMConfig, pair: CoupledPair):
        super().__init__()
        self.alt = pair
        self.sub = "pair"
        attn, ffn = build_subblock(config, pair.attention), build_subblock(config, pair.ffn)
        self.has_attention, self.has_ffn = attn is not None, ffn is not None
        if attn is not None:
            self.input_layernorm, self.self_attn = attn.input_layernorm, attn.self_attn
        if ffn is not None:
            self.post_attention_layernorm, self.mlp = ffn.post_attention_layernorm, ffn.mlp

    def forward(self, h: torch.Tensor, position_embeddings=None) -> torch.Tensor:
        x = h
        if self.has_attention:
            x = x + self.self_attn(self.input_layernorm(x), position_embeddings)
        if self.has_ffn:
            x = x + self.mlp(self.post_attention_layernorm(x))
        return x - h


def build_unit(config: DeciLMConfig, unit) -> nn.Module | None:
    """The trainable module of an alternative or of a coupled pair."""
    return PairBlock(config, unit) if isinstance(unit, CoupledPair) else build_subblock(config, unit)
