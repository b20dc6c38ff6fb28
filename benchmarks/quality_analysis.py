"""Where does the 2-bit KIVI error come from? (issue 4) -- an error analysis on SmolLM2-135M-Instruct.

Emulates kvpass's decode path in ONE full forward: a custom attention function registered with
transformers' `AttentionInterface` ("kvsim") fake-quantizes each layer's keys/values for the whole
sequence (KIVI groups are fixed token ranges, never re-encoded, so token j's quantized version is
fixed) and lets query i read quantized K/V for keys j < Lq_i and full precision otherwise, with
Lq_i = quantized_length(max(i + 1, prefix)) (the prompt's queries already see the quantized prefix
flushed at L = prefix; decode step i sees L = i + 1). This equals the teacher-forced decode path
(validated in section "v" against the real kvpass numbers) at ~1/20 of the cost.

Protocol (issue 4): text from character 30000, 512 + 1024 tokens, 512-token prompt, perplexity over
the 1024 following tokens, fp32 math, scale/zero in fp32. Calibration (outlier thresholds, channel
choice, k-means levels) always uses a DIFFERENT text than the one evaluated.

Sections: v validation | a keys vs values | b per layer | c per head | d channel outliers |
e attention sink | f pre-RoPE keys | g non-uniform levels | h combinations | i second text.

Run (from the repo root; 35-100 s per forward on a shared 2-core CPU, ~50 forwards for everything):
    PYTHONPATH=. python benchmarks/quality_analysis.py                # all sections
    PYTHONPATH=. python benchmarks/quality_analysis.py --only v,a,e   # some sections
Writes benchmarks/results/quality_analysis.{csv,md}; a partial run replaces only its own sections
(the md keeps the others and the hand-written conclusions between the marker comments).
"""
from __future__ import annotations

import argparse
import csv
import math
import re
import time
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import torch
from transformers import AttentionInterface

from kvpass.evaluate.model import load_default_model
from kvpass.lowering import kivi
from kvpass.simulate import quantized_length

TEXTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "texts"
RESULTS = Path(__file__).resolve().parent / "results"
START_CHAR, PREFIX, SCORED = 30000, 512, 1024
DECODE_PATH = {"fp": 32.359, "k2v2": 37.463, "k4v4": 32.462, "k8v8": 32.362}  # benchmarks/results/quality.md
SECTIONS = "vabcdefghi"


# ----------------------------------------------------------------------------------------------
# Configuration of one emulated run
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cfg:
    name: str
    kbits: int = 16                  # 16 = full precision
    vbits: int = 16
    G: int = 32                      # key groups: G tokens per channel; value groups: G channels
    R: int = 128                     # full-precision residual window
    layers: tuple | None = None      # layers quantized (None = all)
    k_heads: tuple | None = None     # KV heads whose keys are quantized (None = all)
    v_heads: tuple | None = None
    sink: int = 0                    # first tokens kept full precision (K and V)
    pre_rope: bool = False           # quantize keys before RoPE (KVQuant)
    k_dense_ch: int = 0              # per (layer, head): top-n key channels kept full precision
    k_sparse: float = 0.0            # fraction of key entries kept as sparse fp outliers (calibrated per-channel thresholds)
    v_sparse: float = 0.0            # fraction of value entries kept as sparse fp outliers (per token, online)
    k_levels: str = "uniform"        # uniform | kmeans | kmeans-ends (k-means levels on min/max-normalized keys)
    v_levels: str = "uniform"
    jitter: int = 0                  # seed: relative 1e-6 noise on K/V before quantization (noise-floor runs)
    desc: str = ""


def bits_per_value(c: Cfg, n_layers: int, n_heads: int, head_dim: int) -> float:
    """Storage bits per cached K/V scalar (mean of K and V), fp16 scale+zero per group, outliers
    as 16-bit value + 16-bit index; the R-token fp window, sink tokens and channel lists are not counted."""
    def side(bits, frac_layers, frac_heads, dense_ch, sparse):
        if bits == 16:
            return 16.0
        q = bits + 2 * 16 / c.G
        d = dense_ch / head_dim
        b = (1 - d) * q + d * 16 + sparse * 32
        f = frac_layers * frac_heads
        return f * b + (1 - f) * 16
    fl = 1.0 if c.layers is None else len(c.layers) / n_layers
    k = side(c.kbits, fl, 1.0 if c.k_heads is None else len(c.k_heads) / n_heads, c.k_dense_ch, c.k_sparse)
    v = side(c.vbits, fl, 1.0 if c.v_heads is None else len(c.v_heads) / n_heads, 0, c.v_sparse)
    return (k + v) / 2


def what(c: Cfg) -> str:
    """Short human description of what a config quantizes."""
    if c.desc:
        return c.desc
    parts = [f"K{c.kbits if c.kbits < 16 else 'fp'}/V{c.vbits if c.vbits < 16 else 'fp'}"]
    if c.layers is not None:
        parts.append(f"layers {','.join(map(str, c.layers))}")
    if c.k_heads is not None:
        parts.append(f"key heads {','.join(map(str, c.k_heads))}")
    if c.pre_rope:
        parts.append("pre-RoPE keys")
    if c.sink:
        parts.append(f"sink {c.sink} tok fp")
    if c.k_dense_ch:
        parts.append(f"{c.k_dense_ch} fp key ch/head")
    if c.k_sparse:
        parts.append(f"{c.k_sparse:.0%} sparse key outliers")
    if c.v_sparse:
        parts.append(f"{c.v_sparse:.0%} sparse value outliers")
    if c.k_levels != "uniform":
        parts.append(f"K levels {c.k_levels}")
    if c.v_levels != "uniform":
        parts.append(f"V levels {c.v_levels}")
    return ", ".join(parts)


