"""kvpass custom ops: the boundary between the graph pass and the kernels.

    kvpass::kv_write(anchor_k, anchor_v, k_new, v_new, positions?, key_bits, value_bits,
                     group_size, residual_length) -> token [1]
        Writes new tokens k_new [B, H, n, Dk], v_new [B, H, n, Dv] into the store that the
        cache tensors anchor_k/anchor_v stand for (created on first sight). positions=None
        appends after the anchor's logical length (DynamicCache `cat`); otherwise tokens go to
        positions[0] .. positions[0]+n-1 (StaticCache `index_copy_`, slice assignment), and
        everything from positions[0] on is replaced. Returns a 1-element token registered to
        the store: readers take it, which orders them after the write.
    kvpass::attention(q, token, attn_mask?, kv_len, kv_repeat, head_dim_v, dropout_p, is_causal,
                      scale?, enable_gqa, softcap=0.0, eager=False) -> [B, Hq, Tq, Dv]
        SDPA of q [B, Hq, Tq, D] over the store's first kv_len tokens, with the SDPA arguments
        the model passed. kv_repeat > 1 reproduces a `repeat_kv` that fed SDPA. softcap > 0:
        the scores q.k * scale become softcap * tanh(scores / softcap) before the mask (Gemma2's
        logit softcapping; the pass lifts it, with scale and mask, out of eager attention code).
        eager: the site was the model's own eager attention code (the reference then writes the
        attention out in that order, `written_out_attention`, instead of calling SDPA).
    kvpass::dequant(token, which, shape) -> [B, H, kv_len, D]
        The store's keys (which=0) or values (which=1), dequantized: for any other reader.

CPU (and every device without a kernel) runs the plain-torch reference: dequantize in fp32,
cast to the model dtype, call torch's SDPA with the model's own arguments (for eager sites and
softcaps, which SDPA has no argument for: the attention written out in fp32, in eager order).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

from kvpass.store import KVStore, KVStoreError, StoreConfig, count_host_path_use, lookup, new_token, register

_STANDIN_HINT = (
    "kvpass keeps the cache in its own quantized store and the cache object holds NaN stand-ins; "
    "an operation outside the compiled model materialized them (beam search `reorder_cache`, "
    "`batch_repeat_interleave`, `index_select`...). kvpass does not support that: use greedy or "
    "sampling with num_beams=1, and a fresh cache per generate() call."
)


def _ingest(store: KVStore, anchor_k, anchor_v, past_len: int):
    """Fill a new store from a real full-precision cache (an eager prefill ran before)."""
    if past_len == 0:
        return
    k, v = anchor_k[:, :, :past_len], anchor_v[:, :, :past_len]
    if torch.isnan(k).any() or torch.isnan(v).any():
        raise KVStoreError(_STANDIN_HINT)
    store.append(k, v)


def _device_lengths_ok(store: KVStore, anchor_k) -> bool:
    """Static caches (a fixed max_cache_len) on a device with the quantize-append kernel keep their
    lengths on the device, so decode steps can run under CUDA graphs (KVPASS_DEVICE_LENGTHS=0: off)."""
    if os.environ.get("KVPASS_DEVICE_LENGTHS", "1") == "0" or anchor_k.dim() != 4:
        return False
    from kvpass.lowering import dispatch

    return dispatch.quantize_append_kernel(store) is not None


def _store_for(anchor_k, anchor_v, k_new, v_new, cfg: StoreConfig, past_len: int, static: bool = False) -> KVStore:
    store = lookup(anchor_k)
    if store is None:
        dtype = anchor_k.dtype if anchor_k.dim() == 4 else k_new.dtype
        B, H, _, Dk = k_new.shape
        store = KVStore(cfg, B, H, Dk, v_new.shape[-1], dtype, k_new.device)
        if static and _device_lengths_ok(store, anchor_k):
            store.enable_device_lengths(anchor_k.shape[2])
        _ingest(store, anchor_k, anchor_v, past_len)
        for anchor in (anchor_k, anchor_v):
            if anchor.numel():
                register(anchor, store)
        return store
    if store.cfg != cfg:
        raise KVStoreError(
            f"kvpass: this cache was filled with {store.cfg} and is now written with {cfg}; "
            "one cache cannot change quantization settings. Use a fresh cache."
        )
    if past_len < store.length:
        store.truncate(past_len)  # crop(), reset(), or a rewrite from an earlier position
    elif past_len > store.length:
        raise KVStoreError(
            f"kvpass: the cache says {past_len} tokens precede this write but kvpass's store holds "
            f"{store.length}; tokens were added outside the compiled model. Use a fresh cache."
        )
    return store


def _start_position(positions: torch.Tensor) -> int:
    count_host_path_use()
    n = positions.numel()
    start = int(positions.reshape(-1)[0])
    expected = torch.arange(start, start + n, device=positions.device)
    if not torch.equal(positions.reshape(-1).to(expected.dtype), expected):
        raise KVStoreError(
            f"kvpass: cache writes must cover consecutive positions, got {positions.tolist()}; "
            "scattered writes into a quantized cache are not supported."
        )
    return start


@torch.library.custom_op("kvpass::kv_write", mutates_args=())
def kv_write(
    anchor_k: torch.Tensor,
    anchor_v: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    positions: Optional[torch.Tensor],
    key_bits: int,
    value_bits: int,
    group_size: int,
    residual_length: int,
) -> torch.Tensor:
    cfg = StoreConfig(key_bits, value_bits, group_size, residual_length)
    if positions is None:
        past_len = anchor_k.shape[2] if anchor_k.dim() == 4 else 0
    else:
        store = lookup(anchor_k)
        if store is not None and store.cfg == cfg and store.can_append_on_device(k_new.shape[2]):
            from kvpass.lowering import dispatch

            kernels = dispatch.quantize_append_kernel(store)
            if kernels is not None:  # decode step with device-side lengths: no host sync (CUDA-graph capturable)
                store.check_compatible(k_new, v_new)
                store.append_at(k_new, v_new, positions, kernels)
                return new_token(store)
        past_len = _start_position(positions)
    store = _store_for(anchor_k, anchor_v, k_new, v_new, cfg, past_len, static=positions is not None)
    store.append(k_new, v_new)
    return new_token(store)


@kv_write.register_fake
def _(anchor_k, anchor_v, k_new, v_new, positions, key_bits, value_bits, group_size, residual_length):
    dtype = anchor_k.dtype if anchor_k.dim() == 4 else k_new.dtype
    return k_new.new_empty(1, dtype=dtype)


def _store_of(token: torch.Tensor) -> KVStore:
    store = lookup(token)
    assert store is not None, "kvpass internal error: a read token has no store"
    return store


def repeat_heads(x: torch.Tensor, n: int) -> torch.Tensor:
    """HF's repeat_kv: [B, H, T, D] -> [B, H * n, T, D], each head repeated n times in place."""
    if n == 1:
        return x
    B, H, T, D = x.shape
    return x[:, :, None].expand(B, H, n, T, D).reshape(B, H * n, T, D)


