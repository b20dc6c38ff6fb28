"""Decode attention on tensor cores with explicit register layouts (Gluon), for GQA/MQA and MHA
(1..8 query heads per KV head), for decode steps with device lengths (the CUDA-graph path) or host
lengths (eager steps, dynamic caches). GPU only (Gluon has no interpreter), checked against the
reference by tests/test_decode_mma.py on the device; `decode_attention` uses it when
`DecodeConfig.use_mma` is set (the default) and `mma_unsupported` accepts the call (head_dim 128,
bits 2/4, ...), else the Triton kernel with a log line. Attention masks (bool or additive, per batch
row or per head) are applied to the scores; HF passes one at every decode step. A logit softcap
(Gemma2) is applied to the scores before the mask (SOFTCAP).

Why: the Triton tensor-core variant (`_kvpass_decode_dot`) spends ~1450 thread-instructions per
token and KV head (SASS, 2-bit G32, 4 query heads): Triton stages the unpacked codes through shared
memory to reach the MMA operand layouts and pads the 4 query heads to 16 MMA rows. Here the codes
are loaded straight into the MMA operand registers and the query heads are the MMA's N = 8 side:
    S^T [BLOCK_N tok, 8 heads] = (codes * s_k + z_k) [tok, D] @ q^T [D, 8]   (mma m16n8k16, A = keys)
    O^T [D, 8 heads]         += (codes * s_v + z_v)^T [D, tok] @ P^T [tok, 8]
Constexprs (header of `_kvpass_decode_mma`):
    BITS                   2 or 4 (same width for keys and values)
    GROUP_SIZE             32, 64, 128 (one key group per BLOCK_N = 32 tokens or a multiple)
    HEAD_DIM               128
    REP                    query heads per KV head, 1..8 (the MMA's N = 8). MHA (REP 1) leaves 7 of
                           the 8 columns zero: the MMAs are 32 of ~690 instructions per step, and the
                           unpack, which dominates, is per KV head (session 15: faster than the rows
                           kernel for MHA, see `default_config_for`)
    dtype                  fp16 / bf16 models (q, window, output); scales/zeros fp16
Register layouts (one warp, lane = 4 * g + r):
    key codes    A [32 tok, 128 kappa]: lane owns tokens g + 8i and the 32 channels of bytes
                 [8r, 8r + 8) (2-bit) of each row: one 8/16-byte load per token; kappa is a
                 permutation of the channels (`_kappa_order`: adjacent channels 2i, 2i + 1 share a
                 register) applied to q by the same reshape/permute
    key scales   the lane's 32 channels of the group, read from shared memory as they lie in memory
                 (pairs of adjacent channels = one f16x2 register, `_key_pairs`); the groups arrive
                 by cp.async one group ahead (2-group buffer)
    value codes  A [128 d, 32 tok] (transposed): lane owns the channels of word g (2-bit) and
                 tokens 2r, 2r + 1 (+ 8i): pairs of tokens share one f16x2 register; the output
                 channel order d follows (`_sigma`), undone at the store.
Math as in decode_attention.py (log2 domain, lazy running max). Keys and values are dequantized in
fp16 by magic-number unpacking and one fma per pair; bf16 models use `_v_pair_asm`'s one-fma form
(its extra rounding stays below bf16's), fp16 models the exact code first. q is an fp16 B operand
scaled by 2**-qpow (exact; a bf16 q fits fp16 range) with 2**qpow folded into the score scale.
The loop runs over full 32-token steps without masks, software-pipelined: an iteration runs the
softmax and value MMA of step t and the key dequant and score MMA of step t + 32 in one basic
block (ptxas interleaves the two dependency chains; the lazy-max branch comes first, on a block
max computed the iteration before). Its loads (key words of t + 64, values and value scales of
t + 32) are consumed one iteration later, from registers; value scales stay 32-bit registers so
that ptxas does not pack 16-bit halves right at the load (which waits for it). Each lane issues
these loads from the address of its first element plus immediate offsets (`_lane_loads_asm`):
Triton would compute and carry one 64-bit address per element (2-bit G32: 787 -> 694 SASS
instructions per step). A split's partial last step (if its end is not a multiple of 32) runs once
after the loop, masked, with ordinary loads. The full-precision window runs after the quantized
tokens, on the splits that have none where there are such splits and the rows fit them (`window_splits`),
else every S-th row on every split.
"""
from __future__ import annotations

import logging
import math

import torch
import triton  # (gluon needs triton imported first)
from triton.compiler.errors import CompilationError
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2

from kvpass.templates.decode_attention import _log_once
from kvpass.templates.decode_configs import resident_programs

log = logging.getLogger("kvpass")

BLOCK_N = 32

# Triton API renames the kernel meets on 3.6 and 3.9 (tests/test_decode_mma.py compiles it offline).
# Global -> shared cp.async: `async_load` in 3.9, where `async_copy_global_to_shared` (3.6) raises
# "has been removed"; same arguments (smem, pointers, mask).
_async_load = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
# CTA barrier: `gl.barrier` in newer Triton (3.9 has no `thread_barrier`), `gl.thread_barrier` in 3.6
_cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier


def resident_per_sm(max_regs: int) -> int:
    """One-warp programs resident per SM for the split plan (`resident_programs`, H100 limits) at
    `max_regs` registers per thread (0: uncapped, where the kernel takes ~236-255): 8 uncapped and
    for caps down to 169, 12 for caps of 129-168, 16 from 128 down."""
    return resident_programs(max_regs or 255, 1, 0)


MMA = gl.constexpr(gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8]))
OPA = gl.constexpr(gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2))
OPB = gl.constexpr(gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2))


def _pair_lines(src: str, pos: int, bits: int, fold: bool, s2: str, z2: str, out: str) -> list[str]:
    """PTX lines for one code pair of an unpack (registers t, u, one, neg declared by the caller): the
    codes sit at bit `pos` of both 16-bit halves of `src`; shift them under the magic number's
    exponent (fold: to the top `bits` of the mantissa, exactly 2**bits + code; otherwise to the low
    bits, 1024 + code, and one fma subtracts 1024 exactly), then t * s2 + z2 into `out`."""
    top = 10 - bits if fold else 0
    magic = (bits + 15) << 10 if fold else 0x6400
    mask = ((1 << bits) - 1) << top
    lines, sh = [], pos - top
    if sh:
        lines.append(f"{'shr' if sh > 0 else 'shl'}.b32 u, {src}, {abs(sh)};")
        src = "u"
    lines.append(f"lop3.b32 t, {src}, 0x{mask | (mask << 16):08X}, 0x{magic | (magic << 16):08X}, 0xea;")
    if not fold:
        lines.append("fma.rn.f16x2 t, t, one, neg;")
    return lines + [f"fma.rn.f16x2 t, t, {s2}, {z2};", f"mov.b32 {out}, t;"]


def _v_pair_asm(bits: int, fold: bool) -> tuple[str, str]:
    """PTX: words a, b of two tokens (same channels) and their value scale/zero -> 2 * n fp16 values
    code * s + z, outputs $c (token a, code c) and $(n + c) (token b) share one f16x2 register.
    The two words are interleaved by halves first (prmt), so one lop3 extracts code c of both.
    fold=False: each code is shifted to the low mantissa bits under 1024 (lop3 gives 1024 + code),
    one fma subtracts 1024 exactly, a second applies s and z (one rounding of v).
    fold=True: each code is moved to the top `bits` of the mantissa under the exponent of
    M = 2**bits (lop3 gives exactly M + code) and one fma gives (M + code) * s + z' with
    z' = z - M * s (one fma per token pair): one fma per value less, at one more fp16 rounding,
    of |z - M * s| (~ |z| + range): up to ~3.5 half-ulps of max |v| instead of 1 (CPU emulation)."""
    n = 32 // bits
    half = n // 2
    magic = (bits + 15) << 10
    wa, wb, sa, sb, za, zb = (f"${2 * n + i}" for i in range(6))
    lines = ["{", ".reg .b32 lo, hi, t, u, one, neg, s2, z2;", f"mov.b32 s2, {{{sa}, {sb}}};",
             f"mov.b32 z2, {{{za}, {zb}}};"]
    if fold:
        neg_m = 0x8000 | magic    # -2**bits
        lines += [f"mov.b32 neg, 0x{neg_m | (neg_m << 16):08X};", "fma.rn.f16x2 z2, s2, neg, z2;"]
    else:
        lines += ["mov.b32 one, 0x3C003C00;", "mov.b32 neg, 0xE400E400;"]
    lines += [f"prmt.b32 lo, {wa}, {wb}, 0x5410;", f"prmt.b32 hi, {wa}, {wb}, 0x7632;"]
    for c in range(n):
        lines += _pair_lines("lo" if c < half else "hi", (c % half) * bits, bits, fold, "s2", "z2", f"{{${c}, ${n + c}}}")
    lines.append("}")
    return "\n".join(lines), ",".join(["=h"] * (2 * n) + ["r", "r", "h", "h", "h", "h"])


