"""Tiny random-weight models of many decoder families, plus a gpt-fast-style model owning its KV buffers."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

COMMON = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, max_position_embeddings=256)


def _hf(config_cls_name: str, model_cls_name: str, **kw):
    import transformers

    def build(attn: str):
        cfg = getattr(transformers, config_cls_name)(**{**COMMON, **kw})
        cfg._attn_implementation = attn
        torch.manual_seed(0)
        return getattr(transformers, model_cls_name)(cfg).eval()

    return build


# family -> (builder, attention implementations the family has)
FAMILIES = {
    "llama": (_hf("LlamaConfig", "LlamaForCausalLM", intermediate_size=128, num_attention_heads=4, num_key_value_heads=2), ("sdpa", "eager")),
    "mistral": (_hf("MistralConfig", "MistralForCausalLM", intermediate_size=128, num_attention_heads=4, num_key_value_heads=1, sliding_window=None), ("sdpa", "eager")),
    "qwen2": (_hf("Qwen2Config", "Qwen2ForCausalLM", intermediate_size=128, num_attention_heads=4, num_key_value_heads=2), ("sdpa", "eager")),
    "qwen3": (_hf("Qwen3Config", "Qwen3ForCausalLM", intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16), ("sdpa", "eager")),
    "gemma2": (_hf("Gemma2Config", "Gemma2ForCausalLM", intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4096, layer_types=["full_attention", "full_attention"]), ("eager",)),
    "phi3": (_hf("Phi3Config", "Phi3ForCausalLM", intermediate_size=128, num_attention_heads=4, num_key_value_heads=4, pad_token_id=0), ("sdpa", "eager")),
    "gpt2": (_hf("GPT2Config", "GPT2LMHeadModel", n_embd=64, n_layer=2, n_head=4, n_positions=256, vocab_size=97), ("sdpa", "eager")),
    "gpt_neox": (_hf("GPTNeoXConfig", "GPTNeoXForCausalLM", intermediate_size=128, num_attention_heads=4), ("sdpa", "eager")),
    "falcon": (_hf("FalconConfig", "FalconForCausalLM", num_attention_heads=4, new_decoder_architecture=True, num_kv_heads=2, bias=False, parallel_attn=True), ("sdpa", "eager")),
}


class GptFastAttention(nn.Module):
    """gpt-fast style attention: the module owns its KV buffers and writes them by slice assignment."""

    def __init__(self, dim=64, heads=4, kv_heads=2, max_len=128, batch=1):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wkv = nn.Linear(dim, 2 * kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        shape = (batch, kv_heads, max_len, self.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape), persistent=False)

    def forward(self, x, input_pos, mask):  # x [B, T, dim], input_pos [T], mask [1, 1, T, max_len] bool
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k, v = self.wkv(x).view(B, T, 2 * self.kv_heads, self.head_dim).transpose(1, 2).chunk(2, dim=1)
        self.k_cache[:, :, input_pos] = k
        self.v_cache[:, :, input_pos] = v
        y = F.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=mask, enable_gqa=True)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class GptFastModel(nn.Module):
    """A two-layer decoder built from GptFastAttention blocks; call with (ids [B, T], input_pos [T])."""

    def __init__(self, vocab=97, dim=64, layers=2, max_len=128):
        super().__init__()
        torch.manual_seed(0)
        self.max_len = max_len
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(GptFastAttention(dim, max_len=max_len) for _ in range(layers))
        self.head = nn.Linear(dim, vocab, bias=False)
        self.register_buffer("causal", torch.tril(torch.ones(max_len, max_len, dtype=torch.bool)), persistent=False)

    def forward(self, ids, input_pos):
        x = self.embed(ids)
        mask = self.causal[None, None, input_pos]  # [1, 1, T, max_len]
        for layer in self.layers:
            x = x + layer(x, input_pos, mask)
        return self.head(x)


def gptfast_greedy(model, ids, steps, forward=None):
    """Greedy decoding with a gpt-fast model: prefill then one token per step."""
    forward = model if forward is None else forward
    T = ids.shape[1]
    logits = forward(ids, torch.arange(T))
    out = [logits[:, -1].argmax(-1)]
    for i in range(steps - 1):
        logits = forward(out[-1][:, None], torch.tensor([T + i]))
        out.append(logits[:, -1].argmax(-1))
    return torch.stack(out, 1)
