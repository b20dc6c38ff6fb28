"""Pluggable per-tensor codecs: how a block of cached tokens is encoded into stored parts.

A codec turns a block of whole groups of tokens x [B, H, n, D] into named parts, each a tensor
[B, H, rows, ...] whose dim 2 indexes token rows: `rows = n // tokens_per_row[name]`. The store
appends parts along dim 2 and never re-encodes a block. Later methods (KVQuant's non-uniform
levels and sparse outliers, pre-RoPE keys, coupled-channel codebooks) are new codecs with the
same three methods; the store, the graph pass and the ops do not change.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import kivi


@dataclass(frozen=True)
class PartSpec:
    """One stored part: token rows per stored row, trailing shape and dtype."""

    tokens_per_row: int
    tail: tuple[int, ...]
    dtype: torch.dtype


class FullPrecisionCodec:
    """bits=16: keeps tokens as they are (model dtype). Proves the plumbing exact."""

    name = "fp"
    bits = 16

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def parts(self, head_dim: int) -> dict[str, PartSpec]:
        return {"x": PartSpec(1, (head_dim,), self.dtype)}

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"x": x.to(self.dtype)}

    def decode(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        return parts["x"]

    def bytes_per_token(self, head_dim: int) -> float:
        return head_dim * self.dtype.itemsize


class KiviKeyCodec:
    """KIVI keys: per-channel scales over groups of G tokens. Parts (P = 8 // bits):
    codes [B, H, n, D // P] uint8; scale, zero [B, H, n // G, D] scale_dtype."""

    name = "kivi-key"

    def __init__(self, bits: int, group_size: int, scale_dtype: torch.dtype):
        self.bits, self.group_size, self.scale_dtype = bits, group_size, scale_dtype

    def parts(self, head_dim: int) -> dict[str, PartSpec]:
        g = self.group_size
        return {
            "codes": PartSpec(1, (head_dim * self.bits // 8,), torch.uint8),
            "scale": PartSpec(g, (head_dim,), self.scale_dtype),
            "zero": PartSpec(g, (head_dim,), self.scale_dtype),
        }

    def encode(self, x):
        codes, scale, zero = kivi.quantize_keys(x, self.bits, self.group_size, self.scale_dtype)
        return {"codes": codes, "scale": scale, "zero": zero}

    def decode(self, parts):
        return kivi.dequantize_keys(parts["codes"], parts["scale"], parts["zero"], self.bits, self.group_size)

    def bytes_per_token(self, head_dim: int) -> float:
        return head_dim * self.bits / 8 + 2 * head_dim * self.scale_dtype.itemsize / self.group_size


class KiviValueCodec:
    """KIVI values: per-token scales over groups of G channels. Parts (P = 8 // bits):
    codes [B, H, n, D // P] uint8; scale, zero [B, H, n, D // G] scale_dtype."""

    name = "kivi-value"

    def __init__(self, bits: int, group_size: int, scale_dtype: torch.dtype):
        self.bits, self.group_size, self.scale_dtype = bits, group_size, scale_dtype

    def parts(self, head_dim: int) -> dict[str, PartSpec]:
        ng = head_dim // self.group_size
        return {
            "codes": PartSpec(1, (head_dim * self.bits // 8,), torch.uint8),
            "scale": PartSpec(1, (ng,), self.scale_dtype),
            "zero": PartSpec(1, (ng,), self.scale_dtype),
        }

    def encode(self, x):
        codes, scale, zero = kivi.quantize_values(x, self.bits, self.group_size, self.scale_dtype)
        return {"codes": codes, "scale": scale, "zero": zero}

    def decode(self, parts):
        return kivi.dequantize_values(parts["codes"], parts["scale"], parts["zero"], self.bits, self.group_size)

    def bytes_per_token(self, head_dim: int) -> float:
        return head_dim * self.bits / 8 + 2 * (head_dim // self.group_size) * self.scale_dtype.itemsize


def scale_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """Scales/zeros are fp16 for half-precision models (16 bits, 10-bit mantissa), fp32 for fp32 models."""
    return torch.float32 if dtype == torch.float32 else torch.float16


def value_group_size(group_size: int, head_dim: int) -> int:
    """Channels per value scale: G, or the whole head when G exceeds head_dim (e.g. G=128, D=64)."""
    return min(group_size, head_dim)


def make_codec(kind: str, bits: int, group_size: int, dtype: torch.dtype, head_dim: int):
    """Codec for keys (`kind="key"`, G tokens per scale) or values (`kind="value"`, G channels per scale)."""
    if bits == 16:
        return FullPrecisionCodec(dtype)
    if kind == "key":
        return KiviKeyCodec(bits, group_size, scale_dtype_for(dtype))
    return KiviValueCodec(bits, value_group_size(group_size, head_dim), scale_dtype_for(dtype))
