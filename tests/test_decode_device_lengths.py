"""Device-lengths (CUDA-graph capturable) mode of the decode-attention kernel vs the same golden
and reference as the host mode (tests/test_kernels.py).

The kernel gets (Lq, L) only as an int32 device tensor, the whole window buffers (rows past
L - Lq poisoned with NaN) and part buffers whose rows past Lq hold NaN scales and random codes:
a finite, correct output proves that nothing past the lengths is read. On a machine without
CUDA the kernels run in Triton's interpreter (tiny shapes).
"""
from __future__ import annotations

import math
import os
from types import SimpleNamespace

import pytest
import torch

if not torch.cuda.is_available():  # must precede the first import of the kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton", reason="triton is not importable: the kernels cannot run")

from kvpass.lowering.ops import attention_reference  # noqa: E402
from kvpass.store import KVStore, StoreConfig  # noqa: E402
from kvpass.templates import decode_attention as da  # noqa: E402
from test_kernels import DEVICE, TOLERANCE, _golden, _q  # noqa: E402

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32

# (few splits, many splits) per variant; block_n 32 for rows nests with every G used here
CONFIGS = {
    ("dot", False): da.DecodeConfig(use_dot=True, min_groups_per_split=1),
    ("dot", True): da.DecodeConfig(use_dot=True, min_groups_per_split=1, ctas_per_sm=1024),
    ("dot_exact", False): da.DecodeConfig(use_dot=True, min_groups_per_split=1, pad_heads=1),
    ("rows", False): da.DecodeConfig(use_dot=False, min_groups_per_split=1, block_n=32),
    ("rows", True): da.DecodeConfig(use_dot=False, min_groups_per_split=1, block_n=32, ctas_per_sm=1024),
}


def _exact_store(B, H, D, Lq, L, kb, vb, G, dtype, seed):
    """A store with exactly Lq quantized tokens (a multiple of G) and the window [Lq, L)."""
    g = torch.Generator().manual_seed(seed)
    k = (torch.randn(B, H, L, D, generator=g) * 1.5 + 0.3)
    k[..., 1] *= 6.0  # an outlier key channel, as real models have
    k = k.to(dtype).to(DEVICE)
    v = torch.randn(B, H, L, D, generator=g).to(dtype).to(DEVICE)
    st = KVStore(StoreConfig(kb, vb, G, 2 * G), B, H, D, D, dtype, DEVICE)
    if Lq:
        st.keys.append(k[:, :, :Lq])
        st.values.append(v[:, :, :Lq])
    st.res_k, st.res_v = k[:, :, Lq:].contiguous(), v[:, :, Lq:].contiguous()
    assert (st.quantized_length, st.length) == (Lq, L)
    return st


