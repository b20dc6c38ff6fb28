"""Chooses the implementation of each op for a device: a Triton kernel where one applies, else the reference.

`attention` runs the split-KV decode kernel (kvpass/templates/decode_attention.py) when
    * q is on CUDA, or KVPASS_TRITON_INTERPRET=1 and TRITON_INTERPRET=1 are both set (the CPU
      tests run the kernel in Triton's interpreter that way);
    * one query token (decode), no dropout, not is_causal (SDPA's is_causal is top-left aligned:
      with one query it attends only to key 0, which the kernel does not model);
    * keys and values are both KIVI-quantized (bits 2/4/8, not 16) in q's dtype with a group
      size and head_dim the kernel supports;
    * the heads map like the reference (repeat_kv by kv_repeat, then SDPA's enable_gqa);
    * the mask is None, bool, or additive in q's dtype, broadcastable to [B, Hq, 1, kv_len];
    * any logit softcap (every decode kernel applies it; the reference writes the attention out).
kv_len may differ from the store's length: columns past the store read as zero keys and values
in the reference (static caches) and the kernel reproduces exactly that; kv_len < length
attends the first kv_len tokens, like the reference's slice.
Anything else runs the reference, after a one-time `logging` info line naming the reason.

`quantize_append_kernel(store)` routes `KVStore.append` the same way: the fused quantize-append
kernel (kvpass/templates/quantize_append.py) when the store is on CUDA (or both interpreter
variables are set), both codecs are KIVI (bits 2/4/8), Dk == Dv and the kernel supports the spec;
else the torch reference path (codecs + torch.cat), after a one-time info line naming the reason.
`dequantize_kernel(store, kind)` routes `KVStore.read_keys` / `read_values` (kind "key" / "value")
the same way: the fused dequantize kernel (kvpass/templates/dequantize.py, one launch writes the
whole [B, H, kv_len, D] read) when the store is on CUDA (or both interpreter variables are set),
that kind's codec is KIVI (bits 2/4/8) and the kernel supports its spec; else the torch reference
(codecs + cast + torch.cat), after a one-time info line naming the reason.
KVPASS_DISABLE_TRITON=1 forces the reference everywhere.
"""
from __future__ import annotations

import importlib
import logging
import os

import torch

from kvpass.lowering import paths

log = logging.getLogger("kvpass")

_logged: set[str] = set()
_templates: dict[str, object] = {}       # template module name -> module
_template_errors: dict[str, str] = {}    # template module name -> why it cannot be imported
_append_spec_why: dict = {}
_dequant_spec_why: dict = {}


def _fallback(reason: str):
    _log_once(reason, "kvpass: attention runs the reference (dequantize + SDPA): %s", reason)


def _template(name: str):
    """kvpass.templates.<name>, or None (the reason kept in _template_errors) when Triton cannot
    be imported or initialized; tried once per process."""
    if name not in _templates and name not in _template_errors:
        try:
            _templates[name] = importlib.import_module(f"kvpass.templates.{name}")
        except Exception as e:  # ImportError, or a Triton that fails to initialize
            _template_errors[name] = f"triton unavailable ({type(e).__name__}: {e})"
    return _templates.get(name)


def decode_kernels():
    """The decode-attention template module, or None."""
    return _template("decode_attention")


def _why_no_triton(device: torch.device, template: str) -> str | None:
    """The reason no kernel of `template` can run on `device`, or None."""
    if os.environ.get("KVPASS_DISABLE_TRITON") == "1":
        return "KVPASS_DISABLE_TRITON=1"
    if not (device.type == "cuda" or _interpreting()):
        return f"no kernel for device {device.type} (set KVPASS_TRITON_INTERPRET=1 and TRITON_INTERPRET=1 to interpret)"
    if _template(template) is None:
        return _template_errors[template]
    return None


def _log_once(reason: str, message: str, *args):
    if reason not in _logged:
        _logged.add(reason)
        log.info(message, *args)


def _interpreting() -> bool:
    return os.environ.get("KVPASS_TRITON_INTERPRET") == "1" and os.environ.get("TRITON_INTERPRET") == "1"


def _mask_ok(attn_mask, q, kv_len) -> str | None:
    if attn_mask is None:
        return None
    if attn_mask.dtype != torch.bool and attn_mask.dtype != q.dtype:
        return f"mask dtype {attn_mask.dtype} (kernel takes bool or {q.dtype})"
    if attn_mask.dim() > 4 or attn_mask.shape[-1] != kv_len:
        return f"mask shape {tuple(attn_mask.shape)} for kv_len {kv_len}"
    B, Hq, Tq, _ = q.shape
    shape = (1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)
    for have, want in zip(shape[:3], (B, Hq, Tq)):
        if have not in (1, want):
            return f"mask shape {tuple(attn_mask.shape)} does not broadcast to {(B, Hq, Tq, kv_len)}"
    if attn_mask.device != q.device:
        return "mask on another device"
    return None


