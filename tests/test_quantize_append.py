"""Fused quantize-append kernel (templates/quantize_append.py) vs the KIVI reference, bit for bit.

On a machine without CUDA the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set here
before the kernels are imported; store tests also set KVPASS_TRITON_INTERPRET=1 so that dispatch
routes CPU stores to the kernel) with small shapes; on a GPU the same cases run the compiled CUDA
kernel, plus a few larger ones. Data is random and never zero; parts, scales and zeros must be
*equal* to the reference's (NaN where the reference has NaN), not close.
"""
from __future__ import annotations

import logging

import pytest
import torch

from kernel_setup import BF16, FP16, FP32, DEVICE, ON_GPU, kernel_path  # noqa: F401 (fixture)
from kernel_setup import rand as _rand

triton = pytest.importorskip("triton", reason="triton is not importable: the kernels cannot run")

from kvpass.lowering import dispatch, kivi  # noqa: E402
from kvpass.lowering.codecs import scale_dtype_for  # noqa: E402
from kvpass.store import KVStore, StoreConfig  # noqa: E402
from kvpass.templates import decode_attention as da  # noqa: E402
from kvpass.templates import quantize_append as qa  # noqa: E402


def _buffers(B, H, cap, D, kb, vb, G, dtype):
    """Part buffers of `cap` tokens filled with a sentinel pattern (to see what the kernel touched)."""
    sdt, gv = scale_dtype_for(dtype), min(G, D)
    g = torch.Generator().manual_seed(123)

    def codes(width):
        return torch.randint(0, 256, (B, H, cap, width), generator=g, dtype=torch.uint8).to(DEVICE)

    def scales(rows, width):
        return (torch.rand(B, H, rows, width, generator=g) + 7.0).to(sdt).to(DEVICE)

    return [codes(D * kb // 8), scales(cap // G, D), scales(cap // G, D),
            codes(D * vb // 8), scales(cap, D // gv), scales(cap, D // gv)]


def _reference(k, v, kb, vb, G):
    sdt = scale_dtype_for(k.dtype)
    return [*kivi.quantize_keys(k, kb, G, sdt), *kivi.quantize_values(v, vb, min(G, k.shape[-1]), sdt)]


def _assert_equal(got, want, what):
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")


def _check_kernel(k, v, kb, vb, G, row_groups=1, config=None):
    """Quantize k, v [B, H, n, D] at token row `row_groups * G` of sentinel buffers one group
    longer on each side; the written rows must equal the reference, the others stay untouched."""
    B, H, n, D = k.shape
    row, cap = row_groups * G, (row_groups + 1) * G + n
    bufs = _buffers(B, H, cap, D, kb, vb, G, k.dtype)
    before = [b.clone() for b in bufs]
    qa.quantize_append(k, v, *bufs, key_bits=kb, value_bits=vb, group_size=G, n=n, row=row, config=config)
    names = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero")
    for name, got, old, want in zip(names, bufs, before, _reference(k, v, kb, vb, G)):
        per = G if name in ("k_scale", "k_zero") else 1  # token rows per stored row
        a, b = row // per, (row + n) // per
        _assert_equal(got[:, :, a:b], want, name)
        assert torch.equal(got[:, :, :a], old[:, :, :a]) and torch.equal(got[:, :, b:], old[:, :, b:]), f"{name}: wrote outside its rows"


# Each bits value, group (16 only with head_dim 80, where 32 does not divide it), head_dim and
# dtype appears several times; mixed key/value widths included.
KERNEL_CASES = [
    (2, 2, 32, 128, BF16), (4, 4, 32, 64, FP16), (8, 8, 32, 128, FP32),
    (2, 4, 64, 64, FP32), (4, 2, 64, 128, BF16), (8, 2, 64, 64, FP16),
    (2, 8, 128, 128, FP16), (4, 8, 128, 64, BF16), (8, 4, 128, 128, FP32),
    (2, 2, 16, 80, FP16), (4, 4, 16, 80, BF16), (8, 4, 16, 80, FP32),
]


@pytest.mark.parametrize("kb,vb,G,D,dtype", KERNEL_CASES)
def test_kernel_matches_reference(kb, vb, G, D, dtype):
    B, H, n = 2, 2, 2 * G
    seed = kb * 100 + vb * 10 + G + D
    k = _rand((B, H, n, D), dtype, seed, scale=1.5)
    v = _rand((B, H, n, D), dtype, seed + 1)
    _check_kernel(k, v, kb, vb, G)


def test_strided_source_and_config_variants():
    """A source that is a slice of a longer, head-major buffer; small blocks, one group per program."""
    G, D = 32, 128
    big_k = _rand((2, 3, 5 * G, D), BF16, 7)
    big_v = _rand((2, 3, 5 * G, D), BF16, 8)
    k, v = big_k[:, 1:, G : 3 * G], big_v[:, 1:, G : 3 * G]  # [2, 2, 2G, D], not contiguous
    for cfg in (None, qa.AppendConfig(block_c=16, block_k=8, block_t=4, num_warps=1, groups_per_program=1)):
        _check_kernel(k, v, 2, 4, G, row_groups=2, config=cfg)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy on NaN/Inf
def test_round_half_to_even_constant_nan_and_inf_groups():
    """Ties round to even (torch.round); a constant group gets scale 0 and codes 0; a NaN or Inf
    stays inside its group (NaN scale/zero or Inf scale, codes 0), exactly as the reference."""
    G, D = 32, 64
    k = _rand((1, 2, 3 * G, D), FP32, 3).cpu()
    v = _rand((1, 2, 3 * G, D), FP32, 4).cpu()
    # channel 0 of group 0, 2-bit: min 0, max 3 -> scale 1; 0.5, 1.5, 2.5 are ties -> 0, 2, 2
    k[0, 0, :G, 0] = torch.tensor([0.0, 3.0] + [0.5, 1.5, 2.5] * 10)
    v[0, 0, 0, :G] = torch.tensor([0.0, 3.0] + [0.5, 1.5, 2.5] * 10)
    k[0, 1, :G, 3] = 1.7              # constant key channel in a group
    v[0, 1, 5, G:] = -0.4             # constant value group
    k[0, 0, G + 4, 7] = float("nan")  # NaN key group (group 1, channel 7)
    v[0, 1, 9, 2] = float("nan")      # NaN value group
    k[0, 1, 2 * G + 1, 9] = float("inf")
    v[0, 0, 40, G + 3] = float("-inf")
    ref = _reference(k, v, 2, 2, G)
    assert torch.equal(kivi.unpack_codes(ref[0], 2)[0, 0, 2:8, 0], torch.tensor([0, 2, 2, 0, 2, 2], dtype=torch.int32))
    assert ref[1][0, 1, 0, 3] == 0 and torch.isnan(ref[1][0, 0, 1, 7]) and torch.isinf(ref[1][0, 1, 2, 9])
    for dtype in (FP32, FP16):
        _check_kernel(k.to(dtype).to(DEVICE), v.to(dtype).to(DEVICE), 2, 2, G)


def test_in_place_window_shift():
    """The decode flush: the source is the window buffer itself and the leftover (longer than the
    encoded part) moves down inside it."""
    B, H, G, D, R = 1, 2, 16, 64, 48
    total = R + G + 5
    win_k = _rand((B, H, R + G + 8, D), FP16, 11)
    win_v = _rand((B, H, R + G + 8, D), FP16, 12)
    k0, v0 = win_k[:, :, :total].clone(), win_v[:, :, :total].clone()
    bufs = _buffers(B, H, 2 * G, D, 4, 2, G, FP16)
    n = (total - R) // G * G
    qa.quantize_append(win_k[:, :, :total], win_v[:, :, :total], *bufs, key_bits=4, value_bits=2, group_size=G,
                       n=n, row=G, window_k=win_k, window_v=win_v, rest=total - n)
    for name, got, want in zip(("kc", "ks", "kz", "vc", "vs", "vz"), bufs, _reference(k0[:, :, :n], v0[:, :, :n], 4, 2, G)):
        per = G if name in ("ks", "kz") else 1
        _assert_equal(got[:, :, G // per : (G + n) // per], want, name)
    assert torch.equal(win_k[:, :, : total - n], k0[:, :, n:]) and torch.equal(win_v[:, :, : total - n], v0[:, :, n:])


def test_specs_names_and_errors():
    assert qa.check_spec(qa.AppendSpec(3, 2, 32, 128, FP16)) is not None
    assert qa.check_spec(qa.AppendSpec(2, 2, 48, 96, FP16)) is not None
    assert qa.check_spec(qa.AppendSpec(2, 2, 32, 80, FP16)) is not None  # value groups of 32 do not tile 80
    assert qa.check_spec(qa.AppendSpec(2, 2, 16, 80, FP16)) is None
    assert qa.check_spec(qa.AppendSpec(2, 2, 128, 64, BF16)) is None  # values: one group of 64 channels
    assert qa.check_spec(qa.AppendSpec(2, 2, 32, 72, FP16)) is not None
    assert qa.check_spec(qa.AppendSpec(2, 2, 32, 128, torch.float64)) is not None
    assert qa.kernel_name(qa.AppendSpec(2, 2, 32, 128, BF16)) == "kvpass_append_b2_g32_d128_bf16"
    assert qa.kernel_name(qa.AppendSpec(2, 4, 32, 128, FP16)) == "kvpass_append_k2v4_g32_d128_fp16"
    k = _rand((1, 2, 40, 64), FP16, 1)
    bufs = _buffers(1, 2, 64, 64, 2, 2, 32, FP16)
    with pytest.raises(ValueError, match="whole groups"):
        qa.quantize_append(k, k, *bufs, key_bits=2, value_bits=2, group_size=32, n=40, row=0)
    with pytest.raises(ValueError, match="holds 64 tokens"):
        qa.quantize_append(k, k, *bufs, key_bits=2, value_bits=2, group_size=32, n=32, row=64)
    with pytest.raises(ValueError, match="unsupported"):
        qa.quantize_append(k, k, *bufs, key_bits=3, value_bits=2, group_size=32, n=32, row=0)
    with pytest.raises(ValueError, match="window"):
        qa.quantize_append(k, k, *bufs, key_bits=2, value_bits=2, group_size=32, n=32, row=0, rest=8)


# ---------------------------------------------------------------------------------------------
# Store level: the kernel path must leave exactly the reference path's state after every step.


def _run_store(cfg, B, H, D, dtype, k, v, chunks, kernel: bool, monkeypatch):
    monkeypatch.setenv("KVPASS_DISABLE_TRITON", "0" if kernel else "1")
    st = KVStore(cfg, B, H, D, D, dtype, DEVICE)
    states, a = [], 0
    for n in chunks:
        st.append(k[:, :, a : a + n], v[:, :, a : a + n])
        a += n
        states.append((st.quantized_length, st.length, st.res_k.clone(), st.res_v.clone()))
    return st, states


def _assert_same_store(st_ref, st_ker, states_ref, states_ker):
    for step, (r, q) in enumerate(zip(states_ref, states_ker)):
        assert r[:2] == q[:2], f"step {step}: (Lq, L) {q[:2]} vs reference {r[:2]}"
        assert torch.equal(r[2], q[2]) and torch.equal(r[3], q[3]), f"step {step}: window differs"
    Lq = st_ref.quantized_length
    for parts_ref, parts_ker in ((st_ref.keys, st_ker.keys), (st_ref.values, st_ker.values)):
        for (name, a), b in zip(parts_ref.view(0, Lq).items(), parts_ker.view(0, Lq).values()):
            assert torch.equal(a, b), f"{name} differs"
    assert st_ref.used_bytes() == st_ker.used_bytes() and st_ref.nbytes() == st_ker.nbytes()


STORE_CASES = [  # (key_bits, value_bits, G, R, D, dtype, chunks)
    # one-token decode steps across several flushes: window sizes R+G-1 -> R+G each time
    (2, 2, 16, 32, 64, BF16, [5] + [1] * 60),
    # R = 0: flush on every completed group; the last partial group stays in the window
    (4, 8, 32, 0, 64, FP16, [1] * 40 + [3, 31, 1, 1]),
    # a prefill longer than the window buffer (the torch concatenation), then decode and a second large write
    (8, 4, 16, 16, 80, FP32, [100, 1, 1, 1, 20, 1, 1, 40]),
    # multi-token writes that fit the buffer, and ones that land exactly on R + G
    (2, 4, 32, 32, 128, BF16, [7, 9, 48, 3, 61, 1, 35]),
]


@pytest.mark.parametrize("kb,vb,G,R,D,dtype,chunks", STORE_CASES)
def test_store_kernel_path_equals_reference_path(kb, vb, G, R, D, dtype, chunks, kernel_path, monkeypatch):
    B, H = 1, 2
    L = sum(chunks)
    k, v = _rand((B, H, L, D), dtype, L, scale=1.5), _rand((B, H, L, D), dtype, L + 1)
    cfg = StoreConfig(kb, vb, G, R)
    st_ref, states_ref = _run_store(cfg, B, H, D, dtype, k, v, chunks, False, monkeypatch)
    st_ker, states_ker = _run_store(cfg, B, H, D, dtype, k, v, chunks, True, monkeypatch)
    assert st_ker._win_k is not None and st_ref._win_k is None  # each took its own path
    _assert_same_store(st_ref, st_ker, states_ref, states_ker)


def test_decode_steps_write_in_place(kernel_path):
    """A decode step writes into the preallocated window: no buffer is reallocated, the window is
    a view of it, and the decode kernel reads those views without copying them."""
    G, R, D = 16, 16, 64
    st = KVStore(StoreConfig(2, 2, G, R), 2, 2, D, D, FP16, DEVICE)
    x = _rand((2, 2, 40, D), FP16, 5)
    st.append(x, -x)  # a prefill longer than the buffer: 16 quantized, 24 in the window
    st.keys.reserve(128)
    st.values.reserve(128)
    ptrs = [st._win_k.data_ptr(), st._win_v.data_ptr()] + [b.data_ptr() for p in (st.keys, st.values) for b in p.buffers.values()]
    for i in range(30):  # two flushes (at window sizes 32)
        st.append(x[:, :, i : i + 1], x[:, :, i : i + 1] * 0.5)
        assert st.res_k.data_ptr() == st._win_k.data_ptr() and st.res_k.stride() == st._win_k.stride()
    assert st.quantized_length == 48 and st.length == 70
    assert [st._win_k.data_ptr(), st._win_v.data_ptr()] + [
        b.data_ptr() for p in (st.keys, st.values) for b in p.buffers.values()] == ptrs
    assert not st.res_k.is_contiguous()  # [B, H, w, D] view of a [B, H, R + G, D] buffer
    q = _rand((2, 4, 1, D), FP16, 6)
    cfg = da.DecodeConfig(use_dot=True, pad_heads=1, block_n=16)
    out = da.decode_attention_store(q, st, config=cfg)
    st.res_k, st.res_v = st.res_k.contiguous(), st.res_v.contiguous()
    torch.testing.assert_close(out, da.decode_attention_store(q, st, config=cfg), rtol=0, atol=0)


def test_truncate_and_outside_window_are_adopted(kernel_path, monkeypatch):
    """truncate() (and anything else that replaces res_k/res_v) leaves the window outside the
    buffer: the next kernel-path append copies it back in and continues exactly like the reference."""
    G, R, D = 16, 16, 64
    x = _rand((1, 2, 120, D), BF16, 9)
    stores = []
    for kernel in (False, True):
        monkeypatch.setenv("KVPASS_DISABLE_TRITON", "0" if kernel else "1")
        st = KVStore(StoreConfig(4, 2, G, R), 1, 2, D, D, BF16, DEVICE)
        st.append(x[:, :, :70], x[:, :, :70])  # 48 quantized, 22 in the window
        st.truncate(40)   # inside an encoded group: its 8 kept tokens come back dequantized
        for i in range(40, 75):
            st.append(x[:, :, i : i + 1], x[:, :, i : i + 1])
        st.truncate(70)   # inside the window
        st.append(x[:, :, 70:100], x[:, :, 70:100])
        stores.append(st)
    ref, ker = stores
    assert ker._win_k is not None and ref._win_k is None
    assert (ref.quantized_length, ref.length) == (ker.quantized_length, ker.length)
    assert torch.equal(ref.res_k, ker.res_k) and torch.equal(ref.res_v, ker.res_v)
    assert torch.equal(ref.read_keys(100), ker.read_keys(100)) and torch.equal(ref.read_values(100), ker.read_values(100))


def test_dispatch_logs_append_fallbacks(caplog, kernel_path, monkeypatch):
    x = _rand((1, 2, 40, 64), FP16, 2)
    dispatch._logged.clear()
    with caplog.at_level(logging.INFO, logger="kvpass"):
        monkeypatch.setenv("KVPASS_DISABLE_TRITON", "1")
        st = KVStore(StoreConfig(2, 2, 32, 0), 1, 2, 64, 64, FP16, DEVICE)
        st.append(x, x)
        assert st._win_k is None
        monkeypatch.setenv("KVPASS_DISABLE_TRITON", "0")
        st16 = KVStore(StoreConfig(16, 2, 32, 0), 1, 2, 64, 64, FP16, DEVICE)
        st16.append(x, x)
        st16.append(x, x)
        assert st16._win_k is None and st16.quantized_length == 64
    text = caplog.text
    assert "quantize-append runs the reference" in text and "KVPASS_DISABLE_TRITON=1" in text
    assert text.count("full-precision codec (key_bits=16") == 1  # logged once


# ---------------------------------------------------------------------------------------------
# GPU only: real sizes (the in-place shift runs many warps per program) and many flushes


@pytest.mark.skipif(not ON_GPU, reason="larger shapes: GPU only")
@pytest.mark.parametrize("kb,vb,G,D,dtype", [(2, 2, 32, 128, BF16), (4, 4, 128, 128, FP16), (2, 8, 64, 256, BF16),
                                             (8, 8, 16, 80, FP16), (2, 4, 32, 96, FP32)])
def test_gpu_large(kb, vb, G, D, dtype, monkeypatch):
    B, H = 4, 8
    k, v = _rand((B, H, 16 * G, D), dtype, D, scale=2.0), _rand((B, H, 16 * G, D), dtype, D + 1)
    _check_kernel(k, v, kb, vb, G)
    chunks = [300] + [1] * (3 * G + 5) + [2 * G + 3] + [1] * G
    L = sum(chunks)
    k, v = _rand((B, H, L, D), dtype, L, scale=1.5), _rand((B, H, L, D), dtype, L + 1)
    cfg = StoreConfig(kb, vb, G, 128)
    st_ref, states_ref = _run_store(cfg, B, H, D, dtype, k, v, chunks, False, monkeypatch)
    st_ker, states_ker = _run_store(cfg, B, H, D, dtype, k, v, chunks, True, monkeypatch)
    _assert_same_store(st_ref, st_ker, states_ref, states_ker)