def _poisoned_parts(st: KVStore, capacity: int, seed: int):
    """Copies of the part buffers with room for `capacity` tokens (whole groups); every row past
    Lq holds random codes and NaN scales/zeros."""
    G, Lq = st.cfg.group_size, st.quantized_length
    cap = max(-(-capacity // G) * G, Lq, G)
    g = torch.Generator().manual_seed(seed)
    out = []
    for parts, per_group in ((st.keys, ("scale", "zero")), (st.values, ())):
        for name in ("codes", "scale", "zero"):
            buf = parts.buffers[name]
            rows, valid = (cap // G, Lq // G) if name in per_group else (cap, Lq)  # key scales: one row per group
            shape = (*buf.shape[:2], rows, *buf.shape[3:])
            if name == "codes":
                new = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).to(DEVICE)
            else:
                new = torch.full(shape, float("nan"), dtype=buf.dtype, device=DEVICE)
            new[:, :, :valid] = buf[:, :, :valid]
            out.append(new)
    return out  # k_codes, k_scale, k_zero, v_codes, v_scale, v_zero


def _window(res: torch.Tensor, extra: int):
    """The whole window buffer: res in rows [0, L - Lq), NaN in `extra` rows after it."""
    B, H, W, D = res.shape
    buf = torch.full((B, H, W + extra, D), float("nan"), dtype=res.dtype, device=res.device)
    buf[:, :, :W] = res
    return buf


def _device_call(q, st, kv_len, mask=None, config=None, extra=None, seed=0, lengths=None, out=None, softcap=0.0):
    G = st.cfg.group_size
    parts = _poisoned_parts(st, st.length if kv_len is None else kv_len, seed)
    extra = 2 * G + 3 if extra is None else extra
    wk, wv = _window(st.res_k, extra), _window(st.res_v, extra)
    if lengths is None:
        lengths = torch.tensor([st.quantized_length, st.length, 0, 0], dtype=torch.int32, device=DEVICE)
    return da.decode_attention(
        q, *parts, wk, wv, key_bits=st.cfg.key_bits, value_bits=st.cfg.value_bits, group_size=G,
        kv_len=kv_len, attn_mask=mask, config=config, lengths=lengths,
        out=q.new_full(q.shape, float("nan")) if out is None else out, softcap=softcap)


def _host_mode(q, st, kv_len, mask, config, softcap=0.0):
    """The host-lengths mode on the same store (the mode the device mode must equal)."""
    kb, vb = st.keys.buffers, st.values.buffers
    return da.decode_attention(
        q, kb["codes"], kb["scale"], kb["zero"], vb["codes"], vb["scale"], vb["zero"], st.res_k, st.res_v,
        key_bits=st.cfg.key_bits, value_bits=st.cfg.value_bits, group_size=st.cfg.group_size,
        quantized_length=st.quantized_length, length=st.length, kv_len=kv_len, attn_mask=mask, config=config,
        softcap=softcap)


def _assert_close_to_golden(out, q, st, mask, kv_len, config, softcap=0.0):
    """The error metric of tests/test_kernels.py (fp64 golden, SDPA reference, TOLERANCE), with one
    allowance: the device mode may be as far from the golden as the host mode is on the same data
    (the interpreter's fp32->bf16 cast truncates, which can put the host mode itself slightly past
    the bf16 bound for some data). And the two modes must agree to ~2 ulp of the output dtype:
    they differ only in how the tokens are dealt out to splits (fp32 summation order)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    ref = attention_reference(q, st, mask, kv_len, 1, 0.0, False, None, True, softcap)
    gold = _golden(q, st, mask, kv_len, scale, softcap)
    host = _host_mode(q, st, kv_len, mask, config, softcap)
    assert out.shape == ref.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all(), "kernel output has NaN/Inf (read past the lengths, or unwritten)"
    ref_err = (ref.double() - gold).abs().max().item()
    host_err = (host.double() - gold).abs().max().item()
    err = (out.double() - gold).abs().max().item()
    fudge, atol = TOLERANCE[q.dtype]
    bound = max(fudge * ref_err + atol, 1.05 * host_err + 1e-5)
    print(f"err {err:.3e} bound {bound:.3e} (ref {ref_err:.3e}, host mode {host_err:.3e})")  # pytest -s
    assert err <= bound, f"kernel err {err:.3e} > bound {bound:.3e} (ref err {ref_err:.3e}, host mode {host_err:.3e})"
    ulp = torch.finfo(q.dtype).eps * max(1.0, host.double().abs().max().item())
    diff = (out.double() - host.double()).abs().max().item()
    assert diff <= 2 * ulp + 1e-5, f"device vs host mode differ by {diff:.3e} (> 2 ulp {ulp:.3e})"


def _mask(kind, B, L, kv_len, seed, dtype):
    """None, or a padding + static-cache mask over kv_len columns: the first row of the batch has
    left padding; columns >= L are masked (bool False / additive min) except a few that are kept
    (so the masked tail path has attended columns too)."""
    if kind is None:
        return None
    keep = torch.ones(B, 1, 1, kv_len, dtype=torch.bool)
    keep[0, ..., : min(5, L)] = False
    keep[..., L:] = False
    g = torch.Generator().manual_seed(seed)
    if kv_len > L:
        extra = torch.randint(L, kv_len, (3,), generator=g)
        keep[..., extra] = True
    if kind == "bool":
        return keep.to(DEVICE)
    bias = torch.randn(B, 1, 1, kv_len, generator=g) * 0.5
    return bias.masked_fill(~keep, torch.finfo(dtype).min).to(dtype).to(DEVICE)


# (key bits, value bits, G, dtype, rep, Lq, L, kv_len, mask kind, many splits)
CASES = {
    "plain": (2, 2, 32, BF16, 4, 64, 90, 90, None, False),
    "long_tail": (2, 2, 32, BF16, 4, 64, 90, 400, None, True),
    "long_tail_bool": (2, 2, 32, BF16, 4, 64, 90, 400, "bool", True),
    "long_tail_additive": (4, 4, 16, FP16, 1, 48, 60, 300, "additive", False),
    "tail_mixed_bits": (4, 2, 16, FP16, 1, 48, 60, 300, None, False),
    "lq0": (2, 4, 32, FP32, 4, 0, 20, 100, None, False),
    "lq0_bool": (4, 4, 16, FP16, 1, 0, 30, 64, "bool", True),
    "empty_window": (4, 4, 32, BF16, 1, 96, 96, 96, None, False),
    "empty_window_tail_bool": (2, 2, 16, FP16, 4, 96, 96, 200, "bool", False),
    "kv_len_below_lq": (2, 2, 32, FP16, 4, 96, 120, 70, None, True),
    "kv_len_inside_window": (4, 4, 32, BF16, 1, 96, 120, 110, "bool", False),
    "many_splits": (2, 2, 16, BF16, 4, 128, 147, 256, None, True),
    "many_splits_additive": (4, 4, 16, BF16, 1, 128, 147, 256, "additive", True),
    "empty_store_tail_only": (2, 2, 16, FP16, 1, 0, 0, 40, None, False),
    "bits8_fp32": (8, 8, 32, FP32, 2, 64, 100, 128, "additive", False),
    # a window of 106 rows over 4 splits: each split takes every 4th row, two window steps apiece
    "long_window_bool": (2, 2, 16, BF16, 1, 64, 170, 200, "bool", False),
}


@pytest.mark.parametrize("variant", ["dot", "rows"])
@pytest.mark.parametrize("case", list(CASES))
def test_device_lengths_match_golden(case, variant):
    kb, vb, G, dtype, rep, Lq, L, kv_len, mask_kind, many = CASES[case]
    B, H, D = 2, 2, 64
    seed = sum(map(ord, case))
    st = _exact_store(B, H, D, Lq, L, kb, vb, G, dtype, seed)
    q = _q(B, H * rep, D, dtype, seed)
    mask = _mask(mask_kind, B, L, kv_len, seed, dtype)
    out = _device_call(q, st, kv_len, mask, CONFIGS[(variant, many)], seed=seed)
    _assert_close_to_golden(out, q, st, mask, kv_len, CONFIGS[(variant, many)])


@pytest.mark.parametrize("variant,case", [("dot", "long_tail_bool"), ("rows", "long_window_bool"),
                                          ("rows", "many_splits"), ("dot", "kv_len_inside_window")])
def test_device_lengths_with_softcap(case, variant):
    """Gemma2's logit softcap in device-lengths mode (quantized part, window rows dealt over the
    splits, zero tail whose score 0 the cap keeps at 0); a cap of 2 bends these scores."""
    kb, vb, G, dtype, rep, Lq, L, kv_len, mask_kind, many = CASES[case]
    B, H, D = 2, 2, 64
    seed = sum(map(ord, case)) + 1
    st = _exact_store(B, H, D, Lq, L, kb, vb, G, dtype, seed)
    q = (_q(B, H * rep, D, dtype, seed).float() * 3.0).to(dtype)
    mask = _mask(mask_kind, B, L, kv_len, seed, dtype)
    out = _device_call(q, st, kv_len, mask, CONFIGS[(variant, many)], seed=seed, softcap=2.0)
    _assert_close_to_golden(out, q, st, mask, kv_len, CONFIGS[(variant, many)], softcap=2.0)


def test_device_lengths_exact_query_rows():
    """The dot variant without padded query rows (HB = REP), GQA 4, with a masked tail."""
    st = _exact_store(1, 2, 64, 64, 81, 2, 2, 32, FP16, 3)
    q = _q(1, 8, 64, FP16, 3)
    mask = _mask("bool", 1, 81, 160, 3, FP16)
    cfg = CONFIGS[("dot_exact", False)]
    _assert_close_to_golden(_device_call(q, st, 160, mask, cfg), q, st, mask, 160, cfg)


def test_device_tail_raises_the_running_max():
    """Window scores far below the tail's 0 (keys opposite to q, log2 score ~ -200): the zero
    tail must raise the lazy running max (closed form and masked loop alike). Otherwise the split
    holding the window keeps m ~ -200 with l = count * 2**200 = inf, and the reduce's weight of that
    split, 2**(m - 0) = 0 in fp32, times l gives NaN."""
    B, H, D, G = 1, 2, 64, 16
    st = _exact_store(B, H, D, 0, 20, 2, 2, G, FP16, 5)
    q = _q(B, H, D, FP16, 5)
    k = -150.0 * q.float().expand(B, H, 20, D) / q.float().norm(dim=-1, keepdim=True)
    st.res_k = k.to(FP16).contiguous()
    for variant in ("dot", "rows"):
        for kind in (None, "bool"):
            mask = _mask(kind, B, 20, 100, 5, FP16)
            cfg = CONFIGS[(variant, True)]
            _assert_close_to_golden(_device_call(q, st, 100, mask, cfg), q, st, mask, 100, cfg)


class _DeviceOnly(torch.Tensor):
    """A lengths tensor whose contents the host must never see: only static facts may be read."""
    ALLOWED = {"dtype", "device", "shape", "dim", "stride", "numel", "size", "ndim", "is_contiguous"}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name == "__get__":
            name = getattr(func.__self__, "__name__", name)
        if name not in cls.ALLOWED:
            raise AssertionError(f"decode_attention used the lengths on the host: {name}")
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


def _plain(a):
    if isinstance(a, _DeviceOnly):
        with torch._C.DisableTorchFunctionSubclass():
            return a.as_subclass(torch.Tensor)
    return a


def _describe(a):
    if isinstance(a, torch.Tensor):
        with torch._C.DisableTorchFunctionSubclass():
            return ("tensor", tuple(a.shape), a.dtype, tuple(a.stride()), a.device.type)
    return (type(a).__name__, a)


@pytest.mark.parametrize("variant,mask_kind", [("dot", None), ("dot", "bool"), ("rows", "additive")])
def test_launch_does_not_depend_on_lengths(monkeypatch, variant, mask_kind):
    """Same launches (kernel, grid, every non-tensor argument, tensor shapes/dtypes/strides,
    constexprs) for different lengths contents, lengths never read on the host, and the second
    call (lengths changed in place, as a graph replay sees them) is right."""
    B, H, D, G, rep, kv_len = 2, 2, 64, 16, 4 if variant == "dot" else 1, 300
    st = _exact_store(B, H, D, 96, 121, 2, 2, G, BF16, 8)
    q = _q(B, H * rep, D, BF16, 8)
    mask = _mask(mask_kind, B, 121, kv_len, 8, BF16)
    real_launch, record = da._launch, []

    def recording_launch(fn, grid, args, kw):
        record.append((fn.fn.__name__ if hasattr(fn, "fn") else fn.__name__, tuple(grid),
                       tuple(_describe(a) for a in args), tuple(sorted(kw.items()))))
        real_launch(fn, grid, tuple(_plain(a) for a in args), kw)

    monkeypatch.setattr(da, "_launch", recording_launch)
    lengths = torch.tensor([16, 20, 0, 0], dtype=torch.int32, device=DEVICE).as_subclass(_DeviceOnly)
    cfg = CONFIGS[(variant, True)]
    _device_call(q, st, kv_len, mask, cfg, lengths=lengths)
    first = list(record)
    record.clear()
    with torch._C.DisableTorchFunctionSubclass():
        lengths.copy_(torch.tensor([96, 121, 0, 0], dtype=torch.int32))
    out = _device_call(q, st, kv_len, mask, cfg, lengths=lengths)
    assert first == record
    kw = dict(record[0][3])
    assert len(record) == 1 and not kw["SINGLE"] and kw["FUSE_REDUCE"], "expected one split launch, reduce fused"
    _assert_close_to_golden(out, q, st, mask, kv_len, cfg)


def test_store_wrapper_uses_device_lengths():
    """decode_attention_store reads a store with device_lengths through its lengths and whole
    window buffers (a stand-in store object: no host length is touched), and needs kv_len."""
    B, H, D, G, kv_len = 1, 2, 64, 16, 120
    st = _exact_store(B, H, D, 48, 70, 4, 2, G, FP16, 12)
    q = _q(B, H * 4, D, FP16, 12)
    kc, ks, kz, vc, vs, vz = _poisoned_parts(st, kv_len, 12)
    fake = SimpleNamespace(
        cfg=st.cfg, keys=SimpleNamespace(buffers=dict(codes=kc, scale=ks, zero=kz)),
        values=SimpleNamespace(buffers=dict(codes=vc, scale=vs, zero=vz)),
        device_lengths=torch.tensor([48, 70, 0, 0], dtype=torch.int32, device=DEVICE),
        window_k=_window(st.res_k, 2 * G), window_v=_window(st.res_v, 2 * G))
    cfg = CONFIGS[("dot", True)]
    out = da.decode_attention_store(q, fake, kv_len=kv_len, config=cfg)
    _assert_close_to_golden(out, q, st, None, kv_len, cfg)
    with pytest.raises(ValueError, match="kv_len"):
        da.decode_attention_store(q, fake)


def test_device_lengths_argument_checks():
    st = _exact_store(1, 2, 64, 32, 40, 2, 2, 16, FP16, 1)
    q = _q(1, 2, 64, FP16, 1)
    with pytest.raises(ValueError, match="kv_len"):
        _device_call(q, st, None)
    with pytest.raises(ValueError, match="int32"):
        _device_call(q, st, 64, lengths=torch.tensor([32, 40], dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="int32"):
        _device_call(q, st, 64, lengths=torch.tensor([32], dtype=torch.int32, device=DEVICE))


@pytest.mark.skipif(not hasattr(KVStore, "enable_device_lengths"), reason="KVStore has no device-lengths mode")
def test_real_store_in_device_lengths_mode():
    """A KVStore switched to device lengths, filled by host appends: the wrapper's device path."""
    B, H, D, G, kv_len = 1, 2, 64, 16, 160
    st = KVStore(StoreConfig(2, 2, G, 2 * G), B, H, D, D, FP16, DEVICE)
    st.enable_device_lengths(kv_len)
    g = torch.Generator().manual_seed(21)
    k = torch.randn(B, H, 90, D, generator=g).half().to(DEVICE)
    v = torch.randn(B, H, 90, D, generator=g).half().to(DEVICE)
    st.append(k[:, :, :70], v[:, :, :70])
    st.append(k[:, :, 70:], v[:, :, 70:])
    q = _q(B, H * 4, D, FP16, 21)
    cfg = CONFIGS[("dot", True)]
    out = da.decode_attention_store(q, st, kv_len=kv_len, config=cfg)
    _assert_close_to_golden(out, q, st, None, kv_len, cfg)
