"""Save and load DeciLM checkpoints: safetensors + config.json + the modeling source + tokenizer.

A saved directory loads anywhere with
    AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)
because `register_for_auto_class` makes transformers copy `modeling_decilm.py` and
`configuration_decilm.py` beside the weights and write `auto_map` into config.json.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import PuzzleError
from ..model import BlockConfigError, DeciLMConfig, DeciLMForCausalLM

DeciLMConfig.register_for_auto_class()
DeciLMForCausalLM.register_for_auto_class("AutoModelForCausalLM")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise PuzzleError(f"unknown dtype {name!r} (accepted: {', '.join(_DTYPES)})")
    return _DTYPES[name]


def written_by_puzzlenas(path: str | Path) -> bool:
    """Whether `path` is a checkpoint folder puzzlenas wrote (it carries the puzzlenas.json marker)."""
    from ..workdir import CHECKPOINT_MARKER

    return (Path(path) / CHECKPOINT_MARKER).is_file()


def check_replaceable(out_dir: str | Path, overwrite: bool = False) -> None:
    """Refuse to replace an existing file or non-empty folder that puzzlenas did not write."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite and not written_by_puzzlenas(out_dir):
        if not out_dir.is_dir() or any(out_dir.iterdir()):
            raise PuzzleError(f"{out_dir} exists and was not written by puzzlenas; give --overwrite to replace it "
                              "(its contents will be deleted) or choose another folder")


def save_checkpoint(model: DeciLMForCausalLM, out_dir: str | Path, tokenizer=None, overwrite: bool = False) -> Path:
    """Write the checkpoint into `out_dir`, replacing any earlier one atomically.

    The new folder is written as `out_dir.tmp`; the old one is moved to `out_dir.old` and only
    deleted once the new one is in place, so a kill at any point leaves the old or the new
    checkpoint (`workdir.finish_replace` completes or undoes the replace on the next start).
    A folder that puzzlenas did not write (no puzzlenas.json) is never replaced unless
    `overwrite` is set: it may be the user's."""
    import puzzlenas

    from ..utils import atomic_write_json, kill_point
    from ..workdir import CHECKPOINT_MARKER, finish_replace

    out_dir = Path(out_dir)
    tmp, old = out_dir.with_name(out_dir.name + ".tmp"), out_dir.with_name(out_dir.name + ".old")
    finish_replace(out_dir)
    check_replaceable(out_dir, overwrite)
    for aside in (tmp, old):  # ours from an interrupted save: delete; anything else: never touch
        if aside.exists():
            if not written_by_puzzlenas(aside) and not (aside.is_dir() and not any(aside.iterdir())):
                raise PuzzleError(f"{aside} is in the way of replacing {out_dir} safely; move it elsewhere")
            shutil.rmtree(aside)
    tmp.mkdir(parents=True)
    # the marker goes first: a half-written temp folder is then recognizably puzzlenas's to delete
    atomic_write_json(tmp / CHECKPOINT_MARKER, {"written_by": "puzzlenas", "version": puzzlenas.__version__})
    model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
        _drop_load_options(tmp / "tokenizer_config.json")
    kill_point("checkpoint.write", str(out_dir))
    if out_dir.exists():
        out_dir.rename(old)
    kill_point("checkpoint.swap", str(out_dir))
    tmp.rename(out_dir)
    if old.exists():
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    return out_dir


def _drop_load_options(tokenizer_config: Path) -> None:
    """transformers saves how the tokenizer was loaded (`local_files_only`: true when the process
    started offline) with what it is; the same tokenizer must give the same bytes, or a stage's
    output fingerprint changes with the environment and finished work is redone."""
    if not tokenizer_config.is_file():
        return
    config = json.loads(tokenizer_config.read_text(encoding="utf-8"))
    if config.pop("local_files_only", None) is not None:
        tokenizer_config.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _check_checkpoint_dir(path: Path) -> dict:
    if not path.is_dir():
        raise PuzzleError(f"checkpoint {str(path)!r} not found (expected a directory with config.json and *.safetensors)")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise PuzzleError(f"{path}: missing config.json")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise PuzzleError(f"{config_file}: not valid JSON ({exc})") from None
    if raw.get("model_type") != "nemotron-nas":
        raise PuzzleError(
            f"{path}: model_type={raw.get('model_type')!r} is not a DeciLM checkpoint (accepted: nemotron-nas); "
            "convert it first with `puzzlenas convert`"
        )
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise PuzzleError(f"{path}: no *.safetensors weight file")
    for f in files:  # a truncated file fails here with a clear name, not deep inside torch
        try:
            with safe_open(f, "pt") as handle:
                for name in handle.keys():
                    handle.get_slice(name)
        except SafetensorError as exc:
            raise PuzzleError(f"{f}: unreadable or truncated safetensors file ({exc})") from None
    return raw


