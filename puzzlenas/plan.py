"""Memory plan: the peak memory per device each stage will need, from the parent's shape alone.

    puzzlenas plan configs/llama3_8b_gpu.yaml --gpus 8 --gpu-memory 80GiB

Nothing is loaded: the architecture comes from the parent's config.json (a folder holding only that
file is enough), a .gguf file's metadata, or a built-in preset (llama-3.1-8b, -70b, -405b, smollm2)
matched by name when the parent is not on this machine. Each stage is planned for the strategy it
runs with (the `strategy` column); the formulas are in the README ("Memory plan") and printed with
their numbers under the table.

`check_run_fits` is what `puzzlenas run` calls before it starts: on a CUDA device, a stage that
will run and does not fit stops the run with one line that says what to change. On a CPU it
checks nothing (the tests' tiny parents always fit, and a busy machine's free RAM says little
about what the run will get); `puzzlenas plan` there compares with the machine's RAM.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from .config import PuzzleConfig, parse_size
from .errors import PuzzleError

GiB = 2**30
# Part of a device the plan lets a stage use: the rest is the CUDA context, NCCL buffers and the
# caching allocator's fragmentation (a few GiB on an 80 GiB GPU).
USABLE = 0.9

# Published shapes (the models' config.json), for planning a parent that is not on this machine.
PRESETS = {
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "llama-3.1-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                          num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "llama-3.1-405b": dict(hidden_size=16384, intermediate_size=53248, num_hidden_layers=126, num_attention_heads=128,
                           num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
}
ALIASES = {"llama-3-8b": "llama-3.1-8b", "llama-3-70b": "llama-3.1-70b", "smollm2-135m": "smollm2"}


@dataclass
class Arch:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool
    head_dim: int = 0
    source: str = ""

    def __post_init__(self):
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        h = self.hidden_size
        return 2 * h * self.q_dim + 2 * h * self.kv_dim + 3 * h * self.intermediate_size + 2 * h

    @property
    def embed_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def params(self) -> int:
        head = 0 if self.tie_word_embeddings else self.embed_params
        return self.num_hidden_layers * self.layer_params + self.embed_params + head + self.hidden_size

    def decilm_config(self):
        from .model import DeciLMConfig

        return DeciLMConfig(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                            num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim,
                            intermediate_size=self.intermediate_size, tie_word_embeddings=self.tie_word_embeddings)


def _from_hf_config(raw: dict, source: str) -> Arch:
    if raw.get("block_configs"):  # a converted (DeciLM) parent: its first layer's shape
        block = raw["block_configs"][0]
        raw = {**raw, "num_key_value_heads": raw.get("num_key_value_heads") or
               raw["num_attention_heads"] // block["attention"]["n_heads_in_group"],
               "intermediate_size": block["ffn"].get("intermediate_size") or raw.get("intermediate_size")}
    try:
        return Arch(int(raw["hidden_size"]), int(raw["intermediate_size"]), int(raw["num_hidden_layers"]),
                    int(raw["num_attention_heads"]), int(raw.get("num_key_value_heads") or raw["num_attention_heads"]),
                    int(raw["vocab_size"]), bool(raw.get("tie_word_embeddings", False)), int(raw.get("head_dim") or 0),
                    source)
    except (KeyError, TypeError, ValueError) as exc:
        raise PuzzleError(f"{source}: no usable {exc} in the model config (need hidden_size, intermediate_size, "
                          "num_hidden_layers, num_attention_heads, vocab_size)") from None


def _from_gguf(path: Path) -> Arch:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def field(key):
        f = reader.fields.get(key)
        if f is None:
            return None
        value = f.parts[f.data[0]]
        return value.tobytes().decode() if value.dtype.kind == "u" and key.endswith("architecture") else value[0]

    arch = field("general.architecture")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    raw = {"hidden_size": field(f"{arch}.embedding_length"), "intermediate_size": field(f"{arch}.feed_forward_length"),
           "num_hidden_layers": field(f"{arch}.block_count"), "num_attention_heads": field(f"{arch}.attention.head_count"),
           "num_key_value_heads": field(f"{arch}.attention.head_count_kv"),
           "vocab_size": len(tokens.data) if tokens is not None else None,
           "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors)}
    return _from_hf_config({k: v for k, v in raw.items() if v is not None}, f"{path} (GGUF metadata)")


def parent_arch(parent: str) -> Arch:
    """The parent's shape without loading its weights; one line when it cannot be found."""
    key = parent.strip().lower()
    path = Path(parent).expanduser()
    if (path / "config.json").is_file():
        try:
            raw = json.loads((path / "config.json").read_text())
        except (OSError, json.JSONDecodeError):
            raise PuzzleError(f"{path / 'config.json'}: not valid JSON") from None
        return _from_hf_config(raw, str(path / "config.json"))
    if path.is_file() and path.suffix == ".gguf":
        return _from_gguf(path)
    name = ALIASES.get(key, key)
    if name in PRESETS:
        return Arch(**PRESETS[name], source=f"built-in preset {name}")
    base = path.name.lower()  # /models/Llama-3.1-8B-Instruct, not on this machine: its name says which preset
    for name in sorted(PRESETS, key=len, reverse=True):
        if base.startswith(name) or base.startswith(name.replace("llama-3.1", "meta-llama-3.1")):
            return Arch(**PRESETS[name], source=f"built-in preset {name} ({parent} is not on this machine)")
    raise PuzzleError(f"parent {parent!r}: no config.json there and no built-in shape of that name; give a folder "
                      f"with the model's config.json, or --arch one of {', '.join(PRESETS)}")


