"""Fused KIVI quantize-append: encode whole groups of full-precision tokens straight into a
KVStore's preallocated part buffers, and move the tokens left over into the residual window.

One kernel template, `_kvpass_quantize_append`; `kernel_name(spec)` gives the readable name of a
specialization, e.g. `kvpass_append_b2_g32_d128_bf16` (`kvpass_append_k2v4_g32_d128_fp16` for
mixed widths). Bit-exact with the reference quantizers `lowering/kivi.py` `quantize_keys` /
`quantize_values` (the part layouts are documented there and in `lowering/codecs.py`).
Constexprs:
    KEY_BITS, VALUE_BITS  2, 4, 8 (mixed allowed); codes packed LSB-first in bytes (lowering/kivi.py)
    GROUP_SIZE            16, 32, 64, 128: G tokens per key scale (per channel)
    VALUE_GROUP           channels per value scale (per token): min(G, HEAD_DIM), a power of 2
                          that divides HEAD_DIM (so HEAD_DIM 80 needs G = 16)
    HEAD_DIM              any multiple of 16 <= 256 (64, 80, 96, 128, 256 tested)
    dtype                 of the source tokens: fp16, bf16, fp32 (the model dtype); scales/zeros
                          take the dtype of their part buffers (fp16 for half models, fp32 else)
    BLOCK_C               channels per program (grid axis 2 = batch x channel blocks): >= VALUE_GROUP
    BLOCK_K               key channels per [G, BLOCK_K] tile (divides BLOCK_C)
    BLOCK_T               tokens per [BLOCK_T, BLOCK_C] value / window-copy tile (divides G)
    USE_RINT              round with libdevice rint (GPU); the interpreter, which cannot call
                          libdevice, rounds with the exact fp32 add of 2**23 instead
    num_warps             launch option (AppendConfig); num_stages is always 1 (see below)
Invalid combinations fail a tl.static_assert at compile time; `check_spec` says so before launch.

Math per group (fp32, as the reference): scale = div_rn(max - min, 2**b - 1) rounded to the scale
dtype, zero = min rounded to it; code = clamp(rint(div_rn(x - zero, scale or 1)), 0, 2**b - 1),
computed against the *stored* scale and zero; round half to even (torch.round); exact IEEE
division (`tl.math.div_rn`, not the approximate `/`); a constant group gets scale 0 and
code round(x - zero) (0 when the zero is exact); a group holding a NaN gets NaN scale and zero and
codes 0, like the reference's NaN-propagating min/max.

Programs: grid (group programs, H, B x channel blocks). A program quantizes keys and values of its
channel slice for its groups, then (group program 0 only) copies the leftover tokens
[n, n + rest) of its channel slice to window rows [0, rest). The window may be the source itself
(the decode flush: the remaining window shifts down in place); then one program covers every
group of its slice, reads everything it quantizes before a barrier, and each copy step loads its
rows, waits at a barrier, then stores them: a store never lands on a row some thread of the
program still has to read (rows move down, blocks go up). Programs never share channels, so no
other synchronization is needed. num_stages = 1: no software pipelining moves loads across the
barriers.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

SUPPORTED_BITS = (2, 4, 8)
SUPPORTED_GROUPS = (16, 32, 64, 128)
_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@dataclass(frozen=True)
class AppendConfig:
    """Launch parameters. `AppendConfig()` is the safe default: every block is clipped to what the
    spec allows (BLOCK_C to [VALUE_GROUP, next power of 2 of HEAD_DIM], BLOCK_K to BLOCK_C,
    BLOCK_T to G), so it is valid for every supported spec."""

    block_c: int = 64            # channels per program
    block_k: int = 32            # key channels per [G, block_k] tile
    block_t: int = 16            # tokens per value / copy tile
    num_warps: int = 4
    groups_per_program: int = 4  # when the source is not the window (prefill): groups per program


DEFAULT_CONFIG = AppendConfig()


@dataclass(frozen=True)
class AppendSpec:
    """What selects a compiled specialization."""

    key_bits: int
    value_bits: int
    group_size: int
    head_dim: int
    dtype: torch.dtype

    @property
    def value_group(self) -> int:
        return min(self.group_size, self.head_dim)  # lowering/codecs.py value_group_size


def kernel_name(spec: AppendSpec) -> str:
    bits = f"b{spec.key_bits}" if spec.key_bits == spec.value_bits else f"k{spec.key_bits}v{spec.value_bits}"
    return f"kvpass_append_{bits}_g{spec.group_size}_d{spec.head_dim}_{_DTYPE_NAMES.get(spec.dtype, str(spec.dtype))}"


def check_spec(spec: AppendSpec) -> str | None:
    """None when the kernel supports `spec`, else the reason it does not."""
    if spec.key_bits not in SUPPORTED_BITS or spec.value_bits not in SUPPORTED_BITS:
        return f"bits k{spec.key_bits}/v{spec.value_bits} not in {SUPPORTED_BITS}"
    if spec.group_size not in SUPPORTED_GROUPS:
        return f"group_size {spec.group_size} not in {SUPPORTED_GROUPS}"
    if spec.head_dim % 16 or not 16 <= spec.head_dim <= 256:
        return f"head_dim {spec.head_dim} (needs a multiple of 16, <= 256)"
    gv = spec.value_group
    if gv not in SUPPORTED_GROUPS or spec.head_dim % gv:
        return f"value group {gv} channels does not tile head_dim {spec.head_dim} (needs a power of 2 >= 16 dividing it)"
    if spec.dtype not in _DTYPE_NAMES:
        return f"dtype {spec.dtype}"
    return None


def store_spec(store) -> AppendSpec:
    return AppendSpec(store.cfg.key_bits, store.cfg.value_bits, store.cfg.group_size, store.Dk, store.dtype)


# ---------------------------------------------------------------------------------------------
# Kernel


@triton.jit
def _rint(t, USE_RINT: tl.constexpr):
    """Round half to even, like torch.round. Without libdevice: for 0 <= t < 2**23 one fp32 add of
    2**23 rounds at a unit in the last place of exactly 1; t < 0 gives a result <= 0 and t >= 2**23
    one >= 2**23 - 1, and the caller clamps both to 0 / 2**b - 1 exactly as it clamps torch.round's."""
    if USE_RINT:
        r = libdevice.rint(t)
    else:
        r = (t + 8388608.0) - 8388608.0
    return r


