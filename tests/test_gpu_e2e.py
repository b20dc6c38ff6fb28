"""End to end on CUDA: tiny MHA and GQA models (and Gemma2: eager attention with a softcap) compiled
with kvpass through Inductor give the CPU reference path's greedy tokens, the decode steps run the Triton kernel, and Inductor's generated
code calls the kvpass ops; bf16 models with head_dim 128 run the Gluon tensor-core decode kernel
and match the reference ops on the same GPU. Skipped without a GPU (CI is CPU-only; run through
the device tool)."""
import pytest
import torch

import kvpass
from conftest import LOGIT_ATOL

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# head_dim 64 so the decode kernel's constraints hold (multiple of 16, G divides it); a prompt of
# 100 tokens with G=32, R=32 puts 64 tokens in the quantized region before decode starts.
MODELS = {
    "llama_mha": ("LlamaConfig", "LlamaForCausalLM", dict(num_attention_heads=4, num_key_value_heads=4)),
    "qwen2_gqa": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_attention_heads=8, num_key_value_heads=2)),
    # eager attention with a logit softcap, fused into kvpass::attention by the pass
    "gemma2_gqa": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, sliding_window=4096,
        layer_types=["full_attention", "full_attention"])),
}
GEN = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False, output_logits=True,
           return_dict_in_generate=True)


# head_dim 128 in bf16: what the Gluon kernel (templates/decode_mma.py) takes
MODELS_D128 = {
    "llama_mha_d128": ("LlamaConfig", "LlamaForCausalLM", dict(num_attention_heads=2, num_key_value_heads=2)),
    "qwen2_gqa_d128": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2)),
    # eager attention with a logit softcap (the pass lifts it into kvpass::attention; SOFTCAP kernels)
    "gemma2_gqa_d128": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=128, sliding_window=4096,
        layer_types=["full_attention", "full_attention"])),
}


def _model(name):
    import transformers

    cfg_name, cls_name, kw = {**MODELS, **MODELS_D128}[name]
    hidden = (128 if name in MODELS_D128 else 64) * kw["num_attention_heads"]
    cfg = getattr(transformers, cfg_name)(vocab_size=97, hidden_size=hidden, intermediate_size=2 * hidden,
                                          num_hidden_layers=2, max_position_embeddings=512, **kw)
    cfg._attn_implementation = "eager" if name.startswith("gemma2") else "sdpa"  # Gemma2: eager only
    torch.manual_seed(0)
    return getattr(transformers, cls_name)(cfg).eval()


