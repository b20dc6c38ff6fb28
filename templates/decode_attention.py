"""Split-KV (flash-decoding) attention of one new query token over a KIVI-quantized KV store.

Two kernel templates, one compiled specialization per combination of their constexprs;
`kernel_name(spec)` gives the readable name used in logs and benchmarks, e.g.
`kvpass_attn_b2_g32_d128_bf16` (or `kvpass_attn_k2v4_g32_d128_bf16` for mixed widths):
  _kvpass_decode_dot   tensor cores: the REP = Hq/Hkv query heads of one KV head are the MMA rows
  _kvpass_decode_rows  CUDA cores: one query head per program, each thread owns token rows
  _kvpass_decode_reduce  combines the splits' (acc, m, l) in a launch of its own; by default
                       (DecodeConfig.fuse_reduce) the program that finishes a row's splits last
                       combines them instead (`_last_split`: a counter per row, reset by that program)
Constexprs:
    KEY_BITS, VALUE_BITS   2, 4, 8 (mixed allowed); codes packed LSB-first in bytes (lowering/kivi.py)
    GROUP_SIZE             16, 32, 64, 128: G tokens per key scale (per channel), G channels per
                           value scale (per token); must divide HEAD_DIM
    HEAD_DIM               64, 80, 96, 128, 256 (any multiple of 16 <= 256); D_PAD = next power of 2
    dtype                  the type of Q: fp16, bf16, fp32 (the model dtype: q, residual window,
                           output); scales/zeros are fp16 for half models, fp32 for fp32 models
    BLOCK_N                tokens per step (dot: divides G, one key group per step; rows: nests with G,
                           >= 16, two halves whose same rows one thread owns: BLOCK_N / 2 rows)
    HB                     (dot) query rows per program: REP rounded up to a power of 2, or padded to
                           DecodeConfig.pad_heads
    MASK_KIND              0 none, 1 bool (True = attend), 2 additive float
    SOFTCAP                0.0: none; else the model's logit softcap c times log2(e): scores become
                           c * tanh(score / c) before the mask (Gemma2), applied in the log2 domain
                           (`_softcap`). A model constant, so one specialization per model.
    SINGLE                 one split: write the output directly (no reduce)
    FUSE_REDUCE            several splits: the last program of a row (rows) or KV head (dot) reduces
                           them (`_last_split`, counters in CNT int32, zero between launches)
    LENGTHS_ON_DEVICE      Lq and L are read from the int32 tensor LENS (device-lengths mode, CUDA-graph
                           capturable); else they are host ints (LENS is None: the host-mode
                           specialization compiles to the same code as before this mode existed)
    USE_ASM                (dot) unpack two codes per instruction in inline PTX (GPU, 16-bit models);
                           else exact fp32 unpacking (interpreter, fp32 models). (rows) prepare each
                           word's halves with one PTX prmt (`_magic_halves`, GPU); else plain ops.
                           Both settings give bit-identical results.
    EMULATE_DOT            (dot) the CPU interpreter's bf16 dot is wrong: multiply the rounded
                           operands in fp32 instead
    num_warps, num_stages  launch options (DecodeConfig)
Invalid combinations fail a tl.static_assert at compile time; `check_spec` says so before launch.

Math (log2 domain, qk_scale = sm_scale * log2(e); softcap c: s -> c' tanh(s / c'), c' = c log2(e)):
  keys   k[t, d] = c[t, d] * s[g(t), d] + z[g(t), d]     per-channel scales over G tokens, so
         q . k[t] = sum_d (q_d s_d) c[t, d] + sum_d q_d z_d: the scale is folded into q once per
         key group and the codes go straight into the dot;
  values v[t, d] = c[t, d] * s[t, g(d)] + z[t, g(d)]     per-token scales over G channels:
         dequantized in fp16 before the P @ V dot (dot), or folded into p (rows).
  Codes never go through integer->float conversion instructions: the code bits are ORed into
  the mantissa of a magic float and one (packed) FMA makes them exact (`_plane`, `_asm_unpack`).
  Online softmax in fp32 with a lazily raised running max (only when a block exceeds it by 2**8).
Programs: grid (splits, Hkv, B) (rows: (REP * splits, Hkv, B)). The attended columns are
[0, Lq) quantized, [Lq, L) the full-precision window, and, for static caches, the tail
[L, kv_len) whose keys/values read as zeros (exactly what the reference's zero-padded read gives:
score 0 + mask bias, value 0).
  Host lengths: `plan_splits` follows Lq; split s covers the key groups [s * chunk, (s + 1) * chunk)
  of the quantized region; split `res_split` also covers the window and the tail.
  Device lengths (LENGTHS_ON_DEVICE): the number of splits is planned for the capacity kv_len (the
  launch never depends on the lengths); each program reads (Lq, L) and takes split s's share of
  the quantized region [0, Lq) in whole steps (`_device_lengths`: chunk = ceil(Lq / splits)
  rounded up to G or BLOCK_N, so the work stays balanced for any Lq), every S-th row of the window
  from row s (`_window_rows`: no split waits on the window's load round trips alone), and its
  share of the zero tail (`_tail_share`): in closed form without a mask (count * 2**(0 - m),
  `_zero_tail_*`), else a loop over the mask only. Splits with nothing write m = -inf, l = 0 (the
  reduce skips them).
Performance and its limits on the H100: benchmarks/NOTES.md.
"""
from __future__ import annotations

import logging
import math
import os

import torch
import triton
import triton.language as tl

from kvpass.lowering import paths
from kvpass.templates.decode_configs import (  # noqa: F401  (configs are part of this module's API)
    _DTYPE_NAMES, CONFIG_TABLE, DEFAULT_CONFIG, FALLBACK_CTAS_PER_SM, DecodeConfig, DecodeSpec, autotune_enabled,
    config_key, default_config_for, get_config, kernel_name, length_bucket, resident_programs, rows_warps, save_tuned,
    set_autotune, sm_limits, tune, wave_splits,
)

log = logging.getLogger("kvpass")

# Splits per block of the fused reduce (`_reduce_row`, one pass: 3 rounds of loads for the 33 splits
# of a batch-1 row, where the session-7 two-pass reduce took 6). 16, not 32: with 32 the rows
# kernel's main loop ran 10-18 % slower on Triton 3.6 (batch 1 T32k 65.0 vs 57.5 us, batch 8 T16k
# 218 vs 184 us, results/ab_reduce_s8.log) with the same loop instruction count and registers.
FUSED_REDUCE_BLOCK = tl.constexpr(16)

LOG2E = 1.4426950408889634
SUPPORTED_BITS = (2, 4, 8)
SUPPORTED_GROUPS = (16, 32, 64, 128)
SUPPORTED_HEAD_DIMS = (64, 80, 96, 128, 256)


