"""Split-KV (flash-decoding) attention of one new query token over a KIVI-quantized KV store.

Template constexprs (one compiled specialization per combination; `kernel_name(spec)` names it,
e.g. `kvpass_attn_b2_g32_d128_bf16`, or `kvpass_attn_k2v4_g32_d128_bf16` for mixed widths):
    KEY_BITS, VALUE_BITS   2, 4, 8      code widths of keys / values (packed LSB-first in bytes)
    GROUP_SIZE             16, 32, 64, 128   G: tokens per key scale (per-channel), channels per
                                        value scale (per-token); must divide HEAD_DIM
    HEAD_DIM               64, 80, 96, 128, 256 (any multiple of 16); D_PAD = next power of two
    DTYPE                  fp16, bf16, fp32   the model dtype (q, residual window, output);
                                        scales/zeros are fp16 for half models, fp32 for fp32
    BLOCK_N                tokens per step in the quantized region; divides GROUP_SIZE
    BLOCK_R                tokens per step in the full-precision residual window and the tail
    HB                     query heads per program: the REP = Hq / Hkv heads sharing one KV head,
                           padded to a power of two (>= 16 for tensor-core dots)
    USE_DOT                tl.dot on tensor cores (GQA) or CUDA-core FMAs (MHA, small REP)
    MASK_KIND              0 none, 1 bool (True = attend), 2 additive float
Invalid combinations fail a tl.static_assert at compile time.

Math (log2 domain, qk_scale = sm_scale * log2(e)):
  keys   k[t, d] = c[t, d] * s[g(t), d] + z[g(t), d]     per-channel scales over G tokens, so
         q . k[t] = sum_d (q_d s_d) c[t, d] + sum_d q_d z_d: the scale is folded into q once per
         key group and the codes go straight into the dot ("fold per-channel key scale into q");
  values v[t, d] = c[t, d] * s[t, g(d)] + z[t, g(d)]     per-token scales over G channels; in the
         FMA form the scale is folded into p (sum_t (p_t s_t) c[t, d] + sum_t p_t z_t).
  Codes are unpacked in registers from int32 words: a code at bit position b' < 16 (after one
  16-bit shift for the high half of the word) is ORed into the mantissa of 2**23 and turned into
  an exact fp32 integer by one multiply-add; no integer->float conversion instructions.
Programs: grid (num_splits, Hkv, B). Split s covers key groups [s * chunk, (s + 1) * chunk) of the
quantized region; split `res_split` also covers the residual window [Lq, L) and, for static
caches, the tail [L, kv_len) whose keys/values read as zeros (exactly what the reference's
zero-padded read gives). With one split the program writes the output directly; otherwise it
writes (acc, m, l) partials and `_kvpass_decode_reduce` combines them.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, replace

import torch
import triton
import triton.language as tl

log = logging.getLogger("kvpass")

LOG2E = 1.4426950408889634
SUPPORTED_BITS = (2, 4, 8)
SUPPORTED_GROUPS = (16, 32, 64, 128)
SUPPORTED_HEAD_DIMS = (64, 80, 96, 128, 256)
_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


# ---------------------------------------------------------------------------------------------
# Configs


@dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters of the decode kernel. `DecodeConfig()` is the safe default (valid for
    every supported spec: BLOCK_N is clipped to the group size)."""

    block_n: int = 32          # tokens per step over the quantized region (divides G)
    block_r: int = 32          # tokens per step over the residual window / tail
    use_dot: bool = False      # tensor-core dots; needs heads padded to 16
    num_warps: int = 4
    num_stages: int = 2
    ctas_per_sm: int = 4       # split-KV target: B * Hkv * splits ~ ctas_per_sm * SMs
    min_groups_per_split: int = 4


DEFAULT_CONFIG = DecodeConfig()


@dataclass(frozen=True)
class DecodeSpec:
    """What selects a compiled specialization."""

    key_bits: int
    value_bits: int
    group_size: int
    head_dim: int
    dtype: torch.dtype
    rep: int = 1  # query heads per KV head


def kernel_name(spec: DecodeSpec) -> str:
    bits = f"b{spec.key_bits}" if spec.key_bits == spec.value_bits else f"k{spec.key_bits}v{spec.value_bits}"
    return f"kvpass_attn_{bits}_g{spec.group_size}_d{spec.head_dim}_{_DTYPE_NAMES.get(spec.dtype, str(spec.dtype))}"


