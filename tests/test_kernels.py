"""Decode-attention kernel vs the reference, on random data (never zeros).

On a machine without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set here
before the kernels are imported) with tiny shapes; on a GPU the same cases run compiled.

Error metric (FlexAttention style): both the kernel and the reference (`attention_reference`:
dequantize to the model dtype, torch SDPA in the model dtype) are compared with an fp64 golden
computed from the same dequantized K/V (fp32 dequantization, exactly what the codes mean), and
    max|kernel - golden| <= FUDGE[dtype] * max|reference - golden| + ATOL[dtype].
"""
from __future__ import annotations

import logging
import math
import os
import random
from dataclasses import replace

import pytest
import torch

if not torch.cuda.is_available():  # must precede the first import of the kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")
# (KVPASS_TRITON_INTERPRET, which makes dispatch route CPU tensors to the interpreted kernel, is
# set only inside the dispatch tests, so other test modules keep the CPU reference path.)

triton = pytest.importorskip("triton", reason="triton is not importable: the kernels cannot run")

from kvpass.lowering import dispatch, kivi  # noqa: E402
from kvpass.lowering.ops import attention_reference  # noqa: E402
from kvpass.store import KVStore, StoreConfig  # noqa: E402
from kvpass.templates import decode_attention as da  # noqa: E402

DEVICE = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
ON_GPU = DEVICE.type == "cuda"

# One tolerance table, keyed by the model dtype: (FUDGE, ATOL).
TOLERANCE = {
    # fp32: both sides compute in fp32 (the kernel's dots are exact-fp32 "ieee", no tf32); the
    # reference's error is ~1e-7, so ATOL carries the difference in summation order and exp2
    # vs exp over a few hundred terms (a few ulp of outputs of magnitude <= 4).
    torch.float32: (2.0, 2e-5),
    # fp16: the reference rounds K and V to fp16 (2**-11 relative); the kernel rounds q*s_k to
    # fp16 instead of K (same size of error, different place), V after dequantization to fp16,
    # and p (<= 2**8, lazy max) to fp16 for the P@V tensor-core dot: at most ~2x the
    # reference's error, plus the fp16 rounding of the output (2**-11 of |out| <= ~1e-3).
    torch.float16: (3.0, 2e-3),
    # bf16: the reference rounds K and V to bf16 (2**-9 relative); the kernel rounds q*s_k to
    # bf16 (same size), V to fp16 (smaller; the Gluon GQA kernel's one-fma dequant adds a rounding
    # of z - 2**bits * s: up to ~3.5 fp16 half-ulps of max |v|, still below bf16's), p to fp16:
    # same bound as fp16, with the output's bf16 rounding (2**-9 of |out|) in ATOL.
    torch.bfloat16: (3.0, 8e-3),
}

HEAD_DIM_GROUPS = {64: (16, 32, 64), 80: (16,), 96: (16, 32), 128: (16, 32, 64, 128), 256: (32, 64, 128)}


def _make_store(B, H, D, L, key_bits, value_bits, G, R, dtype, seed, chunks=3):
    """A store holding L random tokens, appended in a few pieces (flushes happen as in decode)."""
    g = torch.Generator().manual_seed(seed)
    k = (torch.randn(B, H, L, D, generator=g) * 1.5 + 0.3).to(dtype)
    v = (torch.randn(B, H, L, D, generator=g)).to(dtype)
    # a few outlier key channels, as real models have
    k[..., 1] *= 6.0
    st = KVStore(StoreConfig(key_bits, value_bits, G, R), B, H, D, D, dtype, DEVICE)
    cuts = sorted({0, L, *[int(x) for x in torch.randint(1, max(2, L), (chunks,), generator=g)]})
    for a, b in zip(cuts, cuts[1:]):
        st.append(k[:, :, a:b].to(DEVICE), v[:, :, a:b].to(DEVICE))
    return st


