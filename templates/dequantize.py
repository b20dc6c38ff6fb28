"""Fused KIVI dequantize: one launch reads a KVStore's codes, scales and zeros once and writes the
model-dtype tensor [B, H, kv_len, D] that `KVStore.read_keys` / `read_values` return.

One kernel template, `_kvpass_dequant`, for both kinds; `kernel_name(spec)` gives the readable
name of a specialization, e.g. `kvpass_dequant_key_b2_g32_d128_bf16` or
`kvpass_dequant_value_b4_g16_d80_fp16`. Bit-identical with the torch read path (`lowering/kivi.py`
`dequantize_keys` / `dequantize_values`, cast to the model dtype, then the window and the zero
tail concatenated); the part layouts are documented in `lowering/kivi.py` and `lowering/codecs.py`.
Constexprs:
    IS_KEY        keys: per-channel scales over GROUP_SIZE tokens, scale/zero [B, H, T/G, D];
                  values: per-token scales over GROUP_SIZE channels, scale/zero [B, H, T, D/G]
    BITS          2, 4, 8; codes [B, H, T, D*BITS/8] uint8, packed LSB-first (lowering/kivi.py)
    GROUP_SIZE    16, 32, 64, 128: the codec's group, i.e. G for keys and the value group
                  min(G, HEAD_DIM) for values (which must divide HEAD_DIM)
    HEAD_DIM      any multiple of 16 <= 256 (64, 80, 128 tested); D_PAD = next power of 2
    dtype         of the output = the model dtype = the window's dtype: fp16, bf16, fp32;
                  scales/zeros keep the dtype of their part buffers (fp16 for half models, fp32 else)
    BLOCK_T       tokens per program (DequantConfig.block_t, a power of 2)
    EMULATE_BF16  the interpreter's fp32 -> bf16 cast truncates (and its explicit "rtne" mode
                  rounds half up): round to nearest even in integer arithmetic instead, exactly as
                  torch does (NaN -> 0x7FC0); the GPU's cvt.rn.bf16.f32 needs none of this
    num_warps     launch option (DequantConfig); every launch also passes enable_fp_fusion=False
                  (see the math below)
Invalid combinations fail a tl.static_assert at compile time; `check_spec` says so before launch.

Math per element (fp32, as the reference): x_hat = (code * scale) + zero, two roundings to nearest
even, then one round-to-nearest-even cast to the output dtype. A group with a NaN scale or zero
gives NaN, as in the reference. The reference rounds twice (torch runs the multiply and the add as
two kernels), so the compiler must not contract them into one FMA: the launch passes
enable_fp_fusion=False (LLVM contracts no fmul/fadd pair, ptxas runs with --fmad=false). libdevice
mul_rn/add_rn would also keep them apart, but Triton links libdevice with FTZ on, which would flush
subnormal products to zero where torch does not. The interpreter runs the two fp32 numpy operations.

Programs: grid (token blocks, H, B). Token t of the output is
    t in [0, Lq)           dequantized from the parts (Lq = n_quant, whole key groups)
    t in [Lq, L)           copied from the window (res_k / res_v; any strides), L = Lq + window
    t in [L, kv_len)       zero (static caches: unwritten slots read as zeros)
and kv_len < L writes only the first kv_len tokens. Every element of the output is written.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

SUPPORTED_BITS = (2, 4, 8)
SUPPORTED_GROUPS = (16, 32, 64, 128)
KINDS = ("key", "value")
_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class DequantConfig:
    """Launch parameters. `DequantConfig()` is the safe default: block_t is rounded to a power of 2
    (at least 1), so it is valid for every supported spec."""

    block_t: int = 32    # tokens per program ([block_t, D_PAD] tile)
    num_warps: int = 4


DEFAULT_CONFIG = DequantConfig()


@dataclass(frozen=True)
class DequantSpec:
    """What selects a compiled specialization (group_size: the codec's own group, see the docstring)."""

    kind: str
    bits: int
    group_size: int
    head_dim: int
    dtype: torch.dtype


def kernel_name(spec: DequantSpec) -> str:
    dt = _DTYPE_NAMES.get(spec.dtype, str(spec.dtype))
    return f"kvpass_dequant_{spec.kind}_b{spec.bits}_g{spec.group_size}_d{spec.head_dim}_{dt}"


def check_spec(spec: DequantSpec) -> str | None:
    """None when the kernel supports `spec`, else the reason it does not."""
    if spec.kind not in KINDS:
        return f"kind {spec.kind!r} not in {KINDS}"
    if spec.bits not in SUPPORTED_BITS:
        return f"bits {spec.bits} not in {SUPPORTED_BITS}"
    if spec.group_size not in SUPPORTED_GROUPS:
        return f"group_size {spec.group_size} not in {SUPPORTED_GROUPS}"
    if spec.head_dim % 16 or not 16 <= spec.head_dim <= 256:
        return f"head_dim {spec.head_dim} (needs a multiple of 16, <= 256)"
    if spec.kind == "value" and spec.head_dim % spec.group_size:
        return f"value group {spec.group_size} channels does not tile head_dim {spec.head_dim}"
    if spec.dtype not in _DTYPE_NAMES:
        return f"dtype {spec.dtype}"
    return None


def store_spec(store, kind: str) -> DequantSpec:
    """The spec of one kind of a KVStore (kvpass/store.py); its codec must be KIVI (bits 2/4/8)."""
    parts, D = (store.keys, store.Dk) if kind == "key" else (store.values, store.Dv)
    return DequantSpec(kind, parts.codec.bits, parts.codec.group_size, D, store.dtype)


# ---------------------------------------------------------------------------------------------
# Kernel


@triton.jit
def _to_bf16_rne(x):
    """fp32 -> bf16, round to nearest even in integer arithmetic (torch's c10 conversion)."""
    u = x.to(tl.uint32, bitcast=True)
    r = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
    r = tl.where(x != x, 0x7FC0, r)
    return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _kvpass_dequant(
    C, S, Z, W, OUT,
    s_cb, s_ch, s_sb, s_sh, s_zb, s_zh,   # part strides (rows contiguous)
    s_wb, s_wh, s_wt, s_wd,               # window strides (any)
    s_ob, s_oh,                           # output strides (token stride HEAD_DIM, channel stride 1)
    n_quant, length, kv_len,
    IS_KEY: tl.constexpr, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr, BLOCK_T: tl.constexpr, EMULATE_BF16: tl.constexpr,
):
    """OUT [B, H, kv_len, D] <- tokens [0, n_quant) of C/S/Z, then W [B, H, length - n_quant, D],
    then zeros (see the module docstring)."""
    tl.static_assert(BITS == 2 or BITS == 4 or BITS == 8, "BITS must be 2, 4 or 8")
    tl.static_assert(GROUP_SIZE == 16 or GROUP_SIZE == 32 or GROUP_SIZE == 64 or GROUP_SIZE == 128,
                     "GROUP_SIZE must be 16, 32, 64 or 128")
    tl.static_assert(HEAD_DIM % 16 == 0 and HEAD_DIM <= 256, "HEAD_DIM must be a multiple of 16, <= 256")
    tl.static_assert(IS_KEY or HEAD_DIM % GROUP_SIZE == 0, "value groups must tile HEAD_DIM")
    tl.static_assert(D_PAD >= HEAD_DIM and (D_PAD & (D_PAD - 1)) == 0, "D_PAD: a power of 2 covering HEAD_DIM")
    tl.static_assert((BLOCK_T & (BLOCK_T - 1)) == 0, "BLOCK_T must be a power of 2")
    P: tl.constexpr = 8 // BITS                      # codes per byte
    LEVELS: tl.constexpr = (1 << BITS) - 1
    ODT: tl.constexpr = OUT.dtype.element_ty

    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)     # [BT] output tokens
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    d = tl.arange(0, D_PAD)                                    # [D_PAD] channels
    d_ok = d < HEAD_DIM
    c = C + b * s_cb + h * s_ch
    s = S + b * s_sb + h * s_sh
    z = Z + b * s_zb + h * s_zh
    w = W + b * s_wb + h * s_wh
    o = OUT + b * s_ob + h * s_oh

    # ---- quantized tokens [0, n_quant): unpack, then x = (code * scale) + zero in fp32
    in_q = t < n_quant
    mq = in_q[:, None] & d_ok[None, :]
    byte = tl.load(c + t[:, None] * (HEAD_DIM // P) + (d // P)[None, :], mask=mq, other=0).to(tl.int32)
    code = ((byte >> ((d % P) * BITS)[None, :]) & LEVELS).to(tl.float32)   # [BT, D_PAD], exact
    if IS_KEY:
        so = (t // GROUP_SIZE)[:, None] * HEAD_DIM + d[None, :]               # scale [T/G, D]
    else:
        so = t[:, None] * (HEAD_DIM // GROUP_SIZE) + (d // GROUP_SIZE)[None, :]  # scale [T, D/G]
    scale = tl.load(s + so, mask=mq, other=0.0).to(tl.float32)
    zero = tl.load(z + so, mask=mq, other=0.0).to(tl.float32)
    x = code * scale + zero  # two roundings: the launch turns FMA contraction off

    # ---- window tokens [n_quant, length); zeros past it (the masked load's `other`)
    mw = ((t >= n_quant) & (t < length))[:, None] & d_ok[None, :]
    win = tl.load(w + (t - n_quant)[:, None] * s_wt + d[None, :] * s_wd, mask=mw, other=0.0)

    if EMULATE_BF16:
        xo = _to_bf16_rne(x)
    else:
        xo = x.to(ODT)  # round to nearest even
    y = tl.where(in_q[:, None], xo, win.to(ODT))
    tl.store(o + t[:, None] * HEAD_DIM + d[None, :], y, mask=(t < kv_len)[:, None] & d_ok[None, :])


# ---------------------------------------------------------------------------------------------
# Launcher


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _rows_contiguous(t: torch.Tensor) -> bool:
    return t.stride(-1) == 1 and (t.shape[-2] <= 1 or t.stride(-2) == t.shape[-1])


def dequantize(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, window: torch.Tensor,
    *, kind: str, bits: int, group_size: int, n_quant: int, kv_len: int,
    config: DequantConfig | None = None,
) -> torch.Tensor:
    """The store read of one kind: a new contiguous [B, H, kv_len, D] tensor in window's dtype.

    Tokens [0, n_quant) are dequantized from the parts (n_quant a multiple of group_size for keys;
    the part buffers may hold more rows, which are not read): codes uint8 [B, H, >= n_quant,
    D*bits/8]; keys: scale/zero [B, H, >= n_quant/G, D]; values: scale/zero [B, H, >= n_quant,
    D/group_size]; contiguous rows, scale and zero of one dtype (fp16/bf16/fp32). Tokens
    [n_quant, n_quant + W) are the window [B, H, W, D] (any strides), the rest up to kv_len zeros;
    kv_len below n_quant + W keeps the first kv_len tokens.
    """
    if window.dim() != 4:
        raise ValueError(f"kvpass dequantize: window {tuple(window.shape)} must be [B, H, T, D]")
    B, H, Wt, D = window.shape
    spec = DequantSpec(kind, bits, group_size, D, window.dtype)
    why = check_spec(spec)
    if why:
        raise ValueError(f"kvpass dequantize: unsupported {why}")
    if n_quant < 0 or kv_len < 0 or (kind == "key" and n_quant % group_size):
        raise ValueError(f"kvpass dequantize: n_quant={n_quant} (whole groups of {group_size} for keys) "
                         f"and kv_len={kv_len} must be >= 0")
    if codes.dtype != torch.uint8:
        raise TypeError(f"kvpass dequantize: codes must be uint8, not {codes.dtype}")
    if scale.dtype != zero.dtype or scale.dtype not in _SCALE_DTYPES:
        raise TypeError(f"kvpass dequantize: scale {scale.dtype} and zero {zero.dtype} must share one of {_SCALE_DTYPES}")
    is_key = kind == "key"
    s_width, s_tokens = (D, group_size) if is_key else (D // group_size, 1)
    for name, p, width, tokens_per_row in (("codes", codes, D * bits // 8, 1), ("scale", scale, s_width, s_tokens),
                                            ("zero", zero, s_width, s_tokens)):
        if p.dim() != 4 or p.shape[:2] != (B, H) or p.shape[3] != width or p.device != window.device:
            raise ValueError(f"kvpass dequantize: {name} {tuple(p.shape)} on {p.device} is not [{B}, {H}, rows, {width}] "
                             f"on {window.device}")
        if p.shape[2] * tokens_per_row < n_quant:
            raise ValueError(f"kvpass dequantize: {name} holds {p.shape[2] * tokens_per_row} tokens, needs {n_quant}")
        if not _rows_contiguous(p):
            raise ValueError(f"kvpass dequantize: {name} must have contiguous rows")
    out = torch.empty(B, H, kv_len, D, dtype=window.dtype, device=window.device)  # [B, H, kv_len, D]
    if out.numel() == 0:
        return out
    cfg = config or DEFAULT_CONFIG
    block_t = _next_pow2(max(1, cfg.block_t))
    grid = (triton.cdiv(kv_len, block_t), H, B)
    with torch.cuda.device(window.device) if window.is_cuda else contextlib.nullcontext():  # launch on its GPU
        _kvpass_dequant[grid](
            codes, scale, zero, window, out,
            codes.stride(0), codes.stride(1), scale.stride(0), scale.stride(1), zero.stride(0), zero.stride(1),
            window.stride(0), window.stride(1), window.stride(2), window.stride(3),
            out.stride(0), out.stride(1),
            n_quant, n_quant + Wt, kv_len,
            IS_KEY=is_key, BITS=bits, GROUP_SIZE=group_size, HEAD_DIM=D, D_PAD=_next_pow2(D),
            BLOCK_T=block_t,
            EMULATE_BF16=_interpreting() and window.dtype == torch.bfloat16,
            num_warps=cfg.num_warps, enable_fp_fusion=False,  # no FMA: see the module docstring
        )
    return out
