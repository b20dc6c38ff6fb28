"""Stores with device-side lengths (the CUDA-graph capturable decode path of static caches):
`KVStore.append_at` + templates/quantize_append.py's FROM_STATE mode must leave exactly the
store that the host path leaves, step by step, with no host read of a length on the way.

Runs the kernels in Triton's interpreter on CPU (kernel_setup), the compiled kernels on a GPU.
"""
from __future__ import annotations

import pytest
import torch

from kernel_setup import BF16, DEVICE, FP16, FP32, kernel_path  # noqa: F401 (fixture)
from kernel_setup import rand

pytest.importorskip("triton", reason="triton is not importable: the kernels cannot run")

from kvpass import store as store_mod  # noqa: E402
from kvpass.lowering import dispatch  # noqa: E402
from kvpass.store import KVStore, KVStoreError, StoreConfig  # noqa: E402


def _pair(kb, vb, G, R, D, dtype, capacity, B=2, H=2):
    cfg = StoreConfig(kb, vb, G, R)
    host = KVStore(cfg, B, H, D, D, dtype, DEVICE)
    dev = KVStore(cfg, B, H, D, D, dtype, DEVICE)
    dev.enable_device_lengths(capacity)
    return host, dev


def _positions(start, n):
    return torch.arange(start, start + n, device=DEVICE)


