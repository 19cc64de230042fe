"""Configuration of a heterogeneous ("nemotron-nas" / DeciLM) decoder-only LM.

Every layer carries its own block config: an attention sub-block and an FFN sub-block, each
either the full kind (grouped-query attention with its own KV-head count; gated MLP with its
own intermediate size), a single hidden->hidden linear map, or a no-op.

This file is copied beside the weights of every checkpoint puzzlenas writes, so it must only
import torch-free standard library code and `transformers`.

`block_configs` format (what Llama-3.1-Nemotron-51B-Instruct ships):

    {"attention": {"n_heads_in_group": 8, "no_op": false, "replace_with_linear": false},
     "ffn":       {"ffn_mult": 5.25,     "no_op": false, "replace_with_linear": false}}

plus the explicit `num_key_value_heads` / `intermediate_size` that newer heterogeneous
checkpoints use. Rules:
  * num_key_value_heads = num_attention_heads // n_heads_in_group (either may be given;
    if both are, they must agree).
  * Legacy consumers compute intermediate = round_up(int(2 * ffn_mult * hidden / 3), 256).
    A searched size (say 1152 for hidden 576) is not always reachable that way, so we write
    `intermediate_size` always and `ffn_mult` only when it maps back to exactly that size
    (else `ffn_mult` is null). On read, `intermediate_size` wins over `ffn_mult`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from transformers import PretrainedConfig


class BlockConfigError(ValueError):
    """A block config that cannot describe a valid model (one-line message)."""


# Nemotron-51B's block configs carry extra fields for features we do not implement
# (sparsity, sink tokens, windowed attention). They are accepted only at their "off" value.
_IGNORED_WHEN_OFF = {
    "sparsify": None,
    "num_sink_tokens": None,
    "unshifted_sink": False,
    "use_prefill_window_in_sink_attention": False,
    "window_length": None,
}
_ATTENTION_KEYS = {"no_op", "replace_with_linear", "n_heads_in_group", "num_key_value_heads"}
_FFN_KEYS = {"no_op", "replace_with_linear", "ffn_mult", "intermediate_size"}


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    """The legacy DeciLM rule: round_up(int(2 * ffn_mult * hidden / 3), 256)."""
    size = int(2 * ffn_mult * hidden_size / 3)
    return int(math.ceil(size / 256) * 256)


def intermediate_size_to_ffn_mult(intermediate_size: int, hidden_size: int) -> float | None:
    """The ffn_mult that legacy readers map back to exactly `intermediate_size`, or None."""
    if intermediate_size % 256:
        return None
    mult = round(1.5 * intermediate_size / hidden_size, 6)
    # int() in the legacy rule truncates; nudge up by an ulp-scale amount if rounding lost it.
    for candidate in (mult, mult + 1e-6, mult + 1e-5):
        if ffn_mult_to_intermediate_size(candidate, hidden_size) == intermediate_size:
            return candidate
    return None


@dataclass(frozen=True)
class AttentionConfig:
    """One layer's attention sub-block: `gqa` (num_key_value_heads), `linear` or `no_op`.

    Serving engines (vLLM's and TensorRT-LLM's `nemotron_nas`, NVIDIA's remote code) read the
    block configs as attributes of these objects, with NVIDIA's names: `no_op`,
    `replace_with_linear`, `n_heads_in_group` (None when the layer has no attention heads).
    `num_attention_heads` is the model's, recorded by the parser so `n_heads_in_group` can be
    answered; it takes no part in equality.
    """

    kind: str = "gqa"
    num_key_value_heads: int | None = None
    num_attention_heads: int | None = field(default=None, compare=False, repr=False)

    @property
    def no_op(self) -> bool:
        return self.kind == "no_op"

    @property
    def replace_with_linear(self) -> bool:
        return self.kind == "linear"

    @property
    def n_heads_in_group(self) -> int | None:
        if self.kind != "gqa" or self.num_attention_heads is None:
            return None
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def sparsify(self) -> None:  # present in NVIDIA's schema; never used here
        return None

    def short(self) -> str:
        return f"gqa{self.num_key_value_heads}" if self.kind == "gqa" else self.kind


@dataclass(frozen=True)
class FFNConfig:
    """One layer's FFN sub-block: `mlp` (intermediate_size), `linear` or `no_op`.

    `ffn_mult` (NVIDIA's name) exists as an attribute only when the legacy rule
    round_up(int(2 * ffn_mult * hidden / 3), 256) gives back exactly `intermediate_size`.
    vLLM's nemotron_nas reads `ffn.ffn_mult` when the attribute exists and `ffn.intermediate_size`
    otherwise, so a searched size the legacy rule cannot express (say 1152 at hidden 576) still
    loads there at its true size; a no-op or linear FFN answers None, as NVIDIA's configs do.
    """

    kind: str = "mlp"
    intermediate_size: int | None = None
    hidden_size: int | None = field(default=None, compare=False, repr=False)

    @property
    def no_op(self) -> bool:
        return self.kind == "no_op"

    @property
    def replace_with_linear(self) -> bool:
        return self.kind == "linear"

    @property
    def ffn_mult(self) -> float | None:
        if self.kind != "mlp":
            return None
        mult = None if self.hidden_size is None else intermediate_size_to_ffn_mult(self.intermediate_size, self.hidden_size)
        if mult is None:  # AttributeError makes hasattr() false: readers fall back to intermediate_size
            raise AttributeError(
                f"intermediate_size={self.intermediate_size} has no exact legacy ffn_mult; read intermediate_size"
            )
        return mult

    @property
    def sparsify(self) -> None:
        return None

    def short(self) -> str:
        return f"mlp{self.intermediate_size}" if self.kind == "mlp" else self.kind


@dataclass(frozen=True)
class BlockConfig:
    attention: AttentionConfig
    ffn: FFNConfig

    # --- serialization to/from the public block_configs entry ---------------------------
    def to_dict(self, num_attention_heads: int, hidden_size: int) -> dict[str, Any]:
        a, f = self.attention, self.ffn
        attention: dict[str, Any] = {"no_op": a.no_op, "replace_with_linear": a.replace_with_linear}
        if a.kind == "gqa":
            attention["n_heads_in_group"] = num_attention_heads // a.num_key_value_heads
            attention["num_key_value_heads"] = a.num_key_value_heads
        else:
            attention["n_heads_in_group"] = None
        ffn: dict[str, Any] = {"no_op": f.no_op, "replace_with_linear": f.replace_with_linear}
        if f.kind == "mlp":
            ffn["ffn_mult"] = intermediate_size_to_ffn_mult(f.intermediate_size, hidden_size)
            ffn["intermediate_size"] = f.intermediate_size
        else:
            ffn["ffn_mult"] = None
        return {"attention": attention, "ffn": ffn}

    @classmethod
    def from_dict(
        cls, entry: Any, num_attention_heads: int, hidden_size: int, layer: int | None = None
    ) -> BlockConfig:
        where = f"block_configs[{layer}]" if layer is not None else "block config"
        if isinstance(entry, BlockConfig):
            entry = entry.to_dict(num_attention_heads, hidden_size)
        if not isinstance(entry, dict) or set(entry) - {"attention", "ffn"} or "attention" not in entry or "ffn" not in entry:
            raise BlockConfigError(f"{where}: expected a mapping with keys 'attention' and 'ffn', got {entry!r}")
        attention = _parse_attention(entry["attention"], num_attention_heads, f"{where}.attention")
        ffn = _parse_ffn(entry["ffn"], hidden_size, f"{where}.ffn")
        return cls(attention, ffn)


def _check_keys(d: Any, allowed: set[str], where: str) -> dict:
    if not isinstance(d, dict):
        raise BlockConfigError(f"{where}: expected a mapping, got {d!r}")
    for key, value in d.items():
        if key in allowed:
            continue
        if key in _IGNORED_WHEN_OFF:
            if value != _IGNORED_WHEN_OFF[key]:
                raise BlockConfigError(
                    f"{where}.{key}={value!r} is not supported (only {_IGNORED_WHEN_OFF[key]!r})"
                )
            continue
        raise BlockConfigError(f"{where}: unknown key {key!r} (accepted: {', '.join(sorted(allowed))})")
    if d.get("no_op") and d.get("replace_with_linear"):
        raise BlockConfigError(f"{where}: no_op and replace_with_linear cannot both be true")
    return d


def _parse_attention(d: Any, num_attention_heads: int, where: str) -> AttentionConfig:
    d = _check_keys(d, _ATTENTION_KEYS, where)
    if d.get("no_op"):
        return AttentionConfig("no_op", num_attention_heads=num_attention_heads)
    if d.get("replace_with_linear"):
        return AttentionConfig("linear", num_attention_heads=num_attention_heads)
    kv, group = d.get("num_key_value_heads"), d.get("n_heads_in_group")
    if kv is None and group is None:
        raise BlockConfigError(f"{where}: needs num_key_value_heads or n_heads_in_group")
    if group is not None:
        if not isinstance(group, int) or group <= 0 or num_attention_heads % group:
            raise BlockConfigError(
                f"{where}: n_heads_in_group={group!r} must be a positive divisor of "
                f"num_attention_heads={num_attention_heads} (accepted: {_divisors(num_attention_heads)})"
            )
        from_group = num_attention_heads // group
        if kv is not None and kv != from_group:
            raise BlockConfigError(
                f"{where}: num_key_value_heads={kv} disagrees with n_heads_in_group={group} "
                f"({num_attention_heads}/{group}={from_group})"
            )
        kv = from_group
    if not isinstance(kv, int) or kv <= 0 or num_attention_heads % kv:
        raise BlockConfigError(
            f"{where}: num_key_value_heads={kv!r} must divide num_attention_heads={num_attention_heads} "
            f"(accepted: {_divisors(num_attention_heads)})"
        )
    return AttentionConfig("gqa", kv, num_attention_heads)


def _parse_ffn(d: Any, hidden_size: int, where: str) -> FFNConfig:
    d = _check_keys(d, _FFN_KEYS, where)
    if d.get("no_op"):
        return FFNConfig("no_op", hidden_size=hidden_size)
    if d.get("replace_with_linear"):
        return FFNConfig("linear", hidden_size=hidden_size)
    size, mult = d.get("intermediate_size"), d.get("ffn_mult")
    if size is None:
        if mult is None:
            raise BlockConfigError(f"{where}: needs intermediate_size or ffn_mult")
        if not isinstance(mult, (int, float)) or mult <= 0:
            raise BlockConfigError(f"{where}: ffn_mult={mult!r} must be a number > 0")
        size = ffn_mult_to_intermediate_size(mult, hidden_size)
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise BlockConfigError(f"{where}: intermediate_size={size!r} must be an integer > 0")
    return FFNConfig("mlp", size, hidden_size)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


_ROPE_TYPES = ("default", "linear", "llama3")


class DeciLMConfig(PretrainedConfig):
    """Llama-family hyper-parameters plus one `block_configs` entry per layer."""

    model_type = "nemotron-nas"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 4096,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        intermediate_size: int | None = 14336,
        hidden_act: str = "silu",
        max_position_embeddings: int = 8192,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        rope_theta: float | None = None,
        rope_scaling: dict | None = None,
        rope_parameters: dict | None = None,
        qkv_bias: bool = False,
        o_proj_bias: bool = False,
        mlp_bias: bool = False,
        qk_norm: bool = False,
        tie_word_embeddings: bool = False,
        block_configs: list | None = None,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = 1,
        eos_token_id: int | list | None = 2,
        attention_bias: bool | None = None,  # Llama's name: bias on q, k, v and o
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        # RoPE: transformers 5 keeps everything in `rope_parameters`; Nemotron-51B's config.json
        # uses `rope_theta` + `rope_scaling`. Read either, keep one dict, write both (see to_dict).
        rope = dict(rope_parameters or rope_scaling or {})
        rope.setdefault("rope_type", rope.pop("type", "default"))
        rope.setdefault("rope_theta", rope_theta if rope_theta is not None else 10000.0)
        self.rope_parameters = rope
        self.rope_theta = rope["rope_theta"]
        if attention_bias:
            qkv_bias = o_proj_bias = True
        self.qkv_bias = qkv_bias
        self.o_proj_bias = o_proj_bias
        self.mlp_bias = mlp_bias
        self.qk_norm = qk_norm
        self.use_cache = use_cache
        if hidden_act != "silu":
            raise BlockConfigError(f"hidden_act={hidden_act!r} is not supported (accepted: silu)")
        if rope["rope_type"] not in _ROPE_TYPES:
            raise BlockConfigError(
                f"rope type {rope['rope_type']!r} is not supported (accepted: {', '.join(_ROPE_TYPES)})"
            )
        if block_configs is None:  # uniform parent layout
            uniform = {
                "attention": {"num_key_value_heads": self.num_key_value_heads},
                "ffn": {"intermediate_size": intermediate_size},
            }
            block_configs = [uniform] * num_hidden_layers
        if len(block_configs) != num_hidden_layers:
            raise BlockConfigError(
                f"block_configs has {len(block_configs)} entries but num_hidden_layers={num_hidden_layers}"
            )
        self.block_configs = [
            BlockConfig.from_dict(b, num_attention_heads, hidden_size, layer=i) for i, b in enumerate(block_configs)
        ]
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        # transformers' generic config code may set this after us; keep the attribute explicit.
        self.tie_word_embeddings = tie_word_embeddings

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        rope = dict(self.rope_parameters)
        out["rope_parameters"] = rope
        out["rope_theta"] = rope["rope_theta"]
        out["rope_scaling"] = None if rope["rope_type"] == "default" else rope
        out["block_configs"] = [b.to_dict(self.num_attention_heads, self.hidden_size) for b in self.block_configs]
        return out

    # --- helpers used by the model and by puzzlenas -----------------------------------
    def attention_layers(self) -> list[int]:
        """Indices of the layers that hold a KV cache (grouped-query attention)."""
        return [i for i, b in enumerate(self.block_configs) if b.attention.kind == "gqa"]
