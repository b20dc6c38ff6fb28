"""The backend's configuration dataclass and the validation of user arguments."""
from __future__ import annotations

from dataclasses import dataclass

import torch

VALID_BITS = (2, 4, 8, 16)  # 16 = keep full precision (proves the plumbing exact)
VALID_INNER = ("inductor", "eager", "aot_eager")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_int(name: str, value, fix: str):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"kvpass: {name} must be an int, got {value!r} ({type(value).__name__}). {fix}")


def _check_bits(name: str, value):
    _check_int(name, value, f"Use one of {VALID_BITS}.")
    if value not in VALID_BITS:
        raise ValueError(
            f"kvpass: {name}={value} is not supported; valid: 2, 4, 8 (quantized) or 16 (no quantization). "
            f"Pick one of {VALID_BITS}."
        )


@dataclass(frozen=True)
class KVPassConfig:
    """Quantization settings of one backend.

    key_bits/value_bits: 2, 4, 8, or 16 (full precision). group_size: G tokens per key scale
    (per-channel) and G channels per value scale (per-token); must divide every head_dim.
    residual_length: R most recent tokens kept in full precision, a multiple of G.
    inner: what compiles the rewritten graph ("inductor" in production; "eager"/"aot_eager" for
    fast debugging and tests).
    autotune: time the decode kernel's candidate configs at the first decode call of each kind of
    call (bits, group, head_dim, dtype, length bucket, GQA, batch bucket) and cache the fastest in
    ~/.cache/kvpass/decode_configs.json (KVPASS_CONFIG_CACHE overrides), so later processes reuse
    it. Process-wide once a backend with autotune=True is created (as KVPASS_AUTOTUNE=1).
    """

    key_bits: int = 2
    value_bits: int = 2
    group_size: int = 32
    residual_length: int = 128
    inner: str = "inductor"
    autotune: bool = False

    @classmethod
    def from_args(cls, bits=2, group_size=32, residual_length=128, key_bits=None, value_bits=None, inner="inductor",
                  autotune=False):
        _check_bits("bits", bits)
        key_bits = bits if key_bits is None else key_bits
        value_bits = bits if value_bits is None else value_bits
        _check_bits("key_bits", key_bits)
        _check_bits("value_bits", value_bits)
        _check_int("group_size", group_size, "Use 32, 64 or 128.")
        if group_size <= 0 or group_size % 8:
            raise ValueError(
                f"kvpass: group_size={group_size} is invalid; it must be a positive multiple of 8 that divides "
                "the model's head_dim (typical: 32, 64, 128)."
            )
        _check_int("residual_length", residual_length, f"Use a multiple of group_size={group_size}.")
        if residual_length < 0 or residual_length % group_size:
            lo = residual_length // group_size * group_size
            raise ValueError(
                f"kvpass: residual_length={residual_length} must be a non-negative multiple of "
                f"group_size={group_size}; use {max(lo, 0)} or {max(lo, 0) + group_size}."
            )
        if inner not in VALID_INNER:
            raise ValueError(f"kvpass: inner={inner!r} is not valid; use one of {VALID_INNER}.")
        if not isinstance(autotune, bool):
            raise TypeError(f"kvpass: autotune must be True or False, got {autotune!r} ({type(autotune).__name__}).")
        return cls(key_bits, value_bits, group_size, residual_length, inner, autotune)

    @property
    def quantizes(self) -> bool:
        return self.key_bits != 16 or self.value_bits != 16

    def check_site(self, head_dim_k: int, head_dim_v: int, dtype: torch.dtype, where: str):
        """Raise a clear error when a matched attention site cannot use this config."""
        if dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"kvpass: {where} caches {dtype}; supported cache dtypes are float16, bfloat16 and float32. "
                "Convert the model, e.g. model.to(torch.bfloat16)."
            )
        for name, d, bits in (("key", head_dim_k, self.key_bits), ("value", head_dim_v, self.value_bits)):
            if bits == 16:
                continue
            # value groups are min(G, head_dim) channels: G must divide head_dim, or be a multiple of it
            if (self.group_size <= d and d % self.group_size) or (self.group_size > d and self.group_size % d):
                raise ValueError(
                    f"kvpass: group_size={self.group_size} does not divide the {name} head_dim {d} at {where}; "
                    f"pick a group_size that divides {d} (e.g. {_divisor_hint(d)})."
                )
            if (d * bits) % 8:
                raise ValueError(f"kvpass: {name} head_dim {d} at {bits} bits does not pack into whole bytes at {where}.")


def _divisor_hint(d: int) -> int:
    for g in (128, 64, 32, 16, 8):
        if d % g == 0:
            return g
    return 8
