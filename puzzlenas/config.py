"""One typed configuration tree, a section per pipeline stage, loaded from YAML.

    cfg = load_config("configs/smollm2.yaml", overrides=["bld.tokens=200000"])

Unknown keys and wrong types are errors that name the key (`bld.lr: Input should be a valid
number`). Every field has a default that makes sense for SmolLM2-135M on a laptop CPU.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Annotated, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import PuzzleError

log = logging.getLogger(__name__)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    """Distillation text. `path`: a .txt/.jsonl/.parquet file, a folder of them, or a HF dataset
    name (hub only). None: the parent generates its own text (sampled, cached). Both: with
    `generated_fraction` set, that fraction of the sequences is the parent's own text and the rest
    comes from `path`, so a narrow corpus does not teach the child only its domain."""

    path: str | None = None
    text_field: str = "text"
    seq_len: int = Field(256, gt=1)
    max_train_sequences: int = Field(4096, gt=0)
    val_sequences: int = Field(32, gt=0)
    seed: int = 0
    # self-generated text: all of it when path is None; with a path and generated_fraction, the
    # generated share of the mix (at most generate_sequences of them; the corpus part is sized to fit)
    generate_sequences: int = Field(256, gt=0)
    generate_temperature: float = Field(1.0, gt=0)
    generated_fraction: float | None = Field(None, gt=0, lt=1)
    # the precision the parent writes its text in: "bfloat16", a bf16 copy of it (1.8x fp32's
    # tokens/s on an AVX512-BF16 CPU, its next-token distribution a KL of 0.0014 from fp32's for
    # SmolLM2, README: Benchmarks; on an AVX2-only CPU bf16 is emulated and far slower); "auto":
    # bf16 where the device runs bf16 matmuls natively. float32, the default, is the parent as it
    # is held, and what releases before this option wrote (their caches keep their key)
    dtype: Literal["auto", "float32", "bfloat16"] = "float32"
    # under torchrun (the tokens are the same either way): "none": rank 0 holds the whole parent
    # to generate; "layers": its layers are split over the ranks (model/split.py), for a parent
    # too big for one device
    parallel: Literal["none", "layers"] = "none"

    @model_validator(mode="after")
    def _mix_needs_a_corpus(self):
        if self.generated_fraction is not None and self.path is None:
            raise ValueError(f"data.generated_fraction={self.generated_fraction} mixes the parent's text with a corpus, but "
                             "data.path is not set (without a path all the text is generated); set data.path or remove it")
        return self


AttentionChoice = int | Literal["linear", "no_op"]
FFNChoice = float | int | Literal["linear", "no_op"]


class LayerOverride(Section):
    attention: list[AttentionChoice] | None = None
    ffn: list[FFNChoice] | None = None


class SearchSpaceConfig(Section):
    """Per-layer alternatives. attention: KV-head counts, "linear", "no_op". ffn: fractions of the
    parent's intermediate size (0 < x <= 1, floats) or absolute sizes (ints > 1), "linear", "no_op".
    attention None means: the parent's KV count, its halvings that divide the query heads, 1,
    linear and no_op (SmolLM2-135M: 3, 1, linear, no_op). `layers` overrides either list per layer."""

    attention: list[AttentionChoice] | None = None
    ffn: list[FFNChoice] = Field(default_factory=lambda: [1.0, 0.75, 0.5, 0.25, 0.1, "linear", "no_op"])
    layers: dict[int, LayerOverride] = Field(default_factory=dict)
    # restrict the search to these layers (the others keep the parent's blocks); None: all layers
    only_layers: list[int] | None = None
    # round searched FFN sizes to a multiple of this (hardware-friendly shapes)
    ffn_multiple_of: int = Field(32, gt=0)


class InitConfig(Section):
    ffn_channels: Literal["contribution", "weight_norm"] = "contribution"
    # calibration tokens (sequences x seq_len) should be several times the hidden size, or the
    # least-squares fit of the linear alternatives overfits
    calibration_sequences: int = Field(16, gt=0)
    linear_ridge: float = Field(1e-2, ge=0)


class CoupledPairConfig(Section):
    """One layer's attention and FFN alternative trained together (coupled BLD)."""

    layer: int = Field(ge=0)
    attention: AttentionChoice
    ffn: FFNChoice


