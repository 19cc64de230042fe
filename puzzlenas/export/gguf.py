"""Write a DeciLM checkpoint as a GGUF file that llama.cpp runs (its `deci` architecture).

    puzzlenas export work/child child.q8_0.gguf --type q8_0 --tokenizer smollm2

llama.cpp's `deci` graph (src/models/deci.cpp) reads per-layer arrays `deci.attention.head_count`,
`deci.attention.head_count_kv` and `deci.feed_forward_length`, and builds each layer from them:

    head_count = 0                      -> attention no-op (the layer's input goes straight on)
    head_count > 0, head_count_kv = 0   -> "linear attention": attn_norm, then attn_output (hidden x hidden)
    head_count > 0, head_count_kv = k   -> grouped-query attention with k KV heads
    feed_forward_length = n > 0         -> ffn_norm + SiLU-gated MLP of size n
    feed_forward_length = 0             -> the layer's output is skipped (`continue`), attention included

The last rule is why a layer that keeps attention but drops its FFN cannot be written as
feed_forward_length = 0: llama.cpp would throw the attention's output away. We write that FFN as a
1-channel MLP whose weights are all zero (it adds exactly 0) and keep its tensors in f32; it costs
a norm and three (hidden x 1) products. A layer with neither attention nor FFN is the identity and
is left out of the file. A model without any attention layer gets a first 1-head attention layer
with a zero output and FFN size 0 (llama.cpp cannot allocate an empty KV cache). There is nowhere to put a linear FFN (llama.cpp has no such block), nor
Qwen3's q/k norms: those checkpoints are refused with one line.

Weights: q and k are permuted from Hugging Face's rotate-half RoPE layout to llama.cpp's
interleaved pairs (as llama.cpp's own converter does); RoPE scaling (linear, Llama-3) goes into a
`rope_freqs` tensor computed from our own inverse frequencies, so it matches whatever we compute.

Tokenizer: copied field by field from a GGUF parent (`tokenizer.ggml.*`, `tokenizer.chat_template`),
or converted from a Hugging Face byte-level BPE tokenizer; without one a placeholder vocabulary is
written (enough to time the model in llama.cpp, not to tokenize text).

Types: f32, f16, bf16 and the llama.cpp block quantizations q8_0, q5_1, q5_0, q4_1, q4_0 (quantized
here with the `gguf` package's reference code). 1-D tensors stay f32; with the 4- and 5-bit types the
embedding and output matrices are kept at q8_0, as llama.cpp's shipped SmolLM2 Q4_1 file does.
q8_0 keeps every matrix at q8_0, as llama.cpp's own quantizer does: on a heavily damaged SmolLM2
child, keeping the embedding, or it and attn_v/attn_output, at f16 raised top-1 agreement with
PyTorch f32 only from 0.931 to 0.940 / 0.952 for 20 % / 28 % more file (tests/test_llamacpp.py).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import PuzzleError

log = logging.getLogger(__name__)

# name -> (GGMLQuantizationType name, LlamaFileType name)
GGUF_TYPES = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q5_1": ("Q5_1", "MOSTLY_Q5_1"),
    "q5_0": ("Q5_0", "MOSTLY_Q5_0"),
    "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
}
ARCH = "deci"


def unsupported_reason(config) -> str | None:
    """Why llama.cpp's deci graph cannot compute this model, or None."""
    if config.qk_norm:
        return "llama.cpp's deci graph has no q/k norms (Qwen3 parents)"
    for i, block in enumerate(config.block_configs):
        if block.ffn.kind == "linear":
            return f"layer {i}: llama.cpp has no linear FFN block"
    return None


