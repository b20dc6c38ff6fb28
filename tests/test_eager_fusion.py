"""Eager attention (softmax(QK^T) V written out in model code) fused into `kvpass::attention`:
the score chain's scale, logit softcap and mask are lifted into the op's arguments, so eager models
(Gemma2 always; any family with attn_implementation="eager") reach the decode kernels."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import kvpass
from conftest import LOGIT_ATOL, kvpass_ops_in
from kernel_setup import DEVICE, kernel_path  # noqa: F401 (fixture)
from kvpass.rewrite import find
from kvpass.rewrite import nodes as N
from kvpass.simulate import SimulatedKiviCache
from tiny_models import FAMILIES, GptFastAttention, GptFastModel, gptfast_greedy

GEN = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)


def _ids(T=30):
    return torch.randint(1, 97, (1, T), generator=torch.Generator().manual_seed(1))


def _attention_nodes(backend):
    return [n for gm in backend.graphs.values() for n in gm.graph.nodes
            if n.op == "call_function" and n.target is torch.ops.kvpass.attention.default]


def _trace(fn, *args):
    """Dynamo's FX graph of fn (with the example values the pass reads)."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=capture, fullgraph=True)(*args)
    return graphs[0].graph


SCALES = {"mul": lambda s: s * 0.125, "div": lambda s: s / 8.0, "none": lambda s: s}


@pytest.mark.parametrize("scale,softcap,mask", list(itertools.product(SCALES, [None, 30.0], [False, True])))
def test_eager_chain_variants_are_matched(scale, softcap, mask):
    """Every combination of the chain's optional steps gives the constants back."""
    def attn(q, k, v, m):
        s = SCALES[scale](torch.matmul(q, k.transpose(2, 3)))
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        if mask:
            s = s + m
        p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(F.dropout(p, p=0.0, training=False), v)

    q, k, v = (torch.randn(1, 2, 3, 8) for _ in range(3))
    graph = _trace(attn, q, k, v, torch.zeros(1, 1, 3, 3))
    (sm,) = [n for n in graph.nodes if N.is_softmax(n)]
    qk, pv = find._walk_back_to_matmul(sm.args[0]), find._walk_forward_to_matmul(sm)
    terms = find.match_eager_scores(sm, qk, pv)
    assert terms is not None
    assert terms.scale == {"mul": 0.125, "div": 0.125, "none": 1.0}[scale]
    assert terms.softcap == (softcap or 0.0)
    assert (terms.mask is not None) == mask


SOFTMAX_SPELLINGS = {
    "F.softmax": lambda s: F.softmax(s, dim=-1, dtype=torch.float32),
    "torch.softmax": lambda s: torch.softmax(s, -1, torch.float32),
    "method": lambda s: s.softmax(-1),
    "method_dim_kw": lambda s: s.softmax(dim=3),
}


@pytest.mark.parametrize("spelling", list(SOFTMAX_SPELLINGS))
def test_softmax_spellings_are_matched(spelling):
    def attn(q, k, v):
        return torch.matmul(SOFTMAX_SPELLINGS[spelling](torch.matmul(q, k.transpose(2, 3)) * 0.125), v)

    q, k, v = (torch.randn(1, 2, 3, 8) for _ in range(3))
    graph = _trace(attn, q, k, v)
    (sm,) = [n for n in graph.nodes if N.is_softmax(n)]
    qk, pv = find._walk_back_to_matmul(sm.args[0]), find._walk_forward_to_matmul(sm)
    terms = find.match_eager_scores(sm, qk, pv)
    assert terms is not None and terms.scale == 0.125