def _k_word_asm(bits: int, fold: bool) -> tuple[str, str]:
    """PTX: one key word (n = 32 // bits codes) and the scale/zero pairs of its channels -> n fp16
    keys code * s + z. Pair i = codes 2i and 2i + 1 (adjacent channels, so their scales are one
    f16x2 register of the group's scale vector as it lies in memory, `_key_pairs`): the word and
    the word shifted by `bits` are interleaved by halves (prmt), so code 2i sits in the low half and
    code 2i + 1 at the same place in the high half; one lop3 extracts both. fold as in `_v_pair_asm`
    (one fma per pair, zeros already z - 2**bits * s); otherwise the exact code first, then one fma.
    Outputs $2i and $(2i + 1) share one f16x2 register."""
    n = 32 // bits
    half = n // 2
    w = f"${n}"
    lines = ["{", ".reg .b32 t, u, x, y, one, neg;", f"shr.u32 u, {w}, {bits};", f"prmt.b32 x, {w}, u, 0x5410;",
             f"prmt.b32 y, {w}, u, 0x7632;"]
    if not fold:
        lines += ["mov.b32 one, 0x3C003C00;", "mov.b32 neg, 0xE400E400;"]
    for i in range(half):
        src, pos = ("x", 2 * i * bits) if i < half // 2 else ("y", 2 * (i - half // 2) * bits)
        lines += _pair_lines(src, pos, bits, fold, f"${n + 1 + i}", f"${n + 1 + half + i}", f"{{${2 * i}, ${2 * i + 1}}}")
    lines.append("}")
    return "\n".join(lines), ",".join(["=h"] * n + ["r"] * (1 + 2 * half))


def _kz_pair_asm(bits: int, fold: bool) -> str:
    """PTX: the scales and zeros of channels 2i, 2i + 1 (fp16 halves) -> f16x2 registers {s_2i, s_2i+1}
    and {z_2i, z_2i+1} (fold: z - 2**bits * s, `_k_word_asm`'s one-fma form). The halves come from
    one 32-bit register of a vector load, so the packing is free."""
    lines = ["{", "mov.b32 $0, {$2, $3};", "mov.b32 $1, {$4, $5};"]
    if fold:
        neg_m = 0x8000 | ((bits + 15) << 10)
        lines += [".reg .b32 neg;", f"mov.b32 neg, 0x{neg_m | (neg_m << 16):08X};", "fma.rn.f16x2 $1, $0, neg, $1;"]
    lines.append("}")
    return "\n".join(lines)


def _lane_loads_asm(kind: str, bits: int, ng: int) -> tuple[str, str, int]:
    """PTX loading all elements that one lane holds of a step's key words ("k", `_word_layout_k`),
    value words ("v", `_word_layout_v`) or value scales/zeros ("s", same layout, zero-extended to 32
    bits), from the address of the lane's first element plus immediate offsets: one 64-bit address
    per lane and tensor instead of one per element (Triton computes and carries one per element:
    2-bit G32 787 -> 694 instructions per step). HEAD_DIM 128 (the kernel's only head dim).
    Returns (asm, constraints, pack = elements per lane). Lane 4g + r:
        k: tokens g + 8i (i < 4), words [r * nwt, (r + 1) * nwt): element i * nwt + w, one vector load per i
        v, s: words (g * nwt + w) of tokens 2r + j + 8i: element k = i * 2 * nwt + w * 2 + j
           (2-bit nwt = 1, 4-bit nwt = 2; s: the words of a lane share one group, so w = 1 copies w = 0)."""
    nw = 128 * bits // 32                     # words per token
    lines = ["{"]
    if kind == "k":
        nwt = nw // 4
        n = 4 * nwt
        vec = "" if nwt == 1 else f".v{nwt}"
        for i in range(4):
            regs = ", ".join(f"${i * nwt + w}" for w in range(nwt))
            lines.append(f"ld.global{vec}.b32 {{{regs}}}, [${n}+{8 * i * nw * 4}];")
    else:
        nwt = 1 if bits == 2 else 2
        n = 8 * nwt
        for i in range(4):
            for j in range(2):
                k0 = i * 2 * nwt + j
                if kind == "s":
                    lines.append(f"ld.global.u16 ${k0}, [${n}+{(j + 8 * i) * ng * 2}];")
                    lines += [f"mov.b32 ${k0 + 2 * w}, ${k0};" for w in range(1, nwt)]
                else:
                    regs = ", ".join(f"${k0 + 2 * w}" for w in range(nwt))
                    vec = "" if nwt == 1 else f".v{nwt}"
                    lines.append(f"ld.global{vec}.b32 {{{regs}}}, [${n}+{(j + 8 * i) * nw * 4}];")
    lines.append("}")
    return "\n".join(lines), ",".join(["=r"] * n + ["l"] * n), n


_V_ASM = {(bits, fold): _v_pair_asm(bits, fold) for bits in (2, 4) for fold in (False, True)}
_K_ASM = {(bits, fold): _k_word_asm(bits, fold) for bits in (2, 4) for fold in (False, True)}
_KZ_ASM = {(bits, fold): _kz_pair_asm(bits, fold) for bits in (2, 4) for fold in (False, True)}
_ASM = {"k": _K_ASM, "v": _V_ASM}
_LANE_LOADS = {(kind, bits, ng): _lane_loads_asm(kind, bits, ng) for kind in "kvs" for bits in (2, 4) for ng in (1, 2, 4)}


@gluon.constexpr_function
def _loads_asm(kind, bits, ng):
    return _LANE_LOADS[(kind, bits, ng)][0]


@gluon.constexpr_function
def _loads_constraints(kind, bits, ng):
    return _LANE_LOADS[(kind, bits, ng)][1]


@gluon.constexpr_function
def _loads_pack(kind, bits, ng):
    return _LANE_LOADS[(kind, bits, ng)][2]


@gluon.constexpr_function
def _asm(kind, bits, fold):
    """PTX of the key ("k", `_k_word_asm`) or value ("v", `_v_pair_asm`) unpack."""
    return _ASM[kind][(bits, fold)][0]


@gluon.constexpr_function
def _constraints(kind, bits):
    return _ASM[kind][(bits, False)][1]


@gluon.constexpr_function
def _kz_asm(bits, fold):
    return _KZ_ASM[(bits, fold)]