class OptimConfig(Section):
    """AdamW, linear warm-up over warmup_fraction of the steps, cosine decay to min_lr_fraction * lr,
    gradient clipping (0: off). The one optimizer section: `bld.optim` and `gkd.optim`."""

    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_fraction: float = Field(0.05, ge=0, lt=1)
    min_lr_fraction: float = Field(0.1, ge=0, le=1)
    grad_clip: float = Field(1.0, ge=0)


class _TrainingSection(Section):
    """A section with an `optim` sub-section; the keys that lived at its top level before
    (`bld.lr`, `gkd.grad_clip`, ...) still load: they are moved into `optim`."""

    optim_defaults: ClassVar[dict] = {}  # this stage's defaults where they differ from OptimConfig's

    @model_validator(mode="before")
    @classmethod
    def _move_optim_keys(cls, raw):
        if not isinstance(raw, dict) or not isinstance(raw.get("optim") or {}, dict):
            return raw  # not a mapping: left for the field's own error
        raw, optim = dict(raw), dict(raw.get("optim") or {})
        for key in OptimConfig.model_fields:
            if key in raw:
                if key in optim:
                    raise ValueError(f"{key} is set twice (old place and optim.{key}); keep optim.{key}")
                optim[key] = raw.pop(key)
        raw["optim"] = {**cls.optim_defaults, **optim}
        return raw


class BLDConfig(_TrainingSection):
    tokens: int = Field(131072, gt=0)
    batch_size: int = Field(8, gt=0)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    # under torchrun: "alternatives": every rank holds the whole parent and trains a share of the
    # alternatives; "layers": the parent's layers are split over the ranks (for a parent too big
    # for one device), activations pass rank to rank, each rank trains its layers' alternatives
    parallel: Literal["alternatives", "layers"] = "alternatives"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    checkpoint_every: int = Field(50, gt=0)
    # train each rank's alternatives in consecutive groups of this many, one full pass over the
    # tokens per group: only one group's weights and AdamW state are on the device at a time, at
    # the price of tracing the parent once per pass (the blocks are the same). null: all at once
    alternatives_per_pass: int | None = Field(None, gt=0)
    # coupled BLD: these (layer, attention, ffn) pairs are also trained as one unit that imitates
    # the parent's whole layer; the search then uses the pair's own score and weights
    coupled: list[CoupledPairConfig] = Field(default_factory=list)


class ScoreConfig(Section):
    metric: Literal["kl", "lm_loss", "agreement"] = "kl"
    sequences: int = Field(16, gt=0)
    batch_size: int = Field(4, gt=0)
    # under torchrun (the scores are the same either way): "alternatives": every rank holds the
    # whole parent and scores a share of the alternatives; "layers": the parent's layers are split
    # over the ranks (for a parent too big for one device), damaged streams pass rank to rank
    parallel: Literal["alternatives", "layers"] = "alternatives"
    # a killed run resumes mid-stage: the sums so far are saved after every batch and, inside one,
    # after an alternative once this many seconds have passed (0: after every alternative)
    checkpoint_seconds: float = Field(60.0, ge=0)


class ScenarioConfig(Section):
    name: str = "default"
    batch_size: int = Field(1, gt=0)
    prompt_len: int = Field(256, gt=0)
    generate_len: int = Field(128, gt=0)


class CostConfig(Section):
    device: str = "auto"  # "auto": measure here; or a roofline preset (h100-sxm, h200, a100-80gb, l40s, cpu-roofline)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    warmup: int = Field(2, ge=0)
    repeats: int = Field(7, gt=0)
    scenario: ScenarioConfig = Field(default_factory=ScenarioConfig)


_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


