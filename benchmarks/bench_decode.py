"""End-to-end decode: a Llama-2-7B-shaped model (32 layers, 32 heads, head_dim 128, random bf16
weights) with kvpass.backend(bits=2) vs plain torch.compile (Inductor) on a bf16 StaticCache.

    PYTHONPATH=. python3 benchmarks/bench_decode.py [--configs 4096x1,32768x1,4096x8,32768x8] [--out DIR]
        [--kv-heads 8 --name decode_gqa8]   (grouped-query attention: Llama-3-8B's 32/8 heads)

Both sides: an eager prefill of the prompt (not timed; static caches in chunks of PREFILL_CHUNK tokens), then `--steps` greedy decode steps through
the compiled forward, timed with a host clock (tokens/s = batch * steps / time). `--loops`: the
static-cache kinds run the "sync" loop (the position built on the host each step: a blocking copy)
and/or the "async" loop (the position advanced on the device, as gpt-fast does), see decode_loop. kvpass: DynamicCache (no host syncs in its writes), its first compiled step
ingests the prefilled cache into the quantized store. Baseline: StaticCache of prompt + steps
slots, model.forward compiled by Inductor with dynamic shapes. Peak memory = max allocated
during decode. A profile of kvpass decode steps splits the step time into attention kernels,
other GPU work and host time. The largest batch at 16k context is computed from the measured
bytes per token of each cache and checked by allocating it (kvpass: the stores of all 32 layers,
with one decode-attention call per layer). Writes decode.csv / decode.md.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DRY = "--dry" in sys.argv
DEV = torch.device("cpu") if DRY else torch.device("cuda", 0)


def llama7b_config(layers: int, kv_heads: int = 32):
    """Llama-2-7B's shape; kv_heads < 32 gives it grouped-query attention (8: Llama-3-8B's 32/8 heads)."""
    from transformers import LlamaConfig

    if 32 % kv_heads:
        raise SystemExit(f"--kv-heads {kv_heads}: must divide the 32 query heads (1, 2, 4, 8, 16 or 32)")
    if DRY:
        cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=max(1, 4 * kv_heads // 32), vocab_size=1000,
                          max_position_embeddings=70000)
    else:
        cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
                          num_key_value_heads=kv_heads, vocab_size=32000, max_position_embeddings=70000)
    cfg._attn_implementation = "sdpa"
    return cfg


PACKED_GQA = "kvpass_bench_sdpa_packed_gqa"


def packed_gqa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                         **kwargs):
    """The bf16 baseline's GQA-aware attention (kinds `bf16_static_packed*`): HF's sdpa attention,
    except that a single query token attends on the KV heads directly. q [B, Hq, 1, D] ->
    [B, Hkv, rep, D] (the rep query heads of a KV head as query rows) over k/v [B, Hkv, T, D], the
    decode mask [B, 1, 1, T] broadcast over them: no `repeat_kv` copy of the cache, which HF's sdpa path
    makes under torch.compile (transformers' own `pack_gqa` does this reshape only outside
    torch.compile). Anything else goes to HF's sdpa attention unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    rep = getattr(module, "num_key_value_groups", 1)
    B, Hq, Tq, D = query.shape
    if Tq != 1 or rep == 1 or (attention_mask is not None and attention_mask.shape[1] != 1):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(  # [B, Hkv, rep, D]
        query.reshape(B, Hq // rep, rep, D), key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling)
    return out.reshape(B, Hq, 1, D).transpose(1, 2).contiguous(), None


def register_packed_gqa():
    """Make PACKED_GQA a name HF models accept as their attention implementation (sdpa's masks)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(PACKED_GQA, packed_gqa_attention)
    AttentionMaskInterface.register(PACKED_GQA, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


class attention_implementation:
    """`with attention_implementation(model, name):` the model's attention layers call `name` (the
    config every Llama module reads at each forward), then the previous one again."""

    def __init__(self, model, name):
        self.config, self.name = model.config, name

    def __enter__(self):
        self.prev = self.config._attn_implementation
        self.config._attn_implementation = self.name

    def __exit__(self, *exc):
        self.config._attn_implementation = self.prev


def build_model(cfg):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(DEV):
        model = LlamaForCausalLM(cfg)
    return model.to(torch.bfloat16).eval()


def sync():
    if not DRY:
        torch.cuda.synchronize()


def peak_reset():
    if not DRY:
        torch.cuda.reset_peak_memory_stats()


def peak_gb():
    return torch.cuda.max_memory_allocated() / 2**30 if not DRY else 0.0


LOOPS = ("sync", "async")
BF16_FORWARDS = ("bf16_static", "bf16_static_graphs", "bf16_static_packed", "bf16_static_packed_graphs")
KINDS = ("kvpass2", "kvpass2_static_graphs") + BF16_FORWARDS


def decode_loop(step, first, cache, steps, warmup, start_pos, static, loop="sync"):
    """Greedy decode: returns (seconds for `steps` timed steps, last token).
    loop "sync": each step's cache position is built on the host (`torch.tensor([pos])`, a blocking
    host-to-device copy: the host waits for the previous step before it prepares the next one).
    loop "async": the position stays on the device and is advanced there (gpt-fast's loop), so the
    host prepares step i+1 while the GPU runs step i; one sync at the end. Same tokens either way."""
    if loop not in LOOPS:
        raise ValueError(f"loop={loop!r} is not valid: use one of {LOOPS}")
    tok = first
    pos = start_pos
    pos_dev = torch.tensor([start_pos], device=DEV)
    t0 = None
    for i in range(warmup + steps):
        if i == warmup:
            sync()
            t0 = time.perf_counter()
        kw = dict(input_ids=tok, past_key_values=cache, use_cache=True)
        if static:
            kw["cache_position"] = torch.tensor([pos], device=DEV) if loop == "sync" else pos_dev
        out = step(**kw)
        tok = out.logits[:, -1:].argmax(-1)
        pos += 1
        if loop == "async":
            pos_dev = pos_dev + 1
    sync()
    return time.perf_counter() - t0, tok


def host_time(step, tok, cache, pos, n):
    """Host side of async decode steps: ms of host time per step over n steps (the loop returns
    before the GPU is done: nothing in it waits for the device), then the top of a cProfile of n
    more steps (the profiler slows the host down: its times are relative). Uses 2n cache slots."""
    import cProfile
    import pstats

    pos_dev = torch.tensor([pos], device=DEV)
    prof = cProfile.Profile()
    host_ms = None
    for rep in range(2):
        sync()
        t0 = time.perf_counter()
        if rep:
            prof.enable()
        for _ in range(n):
            out = step(input_ids=tok, past_key_values=cache, use_cache=True, cache_position=pos_dev)
            tok = out.logits[:, -1:].argmax(-1)
            pos_dev = pos_dev + 1
        if rep:
            prof.disable()
        else:
            host_ms = (time.perf_counter() - t0) / n * 1e3
    sync()
    stats = pstats.Stats(prof).stats  # {(file, line, name): (prim calls, calls, tottime, cumtime, callers)}
    top = sorted(stats.items(), key=lambda kv: -kv[1][2])[:30]
    lines = [f"host {host_ms:.3f} ms per step unprofiled; profiled, per step: own us, cumulative us, calls, function"]
    lines += [f"{tt / n * 1e6:9.1f} {ct / n * 1e6:9.1f} {nc / n:7.1f}  {os.path.basename(f)}:{ln}({fn})"
              for (f, ln, fn), (_, nc, tt, ct, _) in top]
    return dict(host_ms_per_step=host_ms, host_profile="\n".join(lines) + "\n")


def kernel_profile(step, tok, cache, pos, n):
    """GPU kernels of n async decode steps (torch.profiler, CUDA activity; kernels replayed inside
    CUDA graphs are traced one by one): a table of GPU time and launches per step by kernel name,
    the GPU-busy time per step and the wall time per step (the profiler adds host time, not GPU
    time). Uses n + 2 cache slots."""
    from torch.profiler import ProfilerActivity, profile

    pos_dev = torch.tensor([pos], device=DEV)
    out = step(input_ids=tok, past_key_values=cache, use_cache=True, cache_position=pos_dev)  # warm
    tok, pos_dev = out.logits[:, -1:].argmax(-1), pos_dev + 1
    sync()
    act = ProfilerActivity.CPU if DRY else ProfilerActivity.CUDA  # the dry run lists CPU ops
    with profile(activities=[act]) as prof:
        t0 = time.perf_counter()
        for _ in range(n):
            out = step(input_ids=tok, past_key_values=cache, use_cache=True, cache_position=pos_dev)
            tok = out.logits[:, -1:].argmax(-1)
            pos_dev = pos_dev + 1
        sync()
        wall = time.perf_counter() - t0
    rows = {}
    for e in prof.events():
        if not DRY and (e.device_type is None or "cuda" not in str(e.device_type).lower()):
            continue
        t = e.cpu_time if DRY else (getattr(e, "device_time", None) or getattr(e, "cuda_time", 0.0) or 0.0)
        r = rows.setdefault(e.name[:90], [0, 0.0])
        r[0] += 1
        r[1] += t
    busy = sum(r[1] for r in rows.values()) / n
    lines = [f"GPU busy {busy / 1e3:.3f} ms per step, wall {wall / n * 1e3:.3f} ms per step (profiled), "
             f"{sum(r[0] for r in rows.values()) / n:.0f} kernels per step",
             "   us/step  launches/step  kernel"]
    for name, (cnt, t) in sorted(rows.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"{t / n:10.1f} {cnt / n:14.1f}  {name}")
    return dict(gpu_busy_ms_per_step=busy / 1e3, kernels_per_step=sum(r[0] for r in rows.values()) / n,
                kernel_profile="\n".join(lines) + "\n")


PREFILL_CHUNK = 8192  # tokens per eager prefill forward (8 x 32k in one forward ran out of memory)


def chunked_prefill(model, ids, cache):
    """The eager prefill of `ids` [B, P] into a StaticCache, PREFILL_CHUNK tokens per forward
    (the activations of one chunk, not of the whole prompt). Returns the first generated token [B, 1]."""
    P = ids.shape[1]
    for c0 in range(0, P, PREFILL_CHUNK):
        c1 = min(P, c0 + PREFILL_CHUNK)
        out = model(input_ids=ids[:, c0:c1], past_key_values=cache, use_cache=True, logits_to_keep=1,
                    cache_position=torch.arange(c0, c1, device=DEV))
    first = out.logits[:, -1:].argmax(-1)
    del out
    return first


def run_baseline(model, cfg, P, B, steps, warmup, compiled_fwd, spare_slots=0, loop="sync", host_steps=0,
                 kernel_steps=0):
    from transformers import StaticCache

    ids = torch.randint(0, cfg.vocab_size, (B, P), device=DEV)
    cache = StaticCache(config=cfg, max_cache_len=P + warmup + steps + spare_slots + 2 * host_steps + kernel_steps + 2)
    with torch.no_grad():
        first = chunked_prefill(model, ids, cache)
        peak_reset()
        secs, tok = decode_loop(compiled_fwd, first, cache, steps, warmup, P, static=True, loop=loop)
        res = dict(tokens_per_s=B * steps / secs, ms_per_step=secs / steps * 1e3, peak_gb=peak_gb())
        if host_steps:
            res.update(host_time(compiled_fwd, tok, cache, P + warmup + steps, host_steps))
        if kernel_steps:
            res.update(kernel_profile(compiled_fwd, tok, cache, P + warmup + steps + 2 * host_steps, kernel_steps))
    del cache
    return res


def run_kvpass(model, cfg, P, B, steps, warmup, compiled_fwd, profile=False):
    from transformers import DynamicCache

    ids = torch.randint(0, cfg.vocab_size, (B, P), device=DEV)
    cache = DynamicCache()
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        first = out.logits[:, -1:].argmax(-1)
        del out
        peak_reset()
        secs, tok = decode_loop(compiled_fwd, first, cache, steps, warmup, P, static=False)
        res = dict(tokens_per_s=B * steps / secs, ms_per_step=secs / steps * 1e3, peak_gb=peak_gb())
        if profile and not DRY:
            res.update(profile_steps(compiled_fwd, tok, cache, 4))
    del cache
    return res


def run_kvpass_static(model, cfg, P, B, steps, warmup, compiled_fwd, loop="sync", host_steps=0, kernel_steps=0):
    """kvpass on a StaticCache (the baseline's loop): the store keeps its lengths on the device, so
    under mode="reduce-overhead" kvpass's CudaGraphRunner replays whole decode steps. The eager
    prefill fills the StaticCache's bf16 buffers, which stay allocated (they count in peak memory);
    the first compiled step ingests them into the quantized store."""
    from kvpass import cudagraph

    before = cudagraph.total_replays()
    res = run_baseline(model, cfg, P, B, steps, warmup, compiled_fwd, spare_slots=8, loop=loop, host_steps=host_steps,
                       kernel_steps=kernel_steps)
    res["graph_replays"] = cudagraph.total_replays() - before
    return res


def profile_steps(step, tok, cache, n):
    """GPU time per category over n decode steps, and the host-side step time."""
    from torch.profiler import ProfilerActivity, profile

    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(n):
            out = step(input_ids=tok, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
        sync()
        wall = time.perf_counter() - t0
    cats = {"attention_kernel": 0.0, "attention_reduce": 0.0, "gemm": 0.0, "store_append_and_other": 0.0}
    launches = 0
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None)
        if t is None:
            t = getattr(e, "cuda_time_total", 0.0)
        if not t or e.device_type is None or "cuda" not in str(e.device_type).lower():
            continue
        name = e.key
        launches += e.count
        if "_kvpass_decode_reduce" in name:
            cats["attention_reduce"] += t
        elif "_kvpass_decode" in name:
            cats["attention_kernel"] += t
        elif "gemm" in name.lower() or "gemv" in name.lower() or "cutlass" in name.lower() or "sm90" in name.lower():
            cats["gemm"] += t
        else:
            cats["store_append_and_other"] += t
    per_step = {f"gpu_{k}_ms": v / n / 1e3 for k, v in cats.items()}
    gpu_total = sum(cats.values()) / n / 1e3
    return dict(profile_wall_ms_per_step=wall / n * 1e3, profile_gpu_busy_ms_per_step=gpu_total,
                kernel_launches_per_step=launches / n, **per_step)


def cache_bytes_per_token(cfg, kvpass_bits=None, G=32, R=128, T=16384):
    """Bytes per token of context for all layers: bf16 cache, or the kvpass store at T tokens."""
    L, H, D = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    if kvpass_bits is None:
        return L * 2 * H * D * 2
    b = kvpass_bits
    Lq = (T - R) // G * G
    per_layer = 2 * H * (Lq * D * b // 8) + H * (2 * (Lq // G) * D * 2) + H * (2 * Lq * (D // G) * 2) + 2 * H * (T - Lq) * D * 2
    return L * per_layer / T


def _alloc_store(B, H, T, D, bits=2, G=32, R=128):
    """A kvpass store's buffers at T tokens, allocated in place (no large temporaries)."""
    Lq = (T - R) // G * G
    Lr = T - Lq
    u8 = dict(dtype=torch.uint8, device=DEV)
    st = dict(k_codes=torch.empty(B, H, Lq, D * bits // 8, **u8).random_(0, 256),
              v_codes=torch.empty(B, H, Lq, D * bits // 8, **u8).random_(0, 256),
              k_scale=torch.empty(B, H, Lq // G, D, dtype=torch.float16, device=DEV).uniform_(0.05, 0.5),
              k_zero=torch.empty(B, H, Lq // G, D, dtype=torch.float16, device=DEV).normal_(),
              v_scale=torch.empty(B, H, Lq, D // G, dtype=torch.float16, device=DEV).uniform_(0.02, 0.3),
              v_zero=torch.empty(B, H, Lq, D // G, dtype=torch.float16, device=DEV).normal_(),
              res_k=torch.empty(B, H, Lr, D, dtype=torch.bfloat16, device=DEV).normal_(),
              res_v=torch.empty(B, H, Lr, D, dtype=torch.bfloat16, device=DEV).normal_())
    return dict(st, key_bits=bits, value_bits=bits, group_size=G, quantized_length=Lq, length=T)


def _fits(cfg, B, T, kind, weights_bytes):
    """Allocate weights-sized memory + the whole cache at batch B and run one attention per layer."""
    from kvpass.templates import decode_attention as da
    import torch.nn.functional as F

    L, H, D = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    held = []
    try:
        held.append(torch.empty(weights_bytes + 2 * 2**30, dtype=torch.uint8, device=DEV))  # weights + activations
        q = torch.randn(B, cfg.num_attention_heads, 1, D, device=DEV, dtype=torch.bfloat16)
        for _ in range(L):
            if kind == "bf16":
                k = torch.empty(B, H, T, D, device=DEV, dtype=torch.bfloat16).normal_()
                v = torch.empty(B, H, T, D, device=DEV, dtype=torch.bfloat16).normal_()
                held += [k, v]
                F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            else:
                st = _alloc_store(B, H, T, D)
                held.append(st)
                da.decode_attention(q, **st)
        torch.cuda.synchronize()
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        del held
        torch.cuda.empty_cache()


def largest_batch(cfg, weights_bytes, T=16384):
    """Largest batch at T context: estimate from bytes per token, then the largest batch whose
    weights-sized block + full cache (all layers) + one attention call per layer really fits."""
    if DRY:
        return {}
    total = torch.cuda.mem_get_info()[1]
    res = {}
    for kind, bpt in (("bf16", cache_bytes_per_token(cfg)), ("kvpass2", cache_bytes_per_token(cfg, 2, T=T))):
        est = int((total - weights_bytes - 4 * 2**30) // (bpt * T))
        b = est + 1
        while b > 0 and not _fits(cfg, b, T, kind, weights_bytes):
            b -= 1
        res[f"{kind}_bytes_per_token"] = bpt
        res[f"{kind}_largest_batch_estimate"] = est
        res[f"{kind}_largest_batch_checked"] = b
    return res


def host_overheads(cfg):
    """Host-side microseconds of the pieces a kvpass decode step runs per layer (GPU work tiny)."""
    if DRY:
        return {}
    import kvpass.lowering.ops  # noqa: F401  (registers torch.ops.kvpass.*)
    from kvpass.lowering import dispatch
    from kvpass.store import KVStore, StoreConfig
    from kvpass.templates import decode_attention as da

    H, D = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    st = KVStore(StoreConfig(2, 2, 32, 128), 1, H, D, D, torch.bfloat16, DEV)
    st.append(torch.randn(1, H, 4096, D, device=DEV, dtype=torch.bfloat16), torch.randn(1, H, 4096, D, device=DEV, dtype=torch.bfloat16))
    q = torch.randn(1, cfg.num_attention_heads, 1, D, device=DEV, dtype=torch.bfloat16)
    new = torch.randn(1, H, 1, D, device=DEV, dtype=torch.bfloat16)
    out = {}

    def per_call_us(fn, n=300):
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        host = (time.perf_counter() - t0) / n * 1e6
        torch.cuda.synchronize()
        return host

    out["decode_attention_wrapper_us"] = per_call_us(lambda: da.decode_attention_store(q, st))
    out["dispatch_attention_us"] = per_call_us(lambda: dispatch.attention(q, st, None, st.length, 1, 0.0, False, None, True))
    out["kvpass_attention_op_us"] = per_call_us(
        lambda: torch.ops.kvpass.attention(q, _token(st), None, st.length, 1, D, 0.0, False, None, True))
    out["store_append_us"] = per_call_us(lambda: st.append(new, new))
    tiny = torch.randn(16, device=DEV)
    out["one_torch_op_launch_us"] = per_call_us(lambda: tiny.add_(1.0))
    print("host overheads (us per call):", {k: round(v, 1) for k, v in out.items()})
    return out


def _token(st):
    from kvpass.store import new_token

    if not hasattr(_token, "cache"):
        _token.cache = {}
    if id(st) not in _token.cache:
        _token.cache[id(st)] = new_token(st)
    return _token.cache[id(st)]


def main():
    global PREFILL_CHUNK
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="4096x1,32768x1,4096x8,32768x8")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=32,
                    help="KV heads of the 32 query heads (32: Llama-2-7B, MHA; 8: Llama-3-8B's GQA attention)")
    ap.add_argument("--name", default="decode", help="output files NAME.csv and NAME_extra.json")
    ap.add_argument("--kinds", default="kvpass2,bf16_static,kvpass2_static_graphs,bf16_static_graphs",
                    help="kvpass2 (DynamicCache), kvpass2_static_graphs (StaticCache, mode='reduce-overhead'), "
                         "bf16_static (Inductor), bf16_static_graphs (Inductor, mode='reduce-overhead'), "
                         "bf16_static_packed, bf16_static_packed_graphs (the same with GQA-aware decode attention, "
                         "packed_gqa_attention: no repeat_kv copy)")
    ap.add_argument("--loops", default="sync", help="comma list of decode loops for the static-cache kinds: "
                    "sync (host-built position, blocking copy per step), async (position advanced on the device)")
    ap.add_argument("--host-steps", type=int, default=0,
                    help="after each static-cache run, time the host side of this many async steps (+ cProfile)")
    ap.add_argument("--kernel-steps", type=int, default=0,
                    help="after each static-cache run, profile the GPU kernels of this many async steps "
                         "(writes kernels_KIND_LOOP_PxB.txt)")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--prefill-chunk", type=int, default=PREFILL_CHUNK, help="tokens per eager prefill forward "
                    "(static caches)")
    ap.add_argument("--no-extras", action="store_true", help="skip the host-overhead and largest-batch measurements")
    ap.add_argument("--only-extras", action="store_true", help="host overheads + largest batch, no model runs")
    ap.add_argument("--skip-kvpass", action="store_true")
    ap.add_argument("--dry", action="store_true", help="CPU, tiny model, eager compilers (script check only)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--date", default=datetime.date.today().isoformat())
    args = ap.parse_args()
    PREFILL_CHUNK = args.prefill_chunk
    kinds = args.kinds.split(",")
    for kind in kinds:
        if kind not in KINDS:
            raise SystemExit(f"--kinds: {kind!r} is not valid: use {', '.join(KINDS)}")
    loops = args.loops.split(",")
    for loop in loops:
        if loop not in LOOPS:
            raise SystemExit(f"--loops: {loop!r} is not valid: use {', '.join(LOOPS)}")
    os.makedirs(args.out, exist_ok=True)
    import kvpass
    import triton

    cfg = llama7b_config(args.layers, args.kv_heads)
    model = build_model(cfg)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    gpu = "cpu-dry-run" if DRY else torch.cuda.get_device_properties(0).name
    shape = "Llama-2-7B shape" if args.kv_heads == 32 else f"Llama-2-7B shape with 32/{args.kv_heads} heads (GQA)"
    info = dict(gpu=gpu, date=args.date, torch=torch.__version__, triton=triton.__version__,
                model=f"{shape}, random bf16 weights", weights_gb=weights / 2**30)
    print(json.dumps(info))
    inner = "eager" if DRY else "inductor"
    base_fwd = torch.compile(model.forward, backend="eager" if DRY else "inductor", dynamic=True)
    kv_backend = kvpass.backend(bits=2, group_size=32, residual_length=128, inner=inner)
    kv_fwd = torch.compile(model.forward, backend=kv_backend, dynamic=True)
    graphs = {} if DRY else dict(mode="reduce-overhead")
    base_graph_fwd = torch.compile(model.forward, backend="eager" if DRY else "inductor", dynamic=False, **graphs)
    kv_graph_backend = kvpass.backend(bits=2, group_size=32, residual_length=128, inner=inner)
    kv_graph_fwd = torch.compile(model.forward, backend=kv_graph_backend, dynamic=False, **graphs)
    register_packed_gqa()
    packed_fwd = torch.compile(model.forward, backend="eager" if DRY else "inductor", dynamic=True)
    packed_graph_fwd = torch.compile(model.forward, backend="eager" if DRY else "inductor", dynamic=False, **graphs)
    bf16_fwds = dict(zip(BF16_FORWARDS, (base_fwd, base_graph_fwd, packed_fwd, packed_graph_fwd)))
    rows = []
    configs = [tuple(int(x) for x in c.split("x")) for c in args.configs.split(",")]
    if DRY:
        configs = [(64, 1), (100, 2)]
    if args.only_extras:
        configs = []
    extras = {}
    if not args.no_extras:
        try:
            extras["host_overheads"] = host_overheads(cfg)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
    runs = [(kind, loop) for kind in kinds for loop in (loops if "static" in kind else ["sync"])]
    for P, B in configs:
        for kind, loop in runs:
            if (kind.startswith("bf16") and args.skip_baseline) or (kind.startswith("kvpass2") and args.skip_kvpass):
                continue
            need = cache_bytes_per_token(cfg) * (P + args.steps + args.warmup) * B
            if kind in BF16_FORWARDS + ("kvpass2_static_graphs",) and not DRY and need + weights > torch.cuda.mem_get_info()[1] * 0.95:
                row = dict(kind=kind, loop=loop, prompt=P, batch=B, tokens_per_s="", ms_per_step="", peak_gb="",
                           note=f"does not fit: bf16 cache {need / 2**30:.0f} GiB + weights {weights / 2**30:.1f} GiB")
                print(row)
                rows.append(row)
                continue
            if kind == "kvpass2" and not DRY and cache_bytes_per_token(cfg) * P * B + weights > torch.cuda.mem_get_info()[1] * 0.9:
                row = dict(kind=kind, prompt=P, batch=B, tokens_per_s="", ms_per_step="", peak_gb="",
                           note="eager bf16 prefill does not fit (the decode store would)")
                print(row)
                rows.append(row)
                continue
            t0 = time.perf_counter()
            try:
                if kind == "kvpass2":
                    res = run_kvpass(model, cfg, P, B, args.steps, args.warmup, kv_fwd, profile=(B == 1))
                elif kind == "kvpass2_static_graphs":
                    res = run_kvpass_static(model, cfg, P, B, args.steps, args.warmup, kv_graph_fwd, loop, args.host_steps,
                                            args.kernel_steps)
                else:
                    with attention_implementation(model, PACKED_GQA if "packed" in kind else cfg._attn_implementation):
                        res = run_baseline(model, cfg, P, B, args.steps, args.warmup, bf16_fwds[kind], loop=loop,
                                           host_steps=args.host_steps, kernel_steps=args.kernel_steps)
                profile_text = res.pop("host_profile", None)
                if profile_text:
                    with open(os.path.join(args.out, f"host_profile_{kind}_{loop}_{P}x{B}.txt"), "w") as f:
                        f.write(profile_text)
                kernel_text = res.pop("kernel_profile", None)
                if kernel_text:
                    with open(os.path.join(args.out, f"kernels_{kind}_{loop}_{P}x{B}.txt"), "w") as f:
                        f.write(kernel_text)
                res.update(kind=kind, loop=loop, prompt=P, batch=B, note="")
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                res = dict(kind=kind, loop=loop, prompt=P, batch=B, tokens_per_s="", ms_per_step="", peak_gb="",
                           note=f"failed: {type(e).__name__}: {str(e)[:200]}")
            res["wall_s_incl_compile"] = round(time.perf_counter() - t0, 1)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()}, flush=True)
            rows.append(res)
            if not DRY:
                torch.cuda.empty_cache()
    lb = {}
    if not args.no_extras:
        try:
            lb = largest_batch(cfg, weights)
            print("largest batch at 16k:", lb)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
    cols = ["gpu", "date", "torch", "triton", "kind", "loop", "prompt", "batch", "tokens_per_s", "ms_per_step", "peak_gb", "note"]
    extra = sorted({k for r in rows for k in r} - set(cols))
    name = f"{args.name}.csv" if rows else f"{args.name}_extras.csv"
    with open(os.path.join(args.out, name), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols + extra)
        w.writeheader()
        for r in rows:
            w.writerow({**{k: info.get(k, "") for k in ("gpu", "date", "torch", "triton")}, **r})
    from kvpass.lowering import paths
    ran = [f"{op}: {impl}" for op, impl in paths.seen()]   # which implementation served each kvpass op
    print("kvpass ops ran through:", *ran, sep="\n  ")
    with open(os.path.join(args.out, f"{args.name}_extra.json" if rows else f"{args.name}_extras_only.json"), "w") as f:
        json.dump(dict(info=info, largest_batch_16k=lb, rows=rows, kvpass_paths=ran, **extras), f, indent=1,
                  default=str)
    print("\n| kind | loop | prompt | batch | tokens/s | ms/step | peak GiB | note |")
    for r in rows:
        tps = r.get("tokens_per_s")
        print(f"| {r['kind']} | {r.get('loop', '')} | {r['prompt']} | {r['batch']} | {tps:.1f} | {r['ms_per_step']:.2f} | {r['peak_gb']:.1f} | {r['note']} |"
              if isinstance(tps, float) else f"| {r['kind']} | {r.get('loop', '')} | {r['prompt']} | {r['batch']} | - | - | - | {r['note']} |")


if __name__ == "__main__":
    main()
