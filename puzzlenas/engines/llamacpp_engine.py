"""llama.cpp as the serving engine (`target.engine: llama.cpp`), through llama-cpp-python.

What a CPU user deploys: the child exported to GGUF (`target.gguf_type`, puzzlenas/export/gguf.py)
and run by llama.cpp's `deci` graph. Its limits, read from llama.cpp's source: no linear FFN (no
block for it); a layer that keeps attention but has FFN size 0 loses its attention output, which
the exporter avoids by writing a zero 1-channel FFN there, so every other pair is served.

Timing. Each checkpoint folder is exported to GGUF in the configured type, then a worker process,
`python -m puzzlenas.engines.llamacpp_engine JOB.json RESULT.json` (llama.cpp's OpenMP threads
never share a process with torch's), loads all models of a group and runs the scenario on each in
rotating turns, as `Engine.time_models` promises:

    prefill: the batch's prompts decoded (in chunks of n_batch tokens) up to the first generated
             token of every sequence (greedy argmax of the logits)
    decode:  generate_len - 1 steps, each one llama_decode of one token per sequence
    total:   both

batch_size > 1 runs the requests as parallel sequences of one context (one llama_decode per step
for all of them, a unified KV cache), which is how llama.cpp's server batches its parallel slots.
Threads: all the machine's cores (os.cpu_count(), or PUZZLENAS_LLAMACPP_THREADS), with OpenMP's
own wait policy, as llama-server runs: its threads spin a while at each of the graph's barriers
before they sleep. The worker used to force OMP_WAIT_POLICY=PASSIVE (sleep at once) to be robust
on a busy machine; that made every barrier pay a thread wake-up, which at batch 1 is most of a
decode step and falls mostly on attention's many small ops. SmolLM2 q8_0, 2 threads, quiet 2-core
AVX512 machine, ms per decode step: passive 19.9, default 7.9, active 7.0; at 1 thread 9.2-9.4
whatever the policy. So the costs measured under PASSIVE were the harness's, not llama.cpp's, and
the search took attention out for them. A user's OMP_WAIT_POLICY still applies, and the cost
profile's name carries the policy, so a profile is never reused under another one.
KV cache: llama.cpp's default (f16). Flash attention: llama.cpp's default (auto, on for the CPU).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..errors import PuzzleError
from .base import Engine, ModelTimings, Scenario

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install -e '.[llamacpp]' (compiles llama.cpp: ~30 min the first time on a 2-core CPU)"


def llamacpp_threads() -> int:
    """Threads llama.cpp computes with: PUZZLENAS_LLAMACPP_THREADS, else all the machine's cores."""
    return int(os.environ.get("PUZZLENAS_LLAMACPP_THREADS") or os.cpu_count() or 1)


def openmp_wait_policy() -> str:
    """How llama.cpp's OpenMP threads wait at a barrier: the user's OMP_WAIT_POLICY, else 'default'
    (libgomp spins a while, then sleeps)."""
    return (os.environ.get("OMP_WAIT_POLICY") or "default").strip().lower()


class LlamaCppEngine(Engine):
    name = "llama.cpp"
    kinds = {"attention": {"gqa", "linear", "no_op"}, "ffn": {"mlp", "no_op"}}
    profiles_by_variants = True
    # the GGUF type models are exported to and timed in; set from `target.gguf_type` when a config is loaded
    gguf_type = "q8_0"
    module = "llama_cpp"
    package = "llama-cpp-python"
    install_hint = INSTALL_HINT

    def unsupported(self, alt, config) -> str | None:
        reason = super().unsupported(alt, config)
        if reason:
            return reason + " (llama.cpp's deci graph has no linear FFN)"
        return None

    def serving_dtype(self, choice: str) -> str:
        # what puzzlenas loads the checkpoints in before export; the served precision is gguf_type
        return "float32"

    @classmethod
    def profile_tag(cls, target) -> str:
        # costs differ by GGUF type, thread count and OpenMP wait policy (SmolLM2 q8_0 decode step at 2
        # threads: 7.9 ms with OpenMP's default policy, 19.9 ms passive, 9.3 ms at 1 thread): one profile each
        return f"{cls.name}-{target.gguf_type}-{llamacpp_threads()}thr-omp{openmp_wait_policy()}"

    def export(self, checkpoint: Path, folder: Path) -> Path:
        """checkpoint folder -> folder/<content hash>.<type>.gguf (reused while the weights are unchanged)."""
        from ..export import export_gguf

        out = Path(folder) / f"{_content_hash(Path(checkpoint))}.{self.gguf_type}.gguf"
        if not out.is_file():
            export_gguf(Path(checkpoint), out, self.gguf_type)
        return out

    def time_models(self, models, scenario: Scenario, repeats, warmup=1, groups=None, dtype="float32",
                    progress=False):
        self.check_available()
        groups = groups or [list(models)]
        with tempfile.TemporaryDirectory(prefix="puzzlenas-llamacpp-") as tmp:
            t0 = time.perf_counter()
            files = {name: str(self.export(Path(path), Path(tmp))) for name, path in models.items()}
            log.info("exported %d models to GGUF %s in %.1f s", len(files), self.gguf_type, time.perf_counter() - t0)
            job = {"models": files, "groups": groups, "repeats": repeats, "warmup": warmup,
                   "scenario": [scenario.batch_size, scenario.prompt_len, scenario.generate_len],
                   "threads": llamacpp_threads()}
            result = _run_worker(job, Path(tmp), progress)
        return [{name: ModelTimings.from_dict(t) for name, t in group.items()} for group in result["groups"]]