def parse_size(text: str | float | int) -> float:
    """'40GiB', '500MB', '1.5e9' -> bytes."""
    if isinstance(text, (int, float)):
        return float(text)
    m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise PuzzleError(f"memory {text!r} is not a size (examples: 40GiB, 500MB, 2e9)")
    return float(m.group(1)) * _UNITS[m.group(2).lower()]


def parse_factor(text: str | float) -> float:
    """'1.5x' or 1.5 -> 1.5."""
    if isinstance(text, (int, float)):
        return float(text)
    m = re.fullmatch(r"\s*([0-9.]+)\s*[xX]?\s*", str(text))
    if not m:
        raise PuzzleError(f"throughput {text!r} is not a factor (examples: 1.5x, 2)")
    return float(m.group(1))


class SearchConfig(Section):
    throughput: float | None = Field(1.5, gt=0)  # >= k x the parent's throughput ("1.5x" accepted)
    memory_bytes: float | None = Field(None, gt=0)  # weights + KV cache of the scenario ("40GiB" accepted)
    latency_s: float | None = Field(None, gt=0)
    params: float | None = Field(None, gt=0)
    solutions: int = Field(5, gt=0)
    diversity: float = Field(0.2, ge=0, le=1)
    time_limit_s: float = Field(60.0, gt=0)
    mip_gap: float = Field(1e-3, ge=0, lt=1)  # relative optimality tolerance of every solve (HiGHS's definition)
    # interaction-corrected search (search/refine.py): rounds of re-scoring every alternative inside the
    # current best child and solving again; 0: the additive replace-1-block sum alone
    refine_rounds: int = Field(0, ge=0)
    # a trust region for each round: at most this many layers differ from the child it re-scored in (null: any).
    # The prediction is first-order around that child: on SmolLM2 at 1.5x, unlimited rounds changed 26 of
    # 30 layers, predicted KL 0.71 and measured 1.61; 4 per round measured better every round (README)
    refine_max_changes: int | None = Field(4, ge=1)

    @field_validator("throughput", mode="before")
    @classmethod
    def _factor(cls, v):
        try:
            return None if v is None else parse_factor(v)
        except PuzzleError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("memory_bytes", "params", mode="before")
    @classmethod
    def _size(cls, v):
        try:
            return None if v is None else parse_size(v)
        except PuzzleError as exc:
            raise ValueError(str(exc)) from None


class GKDConfig(_TrainingSection):
    """Global distillation of the realized child against the frozen parent. Under torchrun the
    child is sharded with FSDP2; `teacher: shard` shards the parent too, `replicate` keeps a whole
    copy per rank."""

    # which search solution to realize: a rank, or auto: the one with the lowest KL to the parent
    # measured on held-out text before GKD (realize/selection.py)
    solution: Annotated[int, Field(ge=0)] | Literal["auto"] = "auto"
    tokens: int = Field(262144, gt=0)
    batch_size: int = Field(8, gt=0)  # global: split across torchrun ranks
    grad_accum: int = Field(1, gt=0)
    optim_defaults: ClassVar[dict] = {"lr": 5e-5}
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(lr=5e-5))
    activation_checkpointing: bool = False  # recompute each layer in backward: less memory, ~1/3 more compute
    teacher: Literal["shard", "replicate"] = "shard"
    # under torchrun: the student's fp32 shards, grads and AdamW state in host RAM (FSDP2 CPU
    # offload), the device holding only the layers in flight; slower (host-device copies, CPU AdamW)
    offload: bool = False
    kl_weight: float = Field(1.0, ge=0)
    cosine_weight: float = Field(1.0, ge=0)
    lm_weight: float = Field(0.0, ge=0)
    # learning rate of what the child shares with the parent (sub-blocks of the parent's shape,
    # embeddings, final norm, head) as a fraction of optim.lr; the new blocks train at optim.lr.
    # 0 freezes the shared weights (no weight gradients for them: a cheaper backward)
    untouched_lr_scale: float = Field(1.0, ge=0)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    val_every: int = Field(50, gt=0)
    checkpoint_every: int = Field(50, gt=0)

    @field_validator("solution", mode="before")
    @classmethod
    def _solution(cls, v):
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
            return v
        raise ValueError(f"{v!r} is neither a solution rank (0, 1, ...) nor auto")


