"""Baseline KV-cache compressions to compare kvpass against.

* ``FakeQuantCache``: naive per-token quantization of both K and V (each token's
  vector split into groups of ``group_size`` channels along head_dim, asymmetric
  min/max, round-to-nearest, no full-precision residual window). Values are
  quantized then dequantized on write ("fake quant"), so attention sees exactly
  what a real naive int cache would hold. Use with ``perplexity(cache_factory=...)``.
* ``hf_quantized_cache_factory``: transformers' ``QuantizedCache`` (quanto / HQQ
  backends), when its backend package is installed.

The quantization math here is a small local reference; the official KIVI
reference lives in ``kvpass.lowering.kivi``.
"""
from __future__ import annotations

import functools
from typing import Callable

from transformers import DynamicCache, QuantizedCache
from transformers.cache_utils import DynamicLayer

from kvpass.lowering import kivi


class FakeQuantLayer(DynamicLayer):
    """A DynamicLayer that stores per-token fake-quantized K and V."""

    def __init__(self, bits: int, group_size: int, **kwargs):
        super().__init__(**kwargs)
        self.bits, self.group_size = bits, group_size

    def update(self, key_states, value_states, *args, **kwargs):
        # key_states, value_states: [B, H_kv, T_new, D]; groups of G channels per token, for K too
        k = kivi.fake_quantize_values(key_states, self.bits, self.group_size).to(key_states.dtype)
        v = kivi.fake_quantize_values(value_states, self.bits, self.group_size).to(value_states.dtype)
        return super().update(k, v, *args, **kwargs)


class FakeQuantCache(DynamicCache):
    """DynamicCache whose layers hold naive per-token fake-quantized K/V."""

    def __init__(self, bits: int, group_size: int = 32):
        super().__init__()
        self.layer_class_to_replicate = functools.partial(
            FakeQuantLayer, bits=bits, group_size=group_size)


def naive_cache_factory(bits: int, group_size: int = 32) -> Callable[[], DynamicCache]:
    """A callable returning a fresh ``FakeQuantCache`` (for ``cache_factory=``)."""
    return functools.partial(FakeQuantCache, bits=bits, group_size=group_size)


def hf_backend_available(backend: str) -> tuple[bool, str]:
    """(available, reason) for transformers' QuantizedCache backend 'quanto' or 'hqq'."""
    from transformers.utils import import_utils

    checks = {"quanto": ("is_optimum_quanto_available", "optimum-quanto"),
              "hqq": ("is_hqq_available", "hqq")}
    if backend not in checks:
        return False, f"unknown QuantizedCache backend {backend!r} (use quanto or hqq)"
    fn_name, pkg = checks[backend]
    if not getattr(import_utils, fn_name)():
        return False, f"QuantizedCache backend {backend!r} needs the '{pkg}' package, not installed"
    return True, ""


def hf_quantized_cache_factory(model, nbits: int, backend: str = "quanto", *,
                               q_group_size: int = 64, residual_length: int = 128):
    """(factory, reason): factory returns a fresh transformers QuantizedCache,
    or (None, reason) when the backend package is unavailable."""
    ok, reason = hf_backend_available(backend)
    if not ok:
        return None, reason

    def factory():
        return QuantizedCache(backend, model.config, nbits=nbits, q_group_size=q_group_size,
                              residual_length=residual_length)

    try:  # construct once so a bad argument fails here, not mid-run
        factory()
    except (ImportError, ValueError) as err:
        return None, f"QuantizedCache({backend!r}, nbits={nbits}) unusable: {err}"
    return factory, ""
