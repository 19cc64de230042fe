"""Heterogeneous Llama-family decoder ("nemotron-nas" / DeciLM): each layer has its own blocks.

Read top to bottom: RMSNorm, rotary embedding, the attention variants (grouped-query, linear,
no-op), the FFN variants (gated MLP, linear, no-op), the decoder layer, the model, the causal LM.

This file is copied beside every checkpoint puzzlenas writes and loaded by
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` without puzzlenas installed,
so it imports only torch, transformers and its sibling configuration file. It relies on few
transformers internals on purpose (own mask, own RoPE, SDPA directly): those change between
releases, the math does not.

Parameter names follow the public DeciLM checkpoints (Llama-3.1-Nemotron-51B):
  model.layers.N.self_attn.{q,k,v,o}_proj   grouped-query attention
  model.layers.N.self_attn.linear_attn      attention replaced by a linear map
  model.layers.N.mlp.{gate,up,down}_proj     gated MLP
  model.layers.N.mlp.linear_mlp             FFN replaced by a linear map
  no-op sub-blocks have no parameters and no norm.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_decilm import AttentionConfig, DeciLMConfig, FFNConfig

# transformers 5 renamed the cache field `past_key_values` -> `cache`; follow whichever exists.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class DeciLMRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


def rope_inverse_frequencies(config: DeciLMConfig) -> torch.Tensor:
    """inv_freq (head_dim/2,) for default, linear and Llama-3 scaled RoPE."""
    dim = config.head_dim
    scaling = config.rope_parameters
    rope_type = scaling.get("rope_type", "default")
    inv_freq = 1.0 / (scaling["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif rope_type == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, smooth in between.
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


class DeciLMRotaryEmbedding(nn.Module):
    """cos/sin tables. inv_freq is recomputed per call (head_dim/2 numbers) instead of kept as a
    buffer: transformers 5 builds models on the meta device and would leave a buffer uninitialized."""

    def __init__(self, config: DeciLMConfig):
        super().__init__()
        self.config = config

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids (B, T) -> cos, sin (B, T, head_dim), computed in fp32 for accuracy
        inv_freq = rope_inverse_frequencies(self.config).to(x.device)
        freqs = position_ids[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x (B, H, T, D); cos/sin (B, T, D)
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


class DeciLMAttention(nn.Module):
    """Grouped-query attention with this layer's own number of KV heads."""

    def __init__(self, config: DeciLMConfig, num_key_value_heads: int, cache_index: int):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = config.head_dim
        self.cache_index = cache_index  # position among the layers that own a KV cache
        hidden, q_dim, kv_dim = config.hidden_size, self.num_heads * self.head_dim, num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(hidden, q_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(hidden, kv_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(hidden, kv_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(q_dim, hidden, bias=config.o_proj_bias)
        if config.qk_norm:  # Qwen3: RMSNorm over each head's q and k before RoPE
            self.q_norm = DeciLMRMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = DeciLMRMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, position_embeddings, attention_mask=None, cache=None, **_):
        B, T, _C = x.shape
        q = self.q_proj(x).view(B, T, -1, self.head_dim)  # (B, T, H, D)
        k = self.k_proj(x).view(B, T, -1, self.head_dim)  # (B, T, KV, D)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = position_embeddings
        q = apply_rotary(q.transpose(1, 2), cos, sin)  # (B, H, T, D)
        k = apply_rotary(k.transpose(1, 2), cos, sin)  # (B, KV, T, D)
        if cache is not None:
            k, v = cache.update(k, v, self.cache_index)
        # enable_gqa: each KV head serves its group of query heads inside the kernel, instead of
        # copying the whole cache H/KV times per step (generation spent more time copying than attending)
        gqa = self.num_key_value_heads != self.num_heads
        if attention_mask is None:  # plain causal, no padding, no past: the fused kernel path
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class DeciLMLinearAttention(nn.Module):
    """Attention replaced by one hidden->hidden linear map (no cache, no mixing across tokens)."""

    def __init__(self, config: DeciLMConfig):
        super().__init__()
        self.linear_attn = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x, *args, **kwargs):
        return self.linear_attn(x)


class DeciLMMLP(nn.Module):
    """SiLU-gated MLP with this layer's own intermediate size."""

    def __init__(self, config: DeciLMConfig, intermediate_size: int):
        super().__init__()
        hidden = config.hidden_size
        self.gate_proj = nn.Linear(hidden, intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(hidden, intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(intermediate_size, hidden, bias=config.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DeciLMLinearMLP(nn.Module):
    def __init__(self, config: DeciLMConfig):
        super().__init__()
        self.linear_mlp = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.linear_mlp(x)


def build_attention(config: DeciLMConfig, attention: AttentionConfig, cache_index: int | None) -> nn.Module | None:
    if attention.kind == "no_op":
        return None
    if attention.kind == "linear":
        return DeciLMLinearAttention(config)
    return DeciLMAttention(config, attention.num_key_value_heads, cache_index)


def build_ffn(config: DeciLMConfig, ffn: FFNConfig) -> nn.Module | None:
    if ffn.kind == "no_op":
        return None
    if ffn.kind == "linear":
        return DeciLMLinearMLP(config)
    return DeciLMMLP(config, ffn.intermediate_size)


class DeciLMDecoderLayer(nn.Module):
    """Pre-norm residual layer; a no-op sub-block (and its norm) is simply absent."""

    def __init__(self, config: DeciLMConfig, layer_idx: int, cache_index: int | None):
        super().__init__()
        block = config.block_configs[layer_idx]
        self.block_config = block
        self.self_attn = build_attention(config, block.attention, cache_index)
        self.mlp = build_ffn(config, block.ffn)
        if self.self_attn is not None:
            self.input_layernorm = DeciLMRMSNorm(config.hidden_size, config.rms_norm_eps)
        if self.mlp is not None:
            self.post_attention_layernorm = DeciLMRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, h, position_embeddings, attention_mask=None, cache=None):
        if self.self_attn is not None:
            h = h + self.self_attn(self.input_layernorm(h), position_embeddings, attention_mask, cache)
        if self.mlp is not None:
            h = h + self.mlp(self.post_attention_layernorm(h))
        return h


class DeciLMPreTrainedModel(PreTrainedModel):
    config_class = DeciLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["DeciLMDecoderLayer"]
    _supports_sdpa = True
    _supports_cache_class = True

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, DeciLMRMSNorm):
            nn.init.ones_(module.weight)


def build_attention_mask(
    attention_mask: torch.Tensor | None, q_len: int, past_len: int, dtype: torch.dtype, device
) -> torch.Tensor | None:
    """Additive (B, 1, q_len, past_len + q_len) mask, or None when SDPA's own causal path suffices.

    Masked entries get dtype.min rather than -inf so a fully padded query row averages
    instead of producing NaN.
    """
    no_padding = attention_mask is None or bool(attention_mask.all())
    if no_padding and (past_len == 0 or q_len == 1):
        return None
    kv_len = past_len + q_len
    q_pos = torch.arange(past_len, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    allowed = (k_pos <= q_pos)[None, None]  # (1, 1, q, kv)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, -kv_len:].bool()
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


class DeciLMModel(DeciLMPreTrainedModel):
    def __init__(self, config: DeciLMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        cache_indices = {layer: i for i, layer in enumerate(config.attention_layers())}
        self.layers = nn.ModuleList(
            [DeciLMDecoderLayer(config, i, cache_indices.get(i)) for i in range(config.num_hidden_layers)]
        )
        self.norm = DeciLMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = DeciLMRotaryEmbedding(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache: Cache | None = None,
        inputs_embeds=None,
        use_cache=None,
        output_hidden_states=None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if not use_cache:
            cache = None
        elif cache is None:
            cache = DynamicCache()
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        B, T = h.shape[:2]
        # Only layers with grouped-query attention write to the cache, at their cache_index, so
        # index 0 is the first attention layer and holds the true past length.
        past_len = cache.get_seq_length() if cache is not None and self.config.attention_layers() else 0
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + T, device=h.device)[None].expand(B, -1)
        mask = build_attention_mask(attention_mask, T, past_len, h.dtype, h.device)
        position_embeddings = self.rotary_emb(h, position_ids)
        hidden_states = [h] if output_hidden_states else None
        for layer in self.layers:
            h = layer(h, position_embeddings, mask, cache)
            if output_hidden_states:
                hidden_states.append(h)
        h = self.norm(h)
        return BaseModelOutputWithPast(
            last_hidden_state=h,
            hidden_states=tuple(hidden_states) if hidden_states else None,
            **{_CACHE_FIELD: cache},
        )


class DeciLMForCausalLM(DeciLMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DeciLMConfig):
        super().__init__(config)
        self.model = DeciLMModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache: Cache | None = None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_hidden_states=None,
        logits_to_keep: int = 0,
        past_key_values: Cache | None = None,
        return_dict=None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        h = out.last_hidden_state
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=out.hidden_states, **{_CACHE_FIELD: getattr(out, _CACHE_FIELD)}
        )
