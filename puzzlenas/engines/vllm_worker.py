"""Runs one vLLM job in its own process (see vllm_engine.py); not for direct use.

    python -m puzzlenas.engines.vllm_worker JOB.json RESULT.json
"""

from __future__ import annotations

import gc
import json
import random
import sys
import time


def load(path: str, job: dict, tokenizer: bool):
    import torch
    from vllm import LLM

    kwargs = dict(model=path, trust_remote_code=True, dtype=job["dtype"], max_model_len=job["max_model_len"],
                  max_num_seqs=job["max_num_seqs"], seed=0, enable_prefix_caching=False,
                  distributed_executor_backend="uni", skip_tokenizer_init=not tokenizer)
    if torch.cuda.is_available():
        # several engines share the GPU when models are timed side by side
        kwargs["gpu_memory_utilization"] = round(0.85 / job.get("concurrent", 1), 3)
    else:
        kwargs["enforce_eager"] = True  # no Triton-CPU here: torch.compile has nothing to compile into
    return LLM(**kwargs)


def run_generate(job: dict) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm = load(job["model"], job, tokenizer=False)
    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], ignore_eos=True, detokenize=False)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in job["prompts"]], params, use_tqdm=False)
    return {"tokens": [list(o.outputs[0].token_ids) for o in outputs]}


def run_time(job: dict) -> dict:
    import torch
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    batch, prompt_len, generate_len = job["scenario"]
    vocab = min(json.load(open(f"{p}/config.json"))["vocab_size"] for p in job["models"].values())
    rng = random.Random(0)
    prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(vocab) for _ in range(prompt_len)]) for _ in range(batch)]
    first = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, detokenize=False)
    whole = SamplingParams(temperature=0.0, max_tokens=generate_len, ignore_eos=True, detokenize=False)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def timed(llm, params) -> float:
        sync()
        t = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        sync()
        return time.perf_counter() - t

    loaded: dict = {}
    results = []
    for g, group in enumerate(job["groups"]):
        for name in [n for n in loaded if n not in group]:
            del loaded[name]
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        for name in group:
            if name not in loaded:
                loaded[name] = load(job["models"][name], job, tokenizer=False)
        timings = {name: {"decode_steps": generate_len - 1, "prefill_s": [], "total_s": []} for name in group}
        rounds = job["warmup"] + job["repeats"]
        for r in range(rounds):
            order = group[r % len(group):] + group[: r % len(group)]  # rotate: no model always goes first
            for name in order:
                prefill = timed(loaded[name], first)
                total = timed(loaded[name], whole)
                if r >= job["warmup"]:
                    timings[name]["prefill_s"].append(prefill)
                    timings[name]["total_s"].append(total)
            print(f"group {g + 1}/{len(job['groups'])} round {r + 1}/{rounds}", flush=True)
        results.append(timings)
    return {"groups": results}


def main() -> int:
    job_file, out_file = sys.argv[1], sys.argv[2]
    job = json.load(open(job_file))
    result = run_generate(job) if job["kind"] == "generate" else run_time(job)
    with open(out_file + ".tmp", "w") as f:
        json.dump(result, f)
    import os

    os.replace(out_file + ".tmp", out_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
