"""KIVI reference quantization in plain torch (fp32 math): the oracle for every kernel.

Quantization is asymmetric min/max with round-to-nearest:
    scale = (max - min) / (2**bits - 1),  zero = min
    code  = clamp(round((x - zero) / scale), 0, 2**bits - 1)      (code = 0 where scale == 0)
    x_hat = code * scale + zero
Codes are computed against the *stored* (dtype-rounded) scale and zero, so dequantization
reproduces exactly what the quantizer assumed. A constant group has scale 0 and dequantizes
exactly to its value. A NaN or Inf inside a group makes that group's scale or zero non-finite:
its codes are written as 0 and the whole group dequantizes to NaN, while every other group is
untouched (the damage stays confined to the group).

Layouts (B batch, H kv heads, T tokens, D head_dim, G group size, b bits, P = 8 // b):
    Bit packing, along the last dim, little-endian inside a byte:
        codes [..., N] uint8 in [0, 2**b)  ->  packed [..., N // P] uint8
        packed[..., j] = sum_i codes[..., j * P + i] << (i * b),  i in [0, P)
    Keys, per-channel (KIVI): groups of G consecutive tokens share one scale per channel.
        k [B, H, T, D] (T % G == 0) -> codes [B, H, T, D // P] uint8,
                                       scale [B, H, T // G, D], zero [B, H, T // G, D]
    Values, per-token: groups of G consecutive channels of one token share a scale.
        v [B, H, T, D] (D % G == 0) -> codes [B, H, T, D // P] uint8,
                                       scale [B, H, T, D // G], zero [B, H, T, D // G]
"""
from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 4, 8)


def levels(bits: int) -> int:
    """Largest code for a bit width: 2**bits - 1."""
    return (1 << bits) - 1


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2**bits) along the last dim: [..., N] -> uint8 [..., N*bits/8]."""
    per_byte = 8 // bits
    n = codes.shape[-1]
    assert n % per_byte == 0, f"last dim {n} must be a multiple of {per_byte} to pack {bits}-bit codes"
    grouped = codes.to(torch.int32).reshape(*codes.shape[:-1], n // per_byte, per_byte)
    shifts = torch.arange(per_byte, device=codes.device, dtype=torch.int32) * bits
    return (grouped << shifts).sum(dim=-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack_codes: uint8 [..., M] -> int32 codes [..., M * 8 // bits]."""
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.int32) * bits
    codes = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & levels(bits)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)


def _quantize_groups(x: torch.Tensor, bits: int, dim: int, scale_dtype: torch.dtype):
    """Min/max quantize x (fp32) with one group spanning `dim`; returns (codes int32, scale, zero)."""
    mn = x.amin(dim=dim, keepdim=True)
    mx = x.amax(dim=dim, keepdim=True)
    # A tensor divisor: CUDA torch divides by a Python scalar as a multiply by its reciprocal
    # (off by an ulp), while the kernels and the CPU path divide exactly (IEEE, round to nearest).
    scale = ((mx - mn) / torch.full_like(mx, levels(bits))).to(scale_dtype)
    zero = mn.to(scale_dtype)
    scale32, zero32 = scale.float(), zero.float()
    safe = torch.where(scale32 == 0, torch.ones_like(scale32), scale32)
    codes = torch.round((x - zero32) / safe).clamp_(0, levels(bits))
    codes = torch.where(torch.isfinite(codes), codes, torch.zeros_like(codes)).to(torch.int32)
    return codes, scale, zero


def quantize_keys(k: torch.Tensor, bits: int, group_size: int, scale_dtype=torch.float32):
    """Per-channel key quantization over groups of `group_size` tokens.

    k: [B, H, T, D] with T % group_size == 0.
    Returns (codes [B, H, T, D*bits/8] uint8, scale [B, H, T/G, D], zero [B, H, T/G, D]).
    """
    B, H, T, D = k.shape
    assert T % group_size == 0, f"key tokens {T} must be whole groups of {group_size}"
    grouped = k.float().reshape(B, H, T // group_size, group_size, D)  # [B, H, NG, G, D]
    codes, scale, zero = _quantize_groups(grouped, bits, dim=3, scale_dtype=scale_dtype)
    codes = codes.reshape(B, H, T, D)
    return pack_codes(codes, bits), scale.squeeze(3), zero.squeeze(3)


def dequantize_keys(codes, scale, zero, bits: int, group_size: int) -> torch.Tensor:
    """Inverse of quantize_keys, fp32 [B, H, T, D]."""
    q = unpack_codes(codes, bits).float()  # [B, H, T, D]
    B, H, T, D = q.shape
    q = q.reshape(B, H, T // group_size, group_size, D)
    out = q * scale.float().unsqueeze(3) + zero.float().unsqueeze(3)
    return out.reshape(B, H, T, D)


def quantize_values(v: torch.Tensor, bits: int, group_size: int, scale_dtype=torch.float32):
    """Per-token value quantization over groups of `group_size` channels.

    v: [B, H, T, D] with D % group_size == 0.
    Returns (codes [B, H, T, D*bits/8] uint8, scale [B, H, T, D/G], zero [B, H, T, D/G]).
    """
    B, H, T, D = v.shape
    assert D % group_size == 0, f"head_dim {D} must be whole groups of {group_size}"
    grouped = v.float().reshape(B, H, T, D // group_size, group_size)  # [B, H, T, NG, G]
    codes, scale, zero = _quantize_groups(grouped, bits, dim=4, scale_dtype=scale_dtype)
    return pack_codes(codes.reshape(B, H, T, D), bits), scale.squeeze(4), zero.squeeze(4)


def dequantize_values(codes, scale, zero, bits: int, group_size: int) -> torch.Tensor:
    """Inverse of quantize_values, fp32 [B, H, T, D]."""
    q = unpack_codes(codes, bits).float()
    B, H, T, D = q.shape
    q = q.reshape(B, H, T, D // group_size, group_size)
    out = q * scale.float().unsqueeze(4) + zero.float().unsqueeze(4)
    return out.reshape(B, H, T, D)


def fake_quantize_keys(k, bits, group_size, scale_dtype=torch.float32):
    """Quantize then dequantize keys (fp32): the eager simulation used by tests and evaluation."""
    return dequantize_keys(*quantize_keys(k, bits, group_size, scale_dtype), bits, group_size)


def fake_quantize_values(v, bits, group_size, scale_dtype=torch.float32):
    """Quantize then dequantize values (fp32)."""
    return dequantize_values(*quantize_values(v, bits, group_size, scale_dtype), bits, group_size)