# ----------------------------------------------------------------------------------------------
# Quantizers (fp32). The plain uniform case uses kvpass.lowering.kivi itself.
# ----------------------------------------------------------------------------------------------
def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def group_quant(x, bits, dim, keep=None, levels=None):
    """Min/max quantize-dequantize x with one group spanning `dim`.

    keep: bool mask (same shape) of entries stored exactly; they are excluded from min/max.
    levels: 1-D tensor of normalized levels in [0, 1] (None = uniform 2**bits levels).
    """
    if keep is None:
        mn, mx = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    else:
        mn = torch.where(keep, torch.full_like(x, math.inf), x).amin(dim, keepdim=True)
        mx = torch.where(keep, torch.full_like(x, -math.inf), x).amax(dim, keepdim=True)
        allkept = ~torch.isfinite(mn)
        mn = torch.where(allkept, torch.zeros_like(mn), mn)
        mx = torch.where(allkept, torch.zeros_like(mx), mx)
    rng = mx - mn
    if levels is None:
        scale = rng / kivi.levels(bits)
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        xhat = torch.round((x - mn) / safe).clamp_(0, kivi.levels(bits)) * scale + mn
    else:
        safe = torch.where(rng == 0, torch.ones_like(rng), rng)
        u = ((x - mn) / safe).clamp(0, 1)
        code = (u.unsqueeze(-1) - levels).abs().argmin(-1)
        xhat = levels[code] * rng + mn
    return xhat if keep is None else torch.where(keep, x, xhat)


