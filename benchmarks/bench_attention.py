"""Decode attention over a KIVI store (kvpass Triton kernel) vs bf16 SDPA, and the memory floor.

    PYTHONPATH=. python3 benchmarks/bench_attention.py [--sweep] [--table] [--append] [--quick] [--out DIR]

--sweep   times config variants on representative shapes, checks each against a golden, writes
          sweep.json (the fastest correct config per class) and prints a table.
--table   the results table: batch {1,8,32} x heads {32/32, 32/8} x head_dim 128 x seq_len
          {4096, 16384, 32768, 131072 where it fits} x bits {2,4} x group {32,128}
          -> attention.csv / attention.md (in --out, default benchmarks/results).
--append  quantize-append cost per decode step (kvpass.store.KVStore.append: the torch reference
          path and the Triton kernel path) vs decode attention at 16k -> append.json / append.md.
Table timings (kvpass_ms, sdpa_bf16_ms): medians of CUDA-graph replays of 20 calls going round-robin
over input copies that together exceed 4 L2 sizes (benchmarks/timing.py: no host launch gaps, cold
L2, as a decode step under mode="reduce-overhead" runs; kvpass with device lengths); the eager
columns are medians of triton.testing.do_bench (L2 flushed before each run; kvpass with host
lengths). Sweep and append timings use do_bench. sdpa_bf16_ms is the faster of torch SDPA with
enable_gqa=True and SDPA with the query heads of each KV head packed as query rows (the
flash-decoding form of GQA), on a bf16 cache of the same shape in the same run.
floor_ms = bytes of packed codes + scales/zeros + residual window read once / copy bandwidth
(device-to-device copy, bytes read + written, measured in the same run).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
from triton.testing import do_bench as _do_bench  # noqa: E402

from benchmarks.timing import copies_for, graph_us  # noqa: E402
from kvpass.lowering import kivi  # noqa: E402
from kvpass.templates import decode_attention as da  # noqa: E402

# --dry: run everything on the CPU in Triton's interpreter with tiny shapes (checks the script
# before it costs GPU time); timings are then meaningless wall times.
DRY = "--dry" in sys.argv
DEV = torch.device("cpu") if DRY else torch.device("cuda", 0)  # an explicit index: KVStore compares devices
RES_LEN = 100  # tokens in the full-precision window (R = 128 keeps 128..159; 100 is a mid value)
if DRY:
    assert os.environ.get("TRITON_INTERPRET") == "1", "--dry needs TRITON_INTERPRET=1"
    RES_LEN = 10


def do_bench(fn, warmup=25, rep=100, return_mode="median"):
    if not DRY:
        return _do_bench(fn, warmup=warmup, rep=rep, return_mode=return_mode)
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def env_info(date: str):
    if DRY:
        return dict(gpu="cpu-dry-run", sms=4, torch=torch.__version__, triton=triton.__version__, cuda=None, date=date)
    p = torch.cuda.get_device_properties(0)
    return dict(gpu=p.name, sms=p.multi_processor_count, torch=torch.__version__, triton=triton.__version__,
                cuda=torch.version.cuda, date=date)


def copy_bandwidth() -> float:
    """Bytes/s of a device-to-device copy, counting bytes read plus written."""
    n = 1 << (20 if DRY else 30)
    src = torch.empty(n, dtype=torch.uint8, device=DEV).random_(0, 255)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    del src, dst
    return 2 * n / (ms * 1e-3)


def make_store(B, H, T, D, bits, G, dtype=torch.bfloat16, res_len=RES_LEN, seed=0):
    """Random packed buffers of a store holding T tokens: T - res_len rounded down to whole groups
    quantized, the rest in the window. Never zeros: codes uniform, scales > 0, zeros random."""
    torch.manual_seed(seed)
    Lq = max(0, (T - res_len) // G * G)
    Lr = T - Lq
    db = D * bits // 8
    kc = torch.randint(0, 256, (B, H, Lq, db), dtype=torch.uint8, device=DEV)
    vc = torch.randint(0, 256, (B, H, Lq, db), dtype=torch.uint8, device=DEV)
    sd = torch.float32 if dtype == torch.float32 else torch.float16
    ks = (torch.rand(B, H, Lq // G, D, device=DEV) * 0.5 + 0.05).to(sd)
    kz = (torch.randn(B, H, Lq // G, D, device=DEV) - 0.5).to(sd)
    vs = (torch.rand(B, H, Lq, D // G, device=DEV) * 0.3 + 0.02).to(sd)
    vz = (torch.randn(B, H, Lq, D // G, device=DEV) * 0.5).to(sd)
    rk = torch.randn(B, H, Lr, D, device=DEV).to(dtype)
    rv = torch.randn(B, H, Lr, D, device=DEV).to(dtype)
    return dict(k_codes=kc, k_scale=ks, k_zero=kz, v_codes=vc, v_scale=vs, v_zero=vz, res_k=rk, res_v=rv,
                key_bits=bits, value_bits=bits, group_size=G, quantized_length=Lq, length=T)


def store_bytes(st) -> int:
    return sum(st[n].numel() * st[n].element_size() for n in ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero", "res_k", "res_v"))


def run_kvpass(q, st, cfg=None):
    return da.decode_attention(q, **st, config=cfg)


def golden(q, st):
    """fp32 attention over the exact dequantized store (for spot checks; B small)."""
    G, Lq, bits = st["group_size"], st["quantized_length"], st["key_bits"]
    k = kivi.dequantize_keys(st["k_codes"], st["k_scale"], st["k_zero"], bits, G)
    v = kivi.dequantize_values(st["v_codes"], st["v_scale"], st["v_zero"], st["value_bits"], G)
    k = torch.cat([k, st["res_k"].float()], 2)
    v = torch.cat([v, st["res_v"].float()], 2)
    rep = q.shape[1] // k.shape[1]
    s = (q.float().view(q.shape[0], k.shape[1], rep, -1) @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    o = torch.softmax(s, -1) @ v
    return o.view(q.shape)


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def sdpa_forms(q, k, v):
    """The bf16 SDPA formulations of one decode step over a [B, Hkv, T, D] cache: enable_gqa, and
    for GQA the query heads of each KV head packed as query rows (K/V read once)."""
    B, Hq, _, D = q.shape
    rep = Hq // k.shape[1]
    forms = {"gqa": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)}
    if rep > 1:
        qp = q.view(B, k.shape[1], rep, D)
        forms["packed"] = lambda: F.scaled_dot_product_attention(qp, k, v)
    return forms


def sdpa_ms(B, Hq, Hkv, T, D, free):
    """(graph ms, eager ms): the fastest bf16 SDPA formulation, timed in CUDA-graph replays over
    cache copies (`time_graph`) and with do_bench."""
    nbytes = 2 * B * Hkv * T * D * 2
    n = 1 if DRY else copies_for(nbytes, free)
    q = torch.randn(B, Hq, 1, D, device=DEV, dtype=torch.bfloat16)
    caches = [(torch.randn(B, Hkv, T, D, device=DEV, dtype=torch.bfloat16),
               torch.randn(B, Hkv, T, D, device=DEV, dtype=torch.bfloat16)) for _ in range(n)]
    graph, eager = {}, {}
    forms = [sdpa_forms(q, k, v) for k, v in caches]  # per copy: name -> call
    for name in forms[0]:
        try:
            eager[name] = do_bench(forms[0][name], warmup=25, rep=100, return_mode="median")
            graph[name] = time_graph([f[name] for f in forms])
        except Exception as e:  # noqa: BLE001  (a formulation this torch build rejects: the other one is used)
            print(f"  sdpa {name} failed:", type(e).__name__, str(e)[:120])
    del caches, forms
    return min(graph.values()), min(eager.values())


def time_graph(fns) -> float:
    """Milliseconds per call: CUDA-graph replays round-robin over input copies (benchmarks/timing.py);
    under --dry one wall-clock call."""
    if DRY:
        return do_bench(fns[0])
    return graph_us(fns) / 1e3


def run_kvpass_device(q, st, lengths, cfg=None):
    """The kernel as a CUDA-graph decode step runs it: lengths on the device (Lq, L), kv_len = L."""
    return da.decode_attention(q, **st, config=cfg, lengths=lengths, kv_len=st["length"])


def bench_kvpass(q, st, cfg=None):
    return do_bench(lambda: run_kvpass(q, st, cfg), warmup=25, rep=100, return_mode="median")


# ---------------------------------------------------------------------------------------------
# Sweep


def sweep_variants(G, rep):
    out = []
    for pad in ((16, 1) if rep > 1 else (16, 1)):
        for nw in ((1, 2, 4) if not DRY else (4,)):
            for bn in ((32, 64) if not DRY else (32,)):
                if bn <= G:
                    out.append(da.DecodeConfig(use_dot=True, block_n=bn, num_warps=nw, pad_heads=pad))
    rows = ((2, 32), (4, 64), (4, 128), (8, 64), (8, 128)) if not DRY else ((4, 64),)
    for nw, bn in rows:
        out.append(da.DecodeConfig(use_dot=False, block_n=bn, num_warps=nw))
    return out


def sweep(args, bw, info, out_dir):
    classes = [(2, 32, 32, 32), (2, 32, 32, 8), (2, 128, 32, 32), (2, 128, 32, 8), (4, 32, 32, 8), (4, 128, 32, 32)]
    B, T, D = 8, 16384, 128
    if args.quick:
        classes, T = classes[:2], 4096
    if DRY:
        classes, B, T = classes[:2], 2, 300
    results = {}
    print(f"\n== sweep: B={B} T={T} D={D} (bf16) ==")
    for bits, G, Hq, Hkv in classes:
        st = make_store(B, Hkv, T, D, bits, G, seed=bits + G)
        q = torch.randn(B, Hq, 1, D, device=DEV, dtype=torch.bfloat16)
        q1, st1 = q[:1].contiguous(), {k: (v[:1].contiguous() if torch.is_tensor(v) else v) for k, v in st.items()}
        gold = golden(q1, st1)
        floor = store_bytes(st) / bw * 1e3
        rows = []
        cands = sweep_variants(G, Hq // Hkv)
        for cfg in cands:
            if not cfg.use_dot and Hq != Hkv:
                cfg = cfg  # rows variant runs one program per query head (L2 reuse for GQA)
            try:
                err = rel_err(run_kvpass(q1, st1, cfg), gold)
                ok = err < 2e-2
                ms = bench_kvpass(q, st, cfg) if ok else float("nan")
            except Exception as e:  # noqa: BLE001
                print(f"  {cfg}: FAILED {type(e).__name__}: {str(e)[:200]}")
                continue
            rows.append((ms, err, cfg))
        rows = [r for r in rows if r[0] == r[0]]
        rows.sort(key=lambda r: r[0])
        if not rows:
            print(f"  class b{bits} g{G} {Hq}/{Hkv}: no working config")
            continue
        best = rows[0][2]
        # stage 2: pipelining depth and split target around the best
        stage2 = []
        for ns in ((2, 3) if not DRY else (2,)):
            for cps in ((4, 8, 16, 32, 64) if not DRY else (4,)):
                cfg = da.DecodeConfig(**{**best.__dict__, "num_stages": ns, "ctas_per_sm": cps})
                try:
                    err = rel_err(run_kvpass(q1, st1, cfg), gold)
                    if err >= 2e-2:
                        continue
                    stage2.append((bench_kvpass(q, st, cfg), err, cfg))
                except Exception as e:  # noqa: BLE001
                    print(f"  {cfg}: FAILED {type(e).__name__}: {str(e)[:160]}")
        rows += stage2
        rows.sort(key=lambda r: r[0])
        name = da.kernel_name(da.DecodeSpec(bits, bits, G, D, torch.bfloat16, Hq // Hkv))
        print(f"\n-- {name} {Hq}/{Hkv}: floor {floor:.4f} ms")
        for ms, err, cfg in rows[:8]:
            print(f"  {ms:.4f} ms  floor/ms {floor / ms:.2f}  err {err:.1e}  dot={cfg.use_dot} bn={cfg.block_n} "
                  f"nw={cfg.num_warps} ns={cfg.num_stages} cps={cfg.ctas_per_sm} pad={cfg.pad_heads}")
        worst = rows[-1]
        print(f"  (slowest {worst[0]:.4f} ms: dot={worst[2].use_dot} bn={worst[2].block_n} nw={worst[2].num_warps})")
        results[f"b{bits}_g{G}_{Hq}_{Hkv}"] = dict(best=rows[0][2].__dict__, ms=rows[0][0], floor_ms=floor,
                                                   all=[(r[0], r[2].__dict__) for r in rows])
        del st
        torch.cuda.empty_cache()
    with open(os.path.join(out_dir, "sweep.json"), "w") as f:
        json.dump(dict(info=info, bw=bw, results=results), f, indent=1)
    return results


# ---------------------------------------------------------------------------------------------
# Table

COLUMNS = ["gpu", "date", "batch", "q_heads", "kv_heads", "head_dim", "seq_len", "bits", "group_size",
           "kvpass_ms", "sdpa_bf16_ms", "floor_ms", "kvpass_eager_ms", "sdpa_bf16_eager_ms"]


def table(args, bw, info, out_dir, cfg_for=None):
    """kvpass_ms / sdpa_bf16_ms: CUDA-graph replays over input copies (the kernel with device
    lengths, as a decode step under mode="reduce-overhead" runs it); *_eager_ms: do_bench of the
    eager call (kvpass with host lengths), whose batch-1 rows measure host launch time."""
    batches, seqs = (1, 8, 32), (4096, 16384, 32768, 131072)
    heads, bitss, groups = ((32, 32), (32, 8)), (2, 4), (32, 128)
    if args.quick:
        batches, seqs = (1, 8), (4096, 16384)
    if DRY:
        batches, seqs = (1, 2), (200, 333)
    D = 128
    rows = []
    print("\n== table ==")
    for B in batches:
        for Hq, Hkv in heads:
            for T in seqs:
                free = torch.cuda.mem_get_info()[0] if not DRY else 1 << 34
                sdpa = sdpa_eager = None
                if 2 * B * Hkv * T * D * 2 < 0.8 * free and not DRY:
                    try:
                        sdpa, sdpa_eager = sdpa_ms(B, Hq, Hkv, T, D, free)
                    except torch.OutOfMemoryError:
                        sdpa = sdpa_eager = None
                    torch.cuda.empty_cache()
                for bits in bitss:
                    for G in groups:
                        row = table_row(B, Hq, Hkv, T, D, bits, G, bw, info, cfg_for)
                        if row is None:
                            continue
                        row.update(sdpa_bf16_ms=round(sdpa, 5) if sdpa else "",
                                   sdpa_bf16_eager_ms=round(sdpa_eager, 5) if sdpa_eager else "")
                        rows.append(row)
                        ms = row["kvpass_ms"]
                        sp = f"{sdpa / ms:5.2f}x" if sdpa else "  n/a"
                        print(f"  B{B:<2} {Hq}/{Hkv:<2} T{T:<6} b{bits} g{G:<3} kvpass {ms:8.4f} ms  sdpa "
                              f"{sdpa or float('nan'):8.4f}  speedup {sp}  floor/kvpass {row['floor_ms'] / ms:.2f}  "
                              f"(eager {row['kvpass_eager_ms']:.4f} vs {sdpa_eager or float('nan'):.4f})", flush=True)
    with open(os.path.join(out_dir, "attention.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    write_md(rows, info, bw, os.path.join(out_dir, "attention.md"))
    return rows


def table_row(B, Hq, Hkv, T, D, bits, G, bw, info, cfg_for):
    """One table row's kvpass timings (graph replays over store copies, device lengths; eager
    do_bench, host lengths) after a spot check of both modes against the golden; None if the
    store does not fit."""
    try:
        st = make_store(B, Hkv, T, D, bits, G, seed=T + bits + G)
        free = torch.cuda.mem_get_info()[0] if not DRY else 1 << 34
        n = 1 if DRY else copies_for(store_bytes(st), free)
        stores = [st] + [make_store(B, Hkv, T, D, bits, G, seed=T + bits + G + i) for i in range(1, n)]
    except torch.OutOfMemoryError:
        print(f"  B{B} {Hq}/{Hkv} T{T} b{bits} g{G}: store does not fit")
        torch.cuda.empty_cache()
        return None
    q = torch.randn(B, Hq, 1, D, device=DEV, dtype=torch.bfloat16)
    lengths = torch.tensor([st["quantized_length"], st["length"]], dtype=torch.int32, device=DEV)
    cfg = cfg_for(bits, G, Hq // Hkv, T) if cfg_for else None
    if B == 1 and T <= 32768 or DRY:  # spot check against the golden, both length modes
        gold = golden(q, st)
        for mode, out in (("host", run_kvpass(q, st, cfg)), ("device", run_kvpass_device(q, st, lengths, cfg))):
            err = rel_err(out, gold)
            assert err < 2e-2, f"kernel wrong ({mode} lengths): rel err {err}"
    ms = time_graph([lambda s=s: run_kvpass_device(q, s, lengths, cfg) for s in stores])
    eager = bench_kvpass(q, st, cfg)
    floor = store_bytes(st) / bw * 1e3
    del st, stores
    if not DRY:
        torch.cuda.empty_cache()
    return dict(gpu=info["gpu"], date=info["date"], batch=B, q_heads=Hq, kv_heads=Hkv, head_dim=D, seq_len=T,
                bits=bits, group_size=G, kvpass_ms=round(ms, 5), floor_ms=round(floor, 5),
                kvpass_eager_ms=round(eager, 5))


def write_md(rows, info, bw, path):
    lines = ["# Decode attention: kvpass (KIVI store) vs bf16 SDPA", "",
             f"{info['gpu']}, {info['date']}, torch {info['torch']}, triton {info['triton']}, CUDA {info['cuda']}. "
             f"Copy bandwidth (read+write) measured in the same run: {bw / 1e12:.2f} TB/s. head_dim 128, bf16 model, "
             f"fp16 scales, {RES_LEN}-token full-precision window.", "",
             "kvpass ms and sdpa bf16 ms: medians of CUDA-graph replays of 20 calls going round-robin over copies "
             "of the store / bf16 cache that together exceed 4x the L2 (no host gaps, cold L2, as a decode step "
             "under mode=\"reduce-overhead\" runs; kvpass with device lengths). eager: triton.testing.do_bench "
             "of the eager call (kvpass with host lengths); at batch 1 it measures host launch time.", "",
             "| batch | heads q/kv | seq_len | bits | G | kvpass ms | sdpa bf16 ms | floor ms | speedup | floor/kvpass "
             "| eager kvpass / sdpa ms | eager speedup |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        sd, sde = r["sdpa_bf16_ms"], r["sdpa_bf16_eager_ms"]
        sp = f"{sd / r['kvpass_ms']:.2f}x" if sd else "bf16 OOM"
        spe = f"{sde / r['kvpass_eager_ms']:.2f}x" if sde else "-"
        lines.append(f"| {r['batch']} | {r['q_heads']}/{r['kv_heads']} | {r['seq_len']} | {r['bits']} | {r['group_size']} | "
                     f"{r['kvpass_ms']:.4f} | {sd if sd else '-'} | {r['floor_ms']:.4f} | {sp} | "
                     f"{r['floor_ms'] / r['kvpass_ms']:.2f} | {r['kvpass_eager_ms']:.4f} / {sde if sde else '-'} | {spe} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------
# Quantize-append cost


def append_cost(args, out_dir):
    """Per-step cost of KVStore.append (one new token per layer) at 16k, vs decode attention, for
    both store paths: the torch reference (KVPASS_DISABLE_TRITON=1: torch.cat window, codecs) and
    the kernel path (in-place window write, fused quantize-append flush). Per path, over the same
    steps (flushes included, amortized): wall time (host, synchronized), CUDA events around the
    loop (GPU stream time, including any gaps where the GPU waits for the host), and a CUDA graph
    replay of the same steps (GPU work alone, no host gaps), against decode attention over the
    same store timed in CUDA-graph replays. Writes append.json and append.md."""
    from kvpass.store import KVStore, StoreConfig

    batches, H, D, T, G, R, bits = (1, 8), 32, 128, 16384, 32, 128, 2
    warm, steps = 64, 256
    if args.quick:
        batches = (1,)
    if DRY:
        batches, H, T, warm, steps = (1,), 2, 300, 40, 72
        os.environ.setdefault("KVPASS_TRITON_INTERPRET", "1")  # the kernel path through the interpreter
    dt = torch.bfloat16
    results = []
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    for B in batches:
        torch.manual_seed(B)
        prefill = [torch.randn(B, H, T, D, device=DEV, dtype=dt) for _ in range(2)]
        new = [(torch.randn(B, H, 1, D, device=DEV, dtype=dt), torch.randn(B, H, 1, D, device=DEV, dtype=dt))
               for _ in range(warm + 2 * steps)]
        q = torch.randn(B, H, 1, D, device=DEV, dtype=dt)
        row = dict(batch=B, heads=H, head_dim=D, seq_len=T, bits=bits, group_size=G, residual=R, steps=steps - warm)
        for path in ("torch", "kernel"):
            os.environ["KVPASS_DISABLE_TRITON"] = "1" if path == "torch" else "0"
            st = KVStore(StoreConfig(bits, bits, G, R), B, H, D, D, dt, DEV)
            st.append(*prefill)
            for i in range(warm):  # compiles, fills the window to its steady state (includes flushes)
                st.append(*new[i])
            assert (st._win_k is not None) == (path == "kernel"), f"{path} path not taken"
            sync = torch.cuda.synchronize if not DRY else (lambda: None)
            sync()
            t0 = time.perf_counter()
            if not DRY:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            for i in range(warm, steps):
                st.append(*new[i])
            if not DRY:
                end.record()
            sync()
            n = steps - warm
            row[f"{path}_wall_us"] = (time.perf_counter() - t0) / n * 1e6
            row[f"{path}_events_us"] = start.elapsed_time(end) / n * 1e3 if not DRY else None
            if path == "kernel":  # decode attention over this store (window views), before the append replays
                # graph replays as in the table (one store: a warmer L2 than the table's copies, so
                # attention looks faster and the append's share larger, never smaller)
                row["attention_us"] = time_graph([lambda: da.decode_attention_store(q, st)]) * 1e3
            row[f"{path}_graph_us"] = None if DRY else _append_graph_us(st, new[steps : steps + n])
            del st
        os.environ.pop("KVPASS_DISABLE_TRITON", None)
        for path in ("torch", "kernel"):
            for kind in ("wall", "events", "graph"):
                v = row[f"{path}_{kind}_us"]
                row[f"{path}_{kind}_ratio"] = None if v is None else v / row["attention_us"]
        results.append(row)
        print(f"\n== quantize-append per step at {T} tokens, B{B} {H} heads D{D}, {bits}-bit G{G} R{R} "
              f"(decode attention {row['attention_us']:.1f} us) ==")
        for path in ("torch", "kernel"):
            print(f"  {path:>6}: {fmt(row[path + '_wall_us'])} us wall, {fmt(row[path + '_events_us'])} us events, "
                  f"{fmt(row[path + '_graph_us'])} us GPU (graph replay); GPU/attention = "
                  f"{fmt(None if row[path + '_graph_ratio'] is None else 100 * row[path + '_graph_ratio'])}%")
        del prefill, new
    with open(os.path.join(out_dir, "append.json"), "w") as f:
        json.dump(dict(env=env_info(args.date), results=results), f, indent=1)
    lines = ["| batch | path | wall us/step | events us/step | GPU us/step (graph) | attention us | GPU / attention |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        for path in ("torch", "kernel"):
            g = r[f"{path}_graph_ratio"]
            lines.append(f"| {r['batch']} | {path} | {fmt(r[path + '_wall_us'])} | {fmt(r[path + '_events_us'])} | "
                         f"{fmt(r[path + '_graph_us'])} | {r['attention_us']:.1f} | {'-' if g is None else f'{100 * g:.1f}%'} |")
    with open(os.path.join(out_dir, "append.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return results


def _append_graph_us(st, new) -> float | None:
    """GPU time per append step without host gaps: capture len(new) appends (their flushes included)
    in a CUDA graph and time its replays. Replays repeat the captured writes at the captured
    addresses, the same GPU work as the live steps. None (reason printed) if capture fails."""
    try:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):  # records the kernels (the store's Python state advances as in live steps)
            for kv in new:
                st.append(*kv)
        g.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        reps = 10
        start.record()
        for _ in range(reps):
            g.replay()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / reps / len(new) * 1e3
    except RuntimeError as e:  # capture refused (e.g. a host sync inside the path)
        print(f"  (CUDA graph capture of append failed: {type(e).__name__}: {str(e)[:200]})")
        return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--append", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dry", action="store_true", help="CPU interpreter, tiny shapes (script check only)")
    ap.add_argument("--use-sweep", default=None, help="sweep.json whose best configs the table uses")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--date", default=datetime.date.today().isoformat())
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    info = env_info(args.date)
    bw = copy_bandwidth()
    print(json.dumps(info), f"copy bandwidth {bw / 1e12:.3f} TB/s (read+write)")
    cfg_for = None
    if args.sweep:
        try:
            res = sweep(args, bw, info, args.out)
            cfg_for = _cfg_from_sweep(res)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
    if args.use_sweep:
        with open(args.use_sweep) as f:
            cfg_for = _cfg_from_sweep(json.load(f)["results"])
    if args.append:
        try:
            append_cost(args, args.out)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
    if args.table:
        table(args, bw, info, args.out, cfg_for)


def _cfg_from_sweep(results):
    best = {k: da.DecodeConfig(**v["best"]) for k, v in results.items()}

    def pick(bits, G, rep, T):
        key = f"b{bits}_g{G}_32_{32 // rep}"
        if key in best:
            return best[key]
        for k, c in best.items():  # same group and head layout, other bits
            if k.endswith(f"_g{G}_32_{32 // rep}"):
                return c
        return None
    return pick


if __name__ == "__main__":
    main()
