"""Fused dequantize kernel (templates/dequantize.py) vs the store's torch read path, bit for bit.

On a machine without CUDA the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set here
before the kernels are imported; KVPASS_TRITON_INTERPRET=1 makes dispatch route CPU stores to it)
with small shapes; on a GPU the same cases run the compiled kernel, plus larger ones. Data is
random and never zero; reads must be *equal* (`torch.equal`; NaN-aware where NaN is expected).
The reference is `KVStore.read_keys` / `read_values` with KVPASS_DISABLE_TRITON=1.
"""
from __future__ import annotations

import logging

import pytest
import torch

from kernel_setup import BF16, FP16, FP32, DEVICE, ON_GPU, kernel_path  # noqa: F401 (fixture)
from kernel_setup import rand as _rand

triton = pytest.importorskip("triton", reason="triton is not importable: the kernels cannot run")

from kvpass.lowering import dispatch, kivi  # noqa: E402
from kvpass.store import KVStore, StoreConfig  # noqa: E402
from kvpass.templates import dequantize as dq  # noqa: E402


def _store(kb, vb, G, R, D, dtype, n, B=1, H=2, seed=0, monkeypatch=None, kernel_append=False):
    """A store holding n random tokens (appended by the reference path unless kernel_append)."""
    monkeypatch.setenv("KVPASS_DISABLE_TRITON", "0" if kernel_append else "1")
    st = KVStore(StoreConfig(kb, vb, G, R), B, H, D, D, dtype, DEVICE)
    k, v = _rand((B, H, n, D), dtype, seed, scale=1.5), _rand((B, H, n, D), dtype, seed + 1)
    if kernel_append:
        st.append(k[:, :, : n // 2], v[:, :, : n // 2])
        for i in range(n // 2, n):  # decode steps: the window is a view of the kernel path's buffer
            st.append(k[:, :, i : i + 1], v[:, :, i : i + 1])
    else:
        st.append(k, v)
    monkeypatch.setenv("KVPASS_DISABLE_TRITON", "0")
    assert st.length == n
    return st


def _reads(st, kv_len, monkeypatch):
    """(reference keys, values), (kernel keys, values) of one store read."""
    monkeypatch.setenv("KVPASS_DISABLE_TRITON", "1")
    ref = st.read_keys(kv_len), st.read_values(kv_len)
    monkeypatch.setenv("KVPASS_DISABLE_TRITON", "0")
    ker = st.read_keys(kv_len), st.read_values(kv_len)
    return ref, ker


def _check_store(st, kv_lens, monkeypatch):
    for kv_len in kv_lens:
        (rk, rv), (kk, kv) = _reads(st, kv_len, monkeypatch)
        for name, r, k in (("keys", rk, kk), ("values", rv, kv)):
            assert k.shape == r.shape and k.dtype == r.dtype and k.is_contiguous(), (name, kv_len, k.shape, r.shape)
            assert torch.equal(k, r), f"{name} at kv_len {kv_len}: {(k != r).sum().item()} elements differ"


# Each bits value (mixed key/value widths included), group (16 only with head_dim 80, where 32
# does not divide it), head_dim and dtype appears several times.
CASES = [  # (key_bits, value_bits, G, D, dtype)
    (2, 2, 32, 128, BF16), (4, 4, 32, 64, FP16), (8, 8, 32, 128, FP32),
    (2, 4, 64, 64, FP32), (4, 2, 64, 128, BF16), (8, 2, 64, 64, FP16),
    (2, 8, 128, 128, FP16), (4, 8, 128, 64, BF16), (8, 4, 128, 128, FP32),
    (2, 2, 16, 80, FP16), (4, 8, 16, 80, BF16), (8, 4, 16, 80, FP32),
]


@pytest.mark.parametrize("kb,vb,G,D,dtype", CASES)
def test_store_reads_equal_reference(kb, vb, G, D, dtype, kernel_path, monkeypatch):
    """Quantized part + window; kv_len = L, past L (zeros), inside the window, inside the parts."""
    R = 8
    n = 2 * G + R + 5
    st = _store(kb, vb, G, R, D, dtype, n, seed=kb * 100 + vb * 10 + G + D, monkeypatch=monkeypatch)
    Lq = st.quantized_length
    assert Lq == 2 * G and st.length - Lq == R + 5
    assert dispatch.dequantize_kernel(st, "key") is dq and dispatch.dequantize_kernel(st, "value") is dq
    _check_store(st, [n, n + 7, n - 3, Lq - 5], monkeypatch)


def test_edge_lengths(kernel_path, monkeypatch):
    """Nothing quantized yet (Lq = 0), an empty window (R = 0 on whole groups), kv_len 0 and 1,
    a store on two batches, and a window that is a strided view of the kernel path's buffer."""
    st = _store(2, 4, 32, 16, 64, BF16, 20, B=2, seed=1, monkeypatch=monkeypatch)  # Lq = 0
    assert st.quantized_length == 0
    _check_store(st, [20, 27, 9, 1, 0], monkeypatch)
    st = _store(4, 2, 16, 0, 64, FP16, 48, B=2, seed=2, monkeypatch=monkeypatch)  # window empty
    assert st.quantized_length == 48 and st.res_k.shape[2] == 0
    _check_store(st, [48, 60, 33, 0], monkeypatch)
    st = _store(2, 2, 16, 16, 64, FP32, 45, seed=3, monkeypatch=monkeypatch, kernel_append=True)
    assert not st.res_k.is_contiguous() and st.res_k.shape[2] > 0  # [B, H, w, D] view of [B, H, R + G, D]
    _check_store(st, [45, 50, 40, 10], monkeypatch)


def test_mixed_full_precision_and_fallback_logs(caplog, kernel_path, monkeypatch):
    """bits 16 (full precision) keys read through the torch path, 2-bit values through the kernel;
    KVPASS_DISABLE_TRITON=1 falls back; each reason is logged once."""
    dispatch._logged.clear()
    with caplog.at_level(logging.INFO, logger="kvpass"):
        st = _store(16, 2, 32, 8, 64, FP16, 77, seed=4, monkeypatch=monkeypatch)
        assert dispatch.dequantize_kernel(st, "key") is None and dispatch.dequantize_kernel(st, "value") is dq
        _check_store(st, [77, 80], monkeypatch)
    text = caplog.text
    assert text.count("full-precision codec (key_bits=16)") == 1
    assert "key reads run the reference" in text and "KVPASS_DISABLE_TRITON=1" in text


def _parts(kind, bits, G, x):
    """Quantized parts of x [B, H, T, D] at rows [G, G + T) of buffers one group longer on each side
    (filled with finite junk), as the store's over-allocated buffers are."""
    sdt = torch.float16 if x.dtype != FP32 else FP32
    q = (kivi.quantize_keys if kind == "key" else kivi.quantize_values)(x, bits, G, sdt)
    per = (1, G, G) if kind == "key" else (1, 1, 1)
    out = []
    for p, tpr in zip(q, per):
        pad = torch.full_like(p[:, :, : G // tpr], 3)
        out.append(torch.cat([pad, p, pad], dim=2))
    return out, q


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy on NaN
@pytest.mark.parametrize("kind", ["key", "value"])
def test_kernel_nan_groups_strided_window_and_configs(kind):
    """Direct calls: parts read from offset buffers (rows [0, n_quant) of a view), a window that is
    a transposed slice (any strides), a NaN group, small and large blocks."""
    B, H, G, D, T = 1, 2, 32, 64, 64
    x = _rand((B, H, T, D), FP16, 21, scale=2.0).float()
    x[0, 1, 5, 3] = float("nan")  # one NaN group per kind (keys: channel 3 of group 0; values: token 5)
    (codes, scale, zero), (c0, s0, z0) = _parts(kind, 4, G, x.to(FP16))
    skip = G if kind == "value" else 1  # scale/zero rows of the leading pad group
    codes, scale, zero = codes[:, :, G:], scale[:, :, skip:], zero[:, :, skip:]  # rows [0, T) + a pad group
    big = _rand((B, 20, H, D), FP16, 22)                 # [B, W, H, D] storage
    window = big.transpose(1, 2)[:, :, 3:15]             # [B, H, 12, D], token stride H * D
    deq = (kivi.dequantize_keys if kind == "key" else kivi.dequantize_values)(c0, s0, z0, 4, G).to(FP16)
    want = torch.cat([deq, window, torch.zeros(B, H, 9, D, dtype=FP16, device=DEVICE)], dim=2)  # [B, H, 85, D]
    assert torch.isnan(want).any()
    for cfg in (None, dq.DequantConfig(block_t=4, num_warps=1), dq.DequantConfig(block_t=128, num_warps=8)):
        for kv_len in (T + 12 + 9, T + 5, 40):
            got = dq.dequantize(codes, scale, zero, window, kind=kind, bits=4, group_size=G, n_quant=T,
                                kv_len=kv_len, config=cfg)
            torch.testing.assert_close(got, want[:, :, :kv_len], rtol=0, atol=0, equal_nan=True)


def test_specs_names_and_errors():
    assert dq.kernel_name(dq.DequantSpec("key", 2, 32, 128, BF16)) == "kvpass_dequant_key_b2_g32_d128_bf16"
    assert dq.kernel_name(dq.DequantSpec("value", 4, 16, 80, FP16)) == "kvpass_dequant_value_b4_g16_d80_fp16"
    assert dq.check_spec(dq.DequantSpec("key", 2, 32, 80, FP16)) is None  # key groups run along tokens
    assert dq.check_spec(dq.DequantSpec("value", 2, 32, 80, FP16)) is not None
    assert dq.check_spec(dq.DequantSpec("key", 3, 32, 128, FP16)) is not None
    assert dq.check_spec(dq.DequantSpec("key", 2, 48, 96, FP16)) is not None
    assert dq.check_spec(dq.DequantSpec("key", 2, 32, 72, FP16)) is not None
    assert dq.check_spec(dq.DequantSpec("key", 2, 32, 128, torch.float64)) is not None
    assert dq.check_spec(dq.DequantSpec("query", 2, 32, 128, FP16)) is not None
    x = _rand((1, 2, 32, 64), FP16, 5)
    c, s, z = kivi.quantize_keys(x, 2, 32, torch.float16)
    w = x[:, :, :4]
    kw = dict(kind="key", bits=2, group_size=32, kv_len=40)
    with pytest.raises(ValueError, match="unsupported"):
        dq.dequantize(c, s, z, w, **dict(kw, bits=3), n_quant=32)
    with pytest.raises(ValueError, match="whole groups"):
        dq.dequantize(c, s, z, w, **kw, n_quant=16)
    with pytest.raises(ValueError, match="holds 32 tokens"):
        dq.dequantize(c, s, z, w, **kw, n_quant=64)
    with pytest.raises(ValueError, match="codes"):
        dq.dequantize(c[..., :8], s, z, w, **kw, n_quant=32)
    with pytest.raises(TypeError, match="uint8"):
        dq.dequantize(c.to(torch.int32), s, z, w, **kw, n_quant=32)
    with pytest.raises(TypeError, match="share"):
        dq.dequantize(c, s, z.float(), w, **kw, n_quant=32)
    with pytest.raises(ValueError, match="contiguous rows"):
        dq.dequantize(c, torch.stack([s, s], dim=-1)[..., 0], z, w, **kw, n_quant=32)  # channel stride 2


# ---------------------------------------------------------------------------------------------
# GPU only: real sizes, where an FMA-contracted `code * scale + zero` would show up at once


@pytest.mark.skipif(not ON_GPU, reason="larger shapes: GPU only")
@pytest.mark.parametrize("kb,vb,G,D,dtype", [(2, 2, 32, 128, BF16), (4, 4, 128, 128, FP16), (2, 8, 64, 256, BF16),
                                             (8, 8, 16, 80, FP16), (2, 4, 32, 96, FP32), (4, 2, 128, 64, BF16)])
def test_gpu_large(kb, vb, G, D, dtype, kernel_path, monkeypatch):
    n = 4096 + 100
    st = _store(kb, vb, G, 128, D, dtype, n, B=2, H=8, seed=D + G, monkeypatch=monkeypatch)
    _check_store(st, [n, n + 300, n - 50, 1000, 0], monkeypatch)
    st = _store(kb, vb, G, 128, D, dtype, 3 * G + 140, B=2, H=4, seed=7, monkeypatch=monkeypatch, kernel_append=True)
    _check_store(st, [st.length, st.length + 33], monkeypatch)