@triton.jit
def _quantize(x, AXIS: tl.constexpr, BITS: tl.constexpr, SDT: tl.constexpr, USE_RINT: tl.constexpr):
    """Min/max quantize fp32 x with one group along AXIS: (codes int32 like x, scale, zero in SDT)."""
    LEVELS: tl.constexpr = (1 << BITS) - 1
    has_nan = tl.max((x != x).to(tl.int32), axis=AXIS) > 0  # tl.min/max may skip NaN; torch's propagate it
    mn = tl.where(has_nan, float("nan"), tl.min(x, axis=AXIS))
    mx = tl.where(has_nan, float("nan"), tl.max(x, axis=AXIS))
    scale = tl.math.div_rn(mx - mn, tl.full(mn.shape, LEVELS, tl.float32)).to(SDT)
    zero = mn.to(SDT)
    s32 = scale.to(tl.float32)
    safe = tl.where(s32 == 0.0, 1.0, s32)
    t = tl.math.div_rn(x - tl.expand_dims(zero.to(tl.float32), AXIS), tl.expand_dims(safe, AXIS))
    r = _rint(t, USE_RINT)
    c = tl.minimum(tl.maximum(r, 0.0), LEVELS)
    c = tl.where(r == r, c, 0.0)  # NaN -> 0 (the reference's isfinite after clamp)
    return c.to(tl.int32), scale, zero