def _assert_same(host: KVStore, dev: KVStore):
    assert (dev.quantized_length, dev.length) == (host.quantized_length, host.length)
    Lq = host.quantized_length
    for a, b in ((host.keys, dev.keys), (host.values, dev.values)):
        for name in a.buffers:
            torch.testing.assert_close(b.view(0, Lq)[name], a.view(0, Lq)[name], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(dev.res_k, host.res_k, rtol=0, atol=0)
    torch.testing.assert_close(dev.res_v, host.res_v, rtol=0, atol=0)


@pytest.mark.parametrize("kb,vb,G,R,D,dtype,n", [
    (2, 2, 32, 40, 64, BF16, 1), (4, 2, 16, 0, 64, FP16, 1), (8, 4, 32, 7, 64, FP32, 3),
    (2, 4, 16, 16, 80, BF16, 17),
])
def test_device_steps_equal_host_steps(kernel_path, kb, vb, G, R, D, dtype, n):
    """Prefill on the host path, then decode steps of n tokens on the device path: after every
    step the device store equals a host-path store fed the same tokens (flushes included)."""
    host, dev = _pair(kb, vb, G, R, D, dtype, capacity=300)
    B, H = host.B, host.H
    P = 37
    k, v = rand((B, H, P, D), dtype, 1), rand((B, H, P, D), dtype, 2, shift=-0.2)
    host.append(k, v)
    dev.append(k, v)
    _assert_same(host, dev)
    pos = P
    steps = 3 * (R + G) // n + 2
    kernels = dispatch.quantize_append_kernel(dev)
    for i in range(steps):
        k, v = rand((B, H, n, D), dtype, 10 + i), rand((B, H, n, D), dtype, 500 + i, shift=-0.2)
        host.append(k, v)
        uses = store_mod.host_path_uses()
        dev.append_at(k, v, _positions(pos, n), kernels)
        assert store_mod.host_path_uses() == uses, "a device step used host-side state"
        pos += n
    assert int(dev.device_lengths[3]) == 0, "the append kernel's program count was not reset after its launch"
    _assert_same(host, dev)
    assert dev.quantized_length > P  # flushes happened on the device


def test_rewrite_inside_window_and_restart(kernel_path):
    """A write before L (speculative rollback) truncates the window on the device; a write at
    position 0 starts over (a reset cache's new prompt), both like the host path's truncate."""
    G, R, D, dtype = 16, 20, 64, BF16
    host, dev = _pair(2, 2, G, R, D, dtype, capacity=200)
    B, H = host.B, host.H
    k, v = rand((B, H, 50, D), dtype, 1), rand((B, H, 50, D), dtype, 2)
    host.append(k, v)
    dev.append(k, v)
    kernels = dispatch.quantize_append_kernel(dev)
    Lq = host.quantized_length
    for i, pos in enumerate([Lq + 3, Lq + 4, 0, 1, 2]):
        k1, v1 = rand((B, H, 1, D), dtype, 30 + i), rand((B, H, 1, D), dtype, 60 + i)
        host.truncate(pos)
        host.append(k1, v1)
        dev.append_at(k1, v1, _positions(pos, 1), kernels)
        _assert_same(host, dev)


@pytest.mark.parametrize("bad", ["gap", "before_window", "not_consecutive", "past_capacity"])
def test_invalid_device_writes_are_reported(kernel_path, bad):
    """Writes the device cannot apply change nothing and raise KVStoreError at the next host use."""
    G, R, D, dtype = 16, 16, 64, FP16
    host, dev = _pair(2, 2, G, R, D, dtype, capacity=64)
    B, H = dev.B, dev.H
    dev.append(rand((B, H, 40, D), dtype, 1), rand((B, H, 40, D), dtype, 2))
    host.append(rand((B, H, 40, D), dtype, 1), rand((B, H, 40, D), dtype, 2))
    Lq, L = dev.quantized_length, dev.length
    n = 2
    pos = {"gap": _positions(L + 1, n), "before_window": _positions(Lq - 2, n),
           "not_consecutive": torch.tensor([L, L + 2], device=DEVICE), "past_capacity": _positions(63, n)}[bad]
    if bad == "past_capacity":
        pos = _positions(L, n)
        for i in range(64 - L - 1):  # fill up to one slot before the end
            dev.append_at(*(rand((B, H, 1, D), dtype, 90 + i),) * 2, _positions(L + i, 1), dispatch.quantize_append_kernel(dev))
        pos = _positions(63, n)
    dev.append_at(rand((B, H, n, D), dtype, 7), rand((B, H, n, D), dtype, 8), pos, dispatch.quantize_append_kernel(dev))
    with pytest.raises(KVStoreError, match="cannot take"):
        dev.length
    if bad != "past_capacity":
        _assert_same(host, dev)  # the bad write changed nothing
    assert dev.length >= L  # the error is reported once; the store stays usable


def test_host_append_past_capacity_raises(kernel_path):
    _, dev = _pair(2, 2, 16, 16, 64, FP16, capacity=48)
    x = rand((2, 2, 49, 64), FP16, 3)
    with pytest.raises(KVStoreError, match="overflows"):
        dev.append(x, x)


def _generate_twice(monkeypatch, device_lengths: bool):
    """Tiny Llama (head_dim 16), 2-bit G16 R16, static cache reused after reset(); returns the
    sequences, the scores and how many device-path writes ran."""
    import kvpass
    from transformers import StaticCache
    from tiny_models import FAMILIES

    monkeypatch.setenv("KVPASS_DEVICE_LENGTHS", "1" if device_lengths else "0")
    calls = []
    real = KVStore.append_at
    monkeypatch.setattr(KVStore, "append_at", lambda self, *a: (calls.append(1), real(self, *a))[1])
    model = FAMILIES["llama"][0]("sdpa").to(DEVICE)
    model.compile(backend=kvpass.backend(bits=2, group_size=16, residual_length=16, inner="eager"))
    cache = StaticCache(config=model.config, max_cache_len=96)
    outs = []
    for seed in (1, 2):
        ids = torch.randint(1, 97, (2, 30), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
        cache.reset()
        outs.append(model.generate(ids, past_key_values=cache, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                   output_scores=True, return_dict_in_generate=True))
    return outs, len(calls)


def test_static_cache_generate_device_lengths_equals_host_lengths(kernel_path, monkeypatch):
    """End to end through the compiled model: a static cache on the device-lengths path (decode
    writes by `append_at`, flushes decided by the kernel) gives the host-lengths path's tokens
    and scores, over two generate calls on one reset cache."""
    host, host_calls = _generate_twice(monkeypatch, device_lengths=False)
    dev, dev_calls = _generate_twice(monkeypatch, device_lengths=True)
    assert host_calls == 0 and dev_calls >= 2 * 2 * 10  # 2 layers x 2 calls x the decode steps
    for h, d in zip(host, dev):
        assert torch.equal(h.sequences, d.sequences)
        for a, b in zip(h.scores, d.scores):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-4)
