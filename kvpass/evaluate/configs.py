"""Named evaluation configs: what KV-cache treatment a table row measures.

  bf16 (alias fp)            uncompressed cache (model runs in the loaded dtype)
  kivi-b{B}-g{G}-r{R}        kvpass.backend(bits=B, group_size=G, residual_length=R)
  naive-b{B}[-g{G}]          naive per-token fake quant of K and V (default G=32)
  hf-{quanto|hqq}-b{B}[-g{G}][-r{R}]
                             transformers QuantizedCache (defaults G=64, R=128)
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Callable

from kvpass.evaluate.baselines import hf_quantized_cache_factory, naive_cache_factory


@dataclass
class EvalConfig:
    """One row: a compile backend and/or cache factory, or why it cannot run."""
    name: str
    description: str
    backend: object = None
    cache_factory: Callable[[], object] | None = None
    skip_reason: str = ""


def default_config_names() -> list[str]:
    """The issue's list: fp; kvpass B in 8/4/2 x G in 32/128 x R in 0/32/128; naive 2-bit; HF."""
    names = ["bf16"]
    names += [f"kivi-b{b}-g{g}-r{r}" for b in (8, 4, 2) for g in (32, 128) for r in (0, 32, 128)]
    names += ["naive-b2", "hf-quanto-b2", "hf-hqq-b2"]
    return names


def _kvpass_backend(bits: int, group_size: int, residual_length: int):
    """(backend, skip_reason); kvpass is imported lazily so baselines run without it."""
    try:
        import kvpass
        # The rewritten graph and kvpass ops are the same either way; "eager" skips Inductor's
        # ~5 min CPU compile of the surrounding model code per config (KVPASS_EVAL_INNER=inductor).
        inner = os.environ.get("KVPASS_EVAL_INNER", "eager")
        return kvpass.backend(bits=bits, group_size=group_size,
                              residual_length=residual_length, inner=inner), ""
    except ImportError as err:
        return None, f"kvpass.backend not importable: {err}"
    except (TypeError, ValueError) as err:  # e.g. an unsupported bits/group combination
        return None, f"kvpass.backend rejected the config: {err}"


_KIVI = re.compile(r"kivi-b(\d+)-g(\d+)-r(\d+)")
_NAIVE = re.compile(r"naive-b(\d+)(?:-g(\d+))?")
_HF = re.compile(r"hf-(quanto|hqq)-b(\d+)(?:-g(\d+))?(?:-r(\d+))?")


def make_config(name: str, model, dtype_label: str = "fp32") -> EvalConfig:
    """Parse a config name into an EvalConfig; ValueError on an unknown name."""
    if name in ("bf16", "fp"):
        return EvalConfig(name, f"{dtype_label} (uncompressed KV cache)")
    if m := _KIVI.fullmatch(name):
        bits, g, r = map(int, m.groups())
        backend, why = _kvpass_backend(bits, g, r)
        return EvalConfig(name, f"kvpass KIVI {bits}-bit, group {g}, residual {r}",
                          backend=backend, skip_reason=why)
    if m := _NAIVE.fullmatch(name):
        bits, g = int(m[1]), int(m[2] or 32)
        return EvalConfig(name, f"naive per-token {bits}-bit K+V, group {g}, no residual",
                          cache_factory=naive_cache_factory(bits, g))
    if m := _HF.fullmatch(name):
        be, bits, g, r = m[1], int(m[2]), int(m[3] or 64), int(m[4] or 128)
        factory, why = hf_quantized_cache_factory(model, bits, be, q_group_size=g,
                                                  residual_length=r)
        return EvalConfig(name, f"HF QuantizedCache {be} {bits}-bit, group {g}, residual {r}",
                          cache_factory=factory, skip_reason=why)
    raise ValueError(f"unknown config {name!r}; expected bf16, kivi-bB-gG-rR, naive-bB[-gG], "
                     f"or hf-quanto|hqq-bB[-gG][-rR]")