def _generate(model, device, inner, cache, auto_compile=True, **compile_kw):
    """Greedy generation through a model compiled in place with kvpass. auto_compile False passes
    disable_compile=True: transformers then does not wrap the forward in its own torch.compile (it
    does for static caches on CUDA; tests/test_generate_autocompile.py checks that this keeps kvpass)."""
    ids = torch.randint(1, 97, (1, 100), generator=torch.Generator().manual_seed(1)).to(device)
    model = model.to(device)
    b = kvpass.backend(bits=2, group_size=32, residual_length=32, inner=inner)
    model.compile(backend=b, **compile_kw)
    kw = dict(GEN, cache_implementation="static") if cache == "static" else GEN
    if not auto_compile:
        kw["disable_compile"] = True
    out = model.generate(ids, **kw)
    assert kvpass.explain(b).rewritten == model.config.num_hidden_layers
    return out


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts decode-kernel launches through the dispatcher."""
    from kvpass.lowering import dispatch

    mod = dispatch.decode_kernels()
    assert mod is not None, dispatch._template_errors
    calls = []
    real = mod.decode_attention_store

    def counting(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(mod, "decode_attention_store", counting)
    return calls


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("name", list(MODELS))
def test_gpu_greedy_tokens_equal_cpu_reference(name, cache, kernel_calls):
    ref = _generate(_model(name), "cpu", "eager", cache)
    assert not kernel_calls  # the CPU path is the reference
    torch._dynamo.reset()
    got = _generate(_model(name), "cuda", "inductor", cache)
    assert len(kernel_calls) >= 2 * (GEN["max_new_tokens"] - 1)  # 2 layers x every decode step
    assert torch.equal(ref.sequences, got.sequences.cpu())
    diff = max((a - c.cpu()).abs().max().item() for a, c in zip(ref.logits, got.logits))
    assert diff <= LOGIT_ATOL[torch.float32]


def test_inductor_code_calls_kvpass_ops():
    from torch._inductor.utils import run_and_get_code
    from transformers import DynamicCache

    model = _model("qwen2_gqa").cuda()
    b = kvpass.backend(bits=2, group_size=32, residual_length=32, inner="inductor")
    step = torch.compile(model, backend=b)
    ids = torch.randint(1, 97, (1, 100), device="cuda")
    cache = DynamicCache()
    with torch.no_grad():
        out = step(input_ids=ids, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        _, codes = run_and_get_code(step, input_ids=nxt, past_key_values=cache, use_cache=True)
    code = "\n".join(codes)
    assert "torch.ops.kvpass.kv_write.default" in code, code[:2000]
    assert "torch.ops.kvpass.attention.default" in code, code[:2000]


@pytest.mark.parametrize("auto_compile", [False, True])
@pytest.mark.parametrize("name", list(MODELS))
def test_gpu_reduce_overhead_replays_decode_steps(name, auto_compile):
    """mode="reduce-overhead" with a static cache: the stores keep their lengths on the device and
    kvpass's CudaGraphRunner replays the decode steps; tokens and logits equal the CPU reference,
    with and without generate()'s own compile around the model."""
    from kvpass import cudagraph

    ref = _generate(_model(name), "cpu", "eager", "static")
    torch._dynamo.reset()
    before = cudagraph.total_replays()
    got = _generate(_model(name), "cuda", "inductor", "static", auto_compile, mode="reduce-overhead")
    replays = cudagraph.total_replays() - before
    assert replays >= GEN["max_new_tokens"] - 4, f"only {replays} CUDA-graph replays"
    assert torch.equal(ref.sequences, got.sequences.cpu())
    diff = max((a - c.cpu()).abs().max().item() for a, c in zip(ref.logits, got.logits))
    assert diff <= LOGIT_ATOL[torch.float32]


@pytest.mark.parametrize("cache", ["dynamic", "static_graphs"])
@pytest.mark.parametrize("name", list(MODELS_D128))
def test_gpu_gluon_decode_matches_reference_ops(name, cache, mma_launches, monkeypatch):
    """bf16, head_dim 128: the decode steps run the Gluon kernel (host lengths with a dynamic cache;
    device lengths in CUDA-graph replays with a static cache) and give the greedy tokens and
    logits of the same model with kvpass's reference ops (KVPASS_DISABLE_TRITON=1) on the same GPU."""
    static = cache == "static_graphs"
    kw = dict(mode="reduce-overhead") if static else {}
    cache_kind = "static" if static else "dynamic"
    monkeypatch.setenv("KVPASS_DISABLE_TRITON", "1")
    ref = _generate(_model(name).to(torch.bfloat16), "cuda", "eager", cache_kind)
    assert not mma_launches
    torch._dynamo.reset()
    monkeypatch.setenv("KVPASS_DISABLE_TRITON", "0")
    got = _generate(_model(name).to(torch.bfloat16), "cuda", "inductor", cache_kind, **kw)
    assert mma_launches, "the Gluon kernel did not run"
    assert torch.equal(ref.sequences, got.sequences)
    diff = max((a.float() - c.float()).abs().max().item() for a, c in zip(ref.logits, got.logits))
    # bf16 rounding is relative: LOGIT_ATOL's bound is for logits of magnitude <= 1, scaled by the
    # magnitude above that (Gemma2's logits reach tens: one bf16 ulp at 16-32 is 0.125)
    size = max(1.0, max(a.float().abs().max().item() for a in ref.logits))
    assert diff <= LOGIT_ATOL[torch.bfloat16] * size, f"logit diff {diff} at logit magnitude {size}"
