"""An eager simulation of kvpass's quantization in plain code: the oracle for the compiled path.

`SimulatedKiviCache` is a transformers DynamicCache whose layers keep the full-precision history
and, on every update, return keys/values with KIVI fake-quantization applied exactly where kvpass
applies it: with L tokens cached, tokens [0, Lq) are quantized, Lq = max(0, (L - R) // G * G)
(the flush policy of kvpass.store), and the rest is the full-precision window. Attention then
reads these like the compiled model reads the store. No kvpass store, op or graph is involved.
"""
from __future__ import annotations

import torch

from kvpass.lowering import kivi


def quantized_length(length: int, group_size: int, residual_length: int) -> int:
    """How many of `length` cached tokens kvpass holds quantized (always whole groups)."""
    return max(0, (length - residual_length) // group_size * group_size)


def fake_quantize_cache(k, v, key_bits, value_bits, group_size, residual_length):
    """k, v [B, H, L, D] -> what kvpass's store returns for them (model dtype)."""
    Lq = quantized_length(k.shape[2], group_size, residual_length)
    if Lq == 0:
        return k, v
    scale_dtype = torch.float32 if k.dtype == torch.float32 else torch.float16
    kq = k[:, :, :Lq] if key_bits == 16 else kivi.fake_quantize_keys(k[:, :, :Lq], key_bits, group_size, scale_dtype)
    vg = min(group_size, v.shape[-1])  # value groups never span more than one head
    vq = v[:, :, :Lq] if value_bits == 16 else kivi.fake_quantize_values(v[:, :, :Lq], value_bits, vg, scale_dtype)
    return torch.cat([kq.to(k.dtype), k[:, :, Lq:]], 2), torch.cat([vq.to(v.dtype), v[:, :, Lq:]], 2)


def SimulatedKiviCache(config, key_bits=2, value_bits=2, group_size=32, residual_length=128):
    """A DynamicCache whose every layer returns KIVI fake-quantized keys and values (see module doc)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    class _Layer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            keys, values = super().update(key_states, value_states, *args, **kwargs)  # full history
            return fake_quantize_cache(keys, values, key_bits, value_bits, group_size, residual_length)

    cache = DynamicCache()
    n = config.get_text_config(decoder=True).num_hidden_layers
    cache.layers = [_Layer() for _ in range(n)]
    cache.layer_class_to_replicate = None
    return cache