def _golden(q, st: KVStore, mask, kv_len, scale, softcap=0.0):
    """fp64 attention over the store's exact dequantized K/V (+ zero slots past its length), with
    the logit softcap (softcap * tanh(s / softcap), before the mask) when softcap > 0."""
    Lq, G = st.quantized_length, st.cfg.group_size
    kparts, vparts = [], []
    if Lq:
        kb, vb = st.keys.buffers, st.values.buffers
        kparts.append(kivi.dequantize_keys(kb["codes"][:, :, :Lq], kb["scale"][:, :, : Lq // G], kb["zero"][:, :, : Lq // G],
                                           st.cfg.key_bits, G).double())
        vparts.append(kivi.dequantize_values(vb["codes"][:, :, :Lq], vb["scale"][:, :, :Lq], vb["zero"][:, :, :Lq],
                                             st.cfg.value_bits, G).double())
    kparts.append(st.res_k.double())
    vparts.append(st.res_v.double())
    k, v = torch.cat(kparts, 2), torch.cat(vparts, 2)
    if kv_len > k.shape[2]:
        pad = k.new_zeros(*k.shape[:2], kv_len - k.shape[2], k.shape[3])
        k, v = torch.cat([k, pad], 2), torch.cat([v, pad], 2)
    k, v = k[:, :, :kv_len], v[:, :, :kv_len]
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = (q.double() @ k.transpose(-1, -2)) * scale
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.double()
    return torch.softmax(s, -1) @ v


def _check(q, st, mask=None, kv_len=None, config=None, kv_repeat=1, softcap=0.0):
    kv_len = st.length if kv_len is None else kv_len
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D)
    ref = attention_reference(q, st, mask, kv_len, kv_repeat, 0.0, False, None, True, softcap)
    poisoned = q.new_full(q.shape, float("nan"))  # every element must be written
    out = da.decode_attention_store(q, st, mask, kv_len, None, config, out=poisoned, softcap=softcap)
    gold = _golden(q, st, mask, kv_len, scale, softcap)
    assert out.shape == ref.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all(), "kernel output has NaN/Inf"
    ref_err = (ref.double() - gold).abs().max().item()
    err = (out.double() - gold).abs().max().item()
    fudge, atol = TOLERANCE[q.dtype]
    assert err <= fudge * ref_err + atol, f"kernel err {err:.3e} > {fudge} * ref err {ref_err:.3e} + {atol}"
    return err, ref_err


def _q(B, Hq, D, dtype, seed):
    g = torch.Generator().manual_seed(seed + 7)
    return torch.randn(B, Hq, 1, D, generator=g).to(dtype).to(DEVICE)


DOT = da.DecodeConfig(use_dot=True, min_groups_per_split=1)
DOT_SPLIT = da.DecodeConfig(use_dot=True, min_groups_per_split=1, ctas_per_sm=64)
ROWS = da.DecodeConfig(use_dot=False, min_groups_per_split=1, block_n=32)
DOT_EXACT = da.DecodeConfig(use_dot=True, min_groups_per_split=1, pad_heads=1)  # no padding of query rows