def export_gguf(model, out: str | Path, gguf_type: str = "f32", tokenizer=None) -> Path:
    """Write `model` (a DeciLMForCausalLM or a checkpoint folder) to `out` as a llama.cpp GGUF.

    tokenizer: a .gguf file (tokenizer fields copied), a Hugging Face tokenizer or a folder holding
    one (converted), or None (the checkpoint folder's own tokenizer if it has one, else a placeholder
    vocabulary). Atomic: the file appears complete or not at all."""
    import gguf

    from ..checkpoint.io import load_checkpoint

    if gguf_type not in GGUF_TYPES:
        raise PuzzleError(f"GGUF type {gguf_type!r} is not supported (accepted: {', '.join(GGUF_TYPES)})")
    if isinstance(model, (str, Path)):
        folder = Path(model)
        model = load_checkpoint(folder, dtype=torch.float32)
        if tokenizer is None and ((folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()):
            tokenizer = folder
    config = model.config
    reason = unsupported_reason(config)
    if reason:
        raise PuzzleError(f"cannot export to GGUF: {reason}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    writer = gguf.GGUFWriter(tmp, ARCH)
    try:
        kept = _write_hparams(writer, config, gguf_type)
        _write_tokenizer(writer, tokenizer, config.vocab_size)
        for name, array, qtype in _tensors(model, kept, gguf_type):
            if qtype in ("F32", "F16"):
                writer.add_tensor(name, array.astype(np.float32 if qtype == "F32" else np.float16))
            else:
                raw = gguf.GGMLQuantizationType[qtype]
                writer.add_tensor(name, gguf.quants.quantize(array, raw), raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    return out


def _layer_plan(config) -> list[tuple[int, int, int, int]]:
    """(source layer, head_count, head_count_kv, feed_forward_length) of each layer written."""
    plan = []
    for i, block in enumerate(config.block_configs):
        a, f = block.attention, block.ffn
        heads = 0 if a.kind == "no_op" else config.num_attention_heads
        kv = a.num_key_value_heads if a.kind == "gqa" else 0
        if heads == 0 and f.kind == "no_op":
            continue  # the identity: nothing to write
        ffn = f.intermediate_size if f.kind == "mlp" else (1 if heads else 0)  # see the module docstring
        plan.append((i, heads, kv, ffn))
    if not any(kv for _, _, kv, _ in plan):
        # llama.cpp cannot allocate a KV cache of size 0 (no context for a model without attention):
        # put first a 1-head attention layer with a zero output projection and FFN size 0, which
        # llama.cpp computes (its cache is written) and then skips, so the output is unchanged.
        plan.insert(0, (-1, 1, 1, 0))
    return plan


def _write_hparams(writer, config, gguf_type: str) -> list[tuple[int, int, int, int]]:
    import gguf

    plan = _layer_plan(config)
    writer.add_name("puzzlenas child")
    writer.add_block_count(len(plan))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length([p[3] for p in plan])
    writer.add_head_count([p[1] for p in plan])
    writer.add_head_count_kv([p[2] for p in plan])
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(int(gguf.LlamaFileType[GGUF_TYPES[gguf_type][1]]))
    return plan


def _rope_factors(config) -> np.ndarray | None:
    """llama.cpp divides each RoPE frequency by rope_freqs[i]: the ratio of the plain frequencies to
    ours (linear or Llama-3 scaling), or None when there is no scaling."""
    from ..model.modeling_decilm import rope_inverse_frequencies

    ours = rope_inverse_frequencies(config).double()
    dim = config.head_dim
    plain = 1.0 / (config.rope_parameters["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    factors = (plain / ours).float().numpy()
    return None if np.allclose(factors, 1.0, rtol=0, atol=1e-5) else factors  # float32 rounding: ~1e-7


def _permute_rope(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of q/k (heads * head_dim, ...) from rotate-half order to llama.cpp's interleaved pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(model, plan, gguf_type: str):
    """(gguf name, float32 array in PyTorch's (out, in) layout, storage type) for every tensor."""
    config = model.config
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    qtype = GGUF_TYPES[gguf_type][0]
    big = "Q8_0" if qtype.startswith(("Q4", "Q5")) else qtype  # embedding / output matrices

    def store(name: str, t: torch.Tensor, kind: str):
        arr = t.contiguous().numpy()
        if arr.ndim == 1 or kind == "F32":
            return name, arr, "F32"
        if kind in ("F16", "BF16", "F32"):
            return name, arr, kind
        # block types need rows that are whole blocks of 32; otherwise keep the tensor in f16
        return (name, arr, kind) if arr.shape[-1] % 32 == 0 else (name, arr, "F16")

    yield store("token_embd.weight", sd["model.embed_tokens.weight"], big)
    yield store("output_norm.weight", sd["model.norm.weight"], "F32")
    if not config.tie_word_embeddings:
        yield store("output.weight", sd["lm_head.weight"], big)
    factors = _rope_factors(config)
    if factors is not None:
        yield "rope_freqs.weight", factors, "F32"
    for j, (i, heads, kv, n_ff) in enumerate(plan):
        src, dst = f"model.layers.{i}.", f"blk.{j}."
        if i == -1:  # the KV-cache carrier of `_layer_plan`
            hidden, d = config.hidden_size, config.head_dim
            yield store(dst + "attn_norm.weight", torch.ones(hidden), "F32")
            for name, shape in (("attn_q", (d, hidden)), ("attn_k", (d, hidden)), ("attn_v", (d, hidden)),
                                ("attn_output", (hidden, d))):
                yield store(dst + name + ".weight", torch.zeros(shape), "F32")
            continue
        block = config.block_configs[i]
        if block.attention.kind == "linear":
            yield store(dst + "attn_norm.weight", sd[src + "input_layernorm.weight"], "F32")
            yield store(dst + "attn_output.weight", sd[src + "self_attn.linear_attn.weight"], qtype)
        elif block.attention.kind == "gqa":
            yield store(dst + "attn_norm.weight", sd[src + "input_layernorm.weight"], "F32")
            a = src + "self_attn."
            yield store(dst + "attn_q.weight", _permute_rope(sd[a + "q_proj.weight"], heads), qtype)
            yield store(dst + "attn_k.weight", _permute_rope(sd[a + "k_proj.weight"], kv), qtype)
            yield store(dst + "attn_v.weight", sd[a + "v_proj.weight"], qtype)
            yield store(dst + "attn_output.weight", sd[a + "o_proj.weight"], qtype)
            if config.qkv_bias:
                yield store(dst + "attn_q.bias", _permute_rope(sd[a + "q_proj.bias"], heads), "F32")
                yield store(dst + "attn_k.bias", _permute_rope(sd[a + "k_proj.bias"], kv), "F32")
                yield store(dst + "attn_v.bias", sd[a + "v_proj.bias"], "F32")
            if config.o_proj_bias:
                yield store(dst + "attn_output.bias", sd[a + "o_proj.bias"], "F32")
        if block.ffn.kind == "mlp":
            m = src + "mlp."
            yield store(dst + "ffn_norm.weight", sd[src + "post_attention_layernorm.weight"], "F32")
            for proj in ("gate", "up", "down"):
                yield store(dst + f"ffn_{proj}.weight", sd[m + f"{proj}_proj.weight"], qtype)
                if config.mlp_bias:
                    yield store(dst + f"ffn_{proj}.bias", sd[m + f"{proj}_proj.bias"], "F32")
        elif n_ff:  # the zero FFN standing in for a no-op one (module docstring)
            hidden = config.hidden_size
            yield store(dst + "ffn_norm.weight", torch.ones(hidden), "F32")
            yield store(dst + "ffn_gate.weight", torch.zeros(n_ff, hidden), "F32")
            yield store(dst + "ffn_up.weight", torch.zeros(n_ff, hidden), "F32")
            yield store(dst + "ffn_down.weight", torch.zeros(hidden, n_ff), "F32")


# --- tokenizer -------------------------------------------------------------------------------
def _write_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    if tokenizer is None:
        log.info("no tokenizer: writing a placeholder vocabulary (the GGUF can be timed, not prompted with text)")
        _write_placeholder_vocab(writer, vocab_size)
        return
    if isinstance(tokenizer, (str, Path)):
        from ..checkpoint.convert import resolve_parent_path

        path = resolve_parent_path(tokenizer) if not Path(tokenizer).exists() else Path(tokenizer)
        if path.is_file() and path.suffix == ".gguf":
            _copy_gguf_tokenizer(writer, path, vocab_size)
            return
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, TypeError) as exc:
            raise PuzzleError(f"{path}: no usable tokenizer ({str(exc).splitlines()[0]})") from None
    _convert_hf_tokenizer(writer, tokenizer, vocab_size)


def _copy_gguf_tokenizer(writer, path: Path, vocab_size: int) -> None:
    """Every `tokenizer.*` field of a GGUF file, with its value type."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(path))
    n_tokens = None
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        value = field.contents()
        if vtype == GGUFValueType.ARRAY:
            writer.add_key_value(key, value, vtype, sub_type=field.types[1])
            if key == "tokenizer.ggml.tokens":
                n_tokens = len(value)
        else:
            writer.add_key_value(key, value, vtype)
    if n_tokens != vocab_size:
        raise PuzzleError(f"{path}: its tokenizer has {n_tokens} tokens but the model's vocabulary is {vocab_size}")


def _convert_hf_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """A Hugging Face fast tokenizer with a BPE model -> llama.cpp's "gpt2" (byte-level BPE) vocabulary."""
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else None
    if not spec or spec.get("model", {}).get("type") != "BPE" or spec["model"].get("byte_fallback"):
        raise PuzzleError("only byte-level BPE tokenizers convert to GGUF here; give --tokenizer PARENT.gguf "
                          "(a GGUF of the parent) to copy its tokenizer instead")
    vocab = tokenizer.get_vocab()
    special = set(tokenizer.all_special_ids)
    added = {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if i in special else
                         gguf.TokenType.USER_DEFINED if by_id[i] in added else gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    merges = merges or [f"{tokens[0]} {tokens[0]}"]  # llama.cpp refuses a BPE vocabulary without merges
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(tokenizer, tokens, types, merges))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for attr, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int) and 0 <= value < vocab_size:
            add(value)
    writer.add_add_bos_token(False)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        writer.add_chat_template(template)


# llama.cpp names its pre-tokenizers (the regexes that split text before BPE) and its own converter
# recognizes a tokenizer by hashing its output on a test text. We try these names instead and keep
# the first whose tokenization of PROBE_TEXT equals the Hugging Face tokenizer's.
PRE_TOKENIZERS = ["gpt-2", "smollm", "llama-bpe", "qwen2", "default", "starcoder", "deepseek-llm", "deepseek-coder",
                  "falcon", "refact", "olmo", "dbrx", "stablelm2", "command-r", "tekken", "gpt-4o", "mpt"]
PROBE_TEXT = ("Hello world! It's 2024-05-17, and we've got 12345 apples (3.14 each).\n\n  Indented\tline\n"
              " = Title = \n don't, I'm, you'll, they're... naïve café — 日本語 🙂 x==y; a+b<=c {x: [1, 2]}")


def _pre_tokenizer(tokenizer, tokens, types, merges) -> str:
    import gguf

    try:
        import llama_cpp
    except ImportError:
        log.warning("llama-cpp-python is not installed: cannot check the pre-tokenizer; writing 'gpt-2'")
        return "gpt-2"
    expected = tokenizer(PROBE_TEXT, add_special_tokens=False).input_ids
    import tempfile

    with tempfile.TemporaryDirectory(prefix="puzzlenas-tok-") as tmp:
        for name in PRE_TOKENIZERS:
            path = Path(tmp) / f"{name}.gguf"
            w = gguf.GGUFWriter(path, ARCH)
            w.add_block_count(1)
            w.add_context_length(64)
            w.add_embedding_length(8)
            w.add_feed_forward_length(8)
            w.add_head_count(1)
            w.add_layer_norm_rms_eps(1e-6)
            w.add_tokenizer_model("gpt2")
            w.add_tokenizer_pre(name)
            w.add_token_list(tokens)
            w.add_token_types(types)
            w.add_token_merges(merges)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
            try:
                llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
            except ValueError:
                continue
            try:
                got = llm.tokenize(PROBE_TEXT.encode(), add_bos=False, special=False)
            finally:
                llm.close()
            if got == expected:
                return name
    log.warning("no llama.cpp pre-tokenizer reproduces this tokenizer on a probe text; writing 'gpt-2' "
                "(llama.cpp may split some text differently)")
    return "gpt-2"


def _write_placeholder_vocab(writer, vocab_size: int) -> None:
    import gguf

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([f"<t{i}>" for i in range(vocab_size)])
    writer.add_token_types([gguf.TokenType.NORMAL] * vocab_size)
    writer.add_token_merges(["<t0> <t1>"])  # llama.cpp refuses a BPE vocabulary without merges
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(min(1, vocab_size - 1))