def _why_not_kernel(q, store, attn_mask, kv_len, kv_repeat, dropout_p, is_causal, enable_gqa) -> str | None:
    why = _why_no_triton(q.device, "decode_attention")
    if why:
        return why
    mod = decode_kernels()
    if q.dim() != 4 or q.shape[2] != 1:
        return f"query length {q.shape[2] if q.dim() == 4 else q.shape} (the kernel is for decode, one token)"
    if dropout_p > 0.0:
        return f"dropout_p={dropout_p}"
    if is_causal:
        return "is_causal=True with one query token (top-left causal mask)"
    if store.cfg.key_bits == 16 or store.cfg.value_bits == 16:
        return f"full-precision codec (key_bits={store.cfg.key_bits}, value_bits={store.cfg.value_bits})"
    if q.dtype != store.dtype:
        return f"query dtype {q.dtype} differs from the cache dtype {store.dtype}"
    if store.Dk != store.Dv or q.shape[-1] != store.Dk:
        return f"head dims q {q.shape[-1]}, k {store.Dk}, v {store.Dv} (kernel needs them equal)"
    if q.device != store.device:
        return "query and store on different devices"
    Hq, H = q.shape[1], store.H
    if enable_gqa:
        if Hq % (H * kv_repeat):
            return f"{Hq} query heads over {H} kv heads x repeat {kv_repeat}"
    elif Hq != H * kv_repeat:
        return f"{Hq} query heads vs {H} kv heads x repeat {kv_repeat} without enable_gqa"
    why = mod.check_spec(mod.store_spec(store, q))
    if why:
        return f"unsupported spec: {why}"
    return _mask_ok(attn_mask, q, kv_len)


def attention(q, store, attn_mask, kv_len, kv_repeat, dropout_p, is_causal, scale, enable_gqa, softcap=0.0,
              eager=False):
    why = _why_not_kernel(q, store, attn_mask, kv_len, kv_repeat, dropout_p, is_causal, enable_gqa)
    if why is None:
        return decode_kernels().decode_attention_store(q, store, attn_mask, kv_len, scale, softcap=softcap)
    _fallback(why)
    impl = "dequantize + written-out attention (fp32)" if softcap or eager else "dequantize + SDPA"
    if q.dim() == 4 and q.shape[2] != 1:   # prefill, chunked prefill: this is the path (reads by the dequant kernel)
        paths.record("attention, multi-token query", impl)
    else:
        paths.record("decode attention", f"reference ({impl}): {why}")
    from kvpass.lowering.ops import attention_reference

    return attention_reference(q, store, attn_mask, kv_len, kv_repeat, dropout_p, is_causal, scale, enable_gqa,
                               softcap, eager)


def _why_not_append_kernel(store) -> str | None:
    why = _why_no_triton(store.device, "quantize_append")
    if why:
        return why
    mod = _template("quantize_append")
    key = (store.cfg, store.Dk, store.Dv, store.dtype)  # fixed per store: checked once per kind of store
    if key not in _append_spec_why:
        why = None
        if store.cfg.key_bits == 16 or store.cfg.value_bits == 16:
            why = f"full-precision codec (key_bits={store.cfg.key_bits}, value_bits={store.cfg.value_bits})"
        elif store.Dk != store.Dv:
            why = f"head dims k {store.Dk}, v {store.Dv} (kernel needs them equal)"
        else:
            spec_why = mod.check_spec(mod.store_spec(store))
            why = f"unsupported spec: {spec_why}" if spec_why else None
        _append_spec_why[key] = why
    return _append_spec_why[key]


def quantize_append_kernel(store):
    """The quantize-append kernel module when `store`'s appends run it, else None (the reason is
    logged once; the store then runs its torch reference path)."""
    why = _why_not_append_kernel(store)
    if why is None:
        paths.record("quantize-append", "Triton kernel")
        return _template("quantize_append")
    _log_once(f"quantize-append: {why}", "kvpass: quantize-append runs the reference (torch codecs): %s", why)
    paths.record("quantize-append", f"reference (torch codecs): {why}")
    return None


def _why_not_dequant_kernel(store, kind: str) -> str | None:
    why = _why_no_triton(store.device, "dequantize")
    if why:
        return why
    mod = _template("dequantize")
    key = (kind, store.cfg, store.Dk, store.Dv, store.dtype)  # fixed per store: checked once per kind of store
    if key not in _dequant_spec_why:
        bits = store.cfg.key_bits if kind == "key" else store.cfg.value_bits
        if bits == 16:
            why = f"full-precision codec ({kind}_bits=16)"
        else:
            spec_why = mod.check_spec(mod.store_spec(store, kind))
            why = f"unsupported spec: {spec_why}" if spec_why else None
        _dequant_spec_why[key] = why
    return _dequant_spec_why[key]


def dequantize_kernel(store, kind: str):
    """The dequantize kernel module when `store`'s reads of `kind` ("key" / "value") run it, else
    None (the reason is logged once; the store then reads through its torch reference path)."""
    why = _why_not_dequant_kernel(store, kind)
    if why is None:
        paths.record(f"{kind} reads", "Triton kernel")
        return _template("dequantize")
    _log_once(f"dequantize {kind}s: {why}", "kvpass: %s reads run the reference (torch codecs + cat): %s", kind, why)
    paths.record(f"{kind} reads", f"reference (torch codecs + cat): {why}")
    return None