# fp32 scores per chunk of query rows in `written_out_attention` (256 MiB): bounds the [B, Hq, Tq, T]
# intermediate of a long eager prefill (the model's own eager code holds it whole, in its dtype).
SCORE_CHUNK_ELEMENTS = 1 << 26


def written_out_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, softcap: float):
    """SDPA's semantics written out in fp32, with logit softcapping when softcap > 0:
    softmax(cap(q k^T * scale) + mask) v, cap(x) = softcap * tanh(x / softcap), for q [B, Hq, Tq, D],
    k/v [B, H, T, D] (H = Hq, or Hq / n with enable_gqa). The order of operations is HF's eager
    attention (scale, softcap, mask, fp32 softmax), so an fp32 eager model is reproduced exactly.
    Query rows go in chunks of at most SCORE_CHUNK_ELEMENTS scores. Returns q's dtype."""
    if dropout_p > 0.0:
        raise ValueError(f"kvpass attention: an eager or softcapped site with dropout_p={dropout_p} is not "
                         "supported (inference only: call model.eval())")
    if enable_gqa and k.shape[1] != q.shape[1]:
        k, v = repeat_heads(k, q.shape[1] // k.shape[1]), repeat_heads(v, q.shape[1] // v.shape[1])
    scale = 1.0 / q.shape[-1] ** 0.5 if scale is None else scale
    B, Hq, Tq, _ = q.shape
    T = k.shape[2]
    if is_causal:  # SDPA's is_causal: top-left aligned lower triangle
        if attn_mask is not None:
            raise ValueError("kvpass attention: pass attn_mask or is_causal=True, not both (as SDPA)")
        attn_mask = torch.ones(Tq, T, dtype=torch.bool, device=q.device).tril()
    per_row = attn_mask is not None and attn_mask.dim() >= 2 and attn_mask.shape[-2] == Tq
    kt, vf = k.float().transpose(-1, -2), v.float()
    rows = max(1, SCORE_CHUNK_ELEMENTS // max(1, B * Hq * T))
    out = []
    for r0 in range(0, Tq, rows):
        s = torch.matmul(q[:, :, r0:r0 + rows].float(), kt) * scale      # [B, Hq, rows, T]
        if softcap:
            s = torch.tanh(s / softcap) * softcap
        if attn_mask is not None:
            m = attn_mask[..., r0:r0 + rows, :] if per_row else attn_mask
            s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.float()
        out.append(torch.matmul(torch.softmax(s, dim=-1), vf).to(q.dtype))
    return out[0] if len(out) == 1 else torch.cat(out, dim=2)


def attention_reference(q, store: KVStore, attn_mask, kv_len, kv_repeat, dropout_p, is_causal, scale, enable_gqa,
                        softcap: float = 0.0, eager: bool = False):
    """The oracle: dequantize the store (fp32 math, model dtype) and run torch's SDPA as the model did
    (`written_out_attention` for eager sites and softcaps)."""
    k = repeat_heads(store.read_keys(kv_len), kv_repeat)  # [B, Hkv * rep, kv_len, Dk]
    v = repeat_heads(store.read_values(kv_len), kv_repeat)
    if softcap or eager:
        return written_out_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask, dropout_p, is_causal, scale,
                                     enable_gqa, softcap).contiguous()
    out = F.scaled_dot_product_attention(
        q, k.to(q.dtype), v.to(q.dtype), attn_mask=attn_mask, dropout_p=dropout_p,
        is_causal=is_causal, scale=scale, enable_gqa=enable_gqa,
    )
    return out.contiguous()


@torch.library.custom_op("kvpass::attention", mutates_args=())
def attention(
    q: torch.Tensor,
    token: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    kv_len: int,
    kv_repeat: int,
    head_dim_v: int,
    dropout_p: float,
    is_causal: bool,
    scale: Optional[float],
    enable_gqa: bool,
    softcap: float = 0.0,
    eager: bool = False,
) -> torch.Tensor:
    store = _store_of(token)
    from kvpass.lowering import dispatch  # device kernels, when there are any

    return dispatch.attention(q, store, attn_mask, kv_len, kv_repeat, dropout_p, is_causal, scale, enable_gqa,
                              softcap, eager)


@attention.register_fake
def _(q, token, attn_mask, kv_len, kv_repeat, head_dim_v, dropout_p, is_causal, scale, enable_gqa, softcap=0.0,
      eager=False):
    B, Hq, Tq, _ = q.shape
    return q.new_empty(B, Hq, Tq, head_dim_v)


@torch.library.custom_op("kvpass::dequant", mutates_args=())
def dequant(token: torch.Tensor, which: int, shape: list[int]) -> torch.Tensor:
    store = _store_of(token)
    kv_len = shape[2]
    out = store.read_keys(kv_len) if which == 0 else store.read_values(kv_len)
    return out.contiguous()


@dequant.register_fake
def _(token, which, shape):
    return token.new_empty(shape)