def load_config(path: str | Path) -> DeciLMConfig:
    path = Path(path)
    _check_checkpoint_dir(path)
    try:
        return DeciLMConfig.from_pretrained(path)
    except BlockConfigError as exc:
        raise PuzzleError(f"{path / 'config.json'}: {exc}") from None


def load_checkpoint(path: str | Path, dtype: str | torch.dtype | None = None) -> DeciLMForCausalLM:
    path = Path(path)
    config = load_config(path)
    kwargs = {"dtype": parse_dtype(dtype)} if dtype is not None else {}
    try:
        model = DeciLMForCausalLM.from_pretrained(path, config=config, **kwargs)
    except (OSError, RuntimeError, ValueError, SafetensorError) as exc:
        raise PuzzleError(f"could not load {path}: {str(exc).splitlines()[0]}") from None
    return model.eval()


# --- one process's part of a parent split by layers -------------------------------------------
#
# With bld.parallel / score.parallel = layers each torchrun rank holds a contiguous range of the
# parent's decoder layers (bld/pipeline.py). It reads only those tensors from the safetensors files,
# one at a time, into a model built on the meta device, so the ranks' parts add up to one parent.
# (Loading the whole parent and then dropping layers relies on the loader leaving the dropped
# tensors unread in the mmap; a dtype cast on load copies them all: a whole parent per rank.)


class PartialParentError(PuzzleError):
    """A computation reached a part of the parent this process did not load."""


@dataclass(frozen=True)
class ParentPart:
    """What one process of a layer split holds: decoder layers lo..hi-1, the embedding if
    `embedding`, the final norm and LM head if `head` (with tied embeddings the head is the
    embedding's matrix, read again where the head is kept)."""

    lo: int
    hi: int
    embedding: bool
    head: bool

    def keeps(self, name: str) -> bool:
        """Whether the tensor `name` of a DeciLMForCausalLM state dict is part of this process's share."""
        if name.startswith("model.layers."):
            return self.lo <= int(name.split(".")[2]) < self.hi
        if name.startswith("model.embed_tokens."):
            return self.embedding
        return self.head  # model.norm.*, lm_head.*

    def describe(self) -> str:
        return f"layers {self.lo}-{self.hi - 1}" + " + embedding" * self.embedding + " + final norm and LM head" * self.head


@dataclass(frozen=True)
class LoadedPart:
    """What load_checkpoint_part read: parameters and bytes held (in the loaded dtype), of the whole parent's."""

    part: ParentPart
    params: int
    bytes: int
    whole_params: int
    whole_bytes: int


class NotLoaded(torch.nn.Module):
    """A part of the parent another process holds (a decoder layer, the embedding, the final norm or
    the LM head): no weights. library.init.trace_parent passes the stream through a layer it
    stands for unchanged (no attention, no FFN); calling it is an error that names it."""

    self_attn = None
    mlp = None

    def __init__(self, what: str = "this part"):
        super().__init__()
        self.what = what

    def forward(self, *args, **kwargs):
        raise PartialParentError(f"{self.what} of the parent is not loaded in this process (the parent's layers are "
                                 "split over the torchrun ranks)")


def load_checkpoint_part(path: str | Path, part: ParentPart, dtype: str | torch.dtype | None = None) -> DeciLMForCausalLM:
    """The DeciLM checkpoint at `path` with only the tensors `part` keeps: each read on its own
    from the safetensors files (safe_open(...).get_tensor, never a pickle), into a model built on
    the meta device. What it does not keep (layers, embedding, final norm and LM head) is a
    NotLoaded placeholder. `model.loaded_part` (a LoadedPart) says what was read."""
    path = Path(path)
    config = load_config(path)  # also checks every safetensors header
    dtype = parse_dtype(dtype) if dtype is not None else None
    with torch.device("meta"):
        model = DeciLMForCausalLM(config)
    where, whole = {}, 0  # stored tensor name -> its file; the whole parent's parameter count
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, "pt") as handle:
            for key in handle.keys():
                where[key] = f
                whole += math.prod(handle.get_slice(key).get_shape())
    wanted = {}  # state-dict name -> stored name
    for name in model.state_dict():
        if not part.keeps(name):
            continue
        stored = name
        if name not in where and name == "lm_head.weight" and config.tie_word_embeddings:
            stored = "model.embed_tokens.weight"  # tied: saved once, as the embedding
        if stored not in where:
            raise PuzzleError(f"{path}: no tensor {stored!r} in its safetensors files")
        wanted[name] = stored
    state = {}
    for f in sorted({where[s] for s in wanted.values()}):
        with safe_open(f, "pt") as handle:
            read = {}
            for name, stored in wanted.items():
                if where[stored] == f:
                    if stored not in read:
                        t = handle.get_tensor(stored)
                        read[stored] = t if dtype is None else t.to(dtype)
                    state[name] = read[stored]
    model.load_state_dict(state, strict=False, assign=True)
    if "lm_head.weight" in state and "model.embed_tokens.weight" in state and config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight  # one matrix, as a whole tied model holds it
    for i in range(config.num_hidden_layers):
        if not part.lo <= i < part.hi:
            model.model.layers[i] = NotLoaded(f"layer {i}")
    if not part.embedding:
        model.model.embed_tokens = NotLoaded("the embedding")
    if not part.head:
        model.model.norm = NotLoaded("the final norm")
        model.lm_head = NotLoaded("the LM head")
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # a tensor of the part that no file held
        raise PuzzleError(f"{path}: {left[0]} was not read from its safetensors files")
    held = list(model.parameters())  # a tied matrix once
    element = held[0].element_size() if held else 4
    model.loaded_part = LoadedPart(part, sum(p.numel() for p in held), sum(p.numel() * p.element_size() for p in held),
                                   whole, whole * element)
    return model.eval()