@pytest.mark.parametrize("variant", ["weights_used", "training_dropout", "tanh_without_cap", "softmax_dim"])
def test_other_chains_are_not_matched(variant):
    """Chains whose math the op cannot take over stay as they are (None)."""
    def attn(q, k, v):
        s = torch.matmul(q, k.transpose(2, 3)) * 0.125
        if variant == "tanh_without_cap":
            s = torch.tanh(s)
        p = F.softmax(s, dim=-2 if variant == "softmax_dim" else -1)
        p = F.dropout(p, p=0.1, training=variant == "training_dropout")
        out = torch.matmul(p, v)
        return (out, s.sum()) if variant == "weights_used" else out

    q, k, v = (torch.randn(1, 2, 3, 8) for _ in range(3))
    graph = _trace(attn, q, k, v)
    (sm,) = [n for n in graph.nodes if N.is_softmax(n)]
    qk, pv = find._walk_back_to_matmul(sm.args[0]), find._walk_forward_to_matmul(sm)
    assert qk is not None and (pv is None or find.match_eager_scores(sm, qk, pv) is None)


def test_gemma2_softcap_and_scale_are_lifted():
    """Gemma2 (eager only, logit softcap 50): both layers' attention becomes one kvpass::attention
    with the model's scale and softcap, no softmax is left, and the 2-bit outputs equal the eager
    simulation (which runs the model's own softcap code on fake-quantized K/V)."""
    model = FAMILIES["gemma2"][0]("eager")
    ids = _ids()
    kw = dict(GEN, output_logits=True, return_dict_in_generate=True)
    sim = model.generate(ids, past_key_values=SimulatedKiviCache(model.config, 2, 2, 8, 8), **kw)
    b = kvpass.backend(bits=2, group_size=8, residual_length=8, inner="eager")
    model.compile(backend=b)
    got = model.generate(ids, **kw)
    report = kvpass.explain(b)
    assert [s.read for s in report.sites] == ["fused eager"] * 2, str(report)
    nodes = _attention_nodes(b)
    assert nodes and all(n.args[10] == model.config.attn_logit_softcapping for n in nodes)
    assert all(math.isclose(n.args[8], model.config.query_pre_attn_scalar ** -0.5) for n in nodes)
    assert not any(N.is_softmax(n) for gm in b.graphs.values() for n in gm.graph.nodes)
    assert "dequant" not in kvpass_ops_in(b)
    assert torch.equal(sim.sequences, got.sequences)
    diff = max((a - c).abs().max().item() for a, c in zip(sim.logits, got.logits))
    assert diff <= LOGIT_ATOL[torch.float32]


class _EagerAttention(GptFastAttention):
    """gpt-fast attention written out eagerly (repeat_kv, scale, additive mask, softmax); with
    `weights_out` the probabilities also feed the output, as returned attention weights would."""

    weights_out = False

    def forward(self, x, input_pos, mask):  # x [B, T, dim], mask [1, 1, T, max_len] bool
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k, v = self.wkv(x).view(B, T, 2 * self.kv_heads, self.head_dim).transpose(1, 2).chunk(2, dim=1)
        self.k_cache[:, :, input_pos] = k
        self.v_cache[:, :, input_pos] = v
        rep, L = self.heads // self.kv_heads, self.k_cache.shape[2]
        kk = self.k_cache[:, :, None].expand(B, self.kv_heads, rep, L, self.head_dim).reshape(B, self.heads, L, -1)
        vv = self.v_cache[:, :, None].expand(B, self.kv_heads, rep, L, self.head_dim).reshape(B, self.heads, L, -1)
        s = torch.matmul(q, kk.transpose(2, 3)) * self.head_dim ** -0.5
        s = s + torch.where(mask, 0.0, float("-inf"))
        p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        y = self.wo(torch.matmul(p, vv).transpose(1, 2).reshape(B, T, -1))
        return y + p.mean() if self.weights_out else y


@pytest.mark.parametrize("weights_out", [False, True])
def test_model_owned_buffers_eager_attention(weights_out, monkeypatch):
    """A model writing its own KV buffers with eager attention: fused when only the attention output
    leaves the chain; when the probabilities are used too, the site is not taken for attention and
    the model runs unmodified, saying so. Both exact at bits=16 (same tokens as the model)."""
    monkeypatch.setattr(_EagerAttention, "weights_out", weights_out)
    model = GptFastModel().eval()
    for i, layer in enumerate(model.layers):
        eager = _EagerAttention(64, max_len=model.max_len)
        eager.load_state_dict(layer.state_dict(), strict=False)
        model.layers[i] = eager
    ids = _ids(20)
    with torch.no_grad():
        expected = gptfast_greedy(model, ids, 10)
        for layer in model.layers:
            layer.k_cache.zero_(), layer.v_cache.zero_()
        b = kvpass.backend(bits=16, group_size=8, residual_length=8, inner="eager")
        got = gptfast_greedy(model, ids, 10, torch.compile(model, backend=b))
    report = kvpass.explain(b)
    if weights_out:   # not recognized as attention at all (`find._walk_forward_to_matmul`): unmodified
        assert report.rewritten == 0 and "nothing matched" in str(report), str(report)
    else:
        assert [s.read for s in report.sites] == ["fused eager"] * 2, str(report)
    assert torch.equal(expected, got)