@dataclass
class Item:
    what: str  # weights | optimizer | activations | caches
    label: str
    bytes: float
    formula: str


@dataclass
class StagePlan:
    stage: str
    strategy: str
    items: list[Item] = field(default_factory=list)
    # the knob that scales activations: (config key, current value, bytes per unit)
    batch: tuple[str, int, float] | None = None
    sharded: bool = False  # weights/optimizer divide by the number of devices

    def part(self, what: str) -> float:
        return sum(i.bytes for i in self.items if i.what == what)

    @property
    def total(self) -> float:
        return sum(i.bytes for i in self.items)


@dataclass
class Plan:
    arch: Arch
    devices: int
    device_bytes: float
    device_name: str
    stages: list[StagePlan]
    cfg: PuzzleConfig

    @property
    def gkd_accum(self) -> int:
        return self.cfg.gkd.grad_accum

    def fits(self, s: StagePlan) -> bool:
        return s.total <= USABLE * self.device_bytes

    def _batch_fix(self, s: StagePlan) -> str | None:
        """The config change that makes `s` fit by its batch alone, or None."""
        cap = USABLE * self.device_bytes
        if not s.batch:
            return None
        key, value, per = s.batch
        fit = int((cap - (s.total - value * per)) // per)
        if fit < 1:
            return None
        if fit >= value:
            return ""
        if key == "gkd.batch_size":  # global, split over the devices: keep the sequences per step
            was = self.cfg.gkd.batch_size * self.cfg.gkd.grad_accum
            batch = fit * self.devices
            accum = math.ceil(was / batch)
            return (f"set gkd.batch_size={batch} gkd.grad_accum={accum} (per device {value} -> {fit}; "
                    f"{batch * accum} sequences per step, was {was})")
        return f"set {key}={fit} (now {value})"

    def _bld_passes_fix(self) -> str | None:
        """bld.alternatives_per_pass with the fewest passes that makes bld fit (with its batch fix), or None."""
        from .library.space import is_parent_alternative, target_alternatives

        config = self.arch.decilm_config()
        alts = [a for a in target_alternatives(self.cfg, config) if a.trainable and not is_parent_alternative(a, config)]
        most = max((len(r) for r in bld_rank_alternatives(self.cfg, self.arch, alts, self.devices)), default=0)
        now = self.cfg.bld.alternatives_per_pass or most
        tried = set()
        for passes in range(2, most + 1):
            k = math.ceil(most / passes)
            if k >= now or k in tried:
                continue
            tried.add(k)
            cfg = self.cfg.model_copy(update={"bld": self.cfg.bld.model_copy(update={"alternatives_per_pass": k})})
            plan = make_plan(cfg, self.arch, self.devices, self.device_bytes, self.device_name, True)
            t = next(x for x in plan.stages if x.stage == "bld")
            fix = plan._batch_fix(t)
            if fix is not None:
                peak = "" if fix else f"{t.total / GiB:.1f} GiB; "  # with a batch fix the peak is that fix's
                return (f"set bld.alternatives_per_pass={k} ({peak}{math.ceil(most / k)} passes over "
                        f"the BLD tokens, the parent traced once per pass){' and ' + fix if fix else ''}")
        return None

    def advice(self, s: StagePlan) -> str:
        """One line: what to change so the stage fits."""
        cap = USABLE * self.device_bytes
        over = (f"{s.stage}: {s.total / GiB:.1f} GiB per device > {cap / GiB:.1f} GiB usable "
                f"({USABLE:.0%} of {self.device_bytes / GiB:.0f} GiB)")
        fix = self._batch_fix(s)
        if fix:
            return f"{over}: {fix}"
        if s.stage == "bld" and self.cfg.bld.parallel == "alternatives" and s.part("weights") > cap / 2:
            return f"{over}: every rank holds the whole parent; set bld.parallel=layers to split its layers over the ranks"
        if s.stage == "score" and self.cfg.score.parallel == "alternatives" and s.part("weights") > cap / 2:
            return (f"{over}: every rank holds the whole parent; set score.parallel=layers (torchrun -m puzzlenas score) "
                    "to split its layers over the ranks")
        if s.stage == "data" and self.cfg.data.parallel == "none" and s.part("weights") > cap / 2:
            return (f"{over}: it holds the whole parent on one device; set data.parallel=layers (torchrun -m puzzlenas "
                    "run CONFIG --only data) to split its layers over the ranks")
        if s.stage == "eval" and self.cfg.eval.parallel == "none" and s.part("weights") > cap / 2:
            return (f"{over}: it loads the parent and 4 children on one device; set eval.parallel=layers (torchrun -m "
                    "puzzlenas run CONFIG --only eval) to split every model's layers over the ranks")
        passes = self._bld_passes_fix() if s.stage == "bld" else None  # these devices, in passes
        if s.sharded:  # more devices: the whole plan again with 2x, 4x, ... as many
            for need in (self.devices * 2**k for k in range(1, 12)):
                bigger = make_plan(self.cfg, self.arch, need, self.device_bytes, self.device_name, True)
                t = next(x for x in bigger.stages if x.stage == s.stage)
                fix = bigger._batch_fix(t)
                if fix is not None:
                    return (f"{over}: {passes + '; or ' if passes else ''}it needs {need} such devices (torchrun "
                            f"--nproc-per-node {need}, or nodes x GPUs = {need}){' and ' + fix if fix else ''}")
        if passes:
            return f"{over}: {passes}"
        held = s.part("weights") + s.part("optimizer")
        if s.stage == "eval":
            return (f"{over}: it loads the parent and 4 children at once ({held / GiB:.1f} GiB); evaluate one model "
                    "at a time with `puzzlenas eval W/child` (parent + 1), or use a bigger device")
        return (f"{over}: it holds the whole parent on one device ({held / GiB:.1f} GiB; splitting it is not "
                f"implemented for this stage): use a device with at least {(held + GiB) / USABLE / GiB:.0f} GiB")


def _bytes_of(dtype: str) -> int:
    return 2 if dtype in ("bfloat16", "float16") else 4


def _train_act_bytes(choice: str, cuda: bool) -> int:
    """Activation bytes under the stage's autocast: bf16 on a GPU unless float32 is asked for."""
    return 4 if choice == "float32" or not cuda else 2


def _alt_params(arch: Arch, alt) -> int:
    h = arch.hidden_size
    if alt.kind == "no_op":
        return 0
    if alt.kind == "linear":
        return h * h + h  # the map and its input norm
    if alt.sub == "attention":
        return 2 * h * arch.q_dim + 2 * h * alt.size * arch.head_dim + h
    return 3 * h * alt.size + h


def _alt_act_width(arch: Arch, alt) -> int:
    """Values per token a trained alternative keeps for its backward pass (its input, inner products)."""
    if alt.kind == "linear":
        return arch.hidden_size
    if alt.sub == "attention":
        return arch.hidden_size + 2 * arch.q_dim + 2 * alt.size * arch.head_dim
    return arch.hidden_size + 3 * alt.size


def bld_rank_alternatives(cfg: PuzzleConfig, arch: Arch, alts: list, ranks: int) -> list[list]:
    """Each rank's trained alternatives in the order bld.run groups them into passes: its own
    layers' (bld.parallel=layers), or every rank-th of them (=alternatives)."""
    if cfg.bld.parallel != "layers" or ranks == 1:
        return [alts[r::ranks] for r in range(ranks)]
    from .bld.pipeline import layer_bounds

    bounds = [layer_bounds(arch.num_hidden_layers, r, ranks) for r in range(min(ranks, arch.num_hidden_layers))]
    return [[a for a in alts if lo <= a.layer < hi] for lo, hi in bounds]


def g(x: float) -> str:
    return f"{x / GiB:.2f} GiB"


def make_plan(cfg: PuzzleConfig, arch: Arch, devices: int, device_bytes: float, device_name: str,
              cuda: bool = True) -> Plan:
    from .library.space import is_parent_alternative, target_alternatives

    N = devices
    h, L, V, S = arch.hidden_size, arch.num_hidden_layers, arch.vocab_size, cfg.data.seq_len
    bw = _bytes_of(cfg.dtype)  # the parent's weights as the stages hold them
    P = arch.params
    W = P * bw
    emb = arch.embed_params * bw
    config = arch.decilm_config()
    alts = [a for a in target_alternatives(cfg, config) if a.trainable and not is_parent_alternative(a, config)]
    per_layer: dict[int, list] = {}
    for a in alts:
        per_layer.setdefault(a.layer, []).append(a)
    stages = []

    # data: the pipeline loads the parent onto the device (and generates with it when data.path is
    # unset); data.parallel=layers (torchrun): each rank its range of layers, its KV cache, and the
    # embedding (first rank) or LM head (last), as model/split.py places them
    split = math.ceil(L / N)  # a rank's layers under data/eval.parallel=layers
    ends = 2 if N == 1 and not arch.tie_word_embeddings else 1  # embedding on the first rank, LM head on the last
    if cfg.data.parallel == "layers":
        held = split
        s = StagePlan("data", f"parent layers split over {N} rank{'s' * (N > 1)} ({split} layers each, data.parallel=layers)",
                      sharded=True)
        s.items.append(Item("weights", "parent layers + embedding or LM head", (split * arch.layer_params + ends * arch.embed_params) * bw,
                            f"({split} layers x {arch.layer_params / 1e6:.0f}M + {ends} x {arch.embed_params / 1e6:.0f}M) x {bw} B"))
    else:
        held = L
        s = StagePlan("data", "1 device (the parent loaded by every stage's context)")
        s.items.append(Item("weights", "parent", W, f"{P / 1e9:.2f}B params x {bw} B"))
    if cfg.data.path is None or cfg.data.generated_fraction is not None:
        # an upper bound: "auto" is bf16 where it runs natively; a split parent writes as it is held
        if bw == 4 and cfg.data.dtype != "float32" and cfg.data.parallel != "layers":
            s.items.append(Item("weights", "bf16 copy of the parent, writing (data.dtype)", P * 2, f"{P / 1e9:.2f}B params x 2 B"))
        gb = 64  # generate_sequences' batch
        kv = 2 * held * arch.kv_dim * S * gb * bw
        s.items.append(Item("caches", "KV cache, generation", kv, f"2 x {held} layers x {arch.kv_dim} x {S} tok x {gb} seq x {bw} B"))
        s.items.append(Item("activations", "logits", gb * V * 4 * 2, f"{gb} seq x {V} vocab x 4 B x 2"))
    stages.append(s)

    # bld, bld.parallel=layers: the parent's layers split over the ranks, each trains its layers'
    # alternatives; =alternatives: every rank holds the whole parent and 1/N of all alternatives
    ba = _train_act_bytes(cfg.bld.dtype, cuda)
    B = cfg.bld.batch_size
    by_layer = sorted(per_layer.values(), key=lambda v: -sum(_alt_params(arch, a) for a in v))
    K = cfg.bld.alternatives_per_pass
    if cfg.bld.parallel == "layers":
        per = math.ceil(L / N)
        T = sum(sum(_alt_params(arch, a) for a in v) for v in by_layer[:per])
        mine = max(by_layer, key=lambda v: sum(_alt_act_width(arch, a) for a in v), default=[])
        s = StagePlan("bld", f"parent layers split over {N} rank{'s' * (N > 1)} ({per} layers each)", sharded=True)
        s.items.append(Item("weights", "parent layers + embedding", per * arch.layer_params * bw + emb,
                            f"{per} layers x {arch.layer_params / 1e6:.0f}M x {bw} B + embedding "
                            f"{arch.embed_params / 1e6:.0f}M x {bw} B"))
    else:
        every = sorted(alts, key=lambda a: -_alt_params(arch, a))
        T = sum(_alt_params(arch, a) for a in every[::N])  # dealt round-robin: rank 0 gets the biggest share
        widest = max(by_layer, key=lambda v: sum(_alt_act_width(arch, a) for a in v), default=[])
        mine = sorted(widest, key=lambda a: -_alt_act_width(arch, a))[:: N]
        s = StagePlan("bld", f"whole parent on each of {N} rank{'s' * (N > 1)}, alternatives split (bld.parallel=alternatives)",
                      sharded=True)
        s.items.append(Item("weights", "parent", W, f"{P / 1e9:.2f}B x {bw} B"))
    widest_w, n_alts = sum(_alt_act_width(arch, a) for a in mine), len(mine)
    if K is None:
        s.items.append(Item("optimizer", "trained alternatives", T * 16,
                            f"{T / 1e9:.2f}B params x 16 B (fp32 weights, grads, AdamW m and v)"))
    else:  # only one group's weights and AdamW state on the device: the largest group of any rank
        ranks = bld_rank_alternatives(cfg, arch, alts, N)
        passes = max(math.ceil(len(r) / K) for r in ranks)
        T = max((sum(_alt_params(arch, a) for a in r[i : i + K]) for r in ranks for i in range(0, len(r), K)), default=0)
        s.strategy += f", {passes} pass{'es' * (passes > 1)} of at most {K} alternatives (bld.alternatives_per_pass)"
        s.items.append(Item("optimizer", "one pass's alternatives", T * 16,
                            f"{T / 1e9:.2f}B params x 16 B (fp32 weights, grads, AdamW m and v; the largest group "
                            f"of {K}, {passes} passes, the parent traced once per pass)"))
    act_per = S * (ba * (4 * h + widest_w) + 4 * h * n_alts)
    s.items.append(Item("activations", "one layer's graphs", B * act_per,
                        f"{B} seq x {S} tok x ({ba} B x (4 x {h} traced + {widest_w} in {n_alts} alternatives) "
                        f"+ 4 B x {h} x {n_alts} losses)"))
    s.batch = ("bld.batch_size", B, act_per)
    stages.append(s)

    # score: the whole parent on each device and every layer's traced activations of a batch, or
    # (score.parallel=layers) its layers split over the ranks, each keeping the parent's stream
    # entering the attention and FFN of its own layers; the last rank also holds two log-softmaxes
    B = cfg.score.batch_size
    logits = S * V * (2 * bw + 16)  # both models' logits, their fp32 log-probs, the KL terms
    if cfg.score.parallel == "layers":
        per = math.ceil(L / N)
        ends = 2 if N == 1 and not arch.tie_word_embeddings else 1  # embedding on the first rank, LM head on the last
        s = StagePlan("score", f"parent layers split over {N} rank{'s' * (N > 1)} ({per} layers each), "
                               "damaged streams passed on (score.parallel=layers)", sharded=True)
        s.items.append(Item("weights", "parent layers + embedding or LM head", (per * arch.layer_params + ends * arch.embed_params) * bw,
                            f"({per} layers x {arch.layer_params / 1e6:.0f}M + {ends} x {arch.embed_params / 1e6:.0f}M) x {bw} B"))
        traced = 2 * per * S * h * bw
        s.items.append(Item("activations", "parent's stream (2 per own layer)", B * traced,
                            f"2 x {per} layers x {B} seq x {S} tok x {h} x {bw} B"))
    else:
        each = "1 device" if N == 1 else f"each of {N} ranks, alternatives split (score.parallel=alternatives)"
        s = StagePlan("score", f"whole parent on {each}")
        s.items.append(Item("weights", "parent", W, f"{P / 1e9:.2f}B x {bw} B"))
        traced = 4 * L * S * h * bw
        s.items.append(Item("activations", "traced parent (4 per layer)", B * traced, f"4 x {L} layers x {B} seq x {S} tok x {h} x {bw} B"))
    s.items.append(Item("activations", "logits, log-probs, KL of two models", B * logits,
                        f"{B} seq x {S} tok x {V} x (2x{bw} + 16) B"))
    s.batch = ("score.batch_size", B, traced + logits)
    stages.append(s)

    # costs: the parent (and one variant at a time) serving the scenario
    sc = cfg.costs.scenario
    cb = _bytes_of(cfg.costs.dtype) if cfg.costs.dtype != "auto" else (2 if cuda else 4)
    kv = 2 * L * arch.kv_dim * (sc.prompt_len + sc.generate_len) * sc.batch_size * cb
    roofline = cfg.costs.device != "auto"  # a roofline preset estimates: nothing runs on the device
    s = StagePlan("costs", f"roofline {cfg.costs.device}: the architecture alone, nothing loaded or timed"
                  " (`puzzlenas costs`)" if roofline else "1 device, whole parent")
    if not roofline:
        s.items.append(Item("weights", "parent", P * cb, f"{P / 1e9:.2f}B x {cb} B"))
        s.items.append(Item("caches", "KV cache of the scenario", kv, f"2 x {L} x {arch.kv_dim} x ({sc.prompt_len}+"
                            f"{sc.generate_len}) tok x {sc.batch_size} seq x {cb} B"))
        s.items.append(Item("activations", "prefill logits", sc.batch_size * sc.prompt_len * V * 4,
                            f"{sc.batch_size} seq x {sc.prompt_len} tok x {V} x 4 B"))
    stages.append(s)

    # gkd: FSDP2 over N ranks: student sharded (fp32 master, bf16 compute), teacher sharded or
    # replicated (gkd.teacher), layers checkpointed or not (gkd.activation_checkpointing)
    g_ = cfg.gkd
    gb = _train_act_bytes(g_.dtype, cuda)
    child = min(P, cfg.search.memory_bytes / bw) if cfg.search.memory_bytes else P  # upper bound before the search
    B = math.ceil(g_.batch_size / N)
    shard_t = g_.teacher == "shard" and N > 1
    ckpt_on = g_.activation_checkpointing
    offload = g_.offload and N > 1  # FSDP2 CPU offload runs under torchrun only
    s = StagePlan("gkd", f"FSDP2 over {N} rank{'s' * (N > 1)}, teacher {'sharded' if shard_t else 'replicated'}, "
                         f"{'checkpointed' if ckpt_on else 'stored'} activations"
                         + (", student offloaded to host RAM (gkd.offload)" if offload else ""), sharded=True)
    if not offload:  # offloaded, the student's shards are host RAM (host_ram_lines); the gathered layers stay
        s.items.append(Item("optimizer", "student (sharded)", child * 16 / N,
                            f"{child / 1e9:.2f}B x 16 B (fp32 weights, grads, AdamW m, v) / {N}"))
    s.items.append(Item("weights", "teacher" + (" (sharded)" if shard_t else ""), P * bw / (N if shard_t else 1),
                        f"{P / 1e9:.2f}B x {bw} B" + (f" / {N}" if shard_t else "")))
    gather = (1 + shard_t) * 2 * arch.layer_params * gb if N > 1 else 0
    s.items.append(Item("weights", "all-gathered layers", gather,
                        f"{1 + shard_t} model(s) x 2 layers in flight x {arch.layer_params / 1e6:.0f}M x {gb} B"))
    width = 4 * h + 2 * arch.q_dim + 2 * arch.kv_dim + 3 * arch.intermediate_size  # one layer's saved values per token
    teacher_h = L * S * h * gb  # every layer's teacher hidden state (the cosine loss)
    # both models' logits, then six fp32 buffers per element: two log-softmaxes, the KL's terms and
    # exp, their gradients. Measured on a CPU in fp32: 30.6 B per element against 32 here.
    lg = S * V * (2 * gb + 24)
    if ckpt_on:
        acts = L * S * h * gb + S * gb * width
        s.items.append(Item("activations", "checkpoints, 1 layer recomputed, teacher h",
                            B * (acts + teacher_h),
                            f"{B} seq x {S} tok x {gb} B x ({L} x {h} + {width} + {L} x {h})"))
    else:
        acts = L * S * gb * width
        s.items.append(Item("activations", "all layers' saved values, teacher h", B * (acts + teacher_h),
                            f"{B} seq x {S} tok x {gb} B x ({L} x {width} + {L} x {h})"))
    s.items.append(Item("activations", "logits, log-probs, KL and grads", B * lg,
                        f"{B} seq x {S} tok x {V} x (2x{gb} + 24) B"))
    s.batch = ("gkd.batch_size", B, acts + teacher_h + lg)
    stages.append(s)

    # eval: every model of the comparison on one device at once, the parent's and a model's log-probs;
    # eval.parallel=layers (torchrun): every model split over the ranks by its layers, rank 0 also
    # holding each one's embedding (the last rank each LM head) and receiving the logits
    e = cfg.eval
    n_children = 4  # child before and after GKD, width and depth baselines (each at most the child's size)
    if e.parallel == "layers":
        s = StagePlan("eval", f"parent + 4 children, each split over {N} rank{'s' * (N > 1)} ({split} layers each, "
                              "eval.parallel=layers)", sharded=True)
        # a child's layers: what its upper bound leaves after the vocabulary matrices, spread over L layers
        child_layer = max(0.0, child - P + L * arch.layer_params) / L
        s.items.append(Item("weights", "layers of the parent and 4 children", split * (arch.layer_params + n_children * child_layer) * bw,
                            f"{split} layers x ({arch.layer_params / 1e6:.0f}M + {n_children} x {child_layer / 1e6:.0f}M) x {bw} B"))
        # model k starts on rank k mod N (embedding) and ends on the rank before (LM head): the fullest rank's count
        models = 1 + n_children
        vocab = models * ends if N == 1 else max(sum((k - r) % N in (0, 1) for k in range(models)) for r in range(N))
        s.items.append(Item("weights", "embeddings + LM heads on the fullest rank", vocab * arch.embed_params * bw,
                            f"{vocab} x {arch.embed_params / 1e6:.0f}M x {bw} B"))
    else:
        s = StagePlan("eval", "1 device, parent + 4 children loaded together")
        s.items.append(Item("weights", "parent + children", W + n_children * child * bw,
                            f"{P / 1e9:.2f}B x {bw} B + {n_children} x {child / 1e9:.2f}B x {bw} B"))
    T_ = max(e.ppl_context, S)
    lg = T_ * V * (2 * bw + 16)
    s.items.append(Item("activations", "logits + log-probs of two models", e.batch_size * lg,
                        f"{e.batch_size} seq x {T_} tok x {V} x (2x{bw} + 16) B"))
    s.batch = ("eval.batch_size", e.batch_size, lg)
    stages.append(s)
    return Plan(arch, N, device_bytes, device_name, stages, cfg)


def detect_devices() -> tuple[int, float, str, bool]:
    """(count, bytes each, name, cuda?): the CUDA devices here, else one CPU with the machine's RAM."""
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        n = int(os.environ.get("WORLD_SIZE", "0")) or torch.cuda.device_count()
        return n, float(props.total_memory), props.name, True
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return 1, float(ram), "CPU (system RAM)", False


def format_plan(plan: Plan, formulas: bool = True) -> str:
    a = plan.arch
    lines = [f"parent: {a.params / 1e9:.2f}B params, {a.num_hidden_layers} layers, hidden {a.hidden_size}, "
             f"FFN {a.intermediate_size}, {a.num_attention_heads} heads / {a.num_key_value_heads} KV, vocab {a.vocab_size} "
             f"({a.source})",
             f"devices: {plan.devices} x {plan.device_bytes / GiB:.0f} GiB ({plan.device_name}); a stage fits in "
             f"{USABLE:.0%} of one\n",
             "| stage | strategy | weights | optimizer | activations | KV/caches | peak / device | fits |",
             "|---|---|---|---|---|---|---|---|"]
    for s in plan.stages:
        fit = "yes" if plan.fits(s) else "**no**"
        lines.append(f"| {s.stage} | {s.strategy} | {s.part('weights') / GiB:.1f} | {s.part('optimizer') / GiB:.1f} | "
                     f"{s.part('activations') / GiB:.1f} | {s.part('caches') / GiB:.1f} | {s.total / GiB:.1f} GiB | {fit} |")
    bad = [s for s in plan.stages if not plan.fits(s)]
    if bad:
        lines.append("")
        lines += [plan.advice(s) for s in bad]
    lines += host_ram_lines(plan)
    if formulas:
        lines.append("\nthe arithmetic (GiB = 2^30 B):")
        for s in plan.stages:
            for i in s.items:
                lines.append(f"  {s.stage:<6} {i.label:<42} {i.formula} = {g(i.bytes)}")
    return "\n".join(lines)


# --- host RAM: the parent as each torchrun rank reads it, before it moves to the device ---------

LOAD_BYTES = 4  # checkpoint.parent.prepare_parent loads the parent in float32, whatever cfg.dtype


def host_bytes_per_rank(arch: Arch, ranks: int, split: bool, head: bool) -> list[int] | None:
    """Bytes of the parent each of `ranks` torchrun ranks reads into host RAM: with a layer split
    (bld/score.parallel=layers) its own layers (bld.pipeline.layer_bounds), the embedding on the
    first rank and, with `head`, the final norm and LM head on the last (checkpoint.io.
    load_checkpoint_part); else the whole parent on every rank. None: more ranks than layers."""
    if not split or ranks == 1:
        return [arch.params * LOAD_BYTES] * ranks
    from .bld.pipeline import layer_bounds

    if ranks > arch.num_hidden_layers:
        return None
    per = []
    for r in range(ranks):
        lo, hi = layer_bounds(arch.num_hidden_layers, r, ranks)
        n = (hi - lo) * arch.layer_params + arch.embed_params * (r == 0)
        n += (arch.embed_params + arch.hidden_size) * (head and r == ranks - 1)  # tied: the embedding read again
        per.append(n * LOAD_BYTES)
    return per


def host_ram_lines(plan: Plan) -> list[str]:
    """The plan's host-RAM lines: what each torchrun rank reads of the parent, stage by stage."""
    N, cfg, whole = plan.devices, plan.cfg, plan.arch.params * LOAD_BYTES
    lines = ["", f"host RAM per torchrun rank ({N}) for the parent, float32 as it is loaded, before it moves to the device:"]
    for stage, split, head in (("bld", cfg.bld.parallel == "layers", False), ("score", cfg.score.parallel == "layers", True)):
        per = host_bytes_per_rank(plan.arch, N, split, head)
        if per is None:
            lines.append(f"  {stage:<6} {N} ranks for {plan.arch.num_hidden_layers} layers: the split refuses it")
        elif split and N > 1:
            lines.append(f"  {stage:<6} {max(per) / GiB:.1f} GiB at most: its own layers ({stage}.parallel=layers; "
                         f"the {N} parts add up to {sum(per) / GiB:.1f} GiB)")
        else:
            lines.append(f"  {stage:<6} {whole / GiB:.1f} GiB: the whole parent")
    lines.append(f"  gkd    {whole / GiB:.1f} GiB: the whole parent, on every rank")
    if cfg.gkd.offload and N > 1:
        child = min(plan.arch.params, cfg.search.memory_bytes / _bytes_of(cfg.dtype)) if cfg.search.memory_bytes else plan.arch.params
        lines.append(f"  gkd    + {child * 16 / N / GiB:.1f} GiB: the student's fp32 shard, grads and AdamW m, v "
                     f"(gkd.offload: {child / 1e9:.2f}B x 16 B / {N})")
    lines.append(f"  first run: rank 0 converts the parent{' and generates the data' * (cfg.data.path is None)} "
                 f"with the whole of it, once ({whole / GiB:.1f} GiB)")
    return lines


def plan_for(cfg: PuzzleConfig, gpus: int | None = None, gpu_memory: str | float | None = None,
             arch: str | None = None) -> Plan:
    n, mem, name, cuda = detect_devices()
    if gpus is not None or gpu_memory is not None:
        if gpus is not None and gpus < 1:
            raise PuzzleError(f"--gpus {gpus}: must be at least 1")
        n = gpus or (n if cuda else 1)
        if gpu_memory is not None:
            mem, name = parse_size(gpu_memory), "as given"
        elif not cuda:  # GPUs asked for on a machine without one: their size must be assumed
            mem, name = 80 * GiB, "80 GiB assumed: no CUDA device here, give --gpu-memory"
        cuda = True
    return make_plan(cfg, parent_arch(arch or cfg.parent), n, mem, name, cuda)


# pipeline stages planned as another: baselines distill like gkd; realize holds the parent like data
PLAN_OF = {"baselines": "gkd", "realize": "data"}


def check_run_fits(cfg: PuzzleConfig, stages: list[str], device, device_bytes: float | None = None) -> None:
    """Stop before any work when a stage that will run cannot fit its device (CUDA only: see module
    doc). One process: `puzzlenas run` runs bld and gkd unsharded; torchrun them for more devices.
    Under torchrun (data or eval with data/eval.parallel=layers) it plans for WORLD_SIZE devices."""
    if device_bytes is None:
        if getattr(device, "type", str(device)) != "cuda":
            return
        import torch

        device_bytes = float(torch.cuda.get_device_properties(device).total_memory)
    # under torchrun (`run --only data|eval` with the parent's layers split) the ranks share the stage
    plan = make_plan(cfg, parent_arch(cfg.parent), int(os.environ.get("WORLD_SIZE", "1")), device_bytes, str(device),
                     cuda=True)
    wanted = {PLAN_OF.get(stage, stage) for stage in stages}
    for s in plan.stages:
        if s.stage in wanted and not plan.fits(s):
            raise PuzzleError(f"memory plan: {plan.advice(s)} (`puzzlenas plan CONFIG` shows every stage)")