# --- inspection ---------------------------------------------------------------------------


def attention_params(config: DeciLMConfig, kind: str, num_key_value_heads: int | None = None) -> int:
    """Parameters of one attention sub-block, its norm included."""
    hidden, head_dim, heads = config.hidden_size, config.head_dim, config.num_attention_heads
    if kind == "no_op":
        return 0
    if kind == "linear":
        return hidden * hidden + hidden
    q, kv = heads * head_dim, num_key_value_heads * head_dim
    n = hidden * (q + 2 * kv) + q * hidden + hidden
    n += (q + 2 * kv) if config.qkv_bias else 0
    n += hidden if config.o_proj_bias else 0
    n += 2 * head_dim if config.qk_norm else 0
    return n


def ffn_params(config: DeciLMConfig, kind: str, intermediate_size: int | None = None) -> int:
    """Parameters of one FFN sub-block, its norm included."""
    hidden = config.hidden_size
    if kind == "no_op":
        return 0
    if kind == "linear":
        return hidden * hidden + hidden
    n = 3 * hidden * intermediate_size + hidden
    return n + (2 * intermediate_size + hidden if config.mlp_bias else 0)


def kv_bytes_per_token(config: DeciLMConfig, bytes_per_element: int) -> int:
    return sum(
        2 * b.attention.num_key_value_heads * config.head_dim * bytes_per_element
        for b in config.block_configs
        if b.attention.kind == "gqa"
    )


@dataclass
class CheckpointSummary:
    config: DeciLMConfig
    rows: list[dict]
    total_params: int
    weight_bytes: int
    stored_dtype: str
    kv_bytes_per_token: int

    def format(self) -> str:
        lines = [f"{'layer':>5}  {'attention':<10} {'kv':>3}  {'ffn':<7} {'size':>6}  {'params':>12}"]
        for r in self.rows:
            lines.append(
                f"{r['layer']:>5}  {r['attention']:<10} {r['kv'] if r['kv'] is not None else '-':>3}  "
                f"{r['ffn']:<7} {r['ffn_size'] if r['ffn_size'] is not None else '-':>6}  {r['params']:>12,}"
            )
        c = self.config
        embed = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
        lines += [
            "",
            f"layers: {c.num_hidden_layers}  hidden: {c.hidden_size}  heads: {c.num_attention_heads}  "
            f"head_dim: {c.head_dim}  vocab: {c.vocab_size}  tied embeddings: {c.tie_word_embeddings}",
            f"parameters: {self.total_params:,} (embeddings + head: {embed:,})",
            f"weight bytes ({self.stored_dtype}): {self.weight_bytes:,} ({self.weight_bytes / 2**20:.1f} MiB)",
            f"KV-cache bytes per token ({self.stored_dtype}): {self.kv_bytes_per_token:,}",
        ]
        return "\n".join(lines)


def checkpoint_summary(path: str | Path) -> CheckpointSummary:
    """Per-layer architecture and totals, read from config.json and safetensors headers only."""
    path = Path(path)
    config = load_config(path)
    rows = []
    for i, b in enumerate(config.block_configs):
        a, f = b.attention, b.ffn
        rows.append(
            {
                "layer": i,
                "attention": a.kind,
                "kv": a.num_key_value_heads,
                "ffn": f.kind,
                "ffn_size": f.intermediate_size,
                "params": attention_params(config, a.kind, a.num_key_value_heads)
                + ffn_params(config, f.kind, f.intermediate_size),
            }
        )
    weight_bytes, total_params, dtypes = 0, 0, set()
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, "pt") as handle:
            for name in handle.keys():
                tensor_slice = handle.get_slice(name)
                numel = 1
                for dim in tensor_slice.get_shape():
                    numel *= dim
                dtype = tensor_slice.get_dtype()
                dtypes.add(dtype)
                total_params += numel
                weight_bytes += numel * _SAFETENSORS_BYTES.get(dtype, 4)
    stored = "/".join(sorted(dtypes))
    element = max(_SAFETENSORS_BYTES.get(d, 4) for d in dtypes)
    return CheckpointSummary(config, rows, total_params, weight_bytes, stored, kv_bytes_per_token(config, element))


_SAFETENSORS_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I8": 1, "U8": 1}