@gluon.constexpr_function
def _v_dtypes(bits):
    """One fp16 output per value of two tokens' words: 2 * 32 // bits."""
    return (gl.float16,) * (64 // bits)


@gluon.constexpr_function
def _word_layout_k(nwt):
    """K words [BLOCK_N tok, NW]: lane 4g + r holds tokens g + 8i and words [r * nwt, (r + 1) * nwt)."""
    return gl.BlockedLayout(size_per_thread=[1, nwt], threads_per_warp=[8, 4], warps_per_cta=[1, 1], order=[1, 0])


@gluon.constexpr_function
def _word_layout_v(nwt):
    """V words [NW, BLOCK_N tok]: lane 4g + r holds words [g * nwt, (g + 1) * nwt) of tokens 2r, 2r + 1 (+ 8i)."""
    return gl.BlockedLayout(size_per_thread=[nwt, 2], threads_per_warp=[8, 4], warps_per_cta=[1, 1], order=[1, 0])


@gluon.constexpr_function
def _q_layout():
    """[8 heads, 4 r, 32 j]: lane 4g + r holds head g's channels [32r, 32r + 32)."""
    return gl.DistributedLinearLayout(reg_bases=[[0, 0, 1], [0, 0, 2], [0, 0, 4], [0, 0, 8], [0, 0, 16]],
                                      lane_bases=[[0, 1, 0], [0, 2, 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]],
                                      warp_bases=[], block_bases=[], shape=[8, 4, 32])


@gluon.jit
def _tree4(x):
    """Join 4 tensors x[k] into trailing dims (k1, k0), the highest bit of k first."""
    return gl.join(gl.join(x[0], x[2]), gl.join(x[1], x[3]))


@gluon.jit
def _tree8(x):
    """Join 8 tensors x[k] into trailing dims (k2, k1, k0), the highest bit of k first."""
    return _tree4((gl.join(x[0], x[4]), gl.join(x[1], x[5]), gl.join(x[2], x[6]), gl.join(x[3], x[7])))


@gluon.jit
def _tree(o, BITS: gl.constexpr):
    """Join the code tensors o[c] (n = 32 // BITS codes) into trailing dims (c_top, ..., c0): the
    highest code bit first (c and c + n/2 are the two halves of one packed instruction)."""
    if BITS == 2:
        return _tree8((gl.join(o[0], o[8]), gl.join(o[1], o[9]), gl.join(o[2], o[10]), gl.join(o[3], o[11]),
                       gl.join(o[4], o[12]), gl.join(o[5], o[13]), gl.join(o[6], o[14]), gl.join(o[7], o[15])))
    else:
        return _tree8(o)


@gluon.jit
def _tree_pairs(o, BITS: gl.constexpr):
    """Join the key tensors o[c] (codes 2i, 2i + 1 are the halves of one register) into trailing dims
    (c0, c_top, ..., c1)."""
    if BITS == 2:
        return _tree8((gl.join(o[0], o[1]), gl.join(o[2], o[3]), gl.join(o[4], o[5]), gl.join(o[6], o[7]),
                       gl.join(o[8], o[9]), gl.join(o[10], o[11]), gl.join(o[12], o[13]), gl.join(o[14], o[15])))
    else:
        return _tree4((gl.join(o[0], o[1]), gl.join(o[2], o[3]), gl.join(o[4], o[5]), gl.join(o[6], o[7])))


@gluon.jit
def _kappa_order(x, LEAD: gl.constexpr, BITS: gl.constexpr):
    """x [*LEAD dims, 4 r, 32 j] (j = wl * n + c: word wl of lane group r, code c) -> [*LEAD, 128]
    in MMA k order kappa = (wl, c_top .. c1, r, c0): lane bits land on kappa bits 1, 2 and the
    packed pair (c0: channels 2i, 2i + 1) on kappa bit 0, as the A/B operand layouts want them.
    LEAD is 0 or 1."""
    if BITS == 2:   # j = wl * 16 + c, wl in 0..1
        if LEAD == 0:
            y = gl.reshape(x, [4, 2, 2, 2, 2, 2])                  # r, wl, c3, c2, c1, c0
            y = gl.permute(y, [1, 2, 3, 4, 0, 5])
        else:
            y = gl.reshape(x, [x.shape[0], 4, 2, 2, 2, 2, 2])
            y = gl.permute(y, [0, 2, 3, 4, 5, 1, 6])
    else:           # j = wl * 8 + c, wl in 0..3
        if LEAD == 0:
            y = gl.reshape(x, [4, 4, 2, 2, 2])                     # r, wl, c2, c1, c0
            y = gl.permute(y, [1, 2, 3, 0, 4])
        else:
            y = gl.reshape(x, [x.shape[0], 4, 4, 2, 2, 2])
            y = gl.permute(y, [0, 2, 3, 4, 1, 5])
    if LEAD == 0:
        return gl.reshape(y, [128])
    else:
        return gl.reshape(y, [x.shape[0], 128])


@gluon.constexpr_function
def _kz_layout(nw, n):
    """Key scales (or zeros) of a group as [NW words, n codes] (channel w * n + c): lane 4g + r holds
    the words [r * nwt, (r + 1) * nwt) with all their codes (the words `_word_layout_k` gives it),
    the same for every g; codes first in registers (vector loads from shared memory)."""
    nwt = nw // 4
    regs = [[0, 1 << i] for i in range(n.bit_length() - 1)] + [[1 << i, 0] for i in range(nwt.bit_length() - 1)]
    return gl.DistributedLinearLayout(reg_bases=regs, lane_bases=[[nwt, 0], [2 * nwt, 0], [0, 0], [0, 0], [0, 0]],
                                      warp_bases=[], block_bases=[], shape=[nw, n])


@gluon.constexpr_function
def _kz_copy_layout(nw, n):
    """[NW, n] halves (128), 4 contiguous per lane: one 8-byte cp.async per lane."""
    return gl.BlockedLayout(size_per_thread=[1, 4], threads_per_warp=[32 * 4 // n, n // 4], warps_per_cta=[1, 1],
                            order=[1, 0])


@gluon.jit
def _split_cols(x):
    """x [NW, H] (H = 4 or 8) -> the tuple of its H columns [NW], column k at index k."""
    NW: gl.constexpr = x.shape[0]
    H: gl.constexpr = x.shape[1]
    e, o = gl.split(gl.reshape(x, [NW, H // 2, 2]))         # even / odd k
    if H == 8:
        ee, eo = gl.split(gl.reshape(e, [NW, 2, 2]))        # k = 0, 4 / 2, 6
        oe, oo = gl.split(gl.reshape(o, [NW, 2, 2]))        # k = 1, 5 / 3, 7
        k0, k4 = gl.split(ee)
        k2, k6 = gl.split(eo)
        k1, k5 = gl.split(oe)
        k3, k7 = gl.split(oo)
        return k0, k1, k2, k3, k4, k5, k6, k7
    else:
        k0, k2 = gl.split(e)
        k1, k3 = gl.split(o)
        return k0, k1, k2, k3


@gluon.jit
def _key_pairs(ks_buf, kz_buf, BITS: gl.constexpr, FOLD: gl.constexpr):
    """The key group's scales and zeros in shared memory ([NW, n] each) -> two tuples of n/2 int32
    tensors [NW]: pair i = f16x2 {s (or z) of code 2i, of code 2i + 1}."""
    NW: gl.constexpr = ks_buf.shape[0]
    N: gl.constexpr = ks_buf.shape[1]
    ks = ks_buf.load(_kz_layout(NW, N))
    kz = kz_buf.load(_kz_layout(NW, N))
    s_lo, s_hi = gl.split(gl.reshape(ks, [NW, N // 2, 2]))
    z_lo, z_hi = gl.split(gl.reshape(kz, [NW, N // 2, 2]))
    s2, z2 = gl.inline_asm_elementwise(_kz_asm(BITS, FOLD), "=r,=r,h,h,h,h", [s_lo, s_hi, z_lo, z_hi],
                                       dtype=(gl.int32, gl.int32), is_pure=True, pack=1)
    return _split_cols(s2), _split_cols(z2)


@gluon.jit
def _words_b(x, WK: gl.constexpr):
    """[NW] per-word register -> [1, NW] in `WK` (broadcast over the tokens)."""
    return gl.expand_dims(gl.convert_layout(x, gl.SliceLayout(0, WK)), 0)


@gluon.jit
def _key_vals(kw, s2, z2, BITS: gl.constexpr, FOLD: gl.constexpr, WK: gl.constexpr):
    """Key words [32 tok, NW] and their channels' scale/zero pairs (`_key_pairs`) -> fp16 keys
    code * s + z [32 tok, 128 kappa] in the A operand layout."""
    if BITS == 2:
        o = gl.inline_asm_elementwise(
            _asm("k", 2, FOLD), _constraints("k", 2),
            [kw, _words_b(s2[0], WK), _words_b(s2[1], WK), _words_b(s2[2], WK), _words_b(s2[3], WK),
             _words_b(s2[4], WK), _words_b(s2[5], WK), _words_b(s2[6], WK), _words_b(s2[7], WK),
             _words_b(z2[0], WK), _words_b(z2[1], WK), _words_b(z2[2], WK), _words_b(z2[3], WK),
             _words_b(z2[4], WK), _words_b(z2[5], WK), _words_b(z2[6], WK), _words_b(z2[7], WK)],
            dtype=(gl.float16,) * 16, is_pure=True, pack=1)
        t = _tree_pairs(o, 2)                               # [32, NW, c0, c3, c2, c1]
        t = gl.reshape(t, [32, 4, 2, 2, 2, 2, 2])                  # tok, r, wl, c0, c3, c2, c1
        t = gl.permute(t, [0, 2, 4, 5, 6, 1, 3])                   # tok, (wl, c3, c2, c1, r, c0)
    else:
        o = gl.inline_asm_elementwise(
            _asm("k", 4, FOLD), _constraints("k", 4),
            [kw, _words_b(s2[0], WK), _words_b(s2[1], WK), _words_b(s2[2], WK), _words_b(s2[3], WK),
             _words_b(z2[0], WK), _words_b(z2[1], WK), _words_b(z2[2], WK), _words_b(z2[3], WK)],
            dtype=(gl.float16,) * 8, is_pure=True, pack=1)
        t = _tree_pairs(o, 4)                               # [32, NW, c0, c2, c1]
        t = gl.reshape(t, [32, 4, 4, 2, 2, 2])                     # tok, r, wl, c0, c2, c1
        t = gl.permute(t, [0, 2, 4, 5, 1, 3])                      # tok, (wl, c2, c1, r, c0)
    return gl.convert_layout(gl.reshape(t, [32, 128]), OPA)


@gluon.jit
def _value_vals(vw, vs, vz, BITS: gl.constexpr, FOLD: gl.constexpr):
    """Value words [NW, 32 tok] with their fp16 scale/zero (same shape) -> fp16 values, transposed
    [128 d, 32 tok] in the A operand layout; d = (wl, c, g) order (`_sigma`). FOLD: `_v_pair_asm`'s
    one-fma form (bf16 models: its extra rounding stays below the reference's bf16 rounding of V)."""
    NW: gl.constexpr = vw.shape[0]
    we, wo = gl.split(gl.reshape(vw, [NW, 16, 2]))
    se, so = gl.split(gl.reshape(vs, [NW, 16, 2]))
    ze, zo = gl.split(gl.reshape(vz, [NW, 16, 2]))
    o = gl.inline_asm_elementwise(_asm("v", BITS, FOLD), _constraints("v", BITS), [we, wo, se, so, ze, zo],
                                  dtype=_v_dtypes(BITS), is_pure=True, pack=1)
    if BITS == 2:
        u = (gl.join(o[0], o[16]), gl.join(o[1], o[17]), gl.join(o[2], o[18]), gl.join(o[3], o[19]),
             gl.join(o[4], o[20]), gl.join(o[5], o[21]), gl.join(o[6], o[22]), gl.join(o[7], o[23]),
             gl.join(o[8], o[24]), gl.join(o[9], o[25]), gl.join(o[10], o[26]), gl.join(o[11], o[27]),
             gl.join(o[12], o[28]), gl.join(o[13], o[29]), gl.join(o[14], o[30]), gl.join(o[15], o[31]))
        t = _tree(u, 2)                                     # [NW=8 g, 16 th, j, c3, c2, c1, c0]
        t = gl.permute(t, [3, 4, 5, 6, 0, 1, 2])                   # c3 c2 c1 c0, g, th, j
    else:
        u = (gl.join(o[0], o[8]), gl.join(o[1], o[9]), gl.join(o[2], o[10]), gl.join(o[3], o[11]),
             gl.join(o[4], o[12]), gl.join(o[5], o[13]), gl.join(o[6], o[14]), gl.join(o[7], o[15]))
        t = _tree(u, 4)                                     # [NW=16, 16 th, j, c2, c1, c0]
        t = gl.reshape(t, [8, 2, 16, 2, 2, 2, 2])                  # g, wl, th, j, c2, c1, c0
        t = gl.permute(t, [1, 4, 5, 6, 0, 2, 3])                   # wl, c2 c1 c0, g, th, j
    return gl.convert_layout(gl.reshape(t, [128, 32]), OPA)


@gluon.jit
def _sigma(d, BITS: gl.constexpr):
    """Memory channel of accumulator row d (d = (wl * n + c) * 8 + g; word g * nwt + wl holds it)."""
    if BITS == 2:
        return (d % 8) * 16 + d // 8
    else:
        return ((d % 8) * 2 + d // 64) * 8 + (d // 8) % 8


@gluon.jit
def _sigma_order(x, BITS: gl.constexpr):
    """x [32 rows, 128 channels] in memory order -> [128 d, 32 rows] in accumulator row order (`_sigma`)."""
    if BITS == 2:
        y = gl.permute(gl.reshape(x, [32, 8, 16]), [2, 1, 0])            # c, g, rows
    else:
        y = gl.permute(gl.reshape(x, [32, 8, 2, 8]), [2, 3, 1, 0])       # wl, c, g, rows
    return gl.reshape(y, [128, 32])


@gluon.jit
def _lane_rows(p):
    """p [32 tok, 8 heads] (MMA layout: lane g holds rows g + 8a) -> [8 g, 8 heads]: the sum of each
    lane's own 4 rows, no cross-lane reduction (the softmax denominator is reduced once, at the end)."""
    return gl.sum(gl.reshape(p, [4, 8, 8]), axis=0)


@gluon.jit
def _lazy_rescale(m_blk, m_i, acc, l_part):
    """The running max raised only when a block's max m_blk [8 heads] exceeds it by > 8 (then acc and
    the per-lane partial denominators l_part (`_lane_rows`) are rescaled)."""
    if gl.max((m_blk > m_i + 8.0).to(gl.int32), axis=0) > 0:
        m_new = gl.maximum(m_i, m_blk)
        alpha = gl.exp2(m_i - gl.where(m_new == float("-inf"), 0.0, m_new))
        acc = acc * gl.expand_dims(alpha, 0)
        l_part = l_part * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(0, l_part.type.layout)), 0)
        m_i = m_new
    return m_i, acc, l_part


@gluon.jit
def _probs(s, m_i, l_part):
    """p = 2**(s - m_i) [32 tok, 8 heads] and the partial denominators with p added."""
    p = gl.exp2(s - gl.expand_dims(gl.where(m_i == float("-inf"), 0.0, m_i), 0))
    return p, l_part + _lane_rows(p)


@gluon.jit
def _lazy_softmax(s, m_i, acc, l_part):
    """s [32 tok, 8 heads] (log2 domain); `_lazy_rescale`, then `_probs`."""
    m_i, acc, l_part = _lazy_rescale(gl.max(s, axis=0), m_i, acc, l_part)
    p, l_part = _probs(s, m_i, l_part)
    return p, m_i, acc, l_part


@gluon.jit
def _step_pointers(kc_base, vc_base, vs_base, t, kt, kwi, vt, vwi, NW: gl.constexpr, NG: gl.constexpr,
                   GROUP_SIZE: gl.constexpr):
    """Pointers of the 32-token step at t: key words [32 tok, NW] (`_word_layout_k`), value words
    [NW, 32 tok] (`_word_layout_v`) and the value scale/zero offsets of the same shape (word w holds
    channels of group w * CPW // GROUP_SIZE)."""
    CPW: gl.constexpr = 128 // NW
    kp = kc_base + gl.expand_dims(t + kt, 1) * NW + gl.expand_dims(kwi, 0)
    vp = vc_base + gl.expand_dims(t + vt, 0) * NW + gl.expand_dims(vwi, 1)
    vsp = vs_base + gl.expand_dims(t + vt, 0) * NG + gl.expand_dims((vwi * CPW) // GROUP_SIZE, 1)
    return kp, vp, vsp


@gluon.jit
def _lane_loads(ptrs, KIND: gl.constexpr, BITS: gl.constexpr, NG: gl.constexpr):
    """The elements of `ptrs` (a step's key words, value words or value scales/zeros) as int32, by
    `_lane_loads_asm`: one asm per lane (`pack` covers all its elements; only the first pointer is
    read, so ptxas drops the others)."""
    return gl.inline_asm_elementwise(_loads_asm(KIND, BITS, NG), _loads_constraints(KIND, BITS, NG), [ptrs],
                                     dtype=gl.int32, is_pure=True, pack=_loads_pack(KIND, BITS, NG))


@gluon.jit
def _key_loads(kp, t, kt, end, MASKED: gl.constexpr, BITS: gl.constexpr):
    """Key words [32 tok, NW] of the 32-token step at t (MASKED: tokens at or past `end` read zeros)."""
    if MASKED:
        return gl.load(kp, mask=gl.expand_dims(t + kt < end, 1), other=0)
    else:
        return _lane_loads(kp, "k", BITS, 1)


@gluon.jit
def _value_loads(vp, VSI, VZI, vsp, t, vt, end, MASKED: gl.constexpr, BITS: gl.constexpr, NG: gl.constexpr):
    """Value words [NW, 32 tok] of the step at t and its value scales/zeros as zero-extended int32
    (fp16 halves would be packed in pairs right at the load, which waits for it and undoes the
    prefetch). MASKED: tokens at or past `end` read zeros."""
    if MASKED:
        vmask = gl.expand_dims(t + vt < end, 0)
        return (gl.load(vp, mask=vmask, other=0), gl.load(VSI + vsp, mask=vmask, other=0).to(gl.int32),
                gl.load(VZI + vsp, mask=vmask, other=0).to(gl.int32))
    else:
        return _lane_loads(vp, "v", BITS, 1), _lane_loads(VSI + vsp, "s", BITS, NG), _lane_loads(VZI + vsp, "s", BITS, NG)


@gluon.jit
def _group_copy(ks_buf, kz_buf, KS, KZ, ks_base, g, cp_off, ok, HEAD_DIM: gl.constexpr):
    """cp.async of key group g's scales and zeros (128 channels each, [NW, n]) into ks_buf, kz_buf, if `ok`."""
    off = ks_base + g * HEAD_DIM + cp_off
    _async_load(ks_buf, KS + off, mask=(cp_off >= 0) & ok)
    _async_load(kz_buf, KZ + off, mask=(cp_off >= 0) & ok)
    async_copy.commit_group()


@gluon.jit
def _q_kappa(Q, q_base, s_qh, REP: gl.constexpr, BITS: gl.constexpr, VOLATILE: gl.constexpr):
    """The REP query rows of this KV head as fp32 [128 kappa, 8] (rows >= REP zero)."""
    QL: gl.constexpr = _q_layout()
    qh = gl.arange(0, 8, gl.SliceLayout(1, gl.SliceLayout(2, QL)))
    qr = gl.arange(0, 4, gl.SliceLayout(0, gl.SliceLayout(2, QL)))
    qj = gl.arange(0, 32, gl.SliceLayout(0, gl.SliceLayout(1, QL)))
    qoff = (gl.expand_dims(gl.expand_dims(qh * s_qh, 1), 2) + gl.expand_dims(gl.expand_dims(qr * 32, 0), 2)
            + gl.expand_dims(gl.expand_dims(qj, 0), 1))
    qmask = gl.expand_dims(gl.expand_dims(qh < REP, 1), 2) & (qoff >= 0)
    q3 = gl.load(Q + q_base + qoff, mask=qmask, other=0.0, volatile=VOLATILE)
    return gl.permute(_kappa_order(q3.to(gl.float32), 1, BITS), [1, 0])


@gluon.jit
def _group_begin(ks_smem, kz_smem, KS, KZ, ks_base, cp_off, t0, end, GROUP_SIZE: gl.constexpr,
                 HEAD_DIM: gl.constexpr):
    """When a key group starts at t0: wait for its scales/zeros and start the copy of the next group's."""
    if t0 % GROUP_SIZE == 0:
        g = t0 // GROUP_SIZE
        async_copy.wait_group(0)
        _cta_barrier()
        _group_copy(ks_smem.index((g + 1) % 2), kz_smem.index((g + 1) % 2), KS, KZ, ks_base, g + 1, cp_off,
                    (g + 1) * GROUP_SIZE < end, HEAD_DIM)


@gluon.jit
def _softcap(s, CAP: gl.constexpr):
    """CAP * tanh(s / CAP) of log2-domain scores (CAP = the model's softcap * log2(e)); the Gluon twin
    of decode_attention's `_softcap` (Gluon kernels cannot call triton.jit helpers)."""
    e = gl.exp2(s * (2.0 * 1.4426950408889634 / CAP))
    return CAP - (2.0 * CAP) / (e + 1.0)


@gluon.jit
def _step_scores(kw, ks_smem, kz_smem, q16, qk_keys, t0, BITS: gl.constexpr, GROUP_SIZE: gl.constexpr,
                 FOLD: gl.constexpr, WK: gl.constexpr, SOFTCAP: gl.constexpr):
    """Scores [32 tok, 8 heads] (log2 domain) of the 32-token step at t0 from its key words, S = K q
    (keys dequantized in the A operand; the group's scales from shared memory, `_group_begin`),
    softcapped when SOFTCAP > 0."""
    g = t0 // GROUP_SIZE
    s2, z2 = _key_pairs(ks_smem.index(g % 2), kz_smem.index(g % 2), BITS, FOLD)
    s = mma_v2(_key_vals(kw, s2, z2, BITS, FOLD, WK), q16, gl.zeros([32, 8], gl.float32, MMA)) * qk_keys
    if SOFTCAP > 0.0:
        s = _softcap(s, SOFTCAP)
    return s


@gluon.jit
def _step_values(s, m_blk, vw, vs_n, vz_n, m_i, acc, l_i, BITS: gl.constexpr, FOLD: gl.constexpr):
    """The lazy softmax of the step's scores s (block max m_blk, computed with them) and O += V^T P^T."""
    vs = vs_n.to(gl.int16).to(gl.float16, bitcast=True)
    vz = vz_n.to(gl.int16).to(gl.float16, bitcast=True)
    m_i, acc, l_i = _lazy_rescale(m_blk, m_i, acc, l_i)
    p, l_i = _probs(s, m_i, l_i)
    pb = gl.convert_layout(p.to(gl.float16), OPB)
    acc = mma_v2(_value_vals(vw, vs, vz, BITS, FOLD), pb, acc)
    return m_i, acc, l_i


@gluon.jit
def _mask_vals(MASK, mrow, tok, ok, s_mk, MASK_KIND: gl.constexpr, MASK_HEADS: gl.constexpr):
    """Raw attention-mask values of tokens tok [32] (the score rows, `SliceLayout(1, MMA)`): [32] when
    the mask is the same for all heads (MASK_HEADS False, mrow the batch row's offset), else [32, 8]
    (mrow [8]: the heads' row offsets). ok None: every token in range; else tokens with ok False read
    as attended (bool 1 / additive 0; their scores are masked by the caller)."""
    if MASK_HEADS:
        off = gl.expand_dims(tok * s_mk, 1) + gl.expand_dims(mrow, 0)
    else:
        off = tok * s_mk + mrow
    if ok is None:
        return gl.load(MASK + off)
    else:
        if MASK_HEADS:
            ok = gl.expand_dims(ok, 1) & (off >= 0)
        return gl.load(MASK + off, mask=ok, other=1 if MASK_KIND == 1 else 0.0)


@gluon.jit
def _mask_bias(mv, MASK_KIND: gl.constexpr, MASK_HEADS: gl.constexpr):
    """log2-domain score bias [32, 8] (or [32, 1], broadcast over heads) of `_mask_vals` values:
    bool (MASK_KIND 1): 0 or -inf; additive (2): value * log2(e)."""
    if MASK_KIND == 1:
        b = gl.where(mv != 0, 0.0, float("-inf"))
    else:
        b = mv.to(gl.float32) * 1.4426950408889634
    if MASK_HEADS:
        return b
    else:
        return gl.expand_dims(b, 1)


@gluon.jit
def _fused_reduce(OP, OM, OL, OUT, orow, NUM_SPLITS_RT, HEAD_DIM: gl.constexpr):
    """OUT[orow] (model dtype) from the NUM_SPLITS_RT partials of output row orow (OP [rows * splits,
    HEAD_DIM], OM/OL [rows * splits] fp32), as `decode_attention._reduce_row` computes it, in one warp:
    32 splits per round (one round of loads each), lane l holding channels [4l, 4l + 4). Loads bypass
    L1 (.cg): other programs of the launch wrote these partials."""
    RED: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 4], threads_per_warp=[1, 32], warps_per_cta=[1, 1],
                                         order=[1, 0])
    SB: gl.constexpr = 32
    sp = gl.arange(0, SB, gl.SliceLayout(1, RED))
    d = gl.arange(0, HEAD_DIM, gl.SliceLayout(0, RED))
    base = orow * NUM_SPLITS_RT
    m_run = gl.max(gl.full([SB], float("-inf"), gl.float32, gl.SliceLayout(1, RED)), axis=0)
    o = gl.zeros([HEAD_DIM], gl.float32, gl.SliceLayout(0, RED))
    denom = gl.sum(gl.zeros([SB], gl.float32, gl.SliceLayout(1, RED)), axis=0)
    for s0 in range(0, NUM_SPLITS_RT, SB):
        s_ok = s0 + sp < NUM_SPLITS_RT
        m = gl.load(OM + base + s0 + sp, mask=s_ok, other=float("-inf"), cache_modifier=".cg")
        lsum = gl.load(OL + base + s0 + sp, mask=s_ok, other=0.0, cache_modifier=".cg")
        part = gl.load(OP + gl.expand_dims(base + s0 + sp, 1) * HEAD_DIM + gl.expand_dims(d, 0),
                       mask=gl.expand_dims(s_ok, 1), other=0.0, cache_modifier=".cg")
        m_new = gl.maximum(m_run, gl.max(m, axis=0))
        ref = gl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = gl.exp2(m_run - ref)
        w = gl.where(m == float("-inf"), 0.0, gl.exp2(m - ref))
        o = o * alpha + gl.sum(part * gl.expand_dims(w, 1), axis=0)
        denom = denom * alpha + gl.sum(w * lsum, axis=0)
        m_run = m_new
    gl.store(OUT + orow * HEAD_DIM + d, (o / denom).to(OUT.dtype.element_ty))


@gluon.jit(do_not_specialize=["NUM_SPLITS_RT", "LQ_HOST", "L_HOST", "WIN_SPLITS", "WIN_COST", "WIN_MIN_STEPS"])
def _kvpass_decode_mma(
    Q, KC, KS, KZ, VC, VS, VZ, RK, RV, MASK, OP, OM, OL, LENS, OUT, CNT,
    s_qb, s_qh, s_kcb, s_kch, s_ksb, s_ksh, s_vcb, s_vch, s_vsb, s_vsh, s_rb, s_rh, s_mb, s_mh, s_mk,
    KV_LEN, NUM_SPLITS_RT, LQ_HOST, L_HOST, WIN_SPLITS, WIN_COST, WIN_MIN_STEPS, qk_scale,
    BITS: gl.constexpr, GROUP_SIZE: gl.constexpr, HEAD_DIM: gl.constexpr, REP: gl.constexpr,
    HOST_LENS: gl.constexpr, MASK_KIND: gl.constexpr, MASK_HEADS: gl.constexpr, SOFTCAP: gl.constexpr = 0.0,
    FUSE_REDUCE: gl.constexpr = False,
):
    """Constexprs: BITS (2, 4), GROUP_SIZE (32, 64, 128: one group per 32-token step or a multiple),
    HEAD_DIM (128), REP (1..8), HOST_LENS (Lq, L from LQ_HOST, L_HOST instead of LENS[0], LENS[1]),
    MASK_KIND (0 none, 1 bool as uint8, 2 additive in q's dtype; MASK [B, Hq, 1, KV_LEN] by strides
    s_mb, s_mh, s_mk), MASK_HEADS (the mask differs between heads: s_mh != 0), SOFTCAP (0.0 none, else
    the model's logit softcap times log2(e), applied to the scores before the mask: `_softcap`).
    Grid (splits, Hkv, B), one warp. Split roles (`window_splits`): the quantized tokens go to the first
    splits, in whole steps, with WIN_SPLITS splits set aside; the splits left without quantized tokens
    take the full-precision window rows alone when the others have at least WIN_MIN_STEPS quantized
    steps and the window splits' steps, at WIN_COST quantized steps each, no more (WIN_COST 0 and
    WIN_MIN_STEPS 0: whenever there are such splits; WIN_COST -1: never); otherwise the quantized
    tokens go over all splits and every split takes every S-th window row. Writes the split's
    (acc, m, l) for `_kvpass_decode_reduce`, as
    `_kvpass_decode_dot` does; FUSE_REDUCE (REP 1 only): the program that finishes a head's splits
    last (ticket in CNT int32 [B * Hkv], zero between launches) reduces them into OUT [B, Hq, 1, D]
    itself (`_fused_reduce`), no reduce launch. The mask values of a step's scores are loaded with its keys, one
    iteration before they are read (as the keys are)."""
    gl.static_assert(BITS == 2 or BITS == 4, "BITS must be 2 or 4")
    gl.static_assert(HEAD_DIM == 128, "HEAD_DIM must be 128")
    gl.static_assert(REP >= 1 and REP <= 8, "REP (query heads per KV head) must be 1..8")
    gl.static_assert(REP == 1 or not FUSE_REDUCE, "FUSE_REDUCE is for REP 1 (MHA) only")
    gl.static_assert(GROUP_SIZE == 32 or GROUP_SIZE == 64 or GROUP_SIZE == 128,
                     "GROUP_SIZE must be 32, 64 or 128 (one key group per 32-token step or several steps)")
    DT: gl.constexpr = Q.dtype.element_ty
    CPW: gl.constexpr = 32 // BITS
    NW: gl.constexpr = HEAD_DIM // CPW
    NWT: gl.constexpr = NW // 4
    NG: gl.constexpr = HEAD_DIM // GROUP_SIZE
    STEP: gl.constexpr = GROUP_SIZE if GROUP_SIZE > 32 else 32
    WK: gl.constexpr = _word_layout_k(NWT)
    WV: gl.constexpr = _word_layout_v(NWT // 2 if BITS == 4 else 1)
    FOLD: gl.constexpr = DT == gl.bfloat16

    pid_s = gl.program_id(0)
    pid_h = gl.program_id(1)
    pid_b = gl.program_id(2)

    # ---- q: [8 heads, 128 kappa] -> fp16 B operand (q^T) for the quantized keys, scaled by 2**-qpow
    # (exact; |q| * 2**-qpow <= 2**14, so a bf16 q fits fp16), rows >= REP zero
    q_base = pid_b * s_qb + pid_h * REP * s_qh
    qt = _q_kappa(Q, q_base, s_qh, REP, BITS, False)
    qpow = gl.maximum(gl.ceil(gl.log2(gl.max(gl.max(gl.abs(qt), axis=1), axis=0))) - 14.0, 0.0)
    q16 = gl.convert_layout(qt * gl.exp2(-qpow), OPB).to(gl.float16)
    qk_keys = qk_scale * gl.exp2(qpow)

    m_i = gl.full([8], float("-inf"), gl.float32, gl.SliceLayout(0, MMA))
    l_i = _lane_rows(gl.zeros([32, 8], gl.float32, MMA))          # per-lane partials until the end
    acc = gl.zeros([128, 8], gl.float32, MMA)

    if HOST_LENS:
        Lq = gl.minimum(LQ_HOST, KV_LEN)
        L = gl.minimum(L_HOST, KV_LEN)
    else:
        Lq = gl.minimum(gl.load(LENS), KV_LEN)
        L = gl.minimum(gl.load(LENS + 1), KV_LEN)
    nwin = L - Lq
    chunk_w = gl.maximum(gl.cdiv(Lq, (NUM_SPLITS_RT - WIN_SPLITS) * STEP), 1) * STEP   # WIN_SPLITS set aside
    n_busy = gl.cdiv(Lq, chunk_w)                                  # splits with quantized tokens
    n_free = NUM_SPLITS_RT - n_busy                                # splits that can take the window alone
    w_steps = gl.cdiv(nwin, 32 * gl.maximum(n_free, 1))            # window steps on each of them
    q_steps = chunk_w // 32
    own = ((n_free > 0) & (WIN_COST >= 0) & (q_steps >= WIN_MIN_STEPS) & (w_steps * WIN_COST <= q_steps)).to(gl.int32)
    w_first = own * n_busy                                         # the first split with window rows
    chunk = gl.maximum(gl.cdiv(Lq, (NUM_SPLITS_RT - own * WIN_SPLITS) * STEP), 1) * STEP
    start = pid_s * chunk
    end = gl.maximum(gl.minimum(start + chunk, Lq), start)   # >= start: a split past Lq has no steps (no tail)

    kc_base = KC + pid_b * s_kcb + pid_h * s_kch
    ks_base = pid_b * s_ksb + pid_h * s_ksh
    vc_base = VC + pid_b * s_vcb + pid_h * s_vch
    vs_base = pid_b * s_vsb + pid_h * s_vsh
    kt = gl.arange(0, 32, gl.SliceLayout(1, WK))
    kwi = gl.arange(0, NW, gl.SliceLayout(0, WK))
    vwi = gl.arange(0, NW, gl.SliceLayout(1, WV))
    vt = gl.arange(0, 32, gl.SliceLayout(0, WV))
    st = gl.arange(0, 32, gl.SliceLayout(1, MMA))
    oh = gl.arange(0, 8, gl.SliceLayout(0, MMA))
    if MASK_HEADS:   # the heads' mask rows; columns >= REP reuse the last head's (their scores are dropped)
        mrow = pid_b * s_mb + (pid_h * REP + gl.minimum(oh, REP - 1)) * s_mh
    else:
        mrow = pid_b * s_mb
    kp, vp, vsp = _step_pointers(kc_base, vc_base, vs_base, start, kt, kwi, vt, vwi, NW, NG, GROUP_SIZE)
    # the key group after the current one: scales/zeros by cp.async into the other half of a 2-group
    # shared buffer
    CPL: gl.constexpr = _kz_copy_layout(NW, CPW)
    cp_off = (gl.expand_dims(gl.arange(0, NW, gl.SliceLayout(1, CPL)) * CPW, 1)
              + gl.expand_dims(gl.arange(0, CPW, gl.SliceLayout(0, CPL)), 0))
    ks_smem = gl.allocate_shared_memory(gl.float16, [2, NW, CPW], gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0]))
    kz_smem = gl.allocate_shared_memory(gl.float16, [2, NW, CPW], gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0]))
    VSI = VS.to(gl.pointer_type(gl.int16), bitcast=True)   # value scales/zeros: 16-bit loads, int32 registers
    VZI = VZ.to(gl.pointer_type(gl.int16), bitcast=True)
    # full steps, software-pipelined: iteration t computes the scores of step t + 32 (key dequant and
    # MMA) while it runs the softmax and the value MMA of step t, so the two chains interleave; its
    # loads fetch the keys of t + 64 (clamped to the last full step) and the values of t + 32. Then
    # the last full step's values, then the split's partial last step, if any, with masks.
    t_full = start + (end - start) // 32 * 32
    g0 = start // GROUP_SIZE
    _group_copy(ks_smem.index(g0 % 2), kz_smem.index(g0 % 2), KS, KZ, ks_base, g0, cp_off, start < end, HEAD_DIM)
    if t_full > start:
        kw = _key_loads(kp, start, kt, end, False, BITS)
        vw, vs_c, vz_c = _value_loads(vp, VSI, VZI, vsp, start, vt, end, False, BITS, NG)
        kp_last = kp + (t_full - start - 32) * NW                  # the last full step's keys
        kp = gl.where(start + 32 < t_full, kp + 32 * NW, kp_last)
        kw_n = _key_loads(kp, start, kt, end, False, BITS)
        if MASK_KIND != 0:   # the mask of the steps of kw and kw_n
            mv = _mask_vals(MASK, mrow, start + st, None, s_mk, MASK_KIND, MASK_HEADS)
            mv_n = _mask_vals(MASK, mrow, gl.minimum(start + 32, t_full - 32) + st, None, s_mk, MASK_KIND, MASK_HEADS)
        _group_begin(ks_smem, kz_smem, KS, KZ, ks_base, cp_off, start, end, GROUP_SIZE, HEAD_DIM)
        s_c = _step_scores(kw, ks_smem, kz_smem, q16, qk_keys, start, BITS, GROUP_SIZE, FOLD, WK, SOFTCAP)
        if MASK_KIND != 0:
            s_c = s_c + _mask_bias(mv, MASK_KIND, MASK_HEADS)
        mb_c = gl.max(s_c, axis=0)
        for t0 in range(start, t_full - 32, 32):
            _group_begin(ks_smem, kz_smem, KS, KZ, ks_base, cp_off, t0 + 32, end, GROUP_SIZE, HEAD_DIM)
            m_i, acc, l_i = _step_values(s_c, mb_c, vw, vs_c, vz_c, m_i, acc, l_i, BITS, FOLD)
            s_c = _step_scores(kw_n, ks_smem, kz_smem, q16, qk_keys, t0 + 32, BITS, GROUP_SIZE, FOLD, WK, SOFTCAP)
            if MASK_KIND != 0:
                s_c = s_c + _mask_bias(mv_n, MASK_KIND, MASK_HEADS)
            mb_c = gl.max(s_c, axis=0)
            kp = gl.where(t0 + 64 < t_full, kp + 32 * NW, kp_last)
            vp += 32 * NW
            vsp += 32 * NG
            kw_n = _key_loads(kp, t0, kt, end, False, BITS)
            if MASK_KIND != 0:   # the step of kw_n (t0 + 64, clamped like kp)
                mv_n = _mask_vals(MASK, mrow, gl.minimum(t0 + 64, t_full - 32) + st, None, s_mk, MASK_KIND,
                                  MASK_HEADS)
            vw, vs_c, vz_c = _value_loads(vp, VSI, VZI, vsp, t0, vt, end, False, BITS, NG)
        m_i, acc, l_i = _step_values(s_c, mb_c, vw, vs_c, vz_c, m_i, acc, l_i, BITS, FOLD)
    if t_full < end:
        # pointers rebuilt at t_full: the loop carries only each lane's first element (`_lane_loads`)
        kp, vp, vsp = _step_pointers(kc_base, vc_base, vs_base, t_full, kt, kwi, vt, vwi, NW, NG, GROUP_SIZE)
        kw = _key_loads(kp, t_full, kt, end, True, BITS)
        vw, vs_c, vz_c = _value_loads(vp, VSI, VZI, vsp, t_full, vt, end, True, BITS, NG)
        _group_begin(ks_smem, kz_smem, KS, KZ, ks_base, cp_off, t_full, end, GROUP_SIZE, HEAD_DIM)
        s = _step_scores(kw, ks_smem, kz_smem, q16, qk_keys, t_full, BITS, GROUP_SIZE, FOLD, WK, SOFTCAP)
        if MASK_KIND != 0:
            s = s + _mask_bias(_mask_vals(MASK, mrow, t_full + st, t_full + st < end, s_mk, MASK_KIND, MASK_HEADS),
                               MASK_KIND, MASK_HEADS)
        s = gl.where(gl.expand_dims(t_full + st < end, 1), s, float("-inf"))
        m_i, acc, l_i = _step_values(s, gl.max(s, axis=0), vw, vs_c, vz_c, m_i, acc, l_i, BITS, FOLD)
    async_copy.wait_group(0)

    # q again for the window (model dtype, as its keys), after the loop: not live across it
    qn = gl.convert_layout(_q_kappa(Q, q_base, s_qh, REP, BITS, True), OPB).to(DT)

    # ---- window rows w, w + W, ... of [Lq, L) for the w-th of the W splits from w_first on: model-dtype
    # keys/values, natural channels
    w_stride = NUM_SPLITS_RT - w_first
    w_me = pid_s - w_first
    n_mine = gl.cdiv(nwin - w_me, w_stride) * (w_me >= 0).to(gl.int32)
    rk_base = RK + pid_b * s_rb + pid_h * s_rh
    rv_base = RV + pid_b * s_rb + pid_h * s_rh
    WIN: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[2, 16], warps_per_cta=[1, 1],
                                         order=[1, 0])
    wr = gl.arange(0, 32, gl.SliceLayout(1, WIN))
    wd = gl.arange(0, 128, gl.SliceLayout(0, WIN))
    for j0 in range(0, n_mine, 32):
        r = w_me + (j0 + wr) * w_stride                            # window rows of this split
        woff = gl.expand_dims(r, 1) * HEAD_DIM + gl.expand_dims(wd, 0)
        wmask = gl.expand_dims(r < nwin, 1)
        kwin = gl.load(rk_base + woff, mask=wmask, other=0.0)       # [32 rows, 128 channels], natural order
        vwin = gl.load(rv_base + woff, mask=wmask, other=0.0)
        kwin = gl.convert_layout(_kappa_order(gl.reshape(kwin, [32, 4, 32]), 1, BITS), OPA)
        s = mma_v2(kwin, qn, gl.zeros([32, 8], gl.float32, MMA)) * qk_scale
        if SOFTCAP > 0.0:
            s = _softcap(s, SOFTCAP)
        r_s = w_me + (j0 + st) * w_stride
        if MASK_KIND != 0:
            s = s + _mask_bias(_mask_vals(MASK, mrow, Lq + r_s, r_s < nwin, s_mk, MASK_KIND, MASK_HEADS),
                               MASK_KIND, MASK_HEADS)
        s = gl.where(gl.expand_dims(r_s < nwin, 1), s, float("-inf"))
        p, m_i, acc, l_i = _lazy_softmax(s, m_i, acc, l_i)
        acc = mma_v2(gl.convert_layout(_sigma_order(vwin, BITS), OPA), gl.convert_layout(p.to(DT), OPB), acc)

    # ---- zero tail [L, KV_LEN): zero keys and values, so score 0 (plus the mask's bias) and nothing
    # added to acc; without a mask in closed form (below)
    t_chunk = gl.cdiv(KV_LEN - L, NUM_SPLITS_RT)
    t_start = L + pid_s * t_chunk
    t_end = gl.minimum(t_start + t_chunk, KV_LEN)
    if MASK_KIND != 0:
        for t0 in range(t_start, t_end, 32):
            tok = t0 + st
            s = gl.zeros([32, 8], gl.float32, MMA) + _mask_bias(
                _mask_vals(MASK, mrow, tok, tok < t_end, s_mk, MASK_KIND, MASK_HEADS), MASK_KIND, MASK_HEADS)
            s = gl.where(gl.expand_dims(tok < t_end, 1), s, float("-inf"))
            p, m_i, acc, l_i = _lazy_softmax(s, m_i, acc, l_i)

    l_i = gl.convert_layout(gl.sum(l_i, axis=0), gl.SliceLayout(0, MMA))

    if MASK_KIND == 0:
        cnt = t_end - t_start
        if cnt > 0:
            if gl.max((0.0 > m_i + 8.0).to(gl.int32), axis=0) > 0:
                m_new = gl.maximum(m_i, 0.0)
                alpha = gl.exp2(m_i - m_new)
                acc = acc * gl.expand_dims(alpha, 0)
                l_i = l_i * alpha
                m_i = m_new
            l_i = l_i + cnt.to(gl.float32) * gl.exp2(0.0 - m_i)

    # ---- partials: rows (b, hq, split)
    od = gl.arange(0, 128, gl.SliceLayout(1, MMA))
    row = (pid_b * gl.num_programs(1) * REP + pid_h * REP + oh) * NUM_SPLITS_RT + pid_s
    omask = gl.expand_dims(oh < REP, 0)
    gl.store(OP + gl.expand_dims(row, 0) * HEAD_DIM + gl.expand_dims(_sigma(od, BITS), 1), acc,
             mask=omask & gl.expand_dims(od >= 0, 1))
    gl.store(OM + row, m_i, mask=oh < REP)
    gl.store(OL + row, l_i, mask=oh < REP)
    if FUSE_REDUCE:   # REP 1: the program that finishes a head's splits last reduces them into OUT
        # the barrier orders every lane's stores before the gpu-scope acq_rel ticket (release); the last
        # ticket's acquire makes all splits' partials visible to its loads (as `_last_split`)
        _cta_barrier()
        cnt = CNT + pid_b * gl.num_programs(1) + pid_h
        if gl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu") == NUM_SPLITS_RT - 1:
            gl.store(cnt, 0)   # zero between launches: a CUDA-graph replay reuses the counter
            _fused_reduce(OP, OM, OL, OUT, pid_b * gl.num_programs(1) + pid_h, NUM_SPLITS_RT, HEAD_DIM)


# ---------------------------------------------------------------------------------------------
# Launcher

class GluonCompileError(RuntimeError):
    """The installed Triton cannot compile `_kvpass_decode_mma` (an API it uses changed): raised by
    `decode_attention_mma`, after which `mma_unsupported` sends every call to the Triton kernel."""


_COMPILE_FAILURE: list[str] = []   # why this process's Triton cannot compile the kernel, once it failed


def mma_unsupported(spec, lengths, q, quantized_length=None, codes=()) -> str | None:
    """Why this call cannot use the Gluon kernel (None: it can; masks are taken as
    `decode_attention` takes them). quantized_length: Lq of a
    host-lengths call (lengths None); codes: the key and value code buffers (their rows' vector
    loads, `_lane_loads_asm`, need 16-byte aligned batch/head rows; the store's buffers always are)."""
    import os
    if _COMPILE_FAILURE:
        return _COMPILE_FAILURE[0]
    if os.environ.get("TRITON_INTERPRET") == "1" or q.device.type != "cuda":
        return "needs a CUDA device (Gluon kernels have no interpreter)"
    if torch.cuda.get_device_capability(q.device) < (8, 0):
        return "needs compute capability >= 8.0 (mma.sync m16n8k16)"
    if lengths is None and quantized_length % spec.group_size:
        return f"needs whole key groups, got {quantized_length} quantized tokens for group size {spec.group_size}"
    if spec.key_bits != spec.value_bits or spec.key_bits not in (2, 4):
        return f"needs equal key/value bits of 2 or 4, got {spec.key_bits}/{spec.value_bits}"
    if spec.group_size not in (32, 64, 128):
        return f"needs group size 32, 64 or 128, got {spec.group_size}"
    if spec.head_dim != 128:
        return f"needs head_dim 128, got {spec.head_dim}"
    if not 1 <= spec.rep <= 8:
        return f"needs 1..8 query heads per KV head, got {spec.rep}"
    if spec.dtype not in (torch.float16, torch.bfloat16):
        return f"needs an fp16/bf16 model, got {spec.dtype}"
    for t in codes:
        if t.numel() and (t.data_ptr() % 16 or any(st * t.element_size() % 16 for st in t.stride()[:2])):
            return (f"needs 16-byte aligned code rows, got data_ptr % 16 = {t.data_ptr() % 16} and strides "
                    f"{tuple(t.stride())} ({t.dtype})")
    return None


def log_fallback(why: str) -> None:
    _log_once(f"kvpass decode: DecodeConfig.use_mma set but the Gluon tensor-core kernel {why}; "
              "using the Triton kernel")


# `window_splits`' rule, from graph-timed A/Bs on the H100 (benchmarks/NOTES.md, session 17): the
# window goes to splits without quantized tokens only when the others have at least
# WINDOW_MIN_STEPS quantized 32-token steps and at least WINDOW_STEP_COST per window step of the
# window splits (MHA batch 1 at 16k: 16 steps against 4 window steps, 5.6 % faster; 32k 3.6 %).
# Shorter splits won 4-10 % in 5 of 6 measurements (4k MHA and GQA, GQA 16k with 5-step splits) but
# lost 2-9 % in the attention table's GQA 16k (4-step splits): left out until measured further
# (results/ab_window_s17.log).
WINDOW_STEP_COST = 2
WINDOW_MIN_STEPS = 8


def window_splits(units: int, splits: int, chunk_steps: int, window_rows: int, config, device,
                  resident: int) -> tuple[int, int, int]:
    """(WIN_SPLITS, WIN_COST, WIN_MIN_STEPS) of a launch whose split plan gave `splits` splits per unit (B * Hkv).

    The full-precision window (up to `window_rows` rows) costs a program a window step (two row
    loads, their conversion through shared memory, two MMAs) however few of its rows it holds, so
    dealing it over all splits puts one window step on every split's critical path. Splits without
    quantized tokens can take the window alone instead: the wave's slots beyond the plan
    (`split_slots` - splits, at most one per 32 window rows: WIN_SPLITS, added to the launch) and
    the plan's splits that the call's Lq leaves empty (the plan is made for the capacity; Lq is
    only known in the kernel under device lengths). The kernel gives them the window, per call,
    when the other splits have at least WINDOW_MIN_STEPS quantized steps and at least WIN_COST
    (WINDOW_STEP_COST) per window step of the window splits; extra splits are added only when the
    planned splits are that long. H100, graph-timed in one process, window over all splits -> on
    splits of its own, 2-bit G32, the attention table's store (results/ab_window_s17.log, run 11):
    MHA batch 1 16k 30.1 -> 28.4 us, 32k 49.7 -> 47.9, 4-bit 16k 38.5 -> 37.9; GQA 32/8 batch 1 16k
    and 32k unchanged; batch >= 8 fills the wave (no split is free).
    config.window_splits: -1 that rule, 0 never (WIN_COST -1), k > 0 always: k window splits and any
    other split left without quantized tokens (WIN_COST 0, WIN_MIN_STEPS 0)."""
    if config.window_splits == 0 or window_rows <= 0:
        return 0, -1, 0
    if config.window_splits > 0:
        return config.window_splits, 0, 0
    from kvpass.templates import decode_attention as da
    if chunk_steps < WINDOW_MIN_STEPS:   # the planned splits are too short to give the window its own
        return 0, WINDOW_STEP_COST, WINDOW_MIN_STEPS
    free = da.split_slots(units, config, device, resident) - splits
    return max(0, min(free, -(-window_rows // BLOCK_N))), WINDOW_STEP_COST, WINDOW_MIN_STEPS


def decode_attention_mma(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, res_k, res_v, lengths, *,
                         kv_len, key_bits, group_size, sm_scale, config, out=None, host_lengths=(0, 0),
                         mask=(0, None, (0, 0, 0)), softcap=0.0):
    """`decode_attention` through `_kvpass_decode_mma` + the split reduce. mask: (kind, tensor, its
    batch/head/key strides) from `decode_attention`'s `mask_args` (kind 0: none); softcap: the
    model's logit softcap (0: none). Buffers and the
    two length modes as `decode_attention` documents them: device `lengths`, or (lengths None)
    host_lengths = (Lq, L), then the splits follow Lq instead of the capacity kv_len. The split reduce
    runs in the kernel for MHA launches without window splits (`fuse_reduce`), else as a launch of its own (GQA: a fused
    one lost in session 14, B1 T16k 16.8 -> 33.0 us, B8 52.4 -> 55.4; one warp walks REP x splits/16
    dependent rounds of loads that the separate launch spreads over B * Hq programs; results/ab_mma_s14.log)."""
    from kvpass.templates import decode_attention as da
    B, Hq, _, D = q.shape
    H = res_k.shape[1]
    rep = Hq // H
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    step = max(group_size, BLOCK_N)
    quantized = all(t.numel() for t in (k_codes, k_scale, k_zero, v_codes, v_scale, v_zero))
    kc, k_scale, k_zero, vc, v_scale, v_zero, res_k, res_v, rs = da.kernel_buffers(
        q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, res_k, res_v, quantized,
        torch.empty(1, 1, 1, 1, dtype=torch.float16, device=q.device))
    host = lengths is None
    # the parts' batch/head strides; 0 for the never-read placeholders of an empty quantized part
    # (their strides of 1 would specialize the kernel differently from every other launch)
    part_strides = ((kc.stride(0), kc.stride(1), k_scale.stride(0), k_scale.stride(1),
                     vc.stride(0), vc.stride(1), v_scale.stride(0), v_scale.stride(1)) if quantized else (0,) * 8)
    resident = resident_per_sm(config.max_regs)
    S, chunk = da.plan_splits(B * H, host_lengths[0] if host else kv_len, step, False, config, q.device, resident)[:2]
    window = window_splits(B * H, S, chunk // BLOCK_N, res_k.shape[2], config, q.device, resident)
    S += window[0]
    if out is None:
        out = torch.empty(B, Hq, 1, D, dtype=q.dtype, device=q.device)
    op = torch.empty(B * Hq * S, D, dtype=torch.float32, device=q.device)
    om = torch.empty(B * Hq * S, dtype=torch.float32, device=q.device)
    ol = torch.empty(B * Hq * S, dtype=torch.float32, device=q.device)
    mask_kind, mask_t, s_m = mask
    fuse = fuse_reduce(config, rep, S, window[0])
    try:
        _kvpass_decode_mma[(S, H, B)](
            q, kc, k_scale, k_zero, vc, v_scale, v_zero, res_k, res_v, q if mask_t is None else mask_t, op, om, ol,
            q if host else lengths, out, da.split_counters(q.device, B * H) if fuse else q,
            q.stride(0), q.stride(1), *part_strides, rs[0], rs[1], *s_m,
            kv_len, S, host_lengths[0], host_lengths[1], *window, sm_scale * da.LOG2E,
            BITS=key_bits, GROUP_SIZE=group_size, HEAD_DIM=D, REP=rep, HOST_LENS=host, MASK_KIND=mask_kind,
            MASK_HEADS=mask_kind != 0 and s_m[1] != 0, FUSE_REDUCE=fuse, num_warps=1,
            **({"maxnreg": config.max_regs} if config.max_regs else {}),
            **({"SOFTCAP": float(softcap) * da.LOG2E} if softcap else {}))
    except CompilationError as e:   # raised before anything runs: the caller can take another kernel
        last = (str(e).strip().splitlines() or ["?"])[-1]
        _COMPILE_FAILURE.append(f"does not compile with Triton {triton.__version__} ({last[:200]})")
        raise GluonCompileError(_COMPILE_FAILURE[0]) from e
    if not fuse:
        da._kvpass_decode_reduce[(B * Hq,)](op, om, ol, out, S, HEAD_DIM=D, D_PAD=D,
                                            S_BLOCK=min(64, max(2, da._next_pow2(S))), num_warps=4)
    return out


def fuse_reduce(config, rep: int, splits: int, window_splits: int) -> bool:
    """Whether a launch reduces its splits in the kernel (`_fused_reduce`) instead of a reduce launch:
    config.fuse_reduce, MHA (rep 1: one output row per KV head), more than one split, and no splits
    set aside for the window (`window_splits`). H100, one process, attention-table stores, 2-bit G32
    unless said (benchmarks/NOTES.md, session 19), reduce launch -> fused: MHA batch 1 4k 14.29 ->
    13.61 us, batch 8 16k 167.5 -> 166.5, but batch 1 16k 28.68 -> 28.96, 32k 48.52 -> 48.65, 4-bit 16k
    37.93 -> 38.23, 32k 66.95 -> 67.34: the launches with window splits lost, those without gained
    (why is not known). GQA keeps the reduce launch: a fused one measured 16.8 -> 33.0 us at batch 1
    16k in session 14 (one warp walks REP rows of 132 splits)."""
    return bool(config.fuse_reduce) and rep == 1 and splits > 1 and window_splits == 0