def _content_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")) + [folder / "config.json"]:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _run_worker(job: dict, tmp: Path, progress: bool) -> dict:
    job_file, out_file, log_file = tmp / "job.json", tmp / "result.json", tmp / "llamacpp.log"
    job_file.write_text(json.dumps(job))
    with open(log_file, "w") as logf:
        proc = subprocess.run([sys.executable, "-m", "puzzlenas.engines.llamacpp_engine", str(job_file), str(out_file)],
                              stdout=None if progress else logf, stderr=logf)
    if proc.returncode < 0:  # killed by a signal: its log's last line is whatever came before, not the cause
        raise PuzzleError(f"llama.cpp timing failed: the worker was killed by {_signal_name(-proc.returncode)}"
                          + (SIGILL_HINT if -proc.returncode == signal.SIGILL else ""))
    if proc.returncode != 0 or not out_file.is_file():
        lines = [x for x in log_file.read_text(errors="replace").splitlines() if x.strip()]
        raise PuzzleError(f"llama.cpp timing failed: {lines[-1][:300] if lines else 'no output'}")
    return json.loads(out_file.read_text())


# A llama-cpp-python wheel is compiled for the CPU that built it, and pip's cache reuses it on later
# installs; on a Sapphire Rapids VM its AMX kernels (prompts of 32+ tokens) died at the first tile load.
SIGILL_HINT = (" (an illegal instruction): this llama-cpp-python build uses CPU instructions this machine cannot run, "
               "e.g. a wheel compiled on another CPU and reused from pip's cache, or AMX kernels in a VM; compile it "
               "here without AMX (README: set up, \"llama.cpp dies with SIGILL\")")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


# --- the worker: llama_cpp only, no torch -----------------------------------------------------
class _Runner:
    """One GGUF loaded with a context sized for the scenario."""

    def __init__(self, path: str, batch: int, prompt_len: int, generate_len: int, threads: int):
        import llama_cpp
        from llama_cpp import _internals

        self.lib = llama_cpp
        mparams = llama_cpp.llama_model_default_params()
        self.model = _internals.LlamaModel(path_model=path, params=mparams, verbose=False)
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = max(512, batch * (prompt_len + generate_len) + 256)
        self.n_batch = 512
        cparams.n_batch = cparams.n_ubatch = self.n_batch
        cparams.n_seq_max = batch
        cparams.kv_unified = True
        cparams.n_threads = cparams.n_threads_batch = threads
        self.ctx = _internals.LlamaContext(model=self.model, params=cparams, verbose=False)
        self.batch = _internals.LlamaBatch(n_tokens=max(self.n_batch, batch), embd=0, n_seq_max=batch, verbose=False)
        self.n_vocab = self.model.n_vocab()

    def close(self) -> None:
        self.batch.close()
        self.ctx.close()
        self.model.close()

    def _argmax(self, i: int) -> int:
        import numpy as np

        return int(np.ctypeslib.as_array(self.ctx.get_logits_ith(i), shape=(self.n_vocab,)).argmax())

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> dict[int, int]:
        """Decode (token, position, sequence, wants logits) items; the argmax of each sequence's
        last requested logits."""
        b = self.batch.batch
        b.n_tokens = len(items)
        for i, (tok, pos, seq, want) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, want
            b.seq_id[i][0] = seq
        self.ctx.decode(self.batch)
        return {seq: self._argmax(i) for i, (_, _, seq, want) in enumerate(items) if want}

    def run(self, prompts: list[list[int]], generate_len: int) -> tuple[float, float]:
        """(prefill seconds, total seconds) of one scenario run from an empty cache."""
        self.ctx.kv_cache_clear()
        items = [(tok, pos, s, pos == len(p) - 1) for s, p in enumerate(prompts) for pos, tok in enumerate(p)]
        t0 = time.perf_counter()
        nxt: dict[int, int] = {}
        for i in range(0, len(items), self.n_batch):
            nxt.update(self._decode(items[i: i + self.n_batch]))
        t1 = time.perf_counter()
        for step in range(generate_len - 1):
            nxt = self._decode([(nxt[s], len(p) + step, s, True) for s, p in enumerate(prompts)])
        return t1 - t0, time.perf_counter() - t0


def worker_main(job_file: str, out_file: str) -> None:
    import random

    import llama_cpp

    job = json.loads(Path(job_file).read_text())
    quiet = llama_cpp.llama_log_callback(lambda level, text, data: None)  # kept alive until the end
    llama_cpp.llama_log_set(quiet, None)
    llama_cpp.llama_backend_init()
    batch, prompt_len, generate_len = job["scenario"]
    rng = random.Random(0)
    loaded: dict[str, _Runner] = {}
    results = []
    for group in job["groups"]:
        for name in [n for n in loaded if n not in group]:
            loaded.pop(name).close()
        for name in group:
            if name not in loaded:
                loaded[name] = _Runner(job["models"][name], batch, prompt_len, generate_len, job["threads"])
        vocab = min(r.n_vocab for r in loaded.values())
        prompts = [[rng.randrange(vocab) for _ in range(prompt_len)] for _ in range(batch)]
        timings = {name: {"decode_steps": generate_len - 1, "prefill_s": [], "total_s": []} for name in group}
        for r in range(job["warmup"] + job["repeats"]):
            order = group[r % len(group):] + group[: r % len(group)]  # rotate: no model always goes first
            for name in order:
                prefill, total = loaded[name].run(prompts, generate_len)
                if r >= job["warmup"]:
                    timings[name]["prefill_s"].append(prefill)
                    timings[name]["total_s"].append(total)
        results.append(timings)
    for runner in loaded.values():
        runner.close()
    Path(out_file).write_text(json.dumps({"groups": results}))


if __name__ == "__main__":
    worker_main(sys.argv[1], sys.argv[2])