def test_gemma2_decode_runs_the_softcap_kernel(kernel_path):
    """Gemma2's fused decode attention runs the Triton decode kernel with the softcap (under the
    interpreter on CPU) and equals the eager simulation."""
    from kvpass.lowering import paths

    model = FAMILIES["gemma2"][0]("eager").to(DEVICE)   # CPU: the interpreter (kernel_path); GPU: compiled
    ids = _ids(40).to(DEVICE)
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():   # scores and attention outputs of a few units, and a cap that bends them
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.o_proj):
                proj.weight *= 8.0
    uncapped = model.generate(ids, past_key_values=SimulatedKiviCache(model.config, 2, 2, 16, 16), **kw)
    for layer in model.model.layers:
        layer.self_attn.attn_logit_softcapping = 1.0   # the real model's is 50 on scores of tens
    sim = model.generate(ids, past_key_values=SimulatedKiviCache(model.config, 2, 2, 16, 16), **kw)
    assert max((a - c).abs().max().item() for a, c in zip(sim.logits, uncapped.logits)) > 100 * LOGIT_ATOL[torch.float32]
    paths.clear()
    b = kvpass.backend(bits=2, group_size=16, residual_length=16, inner="eager")
    model.compile(backend=b)
    got = model.generate(ids, **kw)
    decode = [impl for op, impl in paths.seen() if op == "decode attention"]
    assert decode and all(impl.startswith("Triton") for impl in decode), paths.seen()
    assert torch.equal(sim.sequences, got.sequences)
    diff = max((a - c).abs().max().item() for a, c in zip(sim.logits, got.logits))
    assert diff <= LOGIT_ATOL[torch.float32]


@pytest.mark.parametrize("mask", ["none", "causal", "bool_rows", "additive_broadcast"])
def test_written_out_attention_chunks_query_rows(mask, monkeypatch):
    """Long multi-token queries go through the written-out reference in chunks of query rows: the
    same result as one chunk (masks sliced per row where they have rows), and SDPA's semantics."""
    from kvpass.lowering import ops

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, n, 16, generator=g) for n in (37, 37, 37))
    k, v = k[:, :2], v[:, :2]   # GQA 4/2
    m, causal = None, mask == "causal"
    if mask == "bool_rows":
        m = torch.rand(2, 1, 37, 37, generator=g) > 0.3
        m[..., 0] = True
    elif mask == "additive_broadcast":
        m = torch.randn(1, 1, 1, 37, generator=g)
    whole = ops.written_out_attention(q, k, v, m, 0.0, causal, None, True, 5.0)
    monkeypatch.setattr(ops, "SCORE_CHUNK_ELEMENTS", 2 * 4 * 37 * 5)   # 5 query rows per chunk
    chunked = ops.written_out_attention(q, k, v, m, 0.0, causal, None, True, 5.0)
    # the same fp32 math per row; only the matmul's blocking over rows can differ: a few fp32 ulps of
    # outputs of magnitude <= ~3 (1e-6 = ~8 ulps)
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-6)
    plain = ops.written_out_attention(q, k, v, m, 0.0, causal, None, True, 0.0)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=causal, enable_gqa=True)
    # SDPA's CPU kernel sums and exponentiates in another order (blockwise online softmax): ~1e-6
    # apart on 37 keys; 1e-5 leaves room for it and nothing for a wrong mask or scale
    torch.testing.assert_close(plain, sdpa, atol=1e-5, rtol=1e-5)
