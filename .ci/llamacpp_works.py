"""Exit 0 when the installed llama.cpp runs a real prompt on this CPU; a build it cannot run dies here.

A llama-cpp-python wheel is compiled for the CPU that built it (-march=native) and pip's cache hands
it to later installs, possibly on another CPU; and on a Sapphire Rapids VM here, its AMX kernels
(used for prompts of 32+ tokens) died with SIGILL at the first tile load. A 1-token decode does not
reach those kernels, so this evaluates a 64-token prompt of the bundled SmolLM2 GGUF, as the costs
stage and the llama.cpp tests do. .ci/run rebuilds llama.cpp when this fails.
"""

import sys

from llama_cpp import Llama

from puzzlenas.checkpoint.convert import resolve_parent_path

model = Llama(model_path=str(resolve_parent_path("smollm2")), n_ctx=256, n_threads=2, verbose=False)
out = model("The quick brown fox jumps over the lazy dog. " * 6, max_tokens=2)
print(f"llama.cpp runs on this CPU: {out['usage']['prompt_tokens']} prompt tokens evaluated", file=sys.stderr)