# ---------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _plane(w, K: tl.constexpr, BITS: tl.constexpr, RAW: tl.constexpr = 0):
    """Code k of every int32 word of w, as an exact fp32 value (same shape and layout as w).

    Code k sits at bit POS = k * BITS. A code in the high half is shifted down by 16 first (one
    shift per word, shared by all high codes), so it lands at LOW < 16, inside the 23-bit mantissa
    of 2**23: OR 0x4B000000 gives the float 2**23 + code * 2**LOW, and one FMA with constants,
    f * 2**-LOW - 2**(23 - LOW), yields the code exactly. No int->float conversion instruction.
    RAW = 1 returns code * 2**LOW instead (exact, one FADD with an immediate; the caller folds
    2**-LOW elsewhere, `_low_scale`). RAW = 2 is RAW 1 for w = (xl, xh), the word and its high
    half already ORed with the magic (`_magic_halves`): then one AND with a single immediate
    extracts a code, so no mask constant has to live in a register."""
    POS: tl.constexpr = K * BITS
    SH: tl.constexpr = (POS // 16) * 16
    LOW: tl.constexpr = POS - SH
    MASK: tl.constexpr = ((1 << BITS) - 1) << LOW
    SCALE: tl.constexpr = 1.0 / (1 << LOW)
    OFFSET: tl.constexpr = 8388608.0 / (1 << LOW)
    if RAW == 2:
        if SH > 0:
            out = (w[1] & (MASK | 0x4B000000)).to(tl.float32, bitcast=True) - 8388608.0
        else:
            out = (w[0] & (MASK | 0x4B000000)).to(tl.float32, bitcast=True) - 8388608.0
    else:
        if SH > 0:
            x = w >> SH
        else:
            x = w
        f = ((x & MASK) | 0x4B000000).to(tl.float32, bitcast=True)
        if RAW == 1:
            out = f - 8388608.0
        else:
            out = f * SCALE - OFFSET
    return out


@triton.jit
def _magic_halves(w):
    """The low and the high half of w under the magic's exponent byte, (w & 0xFFFF) | 0x4B000000
    and (w >> 16) | 0x4B000000, each one byte permute (PTX prmt) for `_plane` RAW 2. An OR would be
    folded back into every code's AND by LLVM or ptxas (two constants per code, one of them held
    in a register); after a prmt each code is one AND with a single immediate."""
    return tl.inline_asm_elementwise(
        "{ .reg .b32 m; mov.b32 m, 0x4B000000; prmt.b32 $0, $2, m, 0x7410; prmt.b32 $1, $2, m, 0x7432; }",
        "=r,=r,r", [w], dtype=(tl.int32, tl.int32), is_pure=True, pack=1)


@triton.jit
def _split_planes(x, BITS: tl.constexpr):
    """x [..., NW * KP] in natural channel order (KP = 32 // BITS codes per word) -> the tuple of its
    KP planes [..., NW], plane k = channels w * KP + k (the layout of `_plane`'s output)."""
    KP: tl.constexpr = 32 // BITS
    if BITS == 2:
        y = tl.reshape(x, x.shape[:-1] + [x.shape[-1] // KP, 2, 2, 2, 2])
        e, o = tl.split(y)            # k % 2
        e0, e1 = tl.split(e)          # (k // 2) % 2
        o0, o1 = tl.split(o)
        e00, e01 = tl.split(e0)
        e10, e11 = tl.split(e1)
        o00, o01 = tl.split(o0)
        o10, o11 = tl.split(o1)
        p0, p8 = tl.split(e00)
        p4, p12 = tl.split(e01)
        p2, p10 = tl.split(e10)
        p6, p14 = tl.split(e11)
        p1, p9 = tl.split(o00)
        p5, p13 = tl.split(o01)
        p3, p11 = tl.split(o10)
        p7, p15 = tl.split(o11)
        return (p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, p12, p13, p14, p15)
    elif BITS == 4:
        y = tl.reshape(x, x.shape[:-1] + [x.shape[-1] // KP, 2, 2, 2])
        e, o = tl.split(y)
        e0, e1 = tl.split(e)
        o0, o1 = tl.split(o)
        p0, p4 = tl.split(e0)
        p2, p6 = tl.split(e1)
        p1, p5 = tl.split(o0)
        p3, p7 = tl.split(o1)
        return (p0, p1, p2, p3, p4, p5, p6, p7)
    else:
        y = tl.reshape(x, x.shape[:-1] + [x.shape[-1] // KP, 2, 2])
        e, o = tl.split(y)
        p0, p2 = tl.split(e)
        p1, p3 = tl.split(o)
        return (p0, p1, p2, p3)


@triton.jit
def _dot_planes(w, qs, BITS: tl.constexpr, RAW: tl.constexpr):
    """sum over channels of code * qs for words w [KG, T, NW] and qs [KG, NW * KP] (natural order):
    [KG, T]. One FMA chain per word over its KP codes (a tree reduction over all channels would
    cost a separate multiply and add per code), then a sum over the NW words."""
    KP: tl.constexpr = 32 // BITS
    if RAW == 2:
        src = _magic_halves(w)
    else:
        src = w
    qp = _split_planes(qs, BITS)
    acc = _plane(src, 0, BITS, RAW) * qp[0][:, None, :]
    for k in tl.static_range(1, KP):
        acc += _plane(src, k, BITS, RAW) * qp[k][:, None, :]
    return tl.sum(acc, axis=2)


@triton.jit
def _low_scale(d, BITS: tl.constexpr):
    """2**-LOW of channel d (natural order) for `_plane`'s RAW codes: code k of a word sits at bit
    LOW = (k * BITS) % 16 after the high-half shift. Built from exponent bits (no exp2)."""
    low = ((d % (32 // BITS)) * BITS) % 16
    return ((127 - low) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _unpack(w, BITS: tl.constexpr, RAW: tl.constexpr = 0):
    """int32 words [..., NW] -> fp32 codes [..., NW, 2, 2(, 2(, 2))] whose row-major flattening of
    the trailing dims is the natural channel order (channel = word * (32 // BITS) + k).
    RAW: see `_plane` (RAW 2 takes the plain words here and prepares them itself).

    Built with tl.join, which adds an in-thread minor dim: each thread unpacks the words it
    loaded into registers, with no data exchange between threads."""
    if RAW == 2:
        src = _magic_halves(w)
    else:
        src = w
    if BITS == 2:
        a0 = tl.join(_plane(src, 0, 2, RAW), _plane(src, 8, 2, RAW))
        a1 = tl.join(_plane(src, 1, 2, RAW), _plane(src, 9, 2, RAW))
        a2 = tl.join(_plane(src, 2, 2, RAW), _plane(src, 10, 2, RAW))
        a3 = tl.join(_plane(src, 3, 2, RAW), _plane(src, 11, 2, RAW))
        a4 = tl.join(_plane(src, 4, 2, RAW), _plane(src, 12, 2, RAW))
        a5 = tl.join(_plane(src, 5, 2, RAW), _plane(src, 13, 2, RAW))
        a6 = tl.join(_plane(src, 6, 2, RAW), _plane(src, 14, 2, RAW))
        a7 = tl.join(_plane(src, 7, 2, RAW), _plane(src, 15, 2, RAW))
        b0 = tl.join(a0, a4)
        b1 = tl.join(a1, a5)
        b2 = tl.join(a2, a6)
        b3 = tl.join(a3, a7)
        c0 = tl.join(b0, b2)
        c1 = tl.join(b1, b3)
        return tl.join(c0, c1)
    elif BITS == 4:
        a0 = tl.join(_plane(src, 0, 4, RAW), _plane(src, 4, 4, RAW))
        a1 = tl.join(_plane(src, 1, 4, RAW), _plane(src, 5, 4, RAW))
        a2 = tl.join(_plane(src, 2, 4, RAW), _plane(src, 6, 4, RAW))
        a3 = tl.join(_plane(src, 3, 4, RAW), _plane(src, 7, 4, RAW))
        b0 = tl.join(a0, a2)
        b1 = tl.join(a1, a3)
        return tl.join(b0, b1)
    else:
        a0 = tl.join(_plane(src, 0, 8, RAW), _plane(src, 2, 8, RAW))
        a1 = tl.join(_plane(src, 1, 8, RAW), _plane(src, 3, 8, RAW))
        return tl.join(a0, a1)


def _asm_unpack(bits: int, fmt: str, dequant: bool) -> tuple[str, str]:
    """PTX that unpacks one int32 word of `bits`-bit codes into 32 // bits 16-bit floats.

    Two codes at a time, one in each 16-bit half: (w >> shift) & (mask | mask << 16), ORed with
    the bit pattern of 2**m (1024 for fp16, 128 for bf16; the code fits in the mantissa), then one
    packed fma subtracts 2**m: exact codes, two per instruction. With `dequant` (fp16 only) a
    second packed fma applies the value scale and zero: v = code * s + z, one rounding.
    Outputs $0..$(n-1) are codes 0..n-1 (output k pairs with k + n/2); inputs follow."""
    n = 32 // bits
    half = n // 2
    mask = (1 << bits) - 1
    if fmt == "bf16":
        magic, one, neg, ty = "0x43004300", "0x3F803F80", "0xC300C300", "bf16x2"
    else:
        magic, one, neg, ty = "0x64006400", "0x3C003C00", "0xE400E400", "f16x2"
    w = f"${n}"
    lines = ["{", ".reg .b32 t, u, one, neg, s2, z2;", f"mov.b32 one, {one};", f"mov.b32 neg, {neg};"]
    if dequant:
        lines += [f"mov.b32 s2, {{${n + 1}, ${n + 1}}};", f"mov.b32 z2, {{${n + 2}, ${n + 2}}};"]
    for k in range(half):
        src = w
        if k:
            lines.append(f"shr.u32 u, {w}, {k * bits};")
            src = "u"
        lines.append(f"lop3.b32 t, {src}, 0x{(mask << 16) | mask:08X}, {magic}, 0xea;")
        lines.append(f"fma.rn.{ty} t, t, one, neg;")
        if dequant:
            lines.append(f"fma.rn.{ty} t, t, s2, z2;")
        lines.append(f"mov.b32 {{${k}, ${k + half}}}, t;")
    lines.append("}")
    cons = ",".join(["=h"] * n + ["r"] + (["h", "h"] if dequant else []))
    return "\n".join(lines), cons


_A_K2_BF16, _C_K2 = (tl.constexpr(x) for x in _asm_unpack(2, "bf16", False))
_A_K4_BF16, _C_K4 = (tl.constexpr(x) for x in _asm_unpack(4, "bf16", False))
_A_K2_F16 = tl.constexpr(_asm_unpack(2, "fp16", False)[0])
_A_K4_F16 = tl.constexpr(_asm_unpack(4, "fp16", False)[0])
_A_K8_F16, _C_K8 = (tl.constexpr(x) for x in _asm_unpack(8, "fp16", False))
_A_V2, _C_V2 = (tl.constexpr(x) for x in _asm_unpack(2, "fp16", True))
_A_V4, _C_V4 = (tl.constexpr(x) for x in _asm_unpack(4, "fp16", True))
_A_V8, _C_V8 = (tl.constexpr(x) for x in _asm_unpack(8, "fp16", True))


@triton.jit
def _tree(o, BASE: tl.constexpr, N: tl.constexpr):
    """Join o[BASE .. BASE+N-1] (N = 2, 4, 8) into [..., 2(, 2(, 2))], row-major index = k."""
    if N == 8:
        return tl.join(tl.join(tl.join(o[BASE + 0], o[BASE + 4]), tl.join(o[BASE + 2], o[BASE + 6])),
                       tl.join(tl.join(o[BASE + 1], o[BASE + 5]), tl.join(o[BASE + 3], o[BASE + 7])))
    elif N == 4:
        return tl.join(tl.join(o[BASE + 0], o[BASE + 2]), tl.join(o[BASE + 1], o[BASE + 3]))
    else:
        return tl.join(o[BASE + 0], o[BASE + 1])


@triton.jit
def _join_tree(o, BITS: tl.constexpr):
    """Join the per-position code tensors o[0..n-1] of each word (n = 32 // BITS) into
    [..., 2, .., 2] whose row-major position inside a word is 2 * k + h for code k + h * n / 2: the
    two codes that one packed instruction produces (k and k + n/2, low and high half of a
    register) stay adjacent, so no byte permutes are needed. The tile's channel order is thus
    permuted inside each word; `_perm` gives the memory channel of each tile position."""
    HALF: tl.constexpr = 16 // BITS
    return tl.join(_tree(o, 0, HALF), _tree(o, HALF, HALF))


@triton.jit
def _perm(d, BITS: tl.constexpr):
    """Memory channel of tile position d in the `_join_tree` order."""
    KP: tl.constexpr = 32 // BITS
    return (d // KP) * KP + (d % 2) * (KP // 2) + (d % KP) // 2


@triton.jit
def _planes(w, BITS: tl.constexpr):
    """The fp32 (exact) code planes of w as a tuple, for `_join_tree` (interpreter/fp32 path)."""
    if BITS == 2:
        return (_plane(w, 0, 2), _plane(w, 1, 2), _plane(w, 2, 2), _plane(w, 3, 2), _plane(w, 4, 2), _plane(w, 5, 2),
                _plane(w, 6, 2), _plane(w, 7, 2), _plane(w, 8, 2), _plane(w, 9, 2), _plane(w, 10, 2), _plane(w, 11, 2),
                _plane(w, 12, 2), _plane(w, 13, 2), _plane(w, 14, 2), _plane(w, 15, 2))
    elif BITS == 4:
        return (_plane(w, 0, 4), _plane(w, 1, 4), _plane(w, 2, 4), _plane(w, 3, 4), _plane(w, 4, 4), _plane(w, 5, 4),
                _plane(w, 6, 4), _plane(w, 7, 4))
    else:
        return (_plane(w, 0, 8), _plane(w, 1, 8), _plane(w, 2, 8), _plane(w, 3, 8))


@triton.jit
def _kcodes_asm(w, BITS: tl.constexpr, BF16: tl.constexpr):
    """int32 words -> exact key codes (bf16 if BF16 else fp16), joined as `_unpack` joins them."""
    if BITS == 2:
        if BF16:
            o = tl.inline_asm_elementwise(_A_K2_BF16, _C_K2, [w], dtype=(tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16), is_pure=True, pack=1)
        else:
            o = tl.inline_asm_elementwise(_A_K2_F16, _C_K2, [w], dtype=(tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True, pack=1)
    elif BITS == 4:
        if BF16:
            o = tl.inline_asm_elementwise(_A_K4_BF16, _C_K4, [w], dtype=(tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16), is_pure=True, pack=1)
        else:
            o = tl.inline_asm_elementwise(_A_K4_F16, _C_K4, [w], dtype=(tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True, pack=1)
    else:
        o = tl.inline_asm_elementwise(_A_K8_F16, _C_K8, [w], dtype=(tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True, pack=1)
    return _join_tree(o, BITS)


@triton.jit
def _vvals_asm(w, s, z, BITS: tl.constexpr):
    """int32 words and their group's fp16 scale/zero (same shape) -> fp16 values code * s + z."""
    if BITS == 2:
        o = tl.inline_asm_elementwise(_A_V2, _C_V2, [w, s, z], dtype=(tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True, pack=1)
    elif BITS == 4:
        o = tl.inline_asm_elementwise(_A_V4, _C_V4, [w, s, z], dtype=(tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True, pack=1)
    else:
        o = tl.inline_asm_elementwise(_A_V8, _C_V8, [w, s, z], dtype=(tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True, pack=1)
    return _join_tree(o, BITS)


@triton.jit
def _dot(a, b, EMULATE: tl.constexpr):
    """a @ b with fp32 accumulation; a and b already in their operand type (tensor cores for 16-bit
    types, exact fp32 products for fp32: no tf32). EMULATE (the CPU interpreter, whose bf16 dot
    multiplies raw bit patterns) multiplies the same rounded operands in fp32: same result."""
    if EMULATE or a.dtype == tl.float32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _mask_bias(MASK, mask_row, tok, tok_ok, s_mk, MASK_KIND: tl.constexpr):
    """log2-domain additive bias for mask columns `tok` (any shape; mask_row broadcasts)."""
    if MASK_KIND == 1:
        mv = tl.load(MASK + mask_row + tok * s_mk, mask=tok_ok, other=1)
        return tl.where(mv != 0, 0.0, float("-inf"))
    elif MASK_KIND == 2:
        mv = tl.load(MASK + mask_row + tok * s_mk, mask=tok_ok, other=0.0)
        return mv.to(tl.float32) * 1.4426950408889634
    else:
        return tl.zeros(tok.shape, tl.float32)


@triton.jit
def _softcap(s, CAP: tl.constexpr):
    """CAP * tanh(s / CAP) for log2-domain scores s (CAP = softcap * log2(e): the model's
    softcap * tanh(x / softcap) of natural-log scores x = s / log2(e), in the log2 domain).
    tanh(y) = 1 - 2 / (e^(2y) + 1): exact 0 at 0 (the zero tail keeps score 0), +-CAP at +-inf."""
    e = tl.exp2(s * (2.0 * 1.4426950408889634 / CAP))
    return CAP - (2.0 * CAP) / (e + 1.0)


@triton.jit
def _rows_key_scales(t0, end, KS, KZ, ks_base, gi, d, HEAD_DIM: tl.constexpr, GROUP_SIZE: tl.constexpr):
    """Scale and zero [KGROUPS, D_PAD] of the key groups of the rows kernel's step at t0 (groups
    whose first token is >= end are masked, also whole steps past end)."""
    grp = t0 // GROUP_SIZE + gi                                                # [KGROUPS]
    gmask = (d < HEAD_DIM)[None, :] & (t0 + gi * GROUP_SIZE < end)[:, None]   # the group's first token
    ks = tl.load(KS + ks_base + grp[:, None] * HEAD_DIM + d[None, :], mask=gmask, other=0.0)
    kz = tl.load(KZ + ks_base + grp[:, None] * HEAD_DIM + d[None, :], mask=gmask, other=0.0)
    return ks, kz


@triton.jit
def _rows_token_loads(t0, end, kc_base, vc_base, VS, VZ, vs_base, gi, ti, rows, wk, wv, g_idx,
                      GROUP_SIZE: tl.constexpr, TPG: tl.constexpr, NWK: tl.constexpr, NWK_PAD: tl.constexpr,
                      NWV: tl.constexpr, NWV_PAD: tl.constexpr, NG: tl.constexpr):
    """One half of the rows kernel's step at t0 (tokens >= end masked, also whole steps past end):
    key words [KGROUPS, TPG / 2, NWK_PAD] of tokens t0 + gi * TPG + ti, and value words
    [BLOCK_N / 2, NWV_PAD], scale and zero [BLOCK_N / 2, NG_PAD] of tokens t0 + rows, the same
    tokens (rows = gi * TPG + ti flattened; storage dtypes)."""
    ktok = t0 + gi[:, None] * TPG + ti[None, :]                                # [KGROUPS, TPG / 2]
    kmask = (ktok < end)[:, :, None]
    if NWK_PAD != NWK:
        kmask = kmask & (wk < NWK)[None, None, :]
    kw = tl.load(kc_base + ktok[:, :, None] * NWK + wk[None, None, :], mask=kmask, other=0)
    tok = t0 + rows
    tok_ok = tok < end
    vmask = tok_ok[:, None]
    if NWV_PAD != NWV:
        vmask = vmask & (wv < NWV)[None, :]
    vw = tl.load(vc_base + tok[:, None] * NWV + wv[None, :], mask=vmask, other=0)
    smask = tok_ok[:, None] & (g_idx < NG)[None, :]
    vsc = tl.load(VS + vs_base + tok[:, None] * NG + g_idx[None, :], mask=smask, other=0.0)
    vze = tl.load(VZ + vs_base + tok[:, None] * NG + g_idx[None, :], mask=smask, other=0.0)
    return kw, vw, vsc, vze


# Runtime ints that change every decode step are not specialized (no recompiles); buffer strides
# are (their 16-divisibility gives aligned, vectorized loads and is stable as the store grows).
_DNS = ["Lq", "L", "KV_LEN", "chunk", "res_split", "NUM_SPLITS_RT", "s_mb", "s_mh", "s_mk"]


@triton.jit
def _lazy_softmax_rows(s, m, acc, accz, l_r):
    """Online-softmax step for one query head (rows variant), log2 domain: the running max is only
    raised when the block (s, any shape) exceeds it by more than 2^8 (FA4-style lazy rescale).
    Returns p (shape of s) and the rescaled state; the caller adds p to l_r."""
    m_blk = tl.max(s)
    if m_blk > m + 8.0:
        alpha = tl.exp2(m - m_blk)
        acc = acc * alpha
        accz = accz * alpha
        l_r = l_r * alpha
        m = m_blk
    p = tl.exp2(s - tl.where(m == float("-inf"), 0.0, m))
    return p, m, acc, accz, l_r


@triton.jit
def _lazy_softmax_heads(s, m_i, acc, l_i):
    """The same step for REP query heads at once (dot variant): s [REP, BLOCK_N], m_i/l_i [REP]."""
    m_blk = tl.max(s, axis=1)
    if tl.max((m_blk > m_i + 8.0).to(tl.int32), axis=0) > 0:
        m_new = tl.maximum(m_i, m_blk)
        alpha = tl.exp2(m_i - tl.where(m_new == float("-inf"), 0.0, m_new))
        acc = acc * alpha[:, None]
        l_i = l_i * alpha
        m_i = m_new
    p = tl.exp2(s - tl.where(m_i == float("-inf"), 0.0, m_i)[:, None])
    return p, m_i, acc, l_i + tl.sum(p, axis=1)


@triton.jit
def _window_loads_rows(rk_base, rv_base, r, in_res, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    """Keys and values [rows, D_PAD] of full-precision window rows r (rows with in_res False read zeros)."""
    d = tl.arange(0, D_PAD)
    ld_mask = in_res[:, None] & (d < HEAD_DIM)[None, :]
    k = tl.load(rk_base + r[:, None] * HEAD_DIM + d[None, :], mask=ld_mask, other=0.0)
    v = tl.load(rv_base + r[:, None] * HEAD_DIM + d[None, :], mask=ld_mask, other=0.0)
    return k, v


@triton.jit
def _window_math_rows(k, v, tok, tok_ok, q, v_high, m, acc, accz, l_r, MASK, mask_row, s_mk,
                      GROUP_SIZE: tl.constexpr, MASK_KIND: tl.constexpr, SOFTCAP: tl.constexpr = 0.0):
    """One step of the rows variant over loaded window rows k, v (`_window_loads_rows`; tokens tok,
    those with tok_ok False not attended), values scaled by v_high into the accumulator's code scale."""
    D_PAD: tl.constexpr = q.shape[0]
    s = tl.sum(k.to(tl.float32) * q[None, :], axis=1)
    if SOFTCAP > 0.0:
        s = _softcap(s, SOFTCAP)
    s += _mask_bias(MASK, mask_row, tok, tok_ok, s_mk, MASK_KIND)
    s = tl.where(tok_ok, s, float("-inf"))
    p, m, acc, accz, l_r = _lazy_softmax_rows(s, m, acc, accz, l_r)
    l_r += p
    acc += p[:, None, None] * tl.reshape(v.to(tl.float32) * v_high[None, :], (s.shape[0], D_PAD // GROUP_SIZE, GROUP_SIZE))
    return m, acc, accz, l_r


@triton.jit
def _window_step_rows(rk_base, rv_base, r, in_res, tok, tok_ok, q, v_high, m, acc, accz, l_r, MASK, mask_row, s_mk,
                      HEAD_DIM: tl.constexpr, GROUP_SIZE: tl.constexpr, MASK_KIND: tl.constexpr,
                      SOFTCAP: tl.constexpr = 0.0):
    """One step of the rows variant over full-precision window rows r (tokens tok; rows with
    in_res False read zeros, tokens with tok_ok False are not attended): keys and values are
    loaded together (one round trip per step), values scaled by v_high into the accumulator's
    code scale."""
    k, v = _window_loads_rows(rk_base, rv_base, r, in_res, HEAD_DIM, q.shape[0])
    return _window_math_rows(k, v, tok, tok_ok, q, v_high, m, acc, accz, l_r, MASK, mask_row, s_mk, GROUP_SIZE,
                             MASK_KIND, SOFTCAP)


@triton.jit
def _device_lengths(LENS, KV_LEN, NUM_SPLITS_RT, STEP: tl.constexpr):
    """Device-lengths mode: (Lq, L) read from LENS[0], LENS[1] and clipped to the attended width,
    and the quantized tokens per split: [0, Lq) dealt out over the launch's NUM_SPLITS_RT splits
    in whole steps (STEP = max(G, BLOCK_N)), so the work stays balanced for any Lq while the grid
    depends only on the capacity KV_LEN. Splits past Lq get nothing there. (The window [Lq, L) is
    dealt row by row: `_window_rows`.)"""
    Lq = tl.minimum(tl.load(LENS), KV_LEN)
    L = tl.minimum(tl.load(LENS + 1), KV_LEN)
    chunk = tl.maximum(tl.cdiv(Lq, NUM_SPLITS_RT * STEP), 1) * STEP
    return Lq, L, chunk


@triton.jit
def _window_rows(Lq, L, pid_s, NUM_SPLITS_RT):
    """Device-lengths mode: split pid_s takes window rows pid_s, pid_s + S, pid_s + 2S, ... below
    L - Lq (S = NUM_SPLITS_RT). Returns (rows in the window, their count: <= 0 when none).
    Why strided: the window is the last ~R tokens; dealt in contiguous chunks after [0, Lq) it
    lands in one or two splits, whose extra load round trips (one per step of window rows) then
    set the whole launch's time: batch 1 T16k 2-bit 36.4 us with a 128-row window vs 28.9 us
    without (session 9, benchmarks/results/fixed_cost_s9.log). Dealt over all splits, each does
    about one step of it (36.1 -> 30.9 us). Dealing it only to the splits the chunks leave with
    room was worse (results/ab_window_s9.log)."""
    nw = L - Lq
    return nw, tl.cdiv(nw - pid_s, NUM_SPLITS_RT)


@triton.jit
def _tail_share(L, KV_LEN, pid_s, NUM_SPLITS_RT):
    """Split pid_s's share [t_start, t_end) of the zero tail [L, KV_LEN) (empty when t_start >= t_end)."""
    t_chunk = tl.cdiv(KV_LEN - L, NUM_SPLITS_RT)
    t_start = L + pid_s * t_chunk
    return t_start, tl.minimum(t_start + t_chunk, KV_LEN)


@triton.jit
def _zero_tail_rows(cnt, m, acc, accz, l_r, rows):
    """cnt (may be <= 0: nothing) unmasked zero-key, zero-value columns at once (rows variant):
    each scores exactly 0, so it adds 2**(0 - m) to the denominator and nothing to acc. The same
    lazy max rule as `_lazy_softmax_rows` (raise to 0 only when 0 > m + 8)."""
    if cnt > 0:
        if 0.0 > m + 8.0:
            alpha = tl.exp2(m)                     # m < -8 (or -inf: alpha = 0, acc and l are 0)
            acc = acc * alpha
            accz = accz * alpha
            l_r = l_r * alpha
            m = tl.maximum(m, 0.0)
        l_r = l_r + tl.where(rows == 0, cnt.to(tl.float32) * tl.exp2(0.0 - m), 0.0)
    return m, acc, accz, l_r


@triton.jit
def _zero_tail_heads(cnt, m_i, acc, l_i):
    """The same for REP query heads at once (dot variant), rule of `_lazy_softmax_heads`."""
    if cnt > 0:
        if tl.max((0.0 > m_i + 8.0).to(tl.int32), axis=0) > 0:
            m_new = tl.maximum(m_i, 0.0)
            alpha = tl.exp2(m_i - m_new)
            acc = acc * alpha[:, None]
            l_i = l_i * alpha
            m_i = m_new
        l_i = l_i + cnt.to(tl.float32) * tl.exp2(0.0 - m_i)
    return m_i, acc, l_i


@triton.jit(do_not_specialize=_DNS)
def _kvpass_decode_rows(
    Q, KC, KS, KZ, VC, VS, VZ, RK, RV, MASK, OP, OM, OL, OUT, LENS, CNT,
    s_qb, s_qh, s_kcb, s_kch, s_ksb, s_ksh, s_vcb, s_vch, s_vsb, s_vsh, s_rb, s_rh, s_mb, s_mh, s_mk,
    Lq, L, KV_LEN, chunk, res_split, NUM_SPLITS_RT, qk_scale, REP,
    KEY_BITS: tl.constexpr, VALUE_BITS: tl.constexpr, GROUP_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_KIND: tl.constexpr, SINGLE: tl.constexpr, LENGTHS_ON_DEVICE: tl.constexpr, USE_ASM: tl.constexpr = False,
    FUSE_REDUCE: tl.constexpr = False, SOFTCAP: tl.constexpr = 0.0,
):
    """CUDA-core variant: one query head per program; each thread owns whole token rows, so the
    q.k dot is an in-thread FMA chain and P.V accumulates per row in registers (rows are summed
    once at the end). A step's BLOCK_N tokens are two halves with the same layout: a thread owns
    the same row of both, tokens t and t + TPG / 2 of one key group, so the group's scale folded
    into q serves two tokens and P.V accumulates both into one row of acc [BLOCK_N / 2, D]. One
    running max per program, updated lazily (only when a block's max exceeds it by more than
    2**8), so the accumulator is rarely rescaled."""
    tl.static_assert(KEY_BITS == 2 or KEY_BITS == 4 or KEY_BITS == 8, "KEY_BITS must be 2, 4 or 8")
    tl.static_assert(VALUE_BITS == 2 or VALUE_BITS == 4 or VALUE_BITS == 8, "VALUE_BITS must be 2, 4 or 8")
    tl.static_assert(GROUP_SIZE == 16 or GROUP_SIZE == 32 or GROUP_SIZE == 64 or GROUP_SIZE == 128,
                     "GROUP_SIZE must be 16, 32, 64 or 128")
    tl.static_assert(HEAD_DIM % 16 == 0, "HEAD_DIM must be a multiple of 16 (whole int32 words of codes)")
    tl.static_assert(HEAD_DIM % GROUP_SIZE == 0, "GROUP_SIZE must divide HEAD_DIM (value groups)")
    tl.static_assert(GROUP_SIZE % (32 // VALUE_BITS) == 0, "a value group must be whole int32 words")
    tl.static_assert(BLOCK_N % GROUP_SIZE == 0 or GROUP_SIZE % BLOCK_N == 0, "BLOCK_N and GROUP_SIZE must nest")
    tl.static_assert(D_PAD >= HEAD_DIM and D_PAD <= 256, "D_PAD must cover HEAD_DIM (<= 256)")
    tl.static_assert(BLOCK_N >= 16, "BLOCK_N must be >= 16 (two halves of whole rows)")

    KPK: tl.constexpr = 32 // KEY_BITS
    KPV: tl.constexpr = 32 // VALUE_BITS
    RAW: tl.constexpr = 2 if USE_ASM else 1      # codes unpacked as code * 2**LOW (`_plane`)
    NWK: tl.constexpr = HEAD_DIM // KPK          # key words per token (row stride of KC)
    NWK_PAD: tl.constexpr = D_PAD // KPK
    NWV: tl.constexpr = HEAD_DIM // KPV
    NWV_PAD: tl.constexpr = D_PAD // KPV
    NG: tl.constexpr = HEAD_DIM // GROUP_SIZE    # value groups per token (row stride of VS)
    NG_PAD: tl.constexpr = D_PAD // GROUP_SIZE
    KGROUPS: tl.constexpr = BLOCK_N // GROUP_SIZE if BLOCK_N >= GROUP_SIZE else 1
    TPG: tl.constexpr = BLOCK_N // KGROUPS       # tokens of one key group inside a block
    TPG2: tl.constexpr = TPG // 2                # ... per half: the second half is offset by TPG2
    HALF: tl.constexpr = BLOCK_N // 2            # rows of acc
    STEP: tl.constexpr = BLOCK_N if BLOCK_N > GROUP_SIZE else GROUP_SIZE  # split boundaries: whole steps

    pid0 = tl.program_id(0)
    pid_s = pid0 // REP
    hq = tl.program_id(1) * REP + pid0 % REP
    pid_h = tl.program_id(1)
    pid_b = tl.program_id(2)

    d = tl.arange(0, D_PAD)
    d_ok = d < HEAD_DIM
    q = tl.load(Q + pid_b * s_qb + hq * s_qh + d, mask=d_ok, other=0.0).to(tl.float32) * qk_scale
    # Codes are unpacked raw (code * 2**LOW, `_plane` RAW): the 2**-LOW of each channel is folded
    # into q for keys and applied to the accumulator once at the end for values (exact scalings).
    qk = q * _low_scale(d, KEY_BITS)
    v_low = _low_scale(d, VALUE_BITS)
    v_high = 1.0 / v_low                         # exact powers of two: window values enter acc as code-scaled
    mask_row = pid_b * s_mb + hq * s_mh

    m = tl.full([], float("-inf"), tl.float32)
    l_r = tl.zeros([HALF], tl.float32)
    acc = tl.zeros([HALF, NG_PAD, GROUP_SIZE], tl.float32)
    accz = tl.zeros([HALF, NG_PAD], tl.float32)

    gi = tl.arange(0, KGROUPS)
    ti = tl.arange(0, TPG2)
    rows = tl.reshape(gi[:, None] * TPG + ti[None, :], (HALF,))   # first-half token of each row
    wrows = tl.arange(0, HALF)                                     # window and tail steps: HALF tokens
    wk = tl.arange(0, NWK_PAD)
    wv = tl.arange(0, NWV_PAD)
    g_idx = tl.arange(0, NG_PAD)

    if LENGTHS_ON_DEVICE:
        Lq, L, chunk = _device_lengths(LENS, KV_LEN, NUM_SPLITS_RT, STEP)
    start = pid_s * chunk
    end = tl.minimum(start + chunk, Lq)
    kc_base = KC + pid_b * s_kcb + pid_h * s_kch
    ks_base = pid_b * s_ksb + pid_h * s_ksh
    vc_base = VC + pid_b * s_vcb + pid_h * s_vch
    vs_base = pid_b * s_vsb + pid_h * s_vsh
    # Software pipelining by hand (Triton pipelines only loads that feed a dot): the words and
    # scales of step t0 + BLOCK_N are loaded while step t0 is computed. Half a: tokens t0 + rows,
    # half b: t0 + TPG2 + rows.
    # The key zeros' term q . z is a reduction across lanes (shuffles). ptxas may give a shuffle
    # the dependency barrier of the prefetch loads just issued; a consumer of it at the top of the
    # loop then waits a full memory round trip every step (session 9: the single-split 2-bit build
    # ran 19 % slower, Nsight Compute put a quarter of all stalls on that one FADD). Where the term
    # is computed decides which builds get such a wait, by ptxas's (Triton 3.6's) allocation, not
    # by a rule: ZERO_TERM_AHEAD computes the next step's term at the end of a step, chosen per
    # build so that `benchmarks/check_waits.py` finds no false wait in any default device-lengths
    # build's main loop. Re-check it after every kernel edit and Triton upgrade.
    ZERO_TERM_AHEAD: tl.constexpr = SINGLE
    ks_n, kz_n = _rows_key_scales(start, end, KS, KZ, ks_base, gi, d, HEAD_DIM, GROUP_SIZE)
    if ZERO_TERM_AHEAD:
        qz_n = tl.sum(q[None, :] * kz_n.to(tl.float32), axis=1)              # [KGROUPS]
    else:
        qz_n = kz_n                                                          # reduced at the top of the step
    kwa_n, vwa_n, vsa_n, vza_n = _rows_token_loads(start, end, kc_base, vc_base, VS, VZ, vs_base, gi, ti, rows, wk,
                                                   wv, g_idx, GROUP_SIZE, TPG, NWK, NWK_PAD, NWV, NWV_PAD, NG)
    kwb_n, vwb_n, vsb_n, vzb_n = _rows_token_loads(start + TPG2, end, kc_base, vc_base, VS, VZ, vs_base, gi, ti, rows,
                                                   wk, wv, g_idx, GROUP_SIZE, TPG, NWK, NWK_PAD, NWV, NWV_PAD, NG)
    for t0 in range(start, end, BLOCK_N):
        ks, qz, kwa, vwa, vsa, vza, kwb, vwb, vsb, vzb = ks_n, qz_n, kwa_n, vwa_n, vsa_n, vza_n, kwb_n, vwb_n, vsb_n, vzb_n
        ks_n, kz_n = _rows_key_scales(t0 + BLOCK_N, end, KS, KZ, ks_base, gi, d, HEAD_DIM, GROUP_SIZE)
        kwa_n, vwa_n, vsa_n, vza_n = _rows_token_loads(t0 + BLOCK_N, end, kc_base, vc_base, VS, VZ, vs_base, gi, ti,
                                                       rows, wk, wv, g_idx, GROUP_SIZE, TPG, NWK, NWK_PAD, NWV, NWV_PAD, NG)
        kwb_n, vwb_n, vsb_n, vzb_n = _rows_token_loads(t0 + BLOCK_N + TPG2, end, kc_base, vc_base, VS, VZ, vs_base, gi,
                                                       ti, rows, wk, wv, g_idx, GROUP_SIZE, TPG, NWK, NWK_PAD, NWV,
                                                       NWV_PAD, NG)
        # ---- keys: [KGROUPS, TPG2] tokens per half, scale of each group folded into q once for both
        qs = qk[None, :] * ks.to(tl.float32)                                   # [KGROUPS, D_PAD]
        if not ZERO_TERM_AHEAD:
            qz = tl.sum(q[None, :] * qz.to(tl.float32), axis=1)              # qz held this step's zeros
        sa = tl.reshape(_dot_planes(kwa, qs, KEY_BITS, RAW) + qz[:, None], (HALF,))
        sb = tl.reshape(_dot_planes(kwb, qs, KEY_BITS, RAW) + qz[:, None], (HALF,))
        if SOFTCAP > 0.0:
            sa = _softcap(sa, SOFTCAP)
            sb = _softcap(sb, SOFTCAP)
        toka = t0 + rows
        tokb = toka + TPG2
        sa = tl.where(toka < end, sa + _mask_bias(MASK, mask_row, toka, toka < end, s_mk, MASK_KIND), float("-inf"))
        sb = tl.where(tokb < end, sb + _mask_bias(MASK, mask_row, tokb, tokb < end, s_mk, MASK_KIND), float("-inf"))
        # ---- lazy online softmax (one max per program)
        p, m, acc, accz, l_r = _lazy_softmax_rows(tl.join(sa, sb), m, acc, accz, l_r)
        pa, pb = tl.split(p)
        l_r += pa + pb
        # ---- values: per-token scales folded into p, both halves into the same rows
        vcode_a = tl.reshape(_unpack(vwa, VALUE_BITS, RAW), (HALF, NG_PAD, GROUP_SIZE))
        vcode_b = tl.reshape(_unpack(vwb, VALUE_BITS, RAW), (HALF, NG_PAD, GROUP_SIZE))
        acc += (pa[:, None] * vsa.to(tl.float32))[:, :, None] * vcode_a     # two separate adds: two FMAs per
        acc += (pb[:, None] * vsb.to(tl.float32))[:, :, None] * vcode_b     # channel (a + b first would not fuse)
        accz += pa[:, None] * vza.to(tl.float32)
        accz += pb[:, None] * vzb.to(tl.float32)
        if ZERO_TERM_AHEAD:
            qz_n = tl.sum(q[None, :] * kz_n.to(tl.float32), axis=1)          # the next step's (see above)
        else:
            qz_n = kz_n

    if LENGTHS_ON_DEVICE:
        # ---- this split's rows of the window [Lq, L) (window row r = token - Lq; rows of the
        # window buffer past L - Lq are never read), then its share of the zero tail [L, KV_LEN)
        rk_base = RK + pid_b * s_rb + pid_h * s_rh
        rv_base = RV + pid_b * s_rb + pid_h * s_rh
        nw, n_mine = _window_rows(Lq, L, pid_s, NUM_SPLITS_RT)
        # one step ahead: a step's rows are loaded before the previous step's math (one memory
        # round trip for a split's whole window share instead of one per step)
        r = pid_s + wrows * NUM_SPLITS_RT
        k_n, v_n = _window_loads_rows(rk_base, rv_base, r, r < nw, HEAD_DIM, D_PAD)
        for j0 in range(0, n_mine, HALF):
            k_c, v_c, r_c = k_n, v_n, r
            r = r + HALF * NUM_SPLITS_RT
            k_n, v_n = _window_loads_rows(rk_base, rv_base, r, r < nw, HEAD_DIM, D_PAD)
            m, acc, accz, l_r = _window_math_rows(k_c, v_c, Lq + r_c, r_c < nw, q, v_high, m, acc, accz, l_r, MASK,
                                                  mask_row, s_mk, GROUP_SIZE, MASK_KIND, SOFTCAP)
        t_start, t_end = _tail_share(L, KV_LEN, pid_s, NUM_SPLITS_RT)
        if MASK_KIND == 0:   # score 0, value 0: closed form
            m, acc, accz, l_r = _zero_tail_rows(t_end - t_start, m, acc, accz, l_r, wrows)
        else:                # score = the mask's bias; nothing to add to acc
            for t0 in range(t_start, t_end, HALF):
                tok = t0 + wrows
                tok_ok = tok < t_end
                s = tl.where(tok_ok, _mask_bias(MASK, mask_row, tok, tok_ok, s_mk, MASK_KIND), float("-inf"))
                p, m, acc, accz, l_r = _lazy_softmax_rows(s, m, acc, accz, l_r)
                l_r += p
    else:
        # ---- residual window [Lq, L) and zero tail [L, KV_LEN), in split `res_split`
        if pid_s == res_split:
            rk_base = RK + pid_b * s_rb + pid_h * s_rh
            rv_base = RV + pid_b * s_rb + pid_h * s_rh
            for t0 in range(Lq, KV_LEN, HALF):
                tok = t0 + wrows
                m, acc, accz, l_r = _window_step_rows(rk_base, rv_base, tok - Lq, tok < L, tok, tok < KV_LEN, q, v_high,
                                                      m, acc, accz, l_r, MASK, mask_row, s_mk, HEAD_DIM, GROUP_SIZE,
                                                      MASK_KIND, SOFTCAP)

    l_sum = tl.sum(l_r, axis=0)
    o = tl.reshape(tl.sum(acc, axis=0), (D_PAD,)) * v_low + tl.reshape(tl.broadcast_to(tl.sum(accz, axis=0)[:, None], (NG_PAD, GROUP_SIZE)), (D_PAD,))
    if SINGLE:
        tl.store(OUT + (pid_b * tl.num_programs(1) * REP + hq) * HEAD_DIM + d, (o / l_sum).to(OUT.dtype.element_ty), mask=d_ok)
    else:
        orow = pid_b * tl.num_programs(1) * REP + hq
        row = orow * NUM_SPLITS_RT + pid_s
        tl.store(OP + row * HEAD_DIM + d, o, mask=d_ok)
        tl.store(OM + row, m)
        tl.store(OL + row, l_sum)
        if FUSE_REDUCE:
            if _last_split(CNT + orow, NUM_SPLITS_RT):
                _reduce_row(OP, OM, OL, OUT, orow, NUM_SPLITS_RT, HEAD_DIM, D_PAD, FUSED_REDUCE_BLOCK)


@triton.jit
def _to_tile_order(x, BITS: tl.constexpr):
    """[N, D_PAD] in natural channel order -> the `_join_tree` tile order (`_perm`): inside each
    word's KP = 32 // BITS channels, position 2 * k + h holds channel k + h * KP / 2. A permute in
    registers, so the tile is loaded with contiguous, vectorized loads (not gathered)."""
    KP: tl.constexpr = 32 // BITS
    N: tl.constexpr = x.shape[0]
    DP: tl.constexpr = x.shape[1]
    return tl.reshape(tl.permute(tl.reshape(x, (N, DP // KP, 2, KP // 2)), (0, 1, 3, 2)), (N, DP))


@triton.jit
def _window_step_heads(rk_base, rv_base, r, in_res, tok_ok, qn, m_i, acc, l_i, qk_scale, MASK, mask_row, tok, h_ok,
                       s_mk, HEAD_DIM: tl.constexpr, VALUE_BITS: tl.constexpr, MASK_KIND: tl.constexpr,
                       EMULATE_DOT: tl.constexpr, SOFTCAP: tl.constexpr = 0.0):
    """One step of the dot variant over full-precision window rows r (tokens tok; rows with in_res
    False read zeros, columns with tok_ok False are not attended): keys and values loaded in
    natural channel order, q in natural order qn [HB, D_PAD] (model dtype) for the scores, the
    values permuted to the accumulator's tile order."""
    D_PAD: tl.constexpr = qn.shape[1]
    d = tl.arange(0, D_PAD)
    ld_mask = in_res[:, None] & (d < HEAD_DIM)[None, :]
    k = tl.load(rk_base + r[:, None] * HEAD_DIM + d[None, :], mask=ld_mask, other=0.0)
    v = tl.load(rv_base + r[:, None] * HEAD_DIM + d[None, :], mask=ld_mask, other=0.0)  # with k: one round trip
    s = _dot(qn, tl.trans(k), EMULATE_DOT) * qk_scale
    if SOFTCAP > 0.0:
        s = _softcap(s, SOFTCAP)
    s += _mask_bias(MASK, mask_row, tok[None, :], h_ok[:, None] & tok_ok[None, :], s_mk, MASK_KIND)
    s = tl.where(tok_ok[None, :], s, float("-inf"))
    p, m_i, acc, l_i = _lazy_softmax_heads(s, m_i, acc, l_i)
    v = _to_tile_order(v, VALUE_BITS)
    acc += _dot(p.to(qn.dtype), v, EMULATE_DOT)
    return m_i, acc, l_i


@triton.jit(do_not_specialize=_DNS)
def _kvpass_decode_dot(
    Q, KC, KS, KZ, VC, VS, VZ, RK, RV, MASK, OP, OM, OL, OUT, LENS, CNT,
    s_qb, s_qh, s_kcb, s_kch, s_ksb, s_ksh, s_vcb, s_vch, s_vsb, s_vsh, s_rb, s_rh, s_mb, s_mh, s_mk,
    Lq, L, KV_LEN, chunk, res_split, NUM_SPLITS_RT, qk_scale, REP,
    KEY_BITS: tl.constexpr, VALUE_BITS: tl.constexpr, GROUP_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, HB: tl.constexpr,
    MASK_KIND: tl.constexpr, SINGLE: tl.constexpr, USE_ASM: tl.constexpr, EMULATE_DOT: tl.constexpr,
    LENGTHS_ON_DEVICE: tl.constexpr, FUSE_REDUCE: tl.constexpr = False, SOFTCAP: tl.constexpr = 0.0,
):
    """Tensor-core variant: the REP query heads of one KV head, padded to HB >= 16 rows, in one
    program (GQA/MQA; MHA pads 1 row to 16, which the tensor cores absorb). Per step one key group
    of BLOCK_N <= G tokens:
        S = ((q * s_k) @ codes^T + q . z_k) * qk_scale     codes exact in KDT (bf16/fp16)
        O += P @ (codes * s_v + z_v)                      values dequantized in fp16
    Codes are unpacked two per instruction (packed fp16/bf16 magic numbers, USE_ASM) or in fp32
    (`_unpack`, the interpreter and fp32 models). Per-head running max, rescaled lazily: only
    when some head's block max exceeds it by more than 8 (log2), so p <= 2**8."""
    tl.static_assert(KEY_BITS == 2 or KEY_BITS == 4 or KEY_BITS == 8, "KEY_BITS must be 2, 4 or 8")
    tl.static_assert(VALUE_BITS == 2 or VALUE_BITS == 4 or VALUE_BITS == 8, "VALUE_BITS must be 2, 4 or 8")
    tl.static_assert(GROUP_SIZE == 16 or GROUP_SIZE == 32 or GROUP_SIZE == 64 or GROUP_SIZE == 128,
                     "GROUP_SIZE must be 16, 32, 64 or 128")
    tl.static_assert(HEAD_DIM % 16 == 0, "HEAD_DIM must be a multiple of 16 (whole int32 words of codes)")
    tl.static_assert(HEAD_DIM % GROUP_SIZE == 0, "GROUP_SIZE must divide HEAD_DIM (value groups)")
    tl.static_assert(GROUP_SIZE % (32 // VALUE_BITS) == 0, "a value group must be whole int32 words")
    tl.static_assert(GROUP_SIZE % BLOCK_N == 0, "BLOCK_N must divide GROUP_SIZE (one key group per step)")
    tl.static_assert(D_PAD >= HEAD_DIM and D_PAD <= 256, "D_PAD must cover HEAD_DIM (<= 256)")
    tl.static_assert(BLOCK_N >= 16, "tensor-core dots need >= 16 tokens")

    DT: tl.constexpr = Q.dtype.element_ty
    IS_F32: tl.constexpr = DT == tl.float32
    # operand types: keys in the model's 16-bit type when the codes fit its mantissa, values fp16
    # (scales/zeros are fp16 already, so every dequantized value is in fp16 range)
    KDT: tl.constexpr = tl.float32 if IS_F32 else (tl.bfloat16 if (DT == tl.bfloat16 and KEY_BITS <= 4) else tl.float16)
    VDT: tl.constexpr = tl.float32 if IS_F32 else tl.float16
    KPK: tl.constexpr = 32 // KEY_BITS
    KPV: tl.constexpr = 32 // VALUE_BITS
    NWK: tl.constexpr = HEAD_DIM // KPK
    NWK_PAD: tl.constexpr = D_PAD // KPK
    NG: tl.constexpr = HEAD_DIM // GROUP_SIZE
    NG_PAD: tl.constexpr = D_PAD // GROUP_SIZE
    WG: tl.constexpr = GROUP_SIZE // KPV          # value words per group
    STEP: tl.constexpr = GROUP_SIZE               # split boundaries: whole key groups (BLOCK_N divides G)

    pid_s = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_b = tl.program_id(2)
    hh = tl.arange(0, HB)
    h_ok = hh < REP
    hq = pid_h * REP + hh
    d = tl.arange(0, D_PAD)
    d_ok = d < HEAD_DIM
    dk = _perm(d, KEY_BITS)      # memory channel of each key tile column (see _join_tree)
    dv = _perm(d, VALUE_BITS)    # ... and of each value / output column
    q_ptr = Q + pid_b * s_qb + hq[:, None] * s_qh
    q = tl.load(q_ptr + dk[None, :], mask=h_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    qn = tl.load(q_ptr + d[None, :], mask=h_ok[:, None] & d_ok[None, :], other=0.0)  # natural order (window keys)
    qn_dt = qn
    qn = qn.to(tl.float32)
    mask_row = pid_b * s_mb + hq[:, None] * s_mh

    m_i = tl.full([HB], float("-inf"), tl.float32)
    l_i = tl.zeros([HB], tl.float32)
    acc = tl.zeros([HB, D_PAD], tl.float32)

    nb = tl.arange(0, BLOCK_N)
    wk = tl.arange(0, NWK_PAD)
    g_idx = tl.arange(0, NG_PAD)
    wv = tl.arange(0, WG)

    if LENGTHS_ON_DEVICE:
        Lq, L, chunk = _device_lengths(LENS, KV_LEN, NUM_SPLITS_RT, STEP)
    start = pid_s * chunk
    end = tl.minimum(start + chunk, Lq)
    kc_base = KC + pid_b * s_kcb + pid_h * s_kch
    ks_base = pid_b * s_ksb + pid_h * s_ksh
    vc_base = VC + pid_b * s_vcb + pid_h * s_vch
    vs_base = pid_b * s_vsb + pid_h * s_vsh
    tok0 = start + nb
    if NWK_PAD == NWK:
        kmask_w = wk < NWK_PAD
    else:
        kmask_w = wk < NWK
    kp = kc_base + tok0[:, None] * NWK + wk[None, :]                                 # advanced per step
    vp = vc_base + tok0[:, None, None] * (NG * WG) + (g_idx * WG)[None, :, None] + wv[None, None, :]
    vsp = VS + vs_base + tok0[:, None, None] * NG + g_idx[None, :, None] + wv[None, None, :] * 0
    vzp = VZ + vs_base + tok0[:, None, None] * NG + g_idx[None, :, None] + wv[None, None, :] * 0
    for t0 in range(start, end, BLOCK_N):
        tok = t0 + nb
        tok_ok = tok < end
        grp = t0 // GROUP_SIZE
        # ---- keys
        kw = tl.load(kp, mask=tok_ok[:, None] & kmask_w[None, :], other=0)
        if USE_ASM:
            kcode = tl.reshape(_kcodes_asm(kw, KEY_BITS, KDT == tl.bfloat16), (BLOCK_N, D_PAD))
        else:
            kcode = tl.reshape(_join_tree(_planes(kw, KEY_BITS), KEY_BITS), (BLOCK_N, D_PAD)).to(KDT)
        ks = tl.load(KS + ks_base + grp * HEAD_DIM + dk, mask=d_ok, other=0.0).to(tl.float32)
        kz = tl.load(KZ + ks_base + grp * HEAD_DIM + d, mask=d_ok, other=0.0).to(tl.float32)
        qz = tl.sum(qn * kz[None, :], axis=1)
        s = (_dot((q * ks[None, :]).to(KDT), tl.trans(kcode), EMULATE_DOT) + qz[:, None]) * qk_scale
        if SOFTCAP > 0.0:
            s = _softcap(s, SOFTCAP)
        s += _mask_bias(MASK, mask_row, tok[None, :], h_ok[:, None] & tok_ok[None, :], s_mk, MASK_KIND)
        s = tl.where(tok_ok[None, :], s, float("-inf"))
        # ---- lazy online softmax
        p, m_i, acc, l_i = _lazy_softmax_heads(s, m_i, acc, l_i)
        # ---- values: words [BLOCK_N, NG_PAD, WG], scale/zero of the token's channel group
        v_ok = tok_ok[:, None, None] & (g_idx < NG)[None, :, None]
        vw = tl.load(vp, mask=v_ok, other=0)
        vsc = tl.load(vsp, mask=v_ok, other=0.0)
        vze = tl.load(vzp, mask=v_ok, other=0.0)
        kp += BLOCK_N * NWK
        vp += BLOCK_N * (NG * WG)
        vsp += BLOCK_N * NG
        vzp += BLOCK_N * NG
        if USE_ASM:
            v = tl.reshape(_vvals_asm(vw, vsc.to(tl.float16), vze.to(tl.float16), VALUE_BITS), (BLOCK_N, D_PAD))
        else:
            vcode = tl.reshape(_join_tree(_planes(vw, VALUE_BITS), VALUE_BITS), (BLOCK_N, NG_PAD, GROUP_SIZE))
            vs1 = tl.max(vsc.to(tl.float32), axis=2)    # the same value along the word axis
            vz1 = tl.max(vze.to(tl.float32), axis=2)
            v = tl.reshape(vcode * vs1[:, :, None] + vz1[:, :, None], (BLOCK_N, D_PAD)).to(VDT)
        acc += _dot(p.to(VDT), v, EMULATE_DOT)

    if LENGTHS_ON_DEVICE:
        # ---- this split's rows of the window [Lq, L), then its share of the zero tail [L, KV_LEN)
        rk_base = RK + pid_b * s_rb + pid_h * s_rh
        rv_base = RV + pid_b * s_rb + pid_h * s_rh
        nw, n_mine = _window_rows(Lq, L, pid_s, NUM_SPLITS_RT)
        for j0 in range(0, n_mine, BLOCK_N):
            r = pid_s + (j0 + nb) * NUM_SPLITS_RT
            in_res = r < nw
            m_i, acc, l_i = _window_step_heads(rk_base, rv_base, r, in_res, in_res, qn_dt, m_i, acc, l_i, qk_scale,
                                               MASK, mask_row, Lq + r, h_ok, s_mk, HEAD_DIM, VALUE_BITS, MASK_KIND,
                                               EMULATE_DOT, SOFTCAP)
        t_start, t_end = _tail_share(L, KV_LEN, pid_s, NUM_SPLITS_RT)
        if MASK_KIND == 0:   # score 0, value 0: closed form
            m_i, acc, l_i = _zero_tail_heads(t_end - t_start, m_i, acc, l_i)
        else:                # score = the mask's bias; nothing to add to acc
            for t0 in range(t_start, t_end, BLOCK_N):
                tok = t0 + nb
                tok_ok = tok < t_end
                s = _mask_bias(MASK, mask_row, tok[None, :], h_ok[:, None] & tok_ok[None, :], s_mk, MASK_KIND)
                s = tl.where(tok_ok[None, :], s, float("-inf"))
                p, m_i, acc, l_i = _lazy_softmax_heads(s, m_i, acc, l_i)
    else:
        # ---- residual window [Lq, L) and zero tail [L, KV_LEN), in split `res_split`
        if pid_s == res_split:
            rk_base = RK + pid_b * s_rb + pid_h * s_rh
            rv_base = RV + pid_b * s_rb + pid_h * s_rh
            for t0 in range(Lq, KV_LEN, BLOCK_N):
                tok = t0 + nb
                m_i, acc, l_i = _window_step_heads(rk_base, rv_base, tok - Lq, tok < L, tok < KV_LEN, qn_dt, m_i, acc,
                                                   l_i, qk_scale, MASK, mask_row, tok, h_ok, s_mk, HEAD_DIM,
                                                   VALUE_BITS, MASK_KIND, EMULATE_DOT, SOFTCAP)

    if SINGLE:
        orow = pid_b * tl.num_programs(1) * REP + hq
        tl.store(OUT + orow[:, None] * HEAD_DIM + dv[None, :], (acc / l_i[:, None]).to(OUT.dtype.element_ty),
                 mask=h_ok[:, None] & d_ok[None, :])
    else:
        row = (pid_b * tl.num_programs(1) * REP + hq) * NUM_SPLITS_RT + pid_s
        tl.store(OP + row[:, None] * HEAD_DIM + dv[None, :], acc, mask=h_ok[:, None] & d_ok[None, :])
        tl.store(OM + row, m_i, mask=h_ok)
        tl.store(OL + row, l_i, mask=h_ok)
        if FUSE_REDUCE:
            kv_row = pid_b * tl.num_programs(1) + pid_h
            if _last_split(CNT + kv_row, NUM_SPLITS_RT):
                for j in range(REP):
                    _reduce_row(OP, OM, OL, OUT, kv_row * REP + j, NUM_SPLITS_RT, HEAD_DIM, D_PAD, FUSED_REDUCE_BLOCK)


@triton.jit
def _last_split(COUNTER, NUM_SPLITS_RT):
    """True in the program that finishes a row's splits last (fused reduce). Called after the
    program stored its partials: the barrier orders every thread's stores before the gpu-scope
    acq_rel ticket (release), and the last ticket's acquire makes all splits' partials visible to
    the reads that follow (the ticket is shared with the program's threads through a barrier).
    The last program resets the counter to 0 for the next launch (CUDA-graph replays reuse it)."""
    tl.debug_barrier()
    ticket = tl.atomic_add(COUNTER, 1, sem="acq_rel")
    last = ticket == NUM_SPLITS_RT - 1
    if last:
        tl.store(COUNTER, 0)
    return last


@triton.jit
def _reduce_row(OP, OM, OL, OUT, orow, NUM_SPLITS_RT,
                HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, S_BLOCK: tl.constexpr):
    """OUT[orow] = sum_s 2**(m_s - M) acc_s / sum_s 2**(m_s - M) l_s over the NUM_SPLITS_RT splits
    of output row orow (OP [rows * splits, HEAD_DIM], OM/OL [rows * splits] fp32), S_BLOCK splits
    at a time, in one pass: each block's m, l and partials are loaded together and the running
    result is rescaled when the block raises the max (one round of loads per block; a max pass
    first doubles the dependent rounds. Measured: < 1 us of a batch-1 call, results/ab_reduce_s8.log). Splits that
    saw nothing (m = -inf) weigh 0. Loads bypass L1 (.cg): in the fused reduce other programs of
    the same launch wrote these partials."""
    sp = tl.arange(0, S_BLOCK)
    d = tl.arange(0, D_PAD)
    d_ok = d < HEAD_DIM
    base = orow * NUM_SPLITS_RT
    m_run = tl.full([], float("-inf"), tl.float32)
    o = tl.zeros([D_PAD], tl.float32)
    denom = tl.zeros([], tl.float32)
    for s0 in range(0, NUM_SPLITS_RT, S_BLOCK):
        s_ok = s0 + sp < NUM_SPLITS_RT
        m = tl.load(OM + base + s0 + sp, mask=s_ok, other=float("-inf"), cache_modifier=".cg")
        lsum = tl.load(OL + base + s0 + sp, mask=s_ok, other=0.0, cache_modifier=".cg")
        part = tl.load(OP + (base + s0 + sp)[:, None] * HEAD_DIM + d[None, :],
                       mask=s_ok[:, None] & d_ok[None, :], other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m_run, tl.max(m, axis=0))
        ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_run - ref)                    # 0 while nothing was seen (m_run = -inf)
        w = tl.where(m == float("-inf"), 0.0, tl.exp2(m - ref))
        o = o * alpha + tl.sum(part * w[:, None], axis=0)
        denom = denom * alpha + tl.sum(w * lsum, axis=0)
        m_run = m_new
    tl.store(OUT + orow * HEAD_DIM + d, (o / denom).to(OUT.dtype.element_ty), mask=d_ok)


@triton.jit(do_not_specialize=["NUM_SPLITS_RT"])
def _kvpass_decode_reduce(OP, OM, OL, OUT, NUM_SPLITS_RT,
                          HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, S_BLOCK: tl.constexpr):
    """The reduce as its own launch (DecodeConfig.fuse_reduce=False): one program per output row."""
    _reduce_row(OP, OM, OL, OUT, tl.program_id(0), NUM_SPLITS_RT, HEAD_DIM, D_PAD, S_BLOCK)


# ---------------------------------------------------------------------------------------------
# Launchers

_SM_COUNT: dict = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


_SPLIT_COUNTERS: dict = {}


def _raw_stream(device: torch.device) -> int:
    """The current CUDA stream of `device` as an int (a cheap C call: this runs on every decode call)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    get_raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return get_raw(idx) if get_raw is not None else torch.cuda.current_stream(idx).cuda_stream


def split_counters(device: torch.device, n: int) -> torch.Tensor:
    """int32 [>= n] zeros on `device`, one per output row (rows variant) or KV head (dot variant)
    of the fused reduce: each program of a launch increments its row's counter once and the last
    one sets it back to 0, so the buffer is all zeros between launches and is reused by every
    launch on the same stream (kernels of one stream never overlap). One buffer per (device,
    stream), so decode calls running at once on two streams do not share counters. Buffers are
    kept for the life of the process: a CUDA graph that captured a launch keeps using its pointer."""
    stream = _raw_stream(device) if device.type == "cuda" else 0
    key = (str(device), stream)
    bufs = _SPLIT_COUNTERS.setdefault(key, [])
    if not bufs or bufs[-1].numel() < n:
        bufs.append(torch.zeros(max(n, 1024, 2 * bufs[-1].numel() if bufs else 0), dtype=torch.int32, device=device))
    return bufs[-1]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def check_spec(spec: DecodeSpec) -> str | None:
    """None when the kernel supports `spec`, else the reason it does not."""
    if spec.key_bits not in SUPPORTED_BITS or spec.value_bits not in SUPPORTED_BITS:
        return f"bits k{spec.key_bits}/v{spec.value_bits} not in {SUPPORTED_BITS}"
    if spec.group_size not in SUPPORTED_GROUPS:
        return f"group_size {spec.group_size} not in {SUPPORTED_GROUPS}"
    if spec.head_dim % 16 or spec.head_dim % spec.group_size or spec.head_dim > 256:
        return f"head_dim {spec.head_dim} (needs a multiple of 16 and of group_size {spec.group_size}, <= 256)"
    if spec.group_size % (32 // spec.value_bits):
        return f"group_size {spec.group_size} is not whole int32 words of {spec.value_bits}-bit codes"
    if spec.dtype not in _DTYPE_NAMES:
        return f"dtype {spec.dtype}"
    return None


def split_slots(units: int, cfg: DecodeConfig, device, resident: int | None = None) -> int:
    """Programs per unit (B*Hq rows or B*Hkv) that the split plan may use: with cfg.ctas_per_sm 0,
    `wave_splits` over `resident` programs per SM (FALLBACK_CTAS_PER_SM when unknown), else about
    ctas_per_sm programs per SM."""
    if cfg.ctas_per_sm == 0:
        return wave_splits(units, (resident or FALLBACK_CTAS_PER_SM) * _num_sms(device))
    return -(-cfg.ctas_per_sm * _num_sms(device) // units)


def plan_splits(units: int, Lq: int, step: int, has_rest: bool, cfg: DecodeConfig, device,
                resident: int | None = None) -> tuple[int, int, int]:
    """(num_splits, chunk tokens, res_split) for `units` programs per split (B*Hq rows or B*Hkv).

    Programs per unit: with cfg.ctas_per_sm 0, `wave_splits` over `resident` programs per SM (the
    compiled kernel's occupancy, `_resident_per_sm`; FALLBACK_CTAS_PER_SM when unknown), else
    about ctas_per_sm programs per SM. The split of the residual window and tail counts among them
    (host and device lengths launch as many programs). Each split covers at least
    min_groups_per_split steps; chunk is a multiple of `step` (G, or BLOCK_N when larger). With
    more than one split, the residual window and tail get a split of their own (res_split)."""
    n_steps = -(-Lq // step)
    if n_steps == 0:
        return 1, step, 0
    total = split_slots(units, cfg, device, resident)
    want = max(1, total - (1 if has_rest else 0))  # the rest's split counts in the target
    max_by_work = max(1, n_steps // max(1, cfg.min_groups_per_split))
    s = min(want, max_by_work, 512)
    chunk_steps = -(-n_steps // s)
    s = -(-n_steps // chunk_steps)
    if s > 1 and has_rest:
        return s + 1, chunk_steps * step, s
    return s, chunk_steps * step, s - 1


_RESIDENT: dict = {}


def _resident_per_sm(fn, make_args, kw, device) -> int | None:
    """Programs of the multi-split specialization (fn, constexprs kw) resident per SM, from the
    compiled kernel's registers and shared memory (`resident_programs`); memoized per
    specialization and device (make_args() builds launch arguments only on a miss). Compiling it
    here is no extra work: a multi-split launch that follows uses the same cache entry. None in
    the interpreter, on a Triton that does not expose `n_regs`, or during a CUDA-graph capture of
    a specialization not seen before (the plan falls back to FALLBACK_CTAS_PER_SM per SM then,
    and the next uncaptured call computes the real value)."""
    if device.type != "cuda" or _interpreting():
        return None
    idx = device.index if device.index is not None else torch.cuda.current_device()
    key = (fn.__name__, idx, tuple(kw.items()))  # one code path builds kw: a stable order
    if key in _RESIDENT:
        return _RESIDENT[key]
    if torch.cuda.is_current_stream_capturing():
        return None
    try:
        kernel = fn.warmup(*make_args(), grid=(1, 1, 1), **kw)
        kernel._init_handles()
        n_regs, shared = int(kernel.n_regs), int(kernel.metadata.shared)
    except (AttributeError, TypeError) as e:  # a Triton without these internals: keep the fallback plan
        log.info("kvpass decode: occupancy of %s unknown (%s: %s); split plan assumes %d programs per SM",
                 fn.__name__, type(e).__name__, e, FALLBACK_CTAS_PER_SM)
        _RESIDENT[key] = None
        return None
    res = resident_programs(n_regs, kw["num_warps"], shared, sm_limits(torch.cuda.get_device_properties(idx)))
    log.info("kvpass decode: %s (%s warps, %d registers, %d B shared) -> %d programs per SM",
             fn.__name__, kw["num_warps"], n_regs, shared, res)
    _RESIDENT[key] = res
    return res


def _rows_contiguous(t: torch.Tensor) -> bool:
    return t.stride(-1) == 1 and (t.shape[-2] <= 1 or t.stride(-2) == t.shape[-1])


def kernel_buffers(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, res_k, res_v, quantized: bool,
                   empty_scale: torch.Tensor):
    """The store's buffers as the decode kernels take them: codes as int32 words, and when nothing is
    quantized yet (`quantized` False: Lq = 0, parts possibly unallocated) never-read placeholders
    (`empty_scale` for the scales/zeros: its dtype and strides pick the kernel specialization); window
    rows made contiguous with K and V sharing their batch/head strides (the store's window views need
    no copy). Returns (kc, k_scale, k_zero, vc, v_scale, v_zero, res_k, res_v, (window batch stride,
    window head stride))."""
    if quantized:
        for t in (k_codes, k_scale, k_zero, v_codes, v_scale, v_zero):
            assert _rows_contiguous(t), "kvpass decode kernel: store buffers must have contiguous rows"
        kc, vc = k_codes.view(torch.int32), v_codes.view(torch.int32)
    else:
        kc = vc = torch.empty(1, 1, 1, 1, dtype=torch.int32, device=q.device)
        k_scale = k_zero = v_scale = v_zero = empty_scale
    if not (_rows_contiguous(res_k) and _rows_contiguous(res_v) and res_k.stride()[:2] == res_v.stride()[:2]):
        res_k, res_v = res_k.contiguous(), res_v.contiguous()
    rs = (res_k.stride(0), res_k.stride(1)) if res_k.numel() else (0, 0)
    return kc, k_scale, k_zero, vc, v_scale, v_zero, res_k, res_v, rs


def mask_args(attn_mask: torch.Tensor | None, q: torch.Tensor, kv_len: int) -> tuple[int, torch.Tensor | None, tuple]:
    """(kind, tensor, (batch, head, key) strides) of a decode mask as the kernels take it: kind 0
    (None; tensor None, strides 0), 1 (bool, viewed as uint8) or 2 (additive, q's dtype), the mask
    broadcast to [B, Hq, 1, kv_len] by strides (0 along broadcast dims; nothing is copied)."""
    if attn_mask is None:
        return 0, None, (0, 0, 0)
    B, Hq = q.shape[:2]
    m4 = attn_mask
    while m4.dim() < 4:
        m4 = m4.unsqueeze(0)
    m4 = m4.expand(B, Hq, 1, kv_len)
    kind, mask = (1, m4.view(torch.uint8)) if m4.dtype == torch.bool else (2, m4)
    return kind, mask, (mask.stride(0), mask.stride(1), mask.stride(3))


def decode_attention(
    q: torch.Tensor,
    k_codes: torch.Tensor, k_scale: torch.Tensor, k_zero: torch.Tensor,
    v_codes: torch.Tensor, v_scale: torch.Tensor, v_zero: torch.Tensor,
    res_k: torch.Tensor, res_v: torch.Tensor,
    *, key_bits: int, value_bits: int, group_size: int,
    quantized_length: int | None = None, length: int | None = None, kv_len: int | None = None,
    sm_scale: float | None = None, attn_mask: torch.Tensor | None = None,
    config: DecodeConfig | None = None, out: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None, softcap: float = 0.0,
) -> torch.Tensor:
    """softmax(cap(q K^T * sm_scale) + mask) V for q [B, Hq, 1, D] over a KIVI store, where
    cap(x) = softcap * tanh(x / softcap) when softcap > 0 (Gemma2's logit softcapping), else x.

    k_codes/v_codes uint8 [B, H, cap, D*bits/8] (tokens [0, Lq) valid), k_scale/k_zero
    [B, H, cap/G, D], v_scale/v_zero [B, H, cap, D/G] (last two dims contiguous).
    kv_len: the attended width; columns in [L, kv_len) read zero keys/values, as the reference's
    zero-padded static-cache read does; kv_len < L attends the first kv_len tokens.
    attn_mask: None, bool (True = attend) or additive float of q's dtype, broadcastable to
    [B, Hq, 1, kv_len]. Returns [B, Hq, 1, D] in q's dtype, written into `out` when given
    (contiguous, that shape and dtype; every element is written).

    Two modes, same result:
    - host lengths (lengths=None): Lq = quantized_length and L = length are host ints,
      res_k/res_v [B, H, L - Lq, D] hold exactly the window, kv_len defaults to L. The split plan
      (number of splits, chunk) follows Lq.
    - device lengths (`lengths` int32 [>= 2] on q's device, contiguous: lengths[0] = Lq, a
      multiple of G, lengths[1] = L): CUDA-graph capturable. Nothing here reads `lengths` on the
      host, and the launch (grid, number of splits, every argument and constexpr) depends only on
      shapes, kv_len (required), dtype and config, so a recorded launch is right for any lengths.
      quantized_length/length are ignored; res_k/res_v are the store's whole window buffers
      [B, H, W, D] with W >= L - Lq (the window's token Lq + r at row r; rows past L - Lq are
      never read); the part buffers must hold tokens [0, Lq) (a static store: capacity kv_len
      rounded up to whole groups). The splits are planned for the capacity kv_len; the kernel
      deals [0, Lq), the window rows and the zero tail [L, kv_len) out over them
      (`_device_lengths`, `_window_rows`, `_tail_share`).
    """
    B, Hq, Tq, D = q.shape
    assert Tq == 1, "decode kernel takes one query token"
    if not (isinstance(softcap, (int, float)) and math.isfinite(softcap) and softcap >= 0):
        raise ValueError(f"kvpass decode kernel: softcap must be a finite float >= 0 (0: none), got {softcap!r}")
    H = res_k.shape[1]
    assert Hq % H == 0, f"query heads {Hq} must be a multiple of kv heads {H}"
    rep = Hq // H
    if lengths is None:
        if length is None or quantized_length is None:
            raise ValueError("kvpass decode kernel: pass quantized_length and length, or device `lengths`")
        kv_len = length if kv_len is None else kv_len
        Lq = min(quantized_length, kv_len)
        L = min(length, kv_len)
    else:
        # Only static facts of `lengths` are checked: its contents stay on the device.
        if kv_len is None:
            raise ValueError("kvpass decode kernel: device `lengths` need kv_len (the static attended width)")
        if kv_len < 1:
            raise ValueError(f"kvpass decode kernel: kv_len {kv_len} < 1")
        if (lengths.dtype != torch.int32 or lengths.device != q.device or lengths.dim() != 1
                or lengths.shape[0] < 2 or lengths.stride(0) != 1):
            raise ValueError("kvpass decode kernel: `lengths` must be a contiguous int32 vector of >= 2 elements "
                             f"(Lq, L) on {q.device}; got {lengths.dtype} {tuple(lengths.shape)} on {lengths.device}")
        Lq = L = 0  # launch placeholders: the kernel reads Lq and L from `lengths`
    spec = DecodeSpec(key_bits, value_bits, group_size, D, q.dtype, rep)
    why = check_spec(spec)
    if why:
        raise ValueError(f"kvpass decode kernel: unsupported {why}")
    if config is None:
        def tune_with(c: DecodeConfig) -> torch.Tensor:  # one call with config c (autotuning only)
            return decode_attention(
                q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, res_k, res_v, key_bits=key_bits,
                value_bits=value_bits, group_size=group_size, quantized_length=quantized_length, length=length,
                kv_len=kv_len, sm_scale=sm_scale, attn_mask=attn_mask, config=c, lengths=lengths, softcap=softcap)

        config = get_config(spec, kv_len, B, tune_with if autotune_enabled() else None)
    cfg = config
    if cfg.use_mma:
        try:
            from kvpass.templates import decode_mma
        except (ImportError, AttributeError) as e:  # a Triton without Gluon, or without an API it uses
            decode_mma = None
            _log_once(f"kvpass decode: DecodeConfig.use_mma set but Gluon is not importable ({e}); "
                      "using the Triton kernel")
        if decode_mma is not None:
            why_not = decode_mma.mma_unsupported(spec, lengths, q, Lq, (k_codes, v_codes))
            if why_not is None:
                try:
                    result = decode_mma.decode_attention_mma(
                        q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, res_k, res_v, lengths, kv_len=kv_len,
                        key_bits=key_bits, group_size=group_size, sm_scale=sm_scale, config=cfg, out=out,
                        host_lengths=(Lq, L), mask=mask_args(attn_mask, q, kv_len), softcap=softcap)
                    paths.record("decode attention", "Gluon tensor-core kernel")
                    return result
                except decode_mma.GluonCompileError as e:  # this Triton cannot build it: the Triton kernel answers
                    why_not = str(e)
            decode_mma.log_fallback(why_not)
        paths.record("decode attention", f"Triton {'dot' if cfg.use_dot else 'rows'} kernel (not the Gluon "
                     f"kernel: {why_not if decode_mma is not None else 'Gluon not importable'})")
    else:
        paths.record("decode attention", f"Triton {'dot' if cfg.use_dot else 'rows'} kernel")
    G = group_size
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    D_PAD = max(16, _next_pow2(D))
    use_dot = cfg.use_dot
    block_n = min(cfg.block_n, G) if use_dot else cfg.block_n

    mask_kind, mask, s_m = mask_args(attn_mask, q, kv_len)
    mask = q if mask is None else mask

    quantized = Lq > 0 or (lengths is not None and all(t.numel() for t in (k_codes, k_scale, k_zero, v_codes,
                                                                           v_scale, v_zero)))
    kc, k_scale, k_zero, vc, v_scale, v_zero, res_k, res_v, rs = kernel_buffers(
        q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, res_k, res_v, quantized, res_k)
    assert q.stride(3) == 1
    units = B * H if use_dot else B * Hq
    step = max(G, block_n)
    interp = _interpreting()
    fn = _kvpass_decode_dot if use_dot else _kvpass_decode_rows
    common = dict(KEY_BITS=key_bits, VALUE_BITS=value_bits, GROUP_SIZE=G, HEAD_DIM=D, D_PAD=D_PAD,
                  BLOCK_N=block_n, MASK_KIND=mask_kind, LENGTHS_ON_DEVICE=lengths is not None,
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.max_regs and not interp:
        common["maxnreg"] = cfg.max_regs
    if softcap:  # only then: calls without softcap launch exactly the specializations they always did
        common["SOFTCAP"] = float(softcap) * LOG2E
    if use_dot:
        common.update(HB=max(cfg.pad_heads, _next_pow2(rep)), EMULATE_DOT=interp,
                      USE_ASM=(not interp) and q.dtype != torch.float32 and cfg.use_asm)
    else:
        common.update(USE_ASM=(not interp) and cfg.use_asm)

    def kernel_args(op, om, ol, out, counters, chunk, res_split, S):
        return (
            q, kc, k_scale, k_zero, vc, v_scale, v_zero, res_k, res_v, mask, op, om, ol, out, lengths, counters,
            q.stride(0), q.stride(1), kc.stride(0), kc.stride(1), k_scale.stride(0), k_scale.stride(1),
            vc.stride(0), vc.stride(1), v_scale.stride(0), v_scale.stride(1), rs[0], rs[1], s_m[0], s_m[1], s_m[2],
            Lq, L, kv_len, chunk, res_split, S, sm_scale * LOG2E, rep,
        )

    resident = None
    if cfg.ctas_per_sm == 0 and q.device.type == "cuda":  # occupancy of the multi-split specialization
        def warmup_args():  # float32 partial buffers as the multi-split launch passes them
            f32 = torch.empty(1, dtype=torch.float32, device=q.device)
            return kernel_args(f32, f32, f32, q, split_counters(q.device, 1), step, 0, 2)

        resident = _resident_per_sm(fn, warmup_args, dict(common, SINGLE=False, FUSE_REDUCE=cfg.fuse_reduce),
                                    q.device)
    if lengths is None:
        has_rest = L > Lq or kv_len > L
        S, chunk, res_split = plan_splits(units, Lq, step, has_rest, cfg, q.device, resident)
    else:  # splits from the capacity; the kernel computes each split's tokens from the lengths
        S = plan_splits(units, kv_len, step, False, cfg, q.device, resident)[0]
        chunk, res_split = step, -1  # unused in this mode
    single = S == 1
    if out is None:
        out = torch.empty(B, Hq, 1, D, dtype=q.dtype, device=q.device)
    else:
        assert out.shape == (B, Hq, 1, D) and out.dtype == q.dtype and out.is_contiguous(), "bad `out`"
    fuse = cfg.fuse_reduce and not single
    counters = split_counters(q.device, B * (H if use_dot else Hq)) if fuse else out  # `out`: never read
    if single:
        op = om = ol = out
    else:
        op = torch.empty(B * Hq * S, D, dtype=torch.float32, device=q.device)
        om = torch.empty(B * Hq * S, dtype=torch.float32, device=q.device)
        ol = torch.empty(B * Hq * S, dtype=torch.float32, device=q.device)
    grid = (S, H, B) if use_dot else (rep * S, H, B)
    _launch(fn, grid, kernel_args(op, om, ol, out, counters, chunk, res_split, S),
            dict(common, SINGLE=single, FUSE_REDUCE=fuse))
    if not single and not fuse:
        _launch(_kvpass_decode_reduce, (B * Hq,), (op, om, ol, out, S),
                dict(HEAD_DIM=D, D_PAD=D_PAD, S_BLOCK=min(64, max(2, _next_pow2(S))), num_warps=4))
    return out


_LOGGED: set = set()


def _log_once(msg: str) -> None:
    if msg not in _LOGGED:
        _LOGGED.add(msg)
        log.info(msg)


def _launch(fn, grid, args, kw):
    """Plain Triton launch. (A direct call of the cached CompiledKernel's launcher was tried to cut
    host time; on Triton 3.6 its argument convention differs from 3.9's and its self-test failed,
    so it was removed: benchmarks/NOTES.md, "host overhead".)"""
    fn[grid](*args, **kw)


def store_spec(store, q: torch.Tensor) -> DecodeSpec:
    return DecodeSpec(store.cfg.key_bits, store.cfg.value_bits, store.cfg.group_size, store.Dk, q.dtype,
                      q.shape[1] // store.H)


def decode_attention_store(q, store, attn_mask=None, kv_len=None, sm_scale=None, config=None, out=None, softcap=0.0):
    """`decode_attention` over a kvpass KVStore (kvpass/store.py). A store in device-lengths mode
    (`store.device_lengths` not None) is read through its device lengths and whole window buffers
    (capturable; kv_len required); otherwise through its host lengths and window views."""
    kb, vb = store.keys.buffers, store.values.buffers
    lengths = getattr(store, "device_lengths", None)
    if lengths is not None:
        if kv_len is None:
            raise ValueError("kvpass decode kernel: a store with device lengths needs kv_len (its static width)")
        res_k, res_v, Lq, L = store.window_k, store.window_v, None, None  # no host length: no sync
    else:
        res_k, res_v, Lq, L = store.res_k, store.res_v, store.quantized_length, store.length
    return decode_attention(
        q, kb["codes"], kb["scale"], kb["zero"], vb["codes"], vb["scale"], vb["zero"], res_k, res_v,
        key_bits=store.cfg.key_bits, value_bits=store.cfg.value_bits, group_size=store.cfg.group_size,
        quantized_length=Lq, length=L, kv_len=kv_len, sm_scale=sm_scale,
        attn_mask=attn_mask, config=config, out=out, lengths=lengths, softcap=softcap,
    )
