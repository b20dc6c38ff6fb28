"""Cache lifecycles under kvpass: memory held, compile counts, eager prefill, beam search, reset and
reuse, crop, two caches at once, left padding. Each works or raises a clear error."""
import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache

import kvpass
from kvpass import store as kv_store
from kvpass.simulate import SimulatedKiviCache
from kvpass.store import KVStoreError
from tiny_models import FAMILIES

GEN = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False)


def _model(attn="sdpa"):
    return FAMILIES["llama"][0](attn)


def _ids(T=30, B=1, seed=1):
    return torch.randint(1, 97, (B, T), generator=torch.Generator().manual_seed(seed))


def _greedy(forward, ids, cache, steps):
    """Manual decode loop (prefill + steps) through `forward` (compiled wrapper or model)."""
    logits = forward(input_ids=ids, past_key_values=cache, use_cache=True).logits
    out = [logits[:, -1].argmax(-1, keepdim=True)]
    for _ in range(steps - 1):
        logits = forward(input_ids=out[-1], past_key_values=cache, use_cache=True).logits
        out.append(logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat(out, 1)


def test_4k_prompt_holds_quantized_bytes_not_full_precision():
    cfg = LlamaConfig(vocab_size=97, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=8192)
    model = LlamaForCausalLM(cfg).eval()  # head_dim 64, fp32
    b = kvpass.backend(bits=2, group_size=32, residual_length=128, inner="eager")
    compiled = torch.compile(model, backend=b)
    cache = DynamicCache()
    with torch.no_grad():
        compiled(input_ids=_ids(4096), past_key_values=cache, use_cache=True)
    stores = [s for s in kv_store.live_stores() if s.length == 4096]
    assert len(stores) == 2
    held = sum(s.nbytes() for s in stores)
    full = 2 * 2 * 4096 * 2 * 64 * 4  # layers * (K,V) * tokens * heads * head_dim * fp32
    Lq = 4096 - 128
    # codes (2 bits) + fp32 scale/zero per 32 tokens (keys) or 32 channels (values), + fp32 window
    expected = 2 * 2 * 2 * (Lq * 64 * 2 // 8 + 2 * Lq * 64 * 4 // 32) + 2 * 2 * 2 * 128 * 64 * 4
    assert held == expected, (held, expected)
    assert held < full / 6
    # the user's cache holds stand-ins over a few bytes, never a full-precision copy
    for layer in cache.layers:
        assert layer.keys.shape == (1, 2, 4096, 64)
        assert layer.keys.untyped_storage().nbytes() <= 16
        assert torch.isnan(layer.keys[0, 0, 0, 0])


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_compile_count_is_constant_over_256_decode_steps(cache_kind):
    model = _model()
    b = kvpass.backend(bits=2, group_size=8, residual_length=8, inner="eager")
    compiled = torch.compile(model, backend=b)
    cache = DynamicCache() if cache_kind == "dynamic" else StaticCache(config=model.config, max_cache_len=300)
    with torch.no_grad():
        _greedy(compiled, _ids(20), cache, 256)
    assert len(b.graphs) <= 4, len(b.graphs)


def test_eager_prefill_then_compiled_decode_is_exact_at_16_bits():
    """HF's own auto-compile compiles decode only: the first compiled step ingests the real cache."""
    model = _model()
    ids = _ids()
    with torch.no_grad():
        expected = _greedy(model, ids, DynamicCache(), 10)
        b = kvpass.backend(bits=16, inner="eager")
        compiled = torch.compile(model, backend=b)
        cache = DynamicCache()
        first = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        rest = [first]
        for _ in range(9):
            rest.append(compiled(input_ids=rest[-1], past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True))
    assert torch.equal(expected, torch.cat(rest, 1))


def test_backend_accepts_hf_mode_kwarg():
    b = kvpass.backend(bits=16, inner="eager")
    gm = torch.fx.symbolic_trace(torch.nn.Linear(4, 4))
    fn = b(gm, [torch.randn(2, 4)], mode="reduce-overhead")
    assert fn(torch.randn(2, 4)).shape == (2, 4)


def test_graphs_with_kvpass_ops_never_run_under_inductor_cuda_graphs():
    """Inductor's CUDA graphs would copy the cache stand-ins and replay host-side store decisions:
    kvpass turns them off for its graphs, even under reduce-overhead (kvpass's own runner,
    kvpass/cudagraph.py, captures those instead), and leaves other graphs alone."""
    from kvpass.backend import cudagraph_patch

    assert cudagraph_patch("reduce-overhead", has_kvpass_ops=True) == {"triton.cudagraphs": False}
    assert cudagraph_patch(None, has_kvpass_ops=True) == {"triton.cudagraphs": False}
    assert cudagraph_patch("reduce-overhead", has_kvpass_ops=False) == {"triton.cudagraphs": True}
    assert cudagraph_patch(None, has_kvpass_ops=False) == {}


def test_cuda_graph_runner_captures_only_device_only_steps(monkeypatch, caplog):
    """The runner captures a signature after one run that used no host-side store state, and
    gives a signature up (running it as compiled, with a log line) after repeated host-side runs."""
    from kvpass import cudagraph, store

    captured = []
    monkeypatch.setattr(cudagraph.CudaGraphRunner, "_capture", lambda self, sig, args, idx: captured.append(args))
    clean = cudagraph.CudaGraphRunner(lambda x: x + 1, name="clean")
    assert clean(torch.ones(2)).tolist() == [2.0, 2.0]
    assert len(captured) == 1

    def host_side(x):
        store.count_host_path_use()
        return x * 2

    dirty = cudagraph.CudaGraphRunner(host_side, name="dirty")
    with caplog.at_level("INFO", logger="kvpass"):
        for _ in range(cudagraph._MAX_DIRTY_RUNS + 2):
            assert dirty(torch.ones(2)).tolist() == [2.0, 2.0]
    assert len(captured) == 1
    assert "dirty runs without CUDA graphs" in caplog.text
    assert all(sig.failed for sig in dirty.signatures.values())


def test_beam_search_raises_a_clear_error():
    model = _model()
    model.compile(backend=kvpass.backend(bits=2, group_size=8, residual_length=8, inner="eager"))
    with pytest.raises(KVStoreError, match="beam search"):
        model.generate(_ids(), num_beams=2, max_new_tokens=5, do_sample=False)


@pytest.mark.parametrize("bits", [16, 4])
def test_static_cache_reset_and_reuse_over_two_generate_calls(bits):
    model = _model()
    ids1, ids2 = _ids(seed=1), _ids(seed=2)
    b = kvpass.backend(bits=bits, group_size=8, residual_length=8, inner="eager")
    model.compile(backend=b)
    fresh = [model.generate(i, past_key_values=StaticCache(config=model.config, max_cache_len=64), **GEN)
             for i in (ids1, ids2)]
    cache = StaticCache(config=model.config, max_cache_len=64)
    first = model.generate(ids1, past_key_values=cache, **GEN)
    cache.reset()
    second = model.generate(ids2, past_key_values=cache, **GEN)
    assert torch.equal(first, fresh[0]) and torch.equal(second, fresh[1])


def test_dynamic_cache_reuse_over_two_generate_calls():
    model = _model()
    b = kvpass.backend(bits=4, group_size=8, residual_length=8, inner="eager")
    model.compile(backend=b)
    a = model.generate(_ids(seed=1), **GEN)
    model.generate(_ids(seed=2), **GEN)
    assert torch.equal(a, model.generate(_ids(seed=1), **GEN))


@pytest.mark.parametrize("bits,keep", [(16, 25), (4, 12), (4, 35)])
def test_crop_then_continue(bits, keep):
    """Crop into the quantized part (12 < Lq) or the window (35); continue as a fresh run would."""
    model = _model()
    ids = _ids(30)
    b = kvpass.backend(bits=bits, group_size=8, residual_length=8, inner="eager")
    compiled = torch.compile(model, backend=b)
    with torch.no_grad():
        cache = DynamicCache()
        toks = _greedy(compiled, ids, cache, 10)  # 39 tokens cached
        cache.crop(keep - cache.get_seq_length())  # transformers 5.x: negative = tokens to remove
        store = kv_store.lookup(cache.layers[0].keys)
        assert store.length == keep or store.length == 39  # the store syncs at the next write
        prefix = torch.cat([ids, toks], 1)[:, : keep + 1]
        cont = _greedy(compiled, prefix[:, keep:], cache, 5)
        assert kv_store.lookup(cache.layers[0].keys).length == keep + 5
    if bits == 16:
        expected = _greedy(model, prefix, DynamicCache(), 5)
        assert torch.equal(cont, expected)


@pytest.mark.parametrize("bits", [16, 4])
def test_two_caches_alive_at_once(bits):
    model = _model()
    b = kvpass.backend(bits=bits, group_size=8, residual_length=8, inner="eager")
    compiled = torch.compile(model, backend=b)
    ids = [_ids(seed=1), _ids(20, seed=2)]
    with torch.no_grad():
        alone = [_greedy(compiled, i, DynamicCache(), 8) for i in ids]
        caches = [DynamicCache(), DynamicCache()]
        last = [compiled(input_ids=i, past_key_values=c, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
                for i, c in zip(ids, caches)]
        outs = [[t] for t in last]
        for _ in range(7):  # interleaved steps
            for j in range(2):
                nxt = compiled(input_ids=outs[j][-1], past_key_values=caches[j], use_cache=True).logits
                outs[j].append(nxt[:, -1].argmax(-1, keepdim=True))
    for j in range(2):
        assert torch.equal(torch.cat(outs[j], 1), alone[j])


@pytest.mark.parametrize("bits", [16, 4])
def test_left_padded_batch_of_two(bits):
    model = _model()
    ids = _ids(24, B=2)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    ids[1, :6] = 0
    kw = dict(GEN, attention_mask=mask, output_logits=True, return_dict_in_generate=True)
    if bits == 16:
        expected = model.generate(ids, **kw)
    else:
        expected = model.generate(ids, past_key_values=SimulatedKiviCache(model.config, bits, bits, 8, 8), **kw)
    model.compile(backend=kvpass.backend(bits=bits, group_size=8, residual_length=8, inner="eager"))
    got = model.generate(ids, **kw)
    assert torch.equal(expected.sequences, got.sequences)


def test_inductor_path_matches_simulation_tokens():
    """The production path (Inductor) on CPU: the ops stay opaque, tokens equal the simulation."""
    model = _model()
    ids = _ids()
    sim = model.generate(ids, past_key_values=SimulatedKiviCache(model.config, 4, 4, 8, 8), **GEN)
    b = kvpass.backend(bits=4, group_size=8, residual_length=8)
    model.compile(backend=b)
    got = model.generate(ids, **GEN)
    assert kvpass.explain(b).rewritten == 2
    assert torch.equal(sim, got)


def test_cuda_graph_runner_never_replays_a_dead_store(monkeypatch):
    """A captured step recorded a store's buffer addresses: once that store is gone, a new store
    whose stand-in reuses the address must get a fresh signature, not the old graph."""
    import gc

    from kvpass import cudagraph, store as kv_store
    from kvpass.store import KVStore, StoreConfig

    captured = []
    monkeypatch.setattr(cudagraph.CudaGraphRunner, "_capture", lambda self, sig, args, idx: captured.append(sig))
    runner = cudagraph.CudaGraphRunner(lambda x: x, name="stores")
    standin = torch.full((4,), float("nan"))
    st = KVStore(StoreConfig(4, 4, 8, 8), 1, 1, 16, 16, torch.float32, "cpu")
    kv_store.register(standin, st)
    runner(standin)
    first = captured[-1]
    assert first.stores[0]() is st
    del st
    gc.collect()
    kv_store.register(standin, KVStore(StoreConfig(4, 4, 8, 8), 1, 1, 16, 16, torch.float32, "cpu"))
    runner(standin)
    assert captured[-1] is not first and len(runner.signatures) == 1


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the C++ data-pointer check exists in CUDA builds"))])
def test_cuda_graph_runner_fast_path_replays_only_matching_calls(monkeypatch, device):
    """After a replay, a call with the same in-place inputs (identity and address), copied inputs
    of the same shape and the same non-tensor values replays through the plan; anything else takes
    the full signature path (and a different shape gets its own signature). An in-place input that
    kept its identity but not its address (`param.data = ...`) is not replayed through the plan."""
    from kvpass import cudagraph

    class FakeGraph:
        def __init__(self):
            self.replays = 0

        def replay(self):
            self.replays += 1

    def fake_capture(self, sig, args, static_idx):
        sig.graph, sig.outputs, sig.keep = FakeGraph(), torch.zeros(2), [False]
        sig.copies = [(i, a.clone()) for i, a in enumerate(args) if isinstance(a, torch.Tensor) and i not in static_idx]

    monkeypatch.setattr(cudagraph.CudaGraphRunner, "_capture", fake_capture)
    runner = cudagraph.CudaGraphRunner(lambda w, x, n: x * n, name="fast")
    weight = torch.nn.Parameter(torch.randn(3, device=device))
    ones = torch.ones(2, device=device)
    runner(weight, ones, 2)                                # runs, then captures
    runner(weight, ones, 2)                                # full path finds the graph: replay, plan kept
    assert runner.replays == 1 and runner.fast_replays == 0
    runner(weight, torch.full((2,), 5.0, device=device), 2)   # same plan: fast replay
    assert runner.replays == 2 and runner.fast_replays == 1
    other = torch.nn.Parameter(torch.randn(3, device=device))
    runner(other, ones, 2)                                 # another in-place input: full path, new signature
    runner(weight, ones, 3)                                # another value: full path
    runner(weight, torch.ones(4, device=device), 2)        # another copied shape: full path
    assert runner.fast_replays == 1 and len(runner.signatures) == 4
    weight.data = torch.randn(3, device=device)            # same object, new address: full path, new signature
    runner(weight, ones, 2)
    assert runner.fast_replays == 1 and len(runner.signatures) == 5


def test_cuda_graph_runner_uses_inputs_updated_in_place_without_copies(monkeypatch):
    """An input the step updates in place (a StaticCache's length counter) is keyed by its address
    after the first run and used in place by the captured graph (no copy in or out per replay); a
    call with another tensor in that position gets its own signature."""
    from kvpass import cudagraph

    captured = []

    def fake_capture(self, sig, args, static_idx):
        captured.append(list(static_idx))
        sig.graph, sig.outputs, sig.keep = type("G", (), {"replay": lambda g: None})(), torch.zeros(2), [False]
        sig.copies = [(i, a.clone()) for i, a in enumerate(args) if isinstance(a, torch.Tensor) and i not in static_idx]

    def step(x, counter):
        counter.add_(1)
        return x + counter

    monkeypatch.setattr(cudagraph.CudaGraphRunner, "_capture", fake_capture)
    runner = cudagraph.CudaGraphRunner(step, name="counter")
    counter = torch.zeros((), dtype=torch.int64)
    runner(torch.ones(2), counter)          # finds the in-place update: re-keyed, not captured
    assert runner.in_place == {1} and not captured and not runner.signatures
    runner(torch.ones(2), counter)          # runs again under the new key, then captures
    assert captured == [[1]] and int(counter) == 2
    runner(torch.ones(2), counter)          # replays through the graph: no copy of the counter
    runner(torch.ones(2), counter)
    assert runner.replays == 2 and runner.fast_replays == 1
    (sig,) = runner.signatures.values()
    assert [i for i, _ in sig.copies] == [0]
    runner(torch.ones(2), torch.zeros((), dtype=torch.int64))   # another counter: its own signature
    assert len(runner.signatures) == 2
