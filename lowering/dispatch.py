"""Chooses the implementation of each op for a device: a Triton kernel where one applies, else the reference."""
from __future__ import annotations

import logging

log = logging.getLogger("kvpass")


def attention(q, store, attn_mask, kv_len, kv_repeat, dropout_p, is_causal, scale, enable_gqa):
    from kvpass.lowering.ops import attention_reference

    return attention_reference(q, store, attn_mask, kv_len, kv_repeat, dropout_p, is_causal, scale, enable_gqa)