def _sampled_cases(n=40, seed=1234):
    """A fixed-seed sample of bits x group x head_dim x dtype x GQA ratio in which every value of
    every axis occurs (the first pass walks each axis; the rest is random)."""
    rnd = random.Random(seed)
    bits, dtypes, reps = (2, 4, 8), (torch.float16, torch.bfloat16, torch.float32), (1, 2, 4, 8)
    dims = list(HEAD_DIM_GROUPS)
    cases = []
    for i in range(max(n, 5)):
        D = dims[i % len(dims)] if i < len(dims) else rnd.choice(dims)
        G = HEAD_DIM_GROUPS[D][i % len(HEAD_DIM_GROUPS[D])] if i < 12 else rnd.choice(HEAD_DIM_GROUPS[D])
        kb = bits[i % 3] if i < 6 else rnd.choice(bits)
        vb = kb if i % 5 else rnd.choice(bits)  # some mixed key/value widths
        dt = dtypes[i % 3] if i < 9 else rnd.choice(dtypes)
        rep = reps[i % 4] if i < 8 else rnd.choice(reps)
        cases.append((kb, vb, G, D, dt, rep))
    # every group size in the list appears with every bit width at least once
    for G in (16, 32, 64, 128):
        for kb in bits:
            cases.append((kb, kb, G, 128, dtypes[(G // 16 + kb) % 3], (1, 4)[(G + kb) % 2]))
    return cases


@pytest.mark.parametrize("kb,vb,G,D,dtype,rep", _sampled_cases())
def test_kernel_matches_reference(kb, vb, G, D, dtype, rep):
    seed = kb * 1000 + vb * 100 + G + D + rep
    R = G if seed % 2 else 0
    L = 2 * G + R + 1 + seed % 7  # odd-ish lengths: a partial group sits in the window
    B, H = 2, 2
    st = _make_store(B, H, D, L, kb, vb, G, R, dtype, seed)
    q = _q(B, H * rep, D, dtype, seed)
    cfg = (DOT, DOT_SPLIT, ROWS, DOT_EXACT)[seed % 4]
    _check(q, st, config=cfg)


@pytest.mark.parametrize("residual_tokens", [0, 1, 5, 16, 31, 32, 47])
@pytest.mark.parametrize("variant", ["dot", "rows"])
def test_residual_sizes(residual_tokens, variant):
    """Residual window sizes 0..R (R = 32, G = 16: the window holds R..R+G-1 after flushes)."""
    G, R = 16, 32
    L = 3 * G + residual_tokens
    st = KVStore(StoreConfig(2, 2, G, R), 1, 2, 64, 64, torch.float16, DEVICE)
    g = torch.Generator().manual_seed(residual_tokens)
    k = torch.randn(1, 2, L, 64, generator=g).half().to(DEVICE)
    v = torch.randn(1, 2, L, 64, generator=g).half().to(DEVICE)
    # quantize exactly 3 groups and keep the rest in the window, whatever its size
    st.keys.append(k[:, :, : 3 * G])
    st.values.append(v[:, :, : 3 * G])
    st.res_k, st.res_v = k[:, :, 3 * G:].contiguous(), v[:, :, 3 * G:].contiguous()
    assert st.length - st.quantized_length == residual_tokens
    q = _q(1, 4, 64, torch.float16, residual_tokens)
    _check(q, st, config=DOT if variant == "dot" else ROWS)


@pytest.mark.parametrize("L", [1, 7, 33, 64, 65, 99])
def test_odd_lengths_and_empty_quantized_region(L):
    st = _make_store(1, 2, 64, L, 2, 2, 32, 32, torch.bfloat16, L, chunks=2)
    q = _q(1, 8, 64, torch.bfloat16, L)
    _check(q, st, config=DOT_SPLIT)


@pytest.mark.parametrize("kind", ["bool", "additive", "per_head_bool"])
@pytest.mark.parametrize("variant", ["dot", "rows"])
def test_padding_masks(kind, variant):
    """HF's [B, 1, 1, kv_len] padding masks: left padding of different lengths per batch row."""
    B, H, rep, D, G, L = 3, 2, 2, 64, 32, 150
    st = _make_store(B, H, D, L, 4, 2, G, G, torch.float16, 11)
    q = _q(B, H * rep, D, torch.float16, 11)
    keep = torch.ones(B, 1, 1, L, dtype=torch.bool)
    keep[0, ..., :40] = False   # padding inside the quantized region
    keep[1, ..., :3] = False
    keep[2, ..., 100:103] = False
    if kind == "per_head_bool":
        keep = keep.expand(B, H * rep, 1, L).clone()
        keep[:, 1, :, 50:70] = False
    mask = keep if kind != "additive" else torch.zeros(B, 1, 1, L).masked_fill(~keep, torch.finfo(torch.float16).min).half()
    _check(q, st, mask=mask.to(DEVICE), config=DOT_SPLIT if variant == "dot" else ROWS)


@pytest.mark.parametrize("masked_tail", [True, False])
def test_static_cache_kv_len_beyond_store(masked_tail):
    """kv_len > store length (StaticCache): slots past the store read as zeros in the reference."""
    B, H, D, L, kv_len = 2, 2, 64, 70, 128
    st = _make_store(B, H, D, L, 2, 2, 32, 32, torch.bfloat16, 5)
    q = _q(B, H * 4, D, torch.bfloat16, 5)
    if masked_tail:
        mask = torch.zeros(1, 1, 1, kv_len, dtype=torch.bool)
        mask[..., :L] = True
        _check(q, st, mask=mask.to(DEVICE), kv_len=kv_len, config=DOT_SPLIT)
    else:
        _check(q, st, mask=None, kv_len=kv_len, config=DOT_SPLIT)   # unmasked zero slots count
        _check(q, st, mask=None, kv_len=kv_len, config=ROWS)


@pytest.mark.parametrize("variant", ["dot", "rows"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_softcap(variant, dtype):
    """Gemma2's logit softcap (50 in the real model; 2 here, so that tanh bends these scores):
    quantized groups, window, a bool padding mask and unmasked zero slots past the store (score
    0 stays 0 under the cap). The cap must change the result (guards against a no-op)."""
    B, H, rep, D, G, L, kv_len, cap = 2, 2, 2, 64, 16, 3 * 16 + 21, 96, 2.0
    st = _make_store(B, H, D, L, 4, 2, G, 16, dtype, 21)
    q = (_q(B, H * rep, D, dtype, 21).float() * 3.0).to(dtype)   # scores of several units: cap 2 matters
    cfg = DOT_SPLIT if variant == "dot" else ROWS
    _check(q, st, kv_len=kv_len, config=cfg, softcap=cap)
    keep = torch.ones(B, 1, 1, kv_len, dtype=torch.bool)
    keep[0, ..., :20] = False
    _check(q, st, mask=keep.to(DEVICE), kv_len=kv_len, config=cfg, softcap=cap)
    capped = da.decode_attention_store(q, st, None, kv_len, None, cfg, softcap=cap).double()
    plain = da.decode_attention_store(q, st, None, kv_len, None, cfg).double()
    assert (capped - plain).abs().max().item() > 10 * TOLERANCE[dtype][1]


def test_softcap_rejects_bad_values():
    st = _make_store(1, 2, 64, 40, 2, 2, 16, 16, torch.float16, 1)
    q = _q(1, 2, 64, torch.float16, 1)
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="softcap"):
            da.decode_attention_store(q, st, softcap=bad)


def test_kv_len_shorter_than_store():
    st = _make_store(1, 2, 64, 150, 2, 2, 32, 32, torch.float16, 9)
    q = _q(1, 2, 64, torch.float16, 9)
    for kv_len in (40, 64, 149):
        _check(q, st, kv_len=kv_len, config=DOT)


@pytest.mark.parametrize("fuse_reduce", [True, False])
def test_many_splits_and_poisoned_output(fuse_reduce):
    """Many splits (17: more than one 16-split block of the reduce), the residual split, and no
    stale output element; the reduce fused into the last program of a row (its counters are back
    to zero after every launch) or in a launch of its own."""
    st = _make_store(2, 2, 128, 16 * 32 + 45, 2, 2, 32, 32, torch.bfloat16, 3)
    q = _q(2, 8, 128, torch.bfloat16, 3)
    for use_dot in (True, False):
        cfg = da.DecodeConfig(use_dot=use_dot, min_groups_per_split=1, ctas_per_sm=1024, block_n=32,
                              fuse_reduce=fuse_reduce)
        for _ in range(2):  # the second launch reuses the counters the first one left
            _check(q, st, config=cfg)
            if fuse_reduce:
                assert int(da.split_counters(DEVICE, 1).abs().sum()) == 0, "split counters not reset"


@pytest.mark.skipif(not ON_GPU, reason="inline-PTX unpacking runs only on the GPU")
@pytest.mark.parametrize("kb,vb,dtype", [(2, 2, torch.bfloat16), (4, 4, torch.float16), (8, 8, torch.bfloat16),
                                         (2, 4, torch.float16), (8, 2, torch.float16), (4, 8, torch.bfloat16)])
def test_asm_and_portable_unpack_agree(kb, vb, dtype):
    """Both unpackings give exact codes: the kernel's outputs are bit-identical (dot variant, and
    the rows variant in its default blocking). Rows with 64-token blocks in 4 warps and 4- or
    8-bit codes differed by 1 ulp in <= 0.4 % of outputs on the H100 (Triton 3.6, session 5):
    fp32 rounding of a different instruction order, both within the table's tolerance (_check)."""
    st = _make_store(2, 4, 128, 600, kb, vb, 32, 128, dtype, kb + vb)
    q = _q(2, 16, 128, dtype, 1)
    rows = da.default_config_for(da.DecodeSpec(kb, vb, 32, 128, dtype, rep=1))
    for cfg in (da.DecodeConfig(use_dot=True), rows):
        a = da.decode_attention_store(q, st, config=replace(cfg, use_asm=True))
        b = da.decode_attention_store(q, st, config=replace(cfg, use_asm=False))
        torch.testing.assert_close(a, b, atol=0, rtol=0)
        _check(q, st, config=replace(cfg, use_asm=True))
        _check(q, st, config=replace(cfg, block_n=64, num_warps=4, use_asm=True))


def test_static_asserts_reject_invalid_specs():
    assert da.check_spec(da.DecodeSpec(3, 2, 32, 128, torch.float16)) is not None
    assert da.check_spec(da.DecodeSpec(2, 2, 48, 96, torch.float16)) is not None
    assert da.check_spec(da.DecodeSpec(2, 2, 32, 80, torch.float16)) is not None  # 32 does not divide 80
    assert da.check_spec(da.DecodeSpec(2, 2, 16, 80, torch.float16)) is None
    assert da.kernel_name(da.DecodeSpec(2, 2, 32, 128, torch.bfloat16)) == "kvpass_attn_b2_g32_d128_bf16"
    assert da.kernel_name(da.DecodeSpec(2, 4, 32, 128, torch.float16)) == "kvpass_attn_k2v4_g32_d128_fp16"


def test_dispatch_routes_and_logs_fallbacks(caplog, monkeypatch):
    monkeypatch.setenv("KVPASS_TRITON_INTERPRET", "1")
    st = _make_store(1, 2, 64, 80, 2, 2, 32, 32, torch.float16, 2)
    q = _q(1, 4, 64, torch.float16, 2)
    args = (st, None, st.length, 1, 0.0, False, None, True)
    out = dispatch.attention(q, *args)
    torch.testing.assert_close(out, da.decode_attention_store(q, st), atol=0, rtol=0)
    dispatch._logged.clear()
    with caplog.at_level(logging.INFO, logger="kvpass"):
        q2 = _q(1, 4, 64, torch.float16, 3).expand(1, 4, 2, 64).contiguous()  # two query tokens
        dispatch.attention(q2, *args)
        dispatch.attention(q, st, None, st.length, 1, 0.1, False, None, True)   # dropout
        dispatch.attention(q, st, None, st.length, 1, 0.0, True, None, True)    # is_causal
    text = caplog.text
    assert "query length 2" in text and "dropout_p=0.1" in text and "is_causal" in text


def test_dispatch_records_what_ran_for_explain(monkeypatch):
    """`kvpass.explain` lists which implementation served each op (kvpass.lowering.paths): here the
    Triton decode kernel, with why the Gluon one did not run (head_dim 64; on CPU: no CUDA), the
    reference with its reason (dropout), and the multi-token path."""
    from kvpass.lowering import paths

    monkeypatch.setenv("KVPASS_TRITON_INTERPRET", "1")
    st = _make_store(1, 2, 64, 80, 2, 2, 32, 32, torch.float16, 5)
    q = _q(1, 4, 64, torch.float16, 5)
    paths.clear()
    dispatch.attention(q, st, None, st.length, 1, 0.0, False, None, True)
    dispatch.attention(q, st, None, st.length, 1, 0.1, False, None, True)   # dropout: the reference
    dispatch.attention(q.expand(1, 4, 2, 64).contiguous(), st, None, st.length, 1, 0.0, False, None, True)
    decode = [impl for op, impl in paths.seen() if op == "decode attention"]
    assert decode[0].startswith("Triton") and "not the Gluon kernel" in decode[0], paths.seen()
    assert ("decode attention", "reference (dequantize + SDPA): dropout_p=0.1") in paths.seen()
    assert ("attention, multi-token query", "dequantize + SDPA") in paths.seen()


def test_dispatch_falls_back_for_full_precision_codec(caplog, monkeypatch):
    monkeypatch.setenv("KVPASS_TRITON_INTERPRET", "1")
    st = KVStore(StoreConfig(16, 16, 32, 32), 1, 2, 64, 64, torch.float16, DEVICE)
    x = torch.randn(1, 2, 40, 64).half().to(DEVICE)
    st.append(x, x)
    q = _q(1, 2, 64, torch.float16, 4)
    dispatch._logged.clear()
    with caplog.at_level(logging.INFO, logger="kvpass"):
        out = dispatch.attention(q, st, None, 40, 1, 0.0, False, None, True)
    assert "full-precision codec" in caplog.text
    ref = attention_reference(q, st, None, 40, 1, 0.0, False, None, True)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