def length_bucket(n: int) -> int:
    """Power-of-two bucket of the attended length (4096, 8192, ...; minimum 1024)."""
    return max(1024, 1 << max(0, (max(n, 1) - 1).bit_length()))


# (key_bits, group_size, head_dim, dtype name, length bucket) -> config. Filled from GPU sweeps
# (benchmarks/bench_attention.py --tune); anything missing uses `default_config_for`.
CONFIG_TABLE: dict[tuple, DecodeConfig] = {}

_TUNED_CACHE: dict[tuple, DecodeConfig] | None = None


def _cache_path() -> str:
    return os.environ.get("KVPASS_CONFIG_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "kvpass", "decode_configs.json"))


def _load_tuned() -> dict:
    global _TUNED_CACHE
    if _TUNED_CACHE is None:
        _TUNED_CACHE = {}
        try:
            with open(_cache_path()) as f:
                for row in json.load(f):
                    _TUNED_CACHE[tuple(row["key"])] = DecodeConfig(**row["config"])
        except (OSError, ValueError, TypeError, KeyError):
            pass
    return _TUNED_CACHE


def save_tuned(key: tuple, cfg: DecodeConfig):
    """Record a tuned config so later processes do not re-tune (JSON beside the user's cache)."""
    table = _load_tuned()
    table[key] = cfg
    path = _cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump([{"key": list(k), "config": asdict(c)} for k, c in table.items()], f)
    except OSError as e:  # a read-only home is not an error: the config is still used in-process
        log.info("kvpass: could not save tuned decode config to %s (%s)", path, e)


def config_key(spec: DecodeSpec, length: int) -> tuple:
    return (spec.key_bits, spec.group_size, spec.head_dim, _DTYPE_NAMES.get(spec.dtype, "?"), length_bucket(length), spec.rep > 1)


def default_config_for(spec: DecodeSpec) -> DecodeConfig:
    cfg = DEFAULT_CONFIG
    if spec.rep >= 4 and spec.dtype != torch.float32:
        cfg = replace(cfg, use_dot=True)
    return cfg


def get_config(spec: DecodeSpec, length: int) -> DecodeConfig:
    key = config_key(spec, length)
    cfg = _load_tuned().get(key) or CONFIG_TABLE.get(key) or default_config_for(spec)
    return cfg


# ---------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _unpack_consts(BITS: tl.constexpr):
    """Per-position constants to unpack int32 words of BITS-bit codes (KP = 32 // BITS per word).

    Code k of a word sits at bit k * BITS. Positions >= 16 are first shifted down by 16, so every
    code lands at a position `low` < 16, inside the 23-bit mantissa of 2**23: ORing 0x4B000000
    gives the float 2**23 + code * 2**low, and f * 2**-low - 2**(23 - low) is the exact code."""
    KP: tl.constexpr = 32 // BITS
    bitpos = tl.arange(0, KP) * BITS
    shift = tl.where(bitpos >= 16, 16, 0)
    low = bitpos - shift
    mask = ((1 << BITS) - 1) << low
    inv = tl.exp2(-low.to(tl.float32))
    return shift, mask, inv


@triton.jit
def _codes2d(w, BITS: tl.constexpr):
    """int32 words [N, NW] -> exact fp32 codes [N, NW * KP], natural channel order."""
    N: tl.constexpr = w.shape[0]
    NW: tl.constexpr = w.shape[1]
    KP: tl.constexpr = 32 // BITS
    shift, mask, inv = _unpack_consts(BITS)
    x = (w[:, :, None] >> shift[None, None, :]) & mask[None, None, :]
    f = (x | 0x4B000000).to(tl.float32, bitcast=True)
    f = f * inv[None, None, :] - 8388608.0 * inv[None, None, :]
    return tl.reshape(f, (N, NW * KP))


@triton.jit
def _codes3d(w, BITS: tl.constexpr):
    """int32 words [N, NG, WG] -> exact fp32 codes [N, NG, WG * KP] (channel g * G + j)."""
    N: tl.constexpr = w.shape[0]
    NG: tl.constexpr = w.shape[1]
    WG: tl.constexpr = w.shape[2]
    KP: tl.constexpr = 32 // BITS
    shift, mask, inv = _unpack_consts(BITS)
    x = (w[:, :, :, None] >> shift[None, None, None, :]) & mask[None, None, None, :]
    f = (x | 0x4B000000).to(tl.float32, bitcast=True)
    f = f * inv[None, None, None, :] - 8388608.0 * inv[None, None, None, :]
    return tl.reshape(f, (N, NG, WG * KP))


@triton.jit
def _dot(a, b, DT: tl.constexpr, EMULATE: tl.constexpr):
    """a @ b with operands rounded to the model dtype DT and fp32 accumulation (tensor cores).

    fp32 models use exact fp32 products (no tf32). EMULATE (the CPU interpreter, whose bf16 dot
    multiplies raw bit patterns) rounds the operands to DT and multiplies in fp32: same result."""
    if DT == tl.float32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif EMULATE:
        return tl.dot(a.to(DT).to(tl.float32), b.to(DT).to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a.to(DT), b.to(DT))


@triton.jit
def _online_update(s, m_i, l_i):
    """One online-softmax step on scores s [HB, N] (log2 domain, -inf = masked)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # all masked so far: keep 0 weights, no NaN
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    return p, alpha, m_new, l_i


@triton.jit
def _load_mask(MASK, mask_base, hq, h_ok, tok, tok_ok, s_mh, s_mk, MASK_KIND: tl.constexpr):
    """Additive log2-domain bias [HB, N] for mask columns `tok` (0 where MASK_KIND == 0)."""
    if MASK_KIND == 1:
        mv = tl.load(MASK + mask_base + hq[:, None] * s_mh + tok[None, :] * s_mk,
                     mask=h_ok[:, None] & tok_ok[None, :], other=1)
        bias = tl.where(mv != 0, 0.0, float("-inf"))
    elif MASK_KIND == 2:
        mv = tl.load(MASK + mask_base + hq[:, None] * s_mh + tok[None, :] * s_mk,
                     mask=h_ok[:, None] & tok_ok[None, :], other=0.0)
        bias = mv.to(tl.float32) * 1.4426950408889634
    else:
        bias = tl.zeros((hq.shape[0], tok.shape[0]), tl.float32)
    return bias


@triton.jit(do_not_specialize=["Lq", "L", "KV_LEN", "chunk", "res_split", "s_rb", "s_rh", "s_rn",
                               "s_mb", "s_mh", "s_kcb", "s_kch", "s_ksb", "s_ksh", "s_vcb", "s_vch",
                               "s_vsb", "s_vsh"])
def _kvpass_decode_kernel(
    Q, KC, KS, KZ, VC, VS, VZ, RK, RV, MASK, OP, OM, OL, OUT,
    s_qb, s_qh,
    s_kcb, s_kch, s_kcn,          # key codes (int32 words)
    s_ksb, s_ksh, s_ksg,          # key scale/zero [B, H, groups, D]
    s_vcb, s_vch, s_vcn,          # value codes (int32 words)
    s_vsb, s_vsh, s_vsn,          # value scale/zero [B, H, tokens, D // G]
    s_rb, s_rh, s_rn,             # residual [B, H, Lr, D] (same strides for res_k and res_v)
    s_mb, s_mh, s_mk,             # mask
    Lq, L, KV_LEN, chunk, res_split, NUM_SPLITS_RT,
    qk_scale, REP,
    KEY_BITS: tl.constexpr, VALUE_BITS: tl.constexpr, GROUP_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, HB: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, USE_DOT: tl.constexpr, MASK_KIND: tl.constexpr,
    SINGLE: tl.constexpr, EMULATE_DOT: tl.constexpr,
):
    # ---- compile-time validation of the specialization
    tl.static_assert(KEY_BITS == 2 or KEY_BITS == 4 or KEY_BITS == 8, "KEY_BITS must be 2, 4 or 8")
    tl.static_assert(VALUE_BITS == 2 or VALUE_BITS == 4 or VALUE_BITS == 8, "VALUE_BITS must be 2, 4 or 8")
    tl.static_assert(GROUP_SIZE == 16 or GROUP_SIZE == 32 or GROUP_SIZE == 64 or GROUP_SIZE == 128,
                     "GROUP_SIZE must be 16, 32, 64 or 128")
    tl.static_assert(HEAD_DIM % 16 == 0, "HEAD_DIM must be a multiple of 16 (whole int32 words of codes)")
    tl.static_assert(HEAD_DIM % GROUP_SIZE == 0, "GROUP_SIZE must divide HEAD_DIM (value groups)")
    tl.static_assert(GROUP_SIZE % (32 // VALUE_BITS) == 0, "a value group must be whole int32 words")
    tl.static_assert(GROUP_SIZE % BLOCK_N == 0, "BLOCK_N must divide GROUP_SIZE (one key group per step)")
    tl.static_assert(D_PAD >= HEAD_DIM, "D_PAD must cover HEAD_DIM")
    if USE_DOT:
        tl.static_assert(HB >= 16, "tensor-core dots need >= 16 query rows (pad HB)")
        tl.static_assert(BLOCK_N >= 16, "tensor-core dots need BLOCK_N >= 16")
        tl.static_assert(BLOCK_R >= 16, "tensor-core dots need BLOCK_R >= 16")

    DT = Q.dtype.element_ty
    KPK: tl.constexpr = 32 // KEY_BITS            # key codes per int32 word
    KPV: tl.constexpr = 32 // VALUE_BITS
    NWK: tl.constexpr = HEAD_DIM // KPK           # key words per token
    NWK_PAD: tl.constexpr = D_PAD // KPK
    NG: tl.constexpr = HEAD_DIM // GROUP_SIZE     # value groups per token
    NG_PAD: tl.constexpr = D_PAD // GROUP_SIZE
    WG: tl.constexpr = GROUP_SIZE // KPV          # value words per group

    pid_s = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_b = tl.program_id(2)

    hh = tl.arange(0, HB)
    h_ok = hh < REP
    hq = pid_h * REP + hh
    d = tl.arange(0, D_PAD)
    d_ok = d < HEAD_DIM

    q = tl.load(Q + pid_b * s_qb + hq[:, None] * s_qh + d[None, :],
                mask=h_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)

    m_i = tl.full((HB,), float("-inf"), tl.float32)
    l_i = tl.zeros((HB,), tl.float32)
    if USE_DOT:
        acc = tl.zeros((HB, D_PAD), tl.float32)
    else:
        acc = tl.zeros((HB, NG_PAD, GROUP_SIZE), tl.float32)
        accz = tl.zeros((HB, NG_PAD), tl.float32)

    mask_base = pid_b * s_mb
    g_idx = tl.arange(0, NG_PAD)
    g_ok = g_idx < NG

    # ---- quantized region [start, end) of this split
    start = pid_s * chunk
    end = tl.minimum(start + chunk, Lq)
    kc_base = KC + pid_b * s_kcb + pid_h * s_kch
    ks_base = pid_b * s_ksb + pid_h * s_ksh
    vc_base = VC + pid_b * s_vcb + pid_h * s_vch
    vs_base = pid_b * s_vsb + pid_h * s_vsh
    nb = tl.arange(0, BLOCK_N)
    wk = tl.arange(0, NWK_PAD)
    wv = tl.arange(0, WG)
    for t0 in range(start, end, BLOCK_N):
        tok = t0 + nb
        tok_ok = tok < end
        grp = t0 // GROUP_SIZE
        # keys: fold the per-channel scale of this group into q
        ks = tl.load(KS + ks_base + grp * s_ksg + d, mask=d_ok, other=0.0).to(tl.float32)
        kz = tl.load(KZ + ks_base + grp * s_ksg + d, mask=d_ok, other=0.0).to(tl.float32)
        qz = tl.sum(q * kz[None, :], axis=1) * qk_scale                       # [HB]
        kw = tl.load(kc_base + tok[:, None] * s_kcn + wk[None, :],
                     mask=tok_ok[:, None] & (wk < NWK)[None, :], other=0)
        kcode = _codes2d(kw, KEY_BITS)                                         # [BLOCK_N, D_PAD]
        if USE_DOT:
            s = _dot(q * ks[None, :], tl.trans(kcode), DT, EMULATE_DOT) * qk_scale + qz[:, None]
        else:
            qs = q * (ks * qk_scale)[None, :]
            s = tl.sum(qs[:, None, :] * kcode[None, :, :], axis=2) + qz[:, None]
        s += _load_mask(MASK, mask_base, hq, h_ok, tok, tok_ok, s_mh, s_mk, MASK_KIND)
        s = tl.where(tok_ok[None, :], s, float("-inf"))
        p, alpha, m_i, l_i = _online_update(s, m_i, l_i)

        # values
        vw = tl.load(vc_base + tok[:, None, None] * s_vcn + (g_idx * WG)[None, :, None] + wv[None, None, :],
                     mask=tok_ok[:, None, None] & g_ok[None, :, None], other=0)
        vcode = _codes3d(vw, VALUE_BITS)                                       # [BLOCK_N, NG_PAD, G]
        vsc = tl.load(VS + vs_base + tok[:, None] * s_vsn + g_idx[None, :],
                      mask=tok_ok[:, None] & g_ok[None, :], other=0.0).to(tl.float32)   # [BLOCK_N, NG_PAD]
        vze = tl.load(VZ + vs_base + tok[:, None] * s_vsn + g_idx[None, :],
                      mask=tok_ok[:, None] & g_ok[None, :], other=0.0).to(tl.float32)
        if USE_DOT:
            v = vcode * vsc[:, :, None] + vze[:, :, None]
            v = tl.reshape(v, (BLOCK_N, D_PAD))
            acc = acc * alpha[:, None] + _dot(p, v, DT, EMULATE_DOT)
        else:
            ps = p[:, :, None] * vsc[None, :, :]                                # [HB, BLOCK_N, NG_PAD]
            acc = acc * alpha[:, None, None] + tl.sum(ps[:, :, :, None] * vcode[None, :, :, :], axis=1)
            accz = accz * alpha[:, None] + tl.sum(p[:, :, None] * vze[None, :, :], axis=1)

    # ---- residual window [Lq, L) and zero tail [L, KV_LEN), in split `res_split`
    if pid_s == res_split:
        rb = tl.arange(0, BLOCK_R)
        rk_base = RK + pid_b * s_rb + pid_h * s_rh
        rv_base = RV + pid_b * s_rb + pid_h * s_rh
        for t0 in range(Lq, L, BLOCK_R):
            tok = t0 + rb
            tok_ok = tok < L
            r = tok - Lq
            k = tl.load(rk_base + r[:, None] * s_rn + d[None, :], mask=tok_ok[:, None] & d_ok[None, :], other=0.0)
            v = tl.load(rv_base + r[:, None] * s_rn + d[None, :], mask=tok_ok[:, None] & d_ok[None, :], other=0.0)
            if USE_DOT:
                s = _dot(q, tl.trans(k), DT, EMULATE_DOT) * qk_scale
            else:
                s = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], axis=2) * qk_scale
            s += _load_mask(MASK, mask_base, hq, h_ok, tok, tok_ok, s_mh, s_mk, MASK_KIND)
            s = tl.where(tok_ok[None, :], s, float("-inf"))
            p, alpha, m_i, l_i = _online_update(s, m_i, l_i)
            if USE_DOT:
                acc = acc * alpha[:, None] + _dot(p, v, DT, EMULATE_DOT)
            else:
                v3 = tl.reshape(v.to(tl.float32), (BLOCK_R, NG_PAD, GROUP_SIZE))
                acc = acc * alpha[:, None, None] + tl.sum(p[:, :, None, None] * v3[None, :, :, :], axis=1)
                accz = accz * alpha[:, None]
        # tail: slots the reference reads as zeros (static caches): score 0 (+ mask), value 0
        for t0 in range(L, KV_LEN, BLOCK_R):
            tok = t0 + rb
            tok_ok = tok < KV_LEN
            s = _load_mask(MASK, mask_base, hq, h_ok, tok, tok_ok, s_mh, s_mk, MASK_KIND)
            s = tl.where(tok_ok[None, :], s, float("-inf"))
            p, alpha, m_i, l_i = _online_update(s, m_i, l_i)
            if USE_DOT:
                acc = acc * alpha[:, None]
            else:
                acc = acc * alpha[:, None, None]
                accz = accz * alpha[:, None]

    if USE_DOT:
        o = acc
    else:
        o = tl.reshape(acc + accz[:, :, None], (HB, D_PAD))
    if SINGLE:
        o = o / l_i[:, None]
        orow = pid_b * tl.num_programs(1) * REP + hq                          # out [B, Hq, 1, D]
        tl.store(OUT + orow[:, None] * HEAD_DIM + d[None, :], o.to(OUT.dtype.element_ty),
                 mask=h_ok[:, None] & d_ok[None, :])
    else:
        row = (pid_b * tl.num_programs(1) * REP + hq) * NUM_SPLITS_RT + pid_s   # [B, Hq, S] flattened
        tl.store(OP + row[:, None] * HEAD_DIM + d[None, :], o, mask=h_ok[:, None] & d_ok[None, :])
        tl.store(OM + row, m_i, mask=h_ok)
        tl.store(OL + row, l_i, mask=h_ok)


@triton.jit(do_not_specialize=["NUM_SPLITS_RT"])
def _kvpass_decode_reduce(OP, OM, OL, OUT, NUM_SPLITS_RT,
                          HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, S_POW2: tl.constexpr):
    row = tl.program_id(0)                      # b * Hq + hq
    sp = tl.arange(0, S_POW2)
    s_ok = sp < NUM_SPLITS_RT
    d = tl.arange(0, D_PAD)
    d_ok = d < HEAD_DIM
    m = tl.load(OM + row * NUM_SPLITS_RT + sp, mask=s_ok, other=float("-inf"))
    lsum = tl.load(OL + row * NUM_SPLITS_RT + sp, mask=s_ok, other=0.0)
    m_max = tl.max(m, axis=0)
    w = tl.where(m == float("-inf"), 0.0, tl.exp2(m - m_max))
    denom = tl.sum(w * lsum, axis=0)
    o = tl.load(OP + (row * NUM_SPLITS_RT + sp)[:, None] * HEAD_DIM + d[None, :],
                mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    o = tl.sum(o * w[:, None], axis=0) / denom
    tl.store(OUT + row * HEAD_DIM + d, o.to(OUT.dtype.element_ty), mask=d_ok)


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


def plan_splits(B: int, H: int, Lq: int, G: int, has_rest: bool, cfg: DecodeConfig, device) -> tuple[int, int, int]:
    """(num_splits, chunk tokens, res_split). chunk is a multiple of G."""
    n_groups = -(-Lq // G)
    if n_groups == 0:
        return 1, G, 0
    target = cfg.ctas_per_sm * _num_sms(device)
    want = max(1, -(-target // (B * H)))
    max_by_work = max(1, n_groups // max(1, cfg.min_groups_per_split))
    s = min(want, max_by_work, 256)
    chunk_groups = -(-n_groups // s)
    s = -(-n_groups // chunk_groups)
    if s > 1 and has_rest:
        return s + 1, chunk_groups * G, s
    return s, chunk_groups * G, s - 1


def decode_attention(
    q: torch.Tensor,
    k_codes: torch.Tensor, k_scale: torch.Tensor, k_zero: torch.Tensor,
    v_codes: torch.Tensor, v_scale: torch.Tensor, v_zero: torch.Tensor,
    res_k: torch.Tensor, res_v: torch.Tensor,
    *, key_bits: int, value_bits: int, group_size: int,
    quantized_length: int, length: int, kv_len: int | None = None,
    sm_scale: float | None = None, attn_mask: torch.Tensor | None = None,
    config: DecodeConfig | None = None,
) -> torch.Tensor:
    """softmax(q K^T * sm_scale + mask) V for q [B, Hq, 1, D] over a KIVI store.

    k_codes/v_codes uint8 [B, H, cap, D*bits/8] (tokens [0, quantized_length) valid), k_scale/
    k_zero [B, H, cap/G, D], v_scale/v_zero [B, H, cap, D/G], res_k/res_v [B, H, length - Lq, D].
    kv_len (default length): the attended width; columns >= length read zero keys/values, as the
    reference's zero-padded static-cache read does; kv_len < length attends the first kv_len.
    attn_mask: None, bool (True = attend) or additive float of q's dtype, broadcastable to
    [B, Hq, 1, kv_len]. Returns [B, Hq, 1, D] in q's dtype.
    """
    B, Hq, Tq, D = q.shape
    assert Tq == 1, "decode kernel takes one query token"
    H = res_k.shape[1]
    assert Hq % H == 0, f"query heads {Hq} must be a multiple of kv heads {H}"
    rep = Hq // H
    kv_len = length if kv_len is None else kv_len
    Lq = min(quantized_length, kv_len)
    L = min(length, kv_len)
    spec = DecodeSpec(key_bits, value_bits, group_size, D, q.dtype, rep)
    why = check_spec(spec)
    if why:
        raise ValueError(f"kvpass decode kernel: unsupported {why}")
    cfg = config or get_config(spec, kv_len)
    G = group_size
    block_n = min(cfg.block_n, G)
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    D_PAD = max(16, _next_pow2(D))
    HB = _next_pow2(rep)
    if cfg.use_dot:
        HB = max(HB, 16)

    if attn_mask is None:
        mask_kind, mask, s_m = 0, q, (0, 0, 0)
    else:
        m4 = attn_mask
        while m4.dim() < 4:
            m4 = m4.unsqueeze(0)
        m4 = m4.expand(B, Hq, 1, kv_len)
        if m4.dtype == torch.bool:
            mask_kind, mask = 1, m4.view(torch.uint8)
        else:
            mask_kind, mask = 2, m4
        s_m = (mask.stride(0), mask.stride(1), mask.stride(3))

    if Lq > 0:
        kc, vc = k_codes.view(torch.int32), v_codes.view(torch.int32)
    else:  # nothing quantized yet: any int32 tensor serves as a never-read pointer
        kc = vc = torch.empty(1, 1, 1, 1, dtype=torch.int32, device=q.device)
        k_scale = k_zero = v_scale = v_zero = res_k
    has_rest = L > Lq or kv_len > L
    S, chunk, res_split = plan_splits(B, H, Lq, G, has_rest, cfg, q.device)
    single = S == 1
    out = torch.empty(B, Hq, 1, D, dtype=q.dtype, device=q.device)
    if single:
        op = om = ol = out
    else:
        op = torch.empty(B * Hq * S, D, dtype=torch.float32, device=q.device)
        om = torch.empty(B * Hq * S, dtype=torch.float32, device=q.device)
        ol = torch.empty(B * Hq * S, dtype=torch.float32, device=q.device)
    if res_k.shape[2] == 0:
        rs = (0, 0, 0)
    else:
        assert res_k.stride() == res_v.stride(), "res_k and res_v must share strides"
        rs = (res_k.stride(0), res_k.stride(1), res_k.stride(2))
    assert res_k.stride(3) == 1 and q.stride(3) == 1
    _kvpass_decode_kernel[(S, H, B)](
        q, kc, k_scale, k_zero, vc, v_scale, v_zero, res_k, res_v, mask, op, om, ol, out,
        q.stride(0), q.stride(1),
        kc.stride(0), kc.stride(1), kc.stride(2),
        k_scale.stride(0), k_scale.stride(1), k_scale.stride(2),
        vc.stride(0), vc.stride(1), vc.stride(2),
        v_scale.stride(0), v_scale.stride(1), v_scale.stride(2),
        rs[0], rs[1], rs[2],
        s_m[0], s_m[1], s_m[2],
        Lq, L, kv_len, chunk, res_split, S,
        sm_scale * LOG2E, rep,
        KEY_BITS=key_bits, VALUE_BITS=value_bits, GROUP_SIZE=G, HEAD_DIM=D, D_PAD=D_PAD, HB=HB,
        BLOCK_N=block_n, BLOCK_R=cfg.block_r, USE_DOT=cfg.use_dot, MASK_KIND=mask_kind, SINGLE=single,
        EMULATE_DOT=_interpreting(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if not single:
        _kvpass_decode_reduce[(B * Hq,)](op, om, ol, out, S, HEAD_DIM=D, D_PAD=D_PAD,
                                         S_POW2=max(2, _next_pow2(S)), num_warps=4)
    return out


def store_spec(store, q: torch.Tensor) -> DecodeSpec:
    return DecodeSpec(store.cfg.key_bits, store.cfg.value_bits, store.cfg.group_size, store.Dk, q.dtype,
                      q.shape[1] // store.H)


def decode_attention_store(q, store, attn_mask=None, kv_len=None, sm_scale=None, config=None):
    """`decode_attention` over a kvpass KVStore (kvpass/store.py)."""
    kb, vb = store.keys.buffers, store.values.buffers
    return decode_attention(
        q, kb["codes"], kb["scale"], kb["zero"], vb["codes"], vb["scale"], vb["zero"], store.res_k, store.res_v,
        key_bits=store.cfg.key_bits, value_bits=store.cfg.value_bits, group_size=store.cfg.group_size,
        quantized_length=store.quantized_length, length=store.length, kv_len=kv_len, sm_scale=sm_scale,
        attn_mask=attn_mask, config=config,
    )