class EvalConfig(Section):
    """What evaluation measures and where its data comes from (eval/data.py): `task_data_dir` (a
    local folder) > $PUZZLENAS_DATA > the Hugging Face hub. No default folder: a path relative to
    wherever the command was started from breaks the eval stage of runs started elsewhere."""

    task_data_dir: str | None = None
    # lm-eval task or group names; the shipped ones (eval/tasks) read a local copy when configured
    tasks: list[str] = Field(default_factory=lambda: ["lambada_openai", "arc_challenge", "boolq", "openbookqa"])
    # items per task (None: all); 500 keeps an accuracy's standard error near 0.02, all when a task has fewer
    limit: int | None = Field(500, gt=0)
    ppl_context: int = Field(512, gt=1)
    ppl_max_tokens: int | None = Field(32768, gt=0)  # None: the whole WikiText-2 test file
    kl_sequences: int = Field(16, gt=0)
    batch_size: int = Field(8, gt=0)
    # timed rounds per model (models in turns; speed-up = median of per-round ratios). 3 was too few: the
    # default run's 1.2x child measured 1.13x (rounds 1.00, 1.13, 1.20) although the same architecture
    # before GKD measured 1.19x in the same run, and 1.24x over 9 rounds afterwards
    speed_repeats: int = Field(7, gt=0)
    # under torchrun (the metrics are the same either way): "none": one process holds every model;
    # "layers": the parent's and each child's layers are split over the ranks (model/split.py)
    parallel: Literal["none", "layers"] = "none"

    @field_validator("task_data_dir")
    @classmethod
    def _folder_named(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("must name a folder (or be null: $PUZZLENAS_DATA, else the Hugging Face hub)")
        return v

    @field_validator("tasks")
    @classmethod
    def _task_names(cls, v: list[str]) -> list[str]:
        for name in v:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", name):
                raise ValueError(f"{name!r} is not an lm-eval task name (examples: arc_challenge, mmlu, hellaswag)")
        if len(set(v)) < len(v):
            raise ValueError(f"{sorted({t for t in v if v.count(t) > 1})[0]!r} is listed twice")
        return v


class TargetConfig(Section):
    """Where the child will be served. The engine decides which block kinds the search may use,
    where costs are measured and how evaluation times speed. torch: puzzlenas's own PyTorch
    model (every block kind); vllm: vLLM (no linear blocks, attention kept in layer 0); llama.cpp:
    the child exported to GGUF in `gguf_type` and run by llama.cpp (no linear FFN); auto: vLLM
    when it is installed here, else torch."""

    engine: Literal["auto", "torch", "vllm", "llama.cpp"] = "torch"
    # llama.cpp only: the GGUF type models are exported to, timed in and served in
    gguf_type: Literal["f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"] = "q8_0"


class PuzzleConfig(Section):
    parent: str = "smollm2"
    dtype: Literal["float32", "bfloat16"] = "float32"
    seed: int = 0
    target: TargetConfig = Field(default_factory=TargetConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    search_space: SearchSpaceConfig = Field(default_factory=SearchSpaceConfig)
    init: InitConfig = Field(default_factory=InitConfig)
    bld: BLDConfig = Field(default_factory=BLDConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    costs: CostConfig = Field(default_factory=CostConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    gkd: GKDConfig = Field(default_factory=GKDConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="before")
    @classmethod
    def _old_section_names(cls, data):
        # `scoring:` was the score stage's section before stage, package and section names were made one
        # (`score`); configs written then still load, the same as if they said `score:`.
        if isinstance(data, dict) and "scoring" in data:
            data = dict(data)
            old, new = data.pop("scoring"), data.get("score")
            data["score"] = {**new, **old} if isinstance(old, dict) and isinstance(new, dict) else old
            log.warning("config section `scoring:` is now called `score:`; read it as `score:`")
        return data

    @field_validator("parent")
    @classmethod
    def _parent_not_empty(cls, v: str) -> str:
        if not v:
            raise ValueError("must name a parent (a path or 'smollm2')")
        return v


def _format_validation_error(exc: ValidationError, source: str) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "(top level)"
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"{source}: {where}: {msg}{more}"


def _apply_override(raw: dict, override: str) -> None:
    if "=" not in override:
        raise PuzzleError(f"override {override!r} must look like key.sub=value")
    key, value = override.split("=", 1)
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise PuzzleError(f"override {override!r}: {part} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise PuzzleError(f"override {override!r}: the value is not valid YAML ({str(exc).splitlines()[0]})") from None


def config_from_dict(raw: dict, source: str = "config", overrides: list[str] | None = None) -> PuzzleConfig:
    raw = dict(raw or {})
    for override in overrides or []:
        _apply_override(raw, override)
    try:
        cfg = PuzzleConfig.model_validate(raw)
    except ValidationError as exc:
        raise PuzzleError(_format_validation_error(exc, source)) from None
    _resolve_target(cfg)
    return cfg


def _resolve_target(cfg: PuzzleConfig) -> None:
    """Fix `target.engine: auto` to the engine found here, and refuse at once a search space that
    asks the engine for a block kind it cannot serve (kinds the user did not ask for are dropped
    quietly from the defaults when the search space is enumerated)."""
    from .engines import get_engine, resolve_engine_name
    from .library.space import Alternative

    cfg.target.engine = resolve_engine_name(cfg.target.engine)
    engine = get_engine(cfg.target.engine)
    if cfg.target.engine == "llama.cpp":
        type(engine).gguf_type = cfg.target.gguf_type  # engines are built by name; the type travels with the class
    space = cfg.search_space
    asked: list[tuple[str, str, object]] = []
    if "attention" in space.model_fields_set and space.attention:
        asked += [("search_space.attention", "attention", c) for c in space.attention]
    # The default list is not the user's choice even when a file names it: the config.yaml a run
    # saves writes every field, and must load back as the same configuration.
    if "ffn" in space.model_fields_set and space.ffn != SearchSpaceConfig().ffn:
        asked += [("search_space.ffn", "ffn", c) for c in space.ffn]
    for layer, override in space.layers.items():
        asked += [(f"search_space.layers.{layer}.attention", "attention", c, layer) for c in override.attention or []]
        asked += [(f"search_space.layers.{layer}.ffn", "ffn", c, layer) for c in override.ffn or []]
    asked = [(*a, None) if len(a) == 3 else a for a in asked]
    for i, pair in enumerate(cfg.bld.coupled):
        asked += [(f"bld.coupled[{i}].attention", "attention", pair.attention, pair.layer),
                  (f"bld.coupled[{i}].ffn", "ffn", pair.ffn, pair.layer)]
    for where, sub, choice, layer in asked:
        kind = choice if isinstance(choice, str) else ("gqa" if sub == "attention" else "mlp")
        reason = engine.unsupported(Alternative(-1 if layer is None else layer, sub, kind), None)
        if reason:
            raise PuzzleError(f"{where}: {choice!r} cannot be served by target.engine={engine.name} ({reason}); "
                              "remove it or choose another engine")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PuzzleConfig:
    if path is None:
        return config_from_dict({}, "defaults", overrides)
    path = Path(path)
    if not path.is_file():
        raise PuzzleError(f"config file {str(path)!r} not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise PuzzleError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise PuzzleError(f"{path}: the top level must be a mapping of sections")
    return config_from_dict(raw, str(path), overrides)


PRESETS = Path(__file__).parent / "presets"


def preset_path(name: str) -> Path:
    path = PRESETS / f"{name}.yaml"
    if not path.is_file():
        raise PuzzleError(f"unknown preset {name!r} (available: {', '.join(sorted(p.stem for p in PRESETS.glob('*.yaml')))})")
    return path


def save_config(cfg: PuzzleConfig, path: str | Path) -> None:
    from .utils import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