def quant_keys(x, c: Cfg, keep, levels):
    """x [1, H, T, D] (T % G == 0) -> per-channel fake-quantized keys (groups of G tokens)."""
    if keep is None and levels is None:
        return kivi.fake_quantize_keys(x, c.kbits, c.G, torch.float32)
    B, H, T, D = x.shape
    g = lambda t: t.reshape(B, H, T // c.G, c.G, D)          # [B, H, NG, G, D]
    out = group_quant(g(x), c.kbits, 3, None if keep is None else g(keep), levels)
    return out.reshape(B, H, T, D)


def quant_values(v, c: Cfg, keep, levels):
    """v [1, H, T, D] -> per-token fake-quantized values (groups of G channels)."""
    G = min(c.G, v.shape[-1])
    if keep is None and levels is None:
        return kivi.fake_quantize_values(v, c.vbits, G, torch.float32)
    B, H, T, D = v.shape
    g = lambda t: t.reshape(B, H, T, D // G, G)               # [B, H, T, NG, G]
    out = group_quant(g(v), c.vbits, 4, None if keep is None else g(keep), levels)
    return out.reshape(B, H, T, D)


# ----------------------------------------------------------------------------------------------
# The emulation: one attention function, driven by module-level state
# ----------------------------------------------------------------------------------------------
class Sim:
    cfg: Cfg = Cfg("fp")
    cos = sin = None        # [1, 1, T, D] RoPE tables of the current text
    calib: dict = {}        # calibration stats (other text): see calibrate()
    record = None           # callable(layer, query, key, value) or None


def unrope(k):
    """Post-RoPE keys [1, H, T, D] -> pre-RoPE (inverse rotation with the model's cos/sin)."""
    T = k.shape[2]
    cos, sin = Sim.cos[:, :, :T], Sim.sin[:, :, :T]
    return (k * cos - rotate_half(k) * sin) / (cos * cos + sin * sin)


def rope(k):
    T = k.shape[2]
    return k * Sim.cos[:, :, :T] + rotate_half(k) * Sim.sin[:, :, :T]


def fake_keys(layer, key, c: Cfg):
    """What the cache returns for keys once quantized: key [1, H, T, D] -> same shape."""
    x = unrope(key) if c.pre_rope else key
    kind = "pre" if c.pre_rope else "post"
    keep = None
    if c.k_dense_ch:
        ch = Sim.calib[f"{kind}_top_ch"][layer][:, : c.k_dense_ch]                  # [H, n]
        m = torch.zeros(x.shape[1], x.shape[3], dtype=torch.bool)
        m.scatter_(1, ch, True)
        keep = m[None, :, None, :].expand_as(x)
    if c.k_sparse:
        lo, hi = Sim.calib[f"{kind}_thr"][(layer, c.k_sparse)]                      # [H, D] each
        s = (x < lo[None, :, None, :]) | (x > hi[None, :, None, :])
        keep = s if keep is None else keep | s
    levels = None if c.k_levels == "uniform" else Sim.calib[f"{kind}_levels_{c.k_levels}"][layer]
    xq = quant_keys(x, c, keep, levels)
    kq = rope(xq) if c.pre_rope else xq
    if c.k_heads is not None:
        sel = torch.zeros(key.shape[1], dtype=torch.bool)
        sel[list(c.k_heads)] = True
        kq = torch.where(sel[None, :, None, None], kq, key)
    if c.sink:
        kq = torch.cat([key[:, :, : c.sink], kq[:, :, c.sink:]], 2)
    return kq


def fake_values(layer, value, c: Cfg):
    keep = None
    if c.v_sparse:
        B, H, T, D = value.shape
        flat = value.transpose(1, 2).reshape(B, T, H * D)                           # [B, T, H*D] one token's vector
        dev = (flat - flat.median(-1, keepdim=True).values).abs()
        k = max(1, round(c.v_sparse * H * D))
        thr = dev.topk(k, -1).values[..., -1:]
        keep = (dev >= thr).reshape(B, T, H, D).transpose(1, 2)
    levels = None if c.v_levels == "uniform" else Sim.calib[f"v_levels_{c.v_levels}"][layer]
    vq = quant_values(value, c, keep, levels)
    if c.v_heads is not None:
        sel = torch.zeros(value.shape[1], dtype=torch.bool)
        sel[list(c.v_heads)] = True
        vq = torch.where(sel[None, :, None, None], vq, value)
    if c.sink:
        vq = torch.cat([value[:, :, : c.sink], vq[:, :, c.sink:]], 2)
    return vq


def kvsim_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """query [1, Hq, T, D], key/value [1, Hkv, T, D] -> ([1, T, Hq, D], None). Ignores attention_mask
    (one unpadded sequence, positions 0..T-1): builds the causal mask itself."""
    c, layer = Sim.cfg, module.layer_idx
    if Sim.record is not None:
        Sim.record(layer, query, key, value)
    T = key.shape[2]
    on = c.layers is None or layer in c.layers
    if c.jitter and on:
        g = torch.Generator().manual_seed(c.jitter * 1000 + layer)
        key = key * (1 + 1e-6 * torch.randn(key.shape, generator=g))
        value = value * (1 + 1e-6 * torch.randn(value.shape, generator=g))
    kq = fake_keys(layer, key, c) if on and c.kbits < 16 else key
    vq = fake_values(layer, value, c) if on and c.vbits < 16 else value
    B, Hq, T, D = query.shape
    H = key.shape[1]
    rep = Hq // H
    qg = query.reshape(B, H, rep, T, D)                                              # GQA: query head h*rep+r -> kv head h
    out = torch.empty(B, H, rep, T, D)
    pos = torch.arange(T)
    for a, b, lq in lq_blocks(T, PREFIX, c.G, c.R):
        Ke = torch.cat([kq[:, :, :lq], key[:, :, lq:b]], 2)                          # [B, H, b, D] what query rows a..b-1 read
        Ve = torch.cat([vq[:, :, :lq], value[:, :, lq:b]], 2)
        s = (qg[:, :, :, a:b] @ Ke.transpose(2, 3).unsqueeze(2)) * scaling           # [B, H, rep, b-a, b]
        s = s.masked_fill(pos[None, :b] > pos[a:b, None], -math.inf)                # causal
        out[:, :, :, a:b] = torch.softmax(s, -1) @ Ve.unsqueeze(2)
    return out.reshape(B, Hq, T, D).transpose(1, 2).contiguous(), None               # [B, T, Hq, D]


@lru_cache(maxsize=8)
def lq_blocks(T, prefix, G, R):
    """Query blocks [a, b) with one quantized length each: (a, b, Lq). Query i sees L = max(i + 1, prefix)."""
    blocks, a = [], 0
    lqs = [quantized_length(max(i + 1, prefix), G, R) for i in range(T)]
    for i in range(1, T + 1):
        if i == T or lqs[i] != lqs[a]:
            blocks.append((a, i, lqs[a]))
            a = i
    return blocks


AttentionInterface.register("kvsim", kvsim_attention)


# ----------------------------------------------------------------------------------------------
# Model, text, perplexity
# ----------------------------------------------------------------------------------------------
def load_ids(tok, name, start=START_CHAR, n=PREFIX + SCORED):
    text = (TEXTS / name).read_text(encoding="utf-8")[start:]
    ids = tok(text, return_tensors="pt").input_ids[:, :n]
    assert ids.shape[1] == n, f"{name}: only {ids.shape[1]} tokens"
    return ids


def set_text(model, ids):
    """RoPE tables for positions 0..N-1 of this text (the ones the model uses)."""
    pos = torch.arange(ids.shape[1])[None]
    x = torch.zeros(1, 1, dtype=torch.float32)
    cos, sin = model.model.rotary_emb(x, pos)                                        # [1, T, D]
    Sim.cos, Sim.sin = cos[:, None], sin[:, None]                                     # [1, 1, T, D]


@torch.no_grad()
def ppl(model, ids, cfg: Cfg, fp_hidden=None) -> float:
    """exp(mean NLL) of tokens PREFIX..N-1 from one emulated forward.

    fp_hidden: per-layer fp inputs [1, T, hidden] of this text; when given and cfg quantizes only
    layers >= l0, the forward starts at layer l0 (everything before is exactly the fp forward)."""
    Sim.cfg = cfg
    m = model.model
    start = min(cfg.layers) if (cfg.layers is not None and fp_hidden is not None) else 0
    h = m.embed_tokens(ids) if start == 0 else fp_hidden[start]                       # [1, T, hidden]
    T = ids.shape[1]
    pe = (Sim.cos[:, 0, :T], Sim.sin[:, 0, :T])                                       # [1, T, D] each
    pos = torch.arange(T)[None]
    for layer in m.layers[start:]:
        h = layer(h, attention_mask=None, position_embeddings=pe, position_ids=pos)
    logits = model.lm_head(m.norm(h[:, PREFIX - 1:-1])).float()                      # [1, SCORED, V] positions 511..1534
    nll = -torch.log_softmax(logits, -1).gather(-1, ids[:, PREFIX:, None]).mean()
    return math.exp(nll.item())


@torch.no_grad()
def fp_layer_inputs(model, ids):
    """fp hidden states entering each decoder layer: list of [1, T, hidden]."""
    Sim.cfg = Cfg("fp")
    out = model(input_ids=ids, use_cache=False, output_hidden_states=True, logits_to_keep=1)
    return list(out.hidden_states[:-1])


@torch.no_grad()
def capture(model, ids):
    """fp forward recording per layer query/key (post-RoPE) and value: lists of [H, T, D]."""
    rec = {"q": {}, "k": {}, "v": {}}
    def hook(layer, q, k, v):
        rec["q"][layer], rec["k"][layer], rec["v"][layer] = q[0].clone(), k[0].clone(), v[0].clone()
    Sim.record, Sim.cfg = hook, Cfg("fp")
    try:
        model(input_ids=ids, logits_to_keep=1, use_cache=False)
    finally:
        Sim.record = None
    return rec


# ----------------------------------------------------------------------------------------------
# Calibration on another text: outlier channels, sparse thresholds, k-means levels
# ----------------------------------------------------------------------------------------------
def kmeans_1d(x, k, fix_ends=False, iters=30):
    """Lloyd's algorithm on 1-D samples in [0, 1]; fix_ends keeps levels 0 and 1 fixed."""
    c = torch.linspace(0, 1, k)
    for _ in range(iters):
        a = (x[:, None] - c).abs().argmin(1)
        sums = torch.zeros(k).index_add_(0, a, x)
        cnt = torch.bincount(a, minlength=k).float()
        new = torch.where(cnt > 0, sums / cnt.clamp(min=1), c)
        if fix_ends:
            new[0], new[-1] = 0.0, 1.0
        c = new
    return c.sort().values


def normalized_key_groups(x, G):
    """x [H, T, D] -> min/max-normalized values in [0, 1] of per-channel groups of G tokens (flat)."""
    H, T, D = x.shape
    g = x[:, : T // G * G].reshape(H, T // G, G, D)
    mn, mx = g.amin(2, keepdim=True), g.amax(2, keepdim=True)
    return ((g - mn) / (mx - mn).clamp(min=1e-12)).flatten()


def normalized_value_groups(v, G):
    H, T, D = v.shape
    g = v.reshape(H, T, D // G, G)
    mn, mx = g.amin(3, keepdim=True), g.amax(3, keepdim=True)
    return ((g - mn) / (mx - mn).clamp(min=1e-12)).flatten()


def calibrate(model, ids, fracs=(0.01, 0.03), bits=2, G=32):
    """Fill Sim.calib from an fp forward over a calibration text (never the evaluation text)."""
    set_text(model, ids)
    rec = capture(model, ids)
    cal = {"pre_top_ch": {}, "post_top_ch": {}, "pre_thr": {}, "post_thr": {}}
    for kind in ("pre", "post"):
        for lv in ("kmeans", "kmeans-ends"):
            cal[f"{kind}_levels_{lv}"] = {}
    for lv in ("kmeans", "kmeans-ends"):
        cal[f"v_levels_{lv}"] = {}
    g = torch.Generator().manual_seed(0)
    for layer, k in rec["k"].items():                                                # k [H, T, D]
        forms = {"post": k, "pre": unrope(k[None])[0]}
        for kind, x in forms.items():
            cal[f"{kind}_top_ch"][layer] = x.abs().amax(1).argsort(-1, descending=True)   # [H, D]
            for f in fracs:
                lo = torch.quantile(x, f / 2, dim=1)                                # [H, D]
                hi = torch.quantile(x, 1 - f / 2, dim=1)
                cal[f"{kind}_thr"][(layer, f)] = (lo, hi)
            u = normalized_key_groups(x, G)
            u = u[torch.randperm(u.numel(), generator=g)[:200_000]]
            cal[f"{kind}_levels_kmeans"][layer] = kmeans_1d(u, 1 << bits)
            cal[f"{kind}_levels_kmeans-ends"][layer] = kmeans_1d(u, 1 << bits, fix_ends=True)
        u = normalized_value_groups(rec["v"][layer], G)
        u = u[torch.randperm(u.numel(), generator=g)[:200_000]]
        cal["v_levels_kmeans"][layer] = kmeans_1d(u, 1 << bits)
        cal["v_levels_kmeans-ends"][layer] = kmeans_1d(u, 1 << bits, fix_ends=True)
    Sim.calib = cal
    return cal


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------
BASE = Cfg("k2v2", kbits=2, vbits=2)


class Runner:
    """Runs configs on the current text, collects result rows, prints progress."""

    def __init__(self, model, ids, text):
        self.model, self.ids, self.text = model, ids, text
        cfgm = model.config
        self.dims = (cfgm.num_hidden_layers, cfgm.num_key_value_heads, cfgm.head_dim)
        self.rows, self.times = [], []
        self.fp = None
        self.fp_hidden = None                  # fp layer inputs, computed on first need

    def run(self, section, c: Cfg):
        if c.layers is not None and self.fp_hidden is None:
            self.fp_hidden = fp_layer_inputs(self.model, self.ids)
        t = time.time()
        p = ppl(self.model, self.ids, c, self.fp_hidden)
        self.times.append(time.time() - t)
        if self.fp is None and c.kbits == 16 and c.vbits == 16:
            self.fp = p
        fp = self.fp if self.fp is not None else p
        row = {"section": section, "text": self.text, "config": c.name, "what": what(c),
               "bits_per_value": round(bits_per_value(c, *self.dims), 3), "ppl": round(p, 3),
               "delta_pct": round((p / fp - 1) * 100, 2)}
        self.rows.append(row)
        print(f"  [{section}] {c.name:<28} ppl {p:8.3f}  {row['delta_pct']:+7.2f}%  "
              f"{row['bits_per_value']:.2f} b/v  ({self.times[-1]:.1f}s)", flush=True)
        return p


def section_v(r: Runner):
    r.run("v", BASE)
    r.run("v", Cfg("k4v4", kbits=4, vbits=4))
    for seed in (1, 2):
        r.run("v", replace(BASE, name=f"k2v2-jitter{seed}", jitter=seed,
                           desc="K2/V2 with K,V x (1 + 1e-6 N(0,1)) before quantization (noise floor)"))


@torch.no_grad()
def prefill_divergence(model, ids):
    """The decode path's own numerics: 2-bit prefill (512 tokens) through SimulatedKiviCache with sdpa
    vs eager attention; max |difference| of hidden states after layers 0, 5, ..., 30."""
    from kvpass.simulate import SimulatedKiviCache
    hs = {}
    for impl in ("sdpa", "eager"):
        model.set_attn_implementation(impl)
        cache = SimulatedKiviCache(model.config, 2, 2, 32, 128)
        hs[impl] = model(input_ids=ids[:, :PREFIX], past_key_values=cache, use_cache=True,
                         output_hidden_states=True, logits_to_keep=1).hidden_states
    model.set_attn_implementation("kvsim")
    return {l: (hs["sdpa"][l] - hs["eager"][l]).abs().max().item() for l in range(0, len(hs["sdpa"]), 5)}


def section_a(r: Runner):
    r.run("a", BASE)
    for kb, vb in [(2, 16), (16, 2), (4, 2), (2, 4)]:
        r.run("a", Cfg(f"k{kb}v{vb}".replace("16", "fp"), kbits=kb, vbits=vb))


def section_b(r: Runner, block=5):
    """Blocks of `block` layers (one layer at a time is too slow on this machine: 35-90 s per forward)."""
    n = r.dims[0]
    for a in range(0, n, block):
        ls = tuple(range(a, min(a + block, n)))
        r.run("b", replace(BASE, name=f"kv2-layers{ls[0]}-{ls[-1]}", layers=ls))
        r.run("b-keys", Cfg(f"k2-layers{ls[0]}-{ls[-1]}", kbits=2, layers=ls))


def section_c(r: Runner):
    H = r.dims[1]
    for h in range(H):
        r.run("c", Cfg(f"k2-head{h}", kbits=2, k_heads=(h,)))


@torch.no_grad()
def channel_stats(model, ids, G=32, bits=2):
    """Per layer: key-magnitude outlier stats and the share of key quantization error in the top channels."""
    set_text(model, ids)
    rec = capture(model, ids)
    out = []
    for layer in sorted(rec["k"]):
        q, k = rec["q"][layer], rec["k"][layer]                                      # [Hq, T, D], [H, T, D]
        H, T, D = k.shape
        row = {"layer": layer}
        for kind, x in (("post", k), ("pre", unrope(k[None])[0])):
            mag = x.abs().amax(1).flatten()                                          # [H*D] max|k| per channel
            srt = mag.sort(descending=True)
            row[f"{kind}_ratio"] = (srt.values[0] / mag.median()).item()
            h, d = divmod(srt.indices[0].item(), D)
            row[f"{kind}_top"] = f"h{h}c{d}"
            # 2-bit per-channel error of the whole sequence, per channel
            e = kivi.fake_quantize_keys(x[None], bits, G, torch.float32)[0] - x       # [H, T, D]
            if kind == "pre":  # logit error is measured on the rotated (used) keys
                e_rot = rope((x + e)[None])[0] - k
            else:
                e_rot = e
            mse = (e ** 2).sum(1).flatten()                                           # [H*D]
            # diagonal term of E[(q . e)^2]: sum_i q_ic^2 * sum_j e_jc^2, queries grouped onto their KV head
            q2 = (q ** 2).sum(1).reshape(H, -1, D).sum(1)                             # [H, D]
            logit = (q2 * (e_rot ** 2).sum(1)).flatten()                              # [H*D]
            n1, n5 = max(1, round(0.01 * H * D)), max(1, round(0.05 * H * D))
            top = srt.indices
            row[f"{kind}_mse_top1"] = (mse[top[:n1]].sum() / mse.sum()).item()
            row[f"{kind}_mse_top5"] = (mse[top[:n5]].sum() / mse.sum()).item()
            if kind == "post":
                row["logit_top1"] = (logit[top[:n1]].sum() / logit.sum()).item()
                row["logit_top5"] = (logit[top[:n5]].sum() / logit.sum()).item()
                lt = logit.sort(descending=True).values
                row["logit_best1"] = (lt[:n1].sum() / lt.sum()).item()
                row["logit_best5"] = (lt[:n5].sum() / lt.sum()).item()
            row[f"{kind}_mse_total"] = mse.sum().item() / (H * T * D)
            row[f"{kind}_logit_total"] = logit.sum().item()
        out.append(row)
    return out


def stats_md(stats):
    lines = ["| layer | post-RoPE max\\|k\\| top/median ch | top ch | pre-RoPE ratio | top ch (pre) | "
             "key MSE in top 1% ch (post) | top 5% | logit err in top-1% ch | top 5% | logit err: best 1% ch | best 5% | "
             "key MSE pre-RoPE / post-RoPE | logit err pre/post |",
             "|---" * 14 + "|"]
    for s in stats:
        lines.append(f"| {s['layer']} | {s['post_ratio']:.1f} | {s['post_top']} | {s['pre_ratio']:.1f} | {s['pre_top']} | "
                     f"{s['post_mse_top1']:.0%} | {s['post_mse_top5']:.0%} | {s['logit_top1']:.0%} | {s['logit_top5']:.0%} | "
                     f"{s['logit_best1']:.0%} | {s['logit_best5']:.0%} | "
                     f"{s['pre_mse_total'] / s['post_mse_total']:.2f} | {s['pre_logit_total'] / s['post_logit_total']:.2f} |")
    return "\n".join(lines)


def section_d(r: Runner):
    r.run("d", replace(BASE, name="k2v2-dense2", k_dense_ch=2, desc="K2/V2, top-2 key ch/head fp (3.1% of keys)"))
    r.run("d", replace(BASE, name="k2v2-ksparse1%", k_sparse=0.01))
    r.run("d", replace(BASE, name="k2v2-ksparse3%", k_sparse=0.03))
    r.run("d", replace(BASE, name="k2v2-vsparse1%", v_sparse=0.01))


def section_e(r: Runner):
    for s in (1, 4):
        r.run("e", replace(BASE, name=f"k2v2-sink{s}", sink=s))


def section_f(r: Runner):
    k = torch.randn(1, 3, r.ids.shape[1], r.dims[2])
    err = (rope(unrope(k)) - k).abs().max().item()
    # the real forward: pre-RoPE keys = k_proj output; compare unrope(post-RoPE key) with it in layer 5
    attn = r.model.model.layers[5].self_attn
    if r.fp_hidden is None:
        r.fp_hidden = fp_layer_inputs(r.model, r.ids)
    x = r.model.model.layers[5].input_layernorm(r.fp_hidden[5])                       # [1, T, hidden]
    k_pre = attn.k_proj(x).view(1, x.shape[1], -1, r.dims[2]).transpose(1, 2)        # [1, H, T, D]
    err_real = (unrope(rope(k_pre)) - k_pre).abs().max().item() / k_pre.abs().max().item()
    print(f"  RoPE inversion: round trip max error {err:.1e} (random), unrope(rope(k_proj)) relative {err_real:.1e}")
    r.roundtrip = (err, err_real)
    r.run("f", Cfg("k2-preRoPE", kbits=2, pre_rope=True))
    r.run("f", replace(BASE, name="k2v2-preRoPE", pre_rope=True))


def section_g(r: Runner):
    for lv in ("kmeans", "kmeans-ends"):
        r.run("g", replace(BASE, name=f"k2v2-{lv}", k_levels=lv, v_levels=lv))
    r.run("g", replace(BASE, name="k2v2-preRoPE-kmeans-ends", pre_rope=True, k_levels="kmeans-ends", v_levels="kmeans-ends"))


COMBOS = [
    replace(BASE, name="k2v2-pre-sink4-ks1%", pre_rope=True, sink=4, k_sparse=0.01),
    replace(BASE, name="k2v2-pre-sink4-ks1%-vs1%", pre_rope=True, sink=4, k_sparse=0.01, v_sparse=0.01),
    replace(BASE, name="k2v2-pre-sink4-ks1%-vs1%-nuq", pre_rope=True, sink=4, k_sparse=0.01, v_sparse=0.01,
            k_levels="kmeans-ends", v_levels="kmeans-ends"),
    replace(BASE, name="k4v2-pre-sink4", kbits=4, pre_rope=True, sink=4),
]


def section_h(r: Runner):
    for c in COMBOS:
        r.run("h", c)


def best_combo(rows):
    h = [row for row in rows if row["section"] == "h" and row["bits_per_value"] <= 3.7]
    if not h:
        return COMBOS[2]
    name = min(h, key=lambda row: row["ppl"])["config"]
    return next(c for c in COMBOS if c.name == name)


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------
FIELDS = ["section", "text", "config", "what", "bits_per_value", "ppl", "delta_pct"]
TITLES = {
    "v": "Validation against the real decode path",
    "a": "a. Keys vs values",
    "b": "b. Blocks of layers (2-bit K+V only in layers a..b; then keys only)",
    "c": "c. One KV head at a time (all layers), then per (layer, head) in the worst key layers",
    "d": "d. Key channels: outlier statistics and dense-and-sparse",
    "e": "e. Attention sink: first tokens in full precision",
    "f": "f. Pre-RoPE key quantization (KVQuant)",
    "g": "g. Non-uniform levels (1-D k-means per layer, calibrated on another text)",
    "h": "h. Combinations",
    "i": "i. Robustness: second text",
}


def rows_md(rows, cols=("config", "what", "bits_per_value", "ppl", "delta_pct")):
    head = {"bits_per_value": "bits/value", "delta_pct": "vs fp (%)", "what": "what is quantized"}
    lines = ["| " + " | ".join(head.get(c, c) for c in cols) + " |", "|---" * len(cols) + "|"]
    for row in rows:
        cells = [f"{row[c]:+.2f}" if c == "delta_pct" else str(row[c]) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def layer_table(rows):
    kv = {r["config"].split("layers")[1]: r for r in rows if r["section"] == "b"}
    k = {r["config"].split("layers")[1]: r for r in rows if r["section"] == "b-keys"}
    lines = ["| layers | K2+V2 only there: ppl | vs fp (%) | K2 only there: ppl | vs fp (%) |", "|---|---|---|---|---|"]
    for l in kv:
        a, b = kv[l], k.get(l)
        lines.append(f"| {l} | {a['ppl']} | {a['delta_pct']:+.2f} | {b['ppl'] if b else ''} | "
                     f"{format(b['delta_pct'], '+.2f') if b else ''} |")
    return "\n".join(lines)


def read_md_chunks(path):
    if not path.exists():
        return {}
    text = path.read_text()
    return dict(re.findall(r"<!-- begin:(\w+) -->\n(.*?)<!-- end:\1 -->", text, flags=re.S))


def write_outputs(rows, chunks):
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "quality_analysis.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    order = ["header", "v"] + list("abcdefghi") + ["conclusions"]
    parts = []
    for key in order:
        if key in chunks:
            parts.append(f"<!-- begin:{key} -->\n{chunks[key].rstrip()}\n<!-- end:{key} -->\n")
    (RESULTS / "quality_analysis.md").write_text("\n".join(parts))


def read_csv_rows(path):
    if not path.exists():
        return []
    with open(path) as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["bits_per_value"], r["ppl"], r["delta_pct"] = float(r["bits_per_value"]), float(r["ppl"]), float(r["delta_pct"])
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default=SECTIONS, help="comma-separated sections out of " + ",".join(SECTIONS))
    ap.add_argument("--text", default="emma.txt")
    ap.add_argument("--calib-text", default="persuasion.txt")
    ap.add_argument("--text2", default="persuasion.txt", help="section i: second evaluation text")
    ap.add_argument("--calib-text2", default="northangerabbey.txt", help="section i: its calibration text")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    only = [s for s in args.only.replace(",", "") if s in SECTIONS]
    torch.set_num_threads(args.threads)
    t_start = time.time()

    model, tok = load_default_model(torch.float32)
    model.eval()
    model.set_attn_implementation("kvsim")
    assert model.config._attn_implementation == "kvsim"

    csv_path = RESULTS / "quality_analysis.csv"
    old_rows = [r for r in read_csv_rows(csv_path) if r["section"].split("-")[0] not in only]
    chunks = read_md_chunks(RESULTS / "quality_analysis.md")

    ids = load_ids(tok, args.text)
    if any(s in only for s in "dfgh"):
        print(f"calibrating on {args.calib_text} ...", flush=True)
        calibrate(model, load_ids(tok, args.calib_text, n=2048))
    set_text(model, ids)
    r = Runner(model, ids, args.text)
    print("fp reference ...", flush=True)
    r.run("v", Cfg("fp"))
    if "v" not in only:
        r.rows.clear()

    def flush():
        write_outputs(old_rows + r.rows, chunks)

    def chunk(key, body):
        rows = [row for row in r.rows if row["section"].split("-")[0] == key]
        chunks[key] = f"## {TITLES[key]}\n\n{body}\n"
        flush()
        return rows

    for s in only:
        print(f"section {s}", flush=True)
        t0 = time.time()
        if s == "v":
            section_v(r)
            by = {row["config"]: row for row in r.rows if row["section"] == "v"}
            lines = ["| config | emulation (one forward) ppl | real kvpass decode path ppl | difference |", "|---|---|---|---|"]
            for name in ("fp", "k4v4", "k2v2"):
                lines.append(f"| {name} | {by[name]['ppl']:.3f} ({by[name]['delta_pct']:+.2f}%) | {DECODE_PATH[name]:.3f} "
                             f"({(DECODE_PATH[name] / DECODE_PATH['fp'] - 1) * 100:+.2f}%) | {by[name]['ppl'] - DECODE_PATH[name]:+.3f} |")
            jit = [by[n]["ppl"] for n in by if "jitter" in n]
            div = prefill_divergence(model, ids)
            set_text(model, ids)
            per = sum(r.times) / len(r.times)
            chunk("v", "\n".join(lines) + "\n\nNoise floor of the 2-bit number (same config, K and V multiplied by "
                  f"(1 + 1e-6 N(0,1)) before quantization, 2 seeds): ppl {', '.join(f'{x:.3f}' for x in jit)} "
                  f"(base {by['k2v2']['ppl']:.3f}).\n\nThe decode path's own sensitivity: 2-bit prefill of the 512-token "
                  "prompt through `SimulatedKiviCache` with sdpa vs eager attention (same quantization, only the "
                  "floating-point order differs), max |hidden-state difference| after layer l: " +
                  ", ".join(f"l{l}: {v:.1e}" for l, v in div.items()) +
                  f"\n\nRuntime: {per:.1f} s per emulated forward on average (1536 tokens, 30 layers, fp32, "
                  "2-core CPU shared with other jobs, load ~3-4) vs ~90-200 s per decode-path run.\n")
        elif s == "a":
            section_a(r)
            chunk("a", rows_md([row for row in r.rows if row["section"] == "a"]))
        elif s == "b":
            section_b(r)
            chunk("b", layer_table(r.rows))
        elif s == "c":
            section_c(r)
            chunk("c", rows_md([row for row in r.rows if row["section"] == "c"]))
        elif s == "d":
            st = channel_stats(model, ids)
            set_text(model, ids)
            section_d(r)
            body = ("Statistics on the evaluation text, fp forward, 2-bit G32 per-channel key quantization of the whole "
                    "sequence. 'top/median' = max|k| of the largest channel / median channel's (all 3 heads x 64 "
                    "channels of the layer); top ch = head h, channel c. 'top 1% ch' = the 2 channels of the layer "
                    "with the largest max|k| (5% = 10); 'logit err' = sum over channels of sum_i q_ic^2 * "
                    "sum_j e_jc^2 (diagonal term of E[(q.(k_hat-k))^2]); 'best 1%' = the channels carrying the "
                    "most logit error whatever their magnitude.\n\n" + stats_md(st) +
                    "\n\nDense-and-sparse (channels / thresholds calibrated on the other text):\n\n" +
                    rows_md([row for row in r.rows if row["section"] == "d"]))
            chunk("d", body)
        elif s == "e":
            section_e(r)
            chunk("e", rows_md([row for row in r.rows if row["section"] == "e"]))
        elif s == "f":
            section_f(r)
            e1, e2 = r.roundtrip
            chunk("f", f"RoPE inversion round trip: max abs error {e1:.1e} (random keys), {e2:.1e} relative on real "
                  "keys.\n\n" + rows_md([row for row in r.rows if row["section"] == "f"]))
        elif s == "g":
            cal = Sim.calib
            lv = "\n".join(f"| {l} | {', '.join(f'{x:.3f}' for x in cal['post_levels_kmeans'][l])} | "
                           f"{', '.join(f'{x:.3f}' for x in cal['post_levels_kmeans-ends'][l])} | "
                           f"{', '.join(f'{x:.3f}' for x in cal['pre_levels_kmeans-ends'][l])} | "
                           f"{', '.join(f'{x:.3f}' for x in cal['v_levels_kmeans-ends'][l])} |" for l in (0, 1, 10, 20, 29))
            section_g(r)
            chunk("g", "Levels in the min/max-normalized group range [0, 1] (uniform 2-bit = 0, .333, .667, 1); "
                  "'kmeans' = 4 free levels, 'kmeans-ends' = 0 and 1 fixed (group min/max stay exact), 2 inner "
                  "levels fitted. Examples:\n\n| layer | keys post-RoPE kmeans | keys post-RoPE kmeans-ends | "
                  "keys pre-RoPE kmeans-ends | values kmeans-ends |\n|---|---|---|---|---|\n" + lv + "\n\n" +
                  rows_md([row for row in r.rows if row["section"] == "g"]))
        elif s == "h":
            section_h(r)
            chunk("h", rows_md([row for row in r.rows if row["section"] == "h"]))
        elif s == "i":
            best = best_combo(old_rows + r.rows)
            print(f"  second text {args.text2}, calibration {args.calib_text2}, best combo {best.name}", flush=True)
            calibrate(model, load_ids(tok, args.calib_text2, n=2048))
            ids2 = load_ids(tok, args.text2)
            set_text(model, ids2)
            r2 = Runner(model, ids2, args.text2)
            for c in (Cfg("fp"), BASE, best):
                r2.run("i", c)
            r.rows += r2.rows
            r.times += r2.times
            chunk("i", f"Evaluated on {args.text2} (chars {START_CHAR}+, same protocol); calibration for the combo "
                  f"on {args.calib_text2}.\n\n" + rows_md(r2.rows, ("text", "config", "what", "bits_per_value", "ppl", "delta_pct")))
            calibrate(model, load_ids(tok, args.calib_text, n=2048))
            set_text(model, ids)
        print(f"section {s} done in {time.time() - t0:.0f}s", flush=True)

    total = time.time() - t_start
    n = len(r.times)
    chunks["header"] = (
        "# 2-bit KV-cache error analysis (issue 4)\n\n"
        "SmolLM2-135M-Instruct (30 layers, 9 query / 3 KV heads, head_dim 64, RoPE), fp32 math, scale/zero fp32. "
        f"Text {args.text} from char {START_CHAR}: 512-token prompt, perplexity over the next 1024 tokens. "
        "KIVI: keys per-channel over groups of G=32 tokens, values per-token over groups of 32 channels; "
        "kvpass flush policy Lq = max(0, (L-R)//G*G), R=128 (the prompt's queries see Lq(512) = 384 quantized tokens). "
        "All numbers from the one-forward emulation (`kvsim` attention function), validated against the decode "
        "path below.\n\n"
        "bits/value = storage per cached scalar, mean of K and V: codes + fp16 scale and zero per 32-value group "
        "(+1 bit; the runs themselves use fp32 scale/zero, which would be +2 bits), full-precision channels at 16 bits, "
        "sparse outliers at 32 bits (16-bit value + 16-bit index). NOT counted: the R=128 full-precision window, the "
        "sink tokens, per-layer channel lists and levels (all amortize to ~0 at long context).\n\n"
        f"Run: 2026-11-22, 2-core CPU (shared with other jobs), command `PYTHONPATH=. python benchmarks/quality_analysis.py"
        f"{'' if ''.join(only) == SECTIONS else ' --only ' + ','.join(only)}`: "
        f"{n} emulated forwards, {sum(r.times) / max(n, 1):.1f} s each on average, {total / 60:.1f} min in all "
        "(last run; per-section times in the log).\n"
    )
    flush()
    print(f"done: {n} forwards, {total:.0f}s", flush=True)


if __name__ == "__main__":
    main()
