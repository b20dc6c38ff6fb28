"""The pass on tiny random configs of many decoder families: fires on every layer, exact at bits=16,
and equal to the eager simulation at 2 and 4 bits."""
import pytest
import torch

import kvpass
from conftest import LOGIT_ATOL, kvpass_ops_in
from kvpass.simulate import SimulatedKiviCache
from tiny_models import FAMILIES, GptFastModel, gptfast_greedy

CASES = [(f, a) for f, (_, attns) in FAMILIES.items() for a in attns]
GEN = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)


def _ids(T=30, B=1):
    return torch.randint(1, 97, (B, T), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("family,attn", CASES)
def test_bits16_is_exact_and_fires_on_every_layer(family, attn, cache):
    model = FAMILIES[family][0](attn)
    kw = dict(GEN, cache_implementation="static") if cache == "static" else GEN
    ids = _ids()
    expected = model.generate(ids, **kw)
    b = kvpass.backend(bits=16, group_size=8, residual_length=8, inner="eager")
    model.compile(backend=b)
    got = model.generate(ids, **kw)
    report = kvpass.explain(b)
    assert report.rewritten == model.config.num_hidden_layers, str(report)
    assert {"kv_write"} <= kvpass_ops_in(b)
    assert "attention" in kvpass_ops_in(b)  # SDPA and eager sites alike are fused (no dequant read)
    assert "dequant" not in kvpass_ops_in(b)
    assert torch.equal(expected, got)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("family,attn", CASES)
def test_quantized_matches_eager_simulation(family, attn, bits):
    model = FAMILIES[family][0](attn)
    ids = _ids()
    kw = dict(GEN, output_logits=True, return_dict_in_generate=True)
    sim = model.generate(ids, past_key_values=SimulatedKiviCache(model.config, bits, bits, 8, 8), **kw)
    b = kvpass.backend(bits=bits, group_size=8, residual_length=8, inner="eager")
    model.compile(backend=b)
    got = model.generate(ids, **kw)
    assert kvpass.explain(b).rewritten == model.config.num_hidden_layers
    assert torch.equal(sim.sequences, got.sequences)
    diff = max((a - c).abs().max().item() for a, c in zip(sim.logits, got.logits))
    assert diff <= LOGIT_ATOL[torch.float32]


def test_explain_says_which_implementation_ran():
    """After a generation, `kvpass.explain` lists what served decode attention and the cache writes
    in this process (on CPU without the interpreter: the reference, with the reason)."""
    from kvpass.lowering import paths

    paths.clear()
    model = FAMILIES["llama"][0]("sdpa")
    b = kvpass.backend(bits=2, group_size=8, residual_length=8, inner="eager")
    model.compile(backend=b)
    model.generate(_ids(), **GEN)
    report = kvpass.explain(b)
    ops = dict(report.runtime)
    assert "decode attention" in ops and "quantize-append" in ops, report.runtime
    if not torch.cuda.is_available():
        assert ops["decode attention"].startswith("reference") and "no kernel for device cpu" in ops["decode attention"]
    assert "ran in this process (op: implementation):" in str(report)


def test_quantization_changes_something():
    """Guards the simulation test against a no-op: 2-bit logits differ from full precision."""
    model = FAMILIES["llama"][0]("sdpa")
    kw = dict(GEN, output_logits=True, return_dict_in_generate=True)
    full = model.generate(_ids(), **kw)
    b = kvpass.backend(bits=2, group_size=8, residual_length=0, inner="eager")
    model.compile(backend=b)
    got = model.generate(_ids(), **kw)
    assert max((a - c).abs().max().item() for a, c in zip(full.logits, got.logits)) > 1e-3


@pytest.mark.parametrize("bits", [16, 4])
def test_gptfast_model_with_own_buffers(bits):
    model = GptFastModel().eval()
    ids = _ids(20)
    with torch.no_grad():
        if bits == 16:
            expected = gptfast_greedy(model, ids, 10)
            for layer in model.layers:
                layer.k_cache.zero_(), layer.v_cache.zero_()
        b = kvpass.backend(bits=bits, group_size=8, residual_length=8, inner="eager")
        got = gptfast_greedy(model, ids, 10, torch.compile(model, backend=b))
    assert kvpass.explain(b).rewritten == 2
    assert "attention" in kvpass_ops_in(b)
    if bits == 16:
        assert torch.equal(expected, got)
    # kvpass never wrote the model's own full-precision buffers (they stay as allocated: zeros)
    assert all(not layer.k_cache.any() for layer in model.layers)


def test_unmatched_model_runs_unmodified_and_says_so():
    model = FAMILIES["llama"][0]("sdpa")
    ids = _ids()
    expected = model(ids, use_cache=False).logits
    b = kvpass.backend(bits=2, inner="eager")
    got = torch.compile(model, backend=b)(ids, use_cache=False).logits
    report = kvpass.explain(b)
    assert report.rewritten == 0 and report.skipped
    assert "nothing matched" in str(report)
    assert torch.equal(expected, got)


def test_sliding_window_layers_are_left_full_precision_and_reported():
    import transformers

    cfg = transformers.MistralConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, sliding_window=16)
    cfg._attn_implementation = "sdpa"
    model = transformers.MistralForCausalLM(cfg).eval()
    ids = _ids(30)
    expected = model.generate(ids, **GEN)
    b = kvpass.backend(bits=2, group_size=8, residual_length=8, inner="eager")
    model.compile(backend=b)
    got = model.generate(ids, **GEN)
    report = kvpass.explain(b)
    assert report.rewritten == 0
    assert any("sliding" in reason for _, reason in report.skipped), str(report)
    assert torch.equal(expected, got)  # left untouched: exact


def test_group_larger_than_head_dim_uses_whole_head_value_groups():
    """G=32 > head_dim 16: keys keep 32-token groups, values one group per head; equals the simulation."""
    model = FAMILIES["llama"][0]("sdpa")
    ids = _ids(80)
    sim = model.generate(ids, past_key_values=SimulatedKiviCache(model.config, 2, 2, 32, 0), **GEN)
    b = kvpass.backend(bits=2, group_size=32, residual_length=0, inner="eager")
    model.compile(backend=b)
    assert torch.equal(sim, model.generate(ids, **GEN))