@triton.jit
def _pack(codes, ROWS: tl.constexpr, N: tl.constexpr, BITS: tl.constexpr):
    """int32 codes [ROWS, N] -> uint8 [ROWS, N * BITS // 8], LSB-first (kivi.pack_codes)."""
    if BITS == 8:
        packed = codes.to(tl.uint8)
    else:
        P: tl.constexpr = 8 // BITS
        c3 = tl.reshape(codes, (ROWS, N // P, P))
        shifts = tl.arange(0, P) * BITS
        packed = tl.sum(c3 << shifts[None, None, :], axis=2).to(tl.uint8)
    return packed


@triton.jit
def _kvpass_quantize_append(
    SK, SV, WK, WV, KC, KS, KZ, VC, VS, VZ,
    s_skb, s_skh, s_skt, s_svb, s_svh, s_svt,   # source strides (channel stride 1)
    s_wkb, s_wkh, s_wvb, s_wvh,                 # window strides (token stride HEAD_DIM)
    s_kcb, s_kch, s_ksb, s_ksh, s_vcb, s_vch, s_vsb, s_vsh,  # part strides (rows contiguous)
    n_groups, groups_per_prog, row0, rest,
    NK, NV, POS, ST, s_nkb, s_nkh, s_nkt, s_nvb, s_nvh, s_nvt, R_LEN, CAP,  # FROM_STATE only
    KEY_BITS: tl.constexpr, VALUE_BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, VALUE_GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr,
    USE_RINT: tl.constexpr, FROM_STATE: tl.constexpr, N_NEW: tl.constexpr,
):
    """Source tokens [0, n_groups * G) of SK/SV [B, H, *, D] -> part rows [row0, row0 + n) of
    KC [B, H, rows, D*KB/8] u8, KS/KZ [B, H, rows/G, D], VC [B, H, rows, D*VB/8] u8,
    VS/VZ [B, H, rows, D/VALUE_GROUP]; then source tokens [n, n + rest) -> WK/WV rows [0, rest)."""
    tl.static_assert(KEY_BITS == 2 or KEY_BITS == 4 or KEY_BITS == 8, "KEY_BITS must be 2, 4 or 8")
    tl.static_assert(VALUE_BITS == 2 or VALUE_BITS == 4 or VALUE_BITS == 8, "VALUE_BITS must be 2, 4 or 8")
    tl.static_assert(GROUP_SIZE == 16 or GROUP_SIZE == 32 or GROUP_SIZE == 64 or GROUP_SIZE == 128,
                     "GROUP_SIZE must be 16, 32, 64 or 128")
    tl.static_assert(HEAD_DIM % 16 == 0 and HEAD_DIM <= 256, "HEAD_DIM must be a multiple of 16, <= 256")
    tl.static_assert(VALUE_GROUP >= 16 and (VALUE_GROUP & (VALUE_GROUP - 1)) == 0 and HEAD_DIM % VALUE_GROUP == 0,
                     "VALUE_GROUP must be a power of 2 >= 16 dividing HEAD_DIM")
    tl.static_assert(BLOCK_C % VALUE_GROUP == 0 and BLOCK_C % BLOCK_K == 0, "BLOCK_C: whole value groups and key tiles")
    tl.static_assert(BLOCK_K % 8 == 0, "BLOCK_K: whole bytes of codes")
    tl.static_assert(GROUP_SIZE % BLOCK_T == 0, "BLOCK_T must divide GROUP_SIZE")
    PK: tl.constexpr = 8 // KEY_BITS
    PV: tl.constexpr = 8 // VALUE_BITS
    NGV: tl.constexpr = HEAD_DIM // VALUE_GROUP
    NB: tl.constexpr = BLOCK_C // VALUE_GROUP
    N_CB: tl.constexpr = (HEAD_DIM + BLOCK_C - 1) // BLOCK_C
    KSDT: tl.constexpr = KS.dtype.element_ty
    VSDT: tl.constexpr = VS.dtype.element_ty

    pid_g = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = (tl.program_id(2) // N_CB).to(tl.int64)
    c0 = (tl.program_id(2) % N_CB) * BLOCK_C
    sk = SK + b * s_skb + h * s_skh
    sv = SV + b * s_svb + h * s_svh
    kc = KC + b * s_kcb + h * s_kch
    ks = KS + b * s_ksb + h * s_ksh
    kz = KZ + b * s_ksb + h * s_ksh
    vc = VC + b * s_vcb + h * s_vch
    vs = VS + b * s_vsb + h * s_vsh
    vz = VZ + b * s_vsb + h * s_vsh
    tg = tl.arange(0, GROUP_SIZE)
    tt = tl.arange(0, BLOCK_T)
    cc = c0 + tl.arange(0, BLOCK_C)
    c_ok = cc < HEAD_DIM
    if FROM_STATE:
        # the decode step of a store with device-side lengths: ST = (Lq, L, error, ticket count) int32;
        # the N_NEW new tokens go to positions POS[0..N_NEW) (int64), i.e. window rows
        # [POS[0] - Lq, ...); SK/SV and WK/WV are the window buffers themselves
        NP2: tl.constexpr = 1 if N_NEW == 1 else 1 << (N_NEW - 1).bit_length()
        lq_now = tl.load(ST)
        l_now = tl.load(ST + 1)
        pp = tl.arange(0, NP2)
        pos = tl.load(POS + pp, mask=pp < N_NEW, other=0).to(tl.int32)
        pos0 = tl.sum(tl.where(pp == 0, pos, 0), axis=0)
        bad = tl.sum(tl.where((pp < N_NEW) & (pos != pos0 + pp), 1, 0), axis=0) > 0  # not consecutive
        lq_now = tl.where(pos0 == 0, 0, lq_now)       # a write at position 0 starts the cache over
        w0 = pos0 - lq_now                             # window tokens kept (a rewrite truncates to it)
        bad = bad | (w0 < 0) | (pos0 > l_now) | (pos0 + N_NEW > CAP)
        total = w0 + N_NEW
        flush = (total >= tl.where(bad, 1 << 30, R_LEN + GROUP_SIZE))
        n_groups = tl.where(flush, (total - R_LEN) // GROUP_SIZE, 0)
        g_lo = 0
        g_hi = n_groups
        row0 = lq_now
        rest = tl.where(flush, total - n_groups * GROUP_SIZE, 0)  # no flush: the window stays put
        new_ok = (pp < tl.where(bad, 0, N_NEW))[:, None] & c_ok[None, :]  # a bad write writes nothing
        dst = (w0 + pp)[:, None] * HEAD_DIM + cc[None, :]
        new_k = tl.load(NK + b * s_nkb + h * s_nkh + pp[:, None] * s_nkt + cc[None, :], mask=new_ok)
        new_v = tl.load(NV + b * s_nvb + h * s_nvh + pp[:, None] * s_nvt + cc[None, :], mask=new_ok)
        tl.store(WK + b * s_wkb + h * s_wkh + dst, new_k.to(WK.dtype.element_ty), mask=new_ok)
        tl.store(WV + b * s_wvb + h * s_wvh + dst, new_v.to(WV.dtype.element_ty), mask=new_ok)
        tl.debug_barrier()  # the new rows are read below by other threads of this program; ST was read
        # ST is updated in place by the last program to take a ticket (ST[3] counts them): every
        # program has read ST before its ticket (the barrier above orders the reads of all its
        # threads before the acq_rel atomic), so nothing reads ST after it changes. The last one
        # resets the count for the next launch (a CUDA-graph replay reuses ST).
        n_progs = tl.num_programs(0) * tl.num_programs(1) * tl.num_programs(2)
        ticket = tl.atomic_add(ST + 3, 1, sem="acq_rel")
        if ticket == n_progs - 1:
            err = tl.load(ST + 2)
            tl.store(ST, lq_now + n_groups * GROUP_SIZE)
            tl.store(ST + 1, tl.where(bad, l_now, pos0 + N_NEW))
            tl.store(ST + 2, tl.where(bad, 1, err))
            tl.store(ST + 3, 0)
    else:
        g_lo = pid_g * groups_per_prog
        g_hi = tl.minimum(g_lo + groups_per_prog, n_groups)

    # ---- keys: per channel over the G tokens of a group; [G, BLOCK_K] tiles
    for g in range(g_lo, g_hi):
        t = g * GROUP_SIZE + tg
        srow = row0 // GROUP_SIZE + g
        for k0 in tl.static_range(0, BLOCK_C, BLOCK_K):
            c = c0 + k0 + tl.arange(0, BLOCK_K)
            ck = c < HEAD_DIM
            x = tl.load(sk + t[:, None] * s_skt + c[None, :], mask=ck[None, :], other=0.0).to(tl.float32)
            codes, scale, zero = _quantize(x, 0, KEY_BITS, KSDT, USE_RINT)     # [G, BK], [BK], [BK]
            tl.store(ks + srow * HEAD_DIM + c, scale, mask=ck)
            tl.store(kz + srow * HEAD_DIM + c, zero, mask=ck)
            j = (c0 + k0) // PK + tl.arange(0, BLOCK_K // PK)
            tl.store(kc + (row0 + t)[:, None] * (HEAD_DIM // PK) + j[None, :], _pack(codes, GROUP_SIZE, BLOCK_K, KEY_BITS),
                     mask=(j < HEAD_DIM // PK)[None, :])

    # ---- values: per token over VALUE_GROUP channels; [BLOCK_T, BLOCK_C] tiles
    gi = c0 // VALUE_GROUP + tl.arange(0, NB)
    jv = c0 // PV + tl.arange(0, BLOCK_C // PV)
    for t0 in range(g_lo * GROUP_SIZE, g_hi * GROUP_SIZE, BLOCK_T):
        t = t0 + tt
        x = tl.load(sv + t[:, None] * s_svt + cc[None, :], mask=c_ok[None, :], other=0.0).to(tl.float32)
        x3 = tl.reshape(x, (BLOCK_T, NB, VALUE_GROUP))
        codes, scale, zero = _quantize(x3, 2, VALUE_BITS, VSDT, USE_RINT)     # [BT, NB, VG], [BT, NB]
        so = (row0 + t)[:, None] * NGV + gi[None, :]
        tl.store(vs + so, scale, mask=(gi < NGV)[None, :])
        tl.store(vz + so, zero, mask=(gi < NGV)[None, :])
        packed = _pack(tl.reshape(codes, (BLOCK_T, BLOCK_C)), BLOCK_T, BLOCK_C, VALUE_BITS)
        tl.store(vc + (row0 + t)[:, None] * (HEAD_DIM // PV) + jv[None, :], packed, mask=(jv < HEAD_DIM // PV)[None, :])

    # ---- leftover tokens [n, n + rest) -> window rows [0, rest) (possibly in place: see the docstring)
    if pid_g == 0:
        wk = WK + b * s_wkb + h * s_wkh
        wv = WV + b * s_wvb + h * s_wvh
        n = n_groups * GROUP_SIZE
        tl.debug_barrier()
        for r0 in range(0, rest, BLOCK_T):
            r = r0 + tt
            m = (r < rest)[:, None] & c_ok[None, :]
            xk = tl.load(sk + (n + r)[:, None] * s_skt + cc[None, :], mask=m)
            xv = tl.load(sv + (n + r)[:, None] * s_svt + cc[None, :], mask=m)
            tl.debug_barrier()
            tl.store(wk + r[:, None] * HEAD_DIM + cc[None, :], xk, mask=m)
            tl.store(wv + r[:, None] * HEAD_DIM + cc[None, :], xv, mask=m)


# ---------------------------------------------------------------------------------------------
# Launcher


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _use_rint(device: torch.device) -> bool:
    return device.type == "cuda" and not _interpreting()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _rows_contiguous(t: torch.Tensor) -> bool:
    return t.stride(-1) == 1 and (t.shape[-2] <= 1 or t.stride(-2) == t.shape[-1])


def quantize_append(
    src_k: torch.Tensor, src_v: torch.Tensor,
    k_codes: torch.Tensor, k_scale: torch.Tensor, k_zero: torch.Tensor,
    v_codes: torch.Tensor, v_scale: torch.Tensor, v_zero: torch.Tensor,
    *, key_bits: int, value_bits: int, group_size: int, n: int, row: int,
    window_k: torch.Tensor | None = None, window_v: torch.Tensor | None = None, rest: int = 0,
    config: AppendConfig | None = None,
) -> None:
    """Quantize source tokens [0, n) (n a multiple of G) into the part buffers at token rows
    [row, row + n) (row a multiple of G), then copy source tokens [n, n + rest) to window rows
    [0, rest). Everything is written in place; nothing is returned.

    src_k/src_v [B, H, >= n + rest, D] in the model dtype, channel stride 1. The window
    window_k/window_v [B, H, >= rest, D] has contiguous rows (token stride D) and may be the
    source itself (the decode flush), or a separate buffer (then src is, e.g., window + new tokens).
    Parts (layouts: lowering/kivi.py): k_codes/v_codes uint8 [B, H, cap, D*bits/8], k_scale/k_zero
    [B, H, cap/G, D], v_scale/v_zero [B, H, cap, D/VALUE_GROUP] with contiguous rows and
    cap >= row + n; scales/zeros in their own dtype (fp16 for half models, fp32 else).
    """
    if src_k.dim() != 4 or src_v.shape != src_k.shape:
        raise ValueError(f"kvpass quantize_append: src_k {tuple(src_k.shape)} and src_v {tuple(src_v.shape)} "
                         "must both be [B, H, T, D] of one shape")
    B, H, T, D = src_k.shape
    spec = AppendSpec(key_bits, value_bits, group_size, D, src_k.dtype)
    why = check_spec(spec)
    if why:
        raise ValueError(f"kvpass quantize_append: unsupported {why}")
    G, GV = group_size, spec.value_group
    if n < 0 or rest < 0 or n % G or row % G or n + rest > T:
        raise ValueError(f"kvpass quantize_append: n={n} (whole groups of {G}), row={row} (a multiple of {G}), "
                         f"rest={rest} must fit the {T} source tokens")
    if src_v.dtype != src_k.dtype or src_k.stride(-1) != 1 or src_v.stride(-1) != 1:
        raise ValueError("kvpass quantize_append: src_k/src_v need one dtype and channel stride 1")
    parts = dict(k_codes=(k_codes, D * key_bits // 8, 1), k_scale=(k_scale, D, G), k_zero=(k_zero, D, G),
                 v_codes=(v_codes, D * value_bits // 8, 1), v_scale=(v_scale, D // GV, 1), v_zero=(v_zero, D // GV, 1))
    for name, (p, width, tokens_per_row) in parts.items():
        if p.dim() != 4 or p.shape[:2] != (B, H) or p.shape[3] != width or p.device != src_k.device:
            raise ValueError(f"kvpass quantize_append: {name} {tuple(p.shape)} on {p.device} is not [{B}, {H}, rows, {width}] "
                             f"on {src_k.device}")
        if p.shape[2] * tokens_per_row < row + n:
            raise ValueError(f"kvpass quantize_append: {name} holds {p.shape[2] * tokens_per_row} tokens, needs {row + n}")
        if not _rows_contiguous(p):
            raise ValueError(f"kvpass quantize_append: {name} must have contiguous rows")
    if k_codes.dtype != torch.uint8 or v_codes.dtype != torch.uint8:
        raise TypeError("kvpass quantize_append: codes must be uint8")
    if k_scale.dtype != k_zero.dtype or v_scale.dtype != v_zero.dtype:
        raise TypeError("kvpass quantize_append: scale and zero must share a dtype")
    if k_scale.stride()[:2] != k_zero.stride()[:2] or v_scale.stride()[:2] != v_zero.stride()[:2]:
        raise ValueError("kvpass quantize_append: scale and zero buffers must share their batch and head strides")
    if rest:
        if window_k is None or window_v is None:
            raise ValueError("kvpass quantize_append: rest > 0 needs window_k and window_v")
        for w in (window_k, window_v):
            if w.shape[:2] != (B, H) or w.shape[2] < rest or w.shape[3] != D or w.dtype != src_k.dtype or not _rows_contiguous(w):
                raise ValueError(f"kvpass quantize_append: window {tuple(w.shape)} {w.dtype} must be [{B}, {H}, >= {rest}, {D}] "
                                 f"{src_k.dtype} with contiguous rows")
    else:
        window_k, window_v = src_k, src_v  # never written
    n_groups = n // G
    if n_groups == 0 and rest == 0:
        return
    cfg = config or DEFAULT_CONFIG
    block_c, block_k, block_t = _blocks(cfg, G, GV, D)
    # a window that is the source itself: one program per channel slice covers every group (module docstring)
    in_place = rest > 0 and window_k.untyped_storage().data_ptr() in (src_k.untyped_storage().data_ptr(),
                                                                      src_v.untyped_storage().data_ptr())
    gpp = max(1, n_groups) if in_place else max(1, cfg.groups_per_program)
    grid = (max(1, -(-n_groups // gpp)), H, B * -(-D // block_c))
    with torch.cuda.device(src_k.device) if src_k.is_cuda else contextlib.nullcontext():  # launch on src's GPU
        _kvpass_quantize_append[grid](
            src_k, src_v, window_k, window_v, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero,
            src_k.stride(0), src_k.stride(1), src_k.stride(2), src_v.stride(0), src_v.stride(1), src_v.stride(2),
            window_k.stride(0), window_k.stride(1), window_v.stride(0), window_v.stride(1),
            k_codes.stride(0), k_codes.stride(1), k_scale.stride(0), k_scale.stride(1),
            v_codes.stride(0), v_codes.stride(1), v_scale.stride(0), v_scale.stride(1),
            n_groups, gpp, row, rest,
            src_k, src_v, src_k, src_k, 0, 0, 0, 0, 0, 0, 0, 0,  # FROM_STATE arguments: unused
            KEY_BITS=key_bits, VALUE_BITS=value_bits, GROUP_SIZE=G, VALUE_GROUP=GV, HEAD_DIM=D,
            BLOCK_C=block_c, BLOCK_K=block_k, BLOCK_T=block_t, USE_RINT=_use_rint(src_k.device),
            FROM_STATE=False, N_NEW=1, num_warps=cfg.num_warps, num_stages=1,
        )


def _blocks(cfg: AppendConfig, G: int, GV: int, D: int) -> tuple[int, int, int]:
    block_c = min(max(_next_pow2(cfg.block_c), GV), _next_pow2(D))
    return block_c, max(8, min(_next_pow2(cfg.block_k), block_c)), min(_next_pow2(cfg.block_t), G)


def append_from_state(
    k_new: torch.Tensor, v_new: torch.Tensor, positions: torch.Tensor,
    lengths: torch.Tensor,
    window_k: torch.Tensor, window_v: torch.Tensor,
    k_codes: torch.Tensor, k_scale: torch.Tensor, k_zero: torch.Tensor,
    v_codes: torch.Tensor, v_scale: torch.Tensor, v_zero: torch.Tensor,
    *, key_bits: int, value_bits: int, group_size: int, residual_length: int,
    config: AppendConfig | None = None,
) -> None:
    """One decode write of a store whose lengths live on the device (CUDA-graph capturable: the
    launch depends on shapes only, and nothing is read back to the host).

    lengths int32 [4] = (Lq, L, error, ticket count) on the device; the kernel reads them, writes the
    new tokens k_new/v_new [B, H, n, D] (n <= G + 1, channel stride 1) to window rows
    [positions[0] - Lq, ... + n), flushes the oldest whole groups into the parts when the window
    reaches R + G tokens (exactly as `KVStore.append`), and updates `lengths` in place (one launch:
    the last program to finish reading them writes them; lengths[3] counts the programs and is 0
    between launches). A write at position 0 starts the cache over (Lq = 0: a reset
    cache's new prompt). A write that is not at consecutive positions in [Lq, L], or that
    runs past the parts' capacity, changes nothing and sets lengths[2] = 1, which the store
    reports (KVStoreError) at its next host-side use. window_k/window_v [B, H, >= R + G + n - 1, D]
    with contiguous rows; parts as in `quantize_append`, with capacity >= the cache length.
    """
    B, H, n, D = k_new.shape
    G = group_size
    GV = min(G, D)
    cfg = config or DEFAULT_CONFIG
    block_c, block_k, block_t = _blocks(cfg, G, GV, D)
    grid = (1, H, B * -(-D // block_c))
    cap = k_codes.shape[2]
    with torch.cuda.device(k_new.device) if k_new.is_cuda else contextlib.nullcontext():
        _kvpass_quantize_append[grid](
            window_k, window_v, window_k, window_v, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero,
            window_k.stride(0), window_k.stride(1), window_k.stride(2), window_v.stride(0), window_v.stride(1),
            window_v.stride(2), window_k.stride(0), window_k.stride(1), window_v.stride(0), window_v.stride(1),
            k_codes.stride(0), k_codes.stride(1), k_scale.stride(0), k_scale.stride(1),
            v_codes.stride(0), v_codes.stride(1), v_scale.stride(0), v_scale.stride(1),
            0, 1, 0, 0,
            k_new, v_new, positions, lengths, k_new.stride(0), k_new.stride(1), k_new.stride(2),
            v_new.stride(0), v_new.stride(1), v_new.stride(2), residual_length, cap,
            KEY_BITS=key_bits, VALUE_BITS=value_bits, GROUP_SIZE=G, VALUE_GROUP=GV, HEAD_DIM=D,
            BLOCK_C=block_c, BLOCK_K=block_k, BLOCK_T=block_t, USE_RINT=_use_rint(k_new.device),
            FROM_STATE=True, N_NEW=n, num_warps=cfg.num_warps, num_stages=1,
        )
