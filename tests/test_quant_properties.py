"""Hypothesis properties of the KIVI reference and the store's flush policy."""
import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpass.lowering import kivi
from kvpass.simulate import quantized_length
from kvpass.store import KVStore, StoreConfig

BITS = st.sampled_from(kivi.SUPPORTED_BITS)
GROUPS = st.sampled_from([8, 16, 32])


def _rand(shape, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale + torch.randn(1, generator=g)


@settings(max_examples=60, deadline=None)
@given(bits=BITS, lead=st.lists(st.integers(1, 3), min_size=0, max_size=3), n=st.integers(1, 12), seed=st.integers(0, 10**6))
def test_pack_unpack_round_trip(bits, lead, n, seed):
    per = 8 // bits
    codes = torch.randint(0, 2**bits, (*lead, n * per), generator=torch.Generator().manual_seed(seed))
    packed = kivi.pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == n
    assert torch.equal(kivi.unpack_codes(packed, bits), codes.to(torch.int32))


@settings(max_examples=60, deadline=None)
@given(bits=BITS, G=GROUPS, groups=st.integers(1, 3), D=st.sampled_from([8, 16, 32]), seed=st.integers(0, 10**6))
def test_key_error_at_most_half_a_step(bits, G, groups, D, seed):
    k = _rand((2, 3, G * groups, D), seed)
    codes, scale, zero = kivi.quantize_keys(k, bits, G)
    err = (kivi.dequantize_keys(codes, scale, zero, bits, G) - k).abs()  # [B, H, T, D]
    bound = scale.repeat_interleave(G, dim=2) / 2
    assert (err <= bound * (1 + 1e-5) + 1e-6).all()


@settings(max_examples=60, deadline=None)
@given(bits=BITS, G=st.sampled_from([8, 16]), mult=st.integers(1, 4), T=st.integers(1, 9), seed=st.integers(0, 10**6))
def test_value_error_at_most_half_a_step(bits, G, mult, T, seed):
    v = _rand((1, 2, T, G * mult), seed)
    codes, scale, zero = kivi.quantize_values(v, bits, G)
    err = (kivi.dequantize_values(codes, scale, zero, bits, G) - v).abs()
    bound = scale.repeat_interleave(G, dim=3) / 2
    assert (err <= bound * (1 + 1e-5) + 1e-6).all()


@settings(max_examples=30, deadline=None)
@given(bits=BITS, value=st.floats(-1e4, 1e4, allow_nan=False), seed=st.integers(0, 1000))
def test_constant_groups_are_exact(bits, value, seed):
    k = _rand((1, 2, 16, 8), seed)
    k[:, :, :8] = value  # one whole key group constant in every channel
    out = kivi.fake_quantize_keys(k, bits, 8)
    assert torch.equal(out[:, :, :8], k[:, :, :8])
    v = _rand((1, 2, 4, 16), seed)
    v[..., :8] = value
    assert torch.equal(kivi.fake_quantize_values(v, bits, 8)[..., :8], v[..., :8])


@settings(max_examples=20, deadline=None)
@given(bits=BITS, bad=st.sampled_from([math.nan, math.inf, -math.inf]), seed=st.integers(0, 1000))
def test_nan_and_inf_stay_in_their_group(bits, bad, seed):
    k = _rand((1, 1, 16, 8), seed)
    k[0, 0, 3, 5] = bad  # key group 0 (tokens 0..7), channel 5
    out = kivi.fake_quantize_keys(k, bits, 8)
    poisoned = torch.zeros_like(k, dtype=torch.bool)
    poisoned[0, 0, :8, 5] = True
    assert torch.isfinite(out[~poisoned]).all()
    clean = k.clone()
    clean[0, 0, :8, 5] = 0
    ref = kivi.fake_quantize_keys(clean, bits, 8)
    assert torch.equal(out[~poisoned], ref[~poisoned])


@settings(max_examples=40, deadline=None)
@given(G=st.sampled_from([4, 8]), rmul=st.integers(0, 3), chunks=st.lists(st.integers(1, 20), min_size=1, max_size=8),
       seed=st.integers(0, 1000))
def test_flush_keeps_every_token_exactly_once(G, rmul, chunks, seed):
    """bits=16 store: after any sequence of writes every token is there once, in order; the quantized
    boundary follows the documented policy."""
    R = rmul * G
    store = KVStore(StoreConfig(16, 16, G, R), 1, 2, 8, 8, torch.float32, torch.device("cpu"))
    k_all = _rand((1, 2, sum(chunks), 8), seed)
    start = 0
    for n in chunks:
        store.append(k_all[:, :, start:start + n], -k_all[:, :, start:start + n])
        start += n
        assert store.quantized_length == quantized_length(start, G, R)
        assert store.length - store.quantized_length < R + G
    assert torch.equal(store.read_keys(start), k_all)
    assert torch.equal(store.read_values(start), -k_all)


@settings(max_examples=30, deadline=None)
@given(chunks=st.lists(st.integers(1, 20), min_size=1, max_size=6), cut=st.integers(0, 60), seed=st.integers(0, 1000))
def test_truncate_keeps_the_prefix(chunks, cut, seed):
    store = KVStore(StoreConfig(16, 16, 8, 8), 1, 1, 8, 8, torch.float32, torch.device("cpu"))
    k = _rand((1, 1, sum(chunks), 8), seed)
    store.append(k, k)
    cut = min(cut, k.shape[2])
    store.truncate(cut)
    assert store.length == cut
    assert torch.equal(store.read_keys(cut), k[:, :, :cut])
