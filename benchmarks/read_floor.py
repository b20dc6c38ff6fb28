"""The achievable read floor at the attention table's sizes (issue 3): how long the fastest pure
streaming-read Triton kernel takes to read exactly the bytes the table's floor_ms counts
(bench_attention.store_bytes: packed codes + scales/zeros + window), timed as the table times kvpass
(benchmarks/timing.py: CUDA-graph replays of 20 calls round-robin over copies exceeding 4x L2). If
even a pure read cannot reach 0.8 of floor_ms at batch 1, no kernel can.

    PYTHONPATH=. python3 benchmarks/read_floor.py [--out DIR] [--batches 1,8]   # GPU: read_floor.md / .csv
    python3 benchmarks/read_floor.py --dry-run                  # CPU: byte counts, table skeleton
    TRITON_INTERPRET=1 python3 benchmarks/read_floor.py --check # CPU: read kernel vs torch sum

Per size: the best of the read variants (BLOCK 1024..16384 int32 x num_warps 4/8 x one program
per chunk or persistent 1/2/4 x SMs); read_plus_launch: it plus a 1-program reduce-like launch.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import sys

if "--check" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import bench_attention as ba  # noqa: E402
from benchmarks.timing import copies_for, graph_us  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
COLS = ["batch", "heads", "seq_len", "bits", "G", "bytes_MB", "floor_us", "best_read_us", "read_floor_ratio",
        "read_plus_launch_us", "kvpass_ms", "sdpa_ms"]
BLOCKS = (1024, 2048, 4096, 8192, 16384)  # int32 per program per step (1024/2048: more programs when small)


@triton.jit
def _read(X, OUT, n, BLOCK: tl.constexpr):
    """Program p sums int32 X[i] over blocks p, p+P, p+2P, ... of BLOCK elements (i < n) into
    OUT[p]. n % 16 == 0 in timing runs, so the masked loads stay 16-byte vectors."""
    pid, nprog = tl.program_id(0), tl.num_programs(0)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(pid.to(tl.int64) * BLOCK, n, nprog * BLOCK):   # int64: buffers past 2 GiB
        idx = tl.multiple_of(start, BLOCK) + offs
        acc += tl.load(X + idx, mask=idx < n, other=0)
    tl.store(OUT + pid, tl.sum(acc, 0))


@triton.jit
def _tiny(OUT, RES, P, BLOCK: tl.constexpr):
    """One program: sums the first min(P, BLOCK) partials of _read into RES[0]."""
    offs = tl.arange(0, BLOCK)
    tl.store(RES, tl.sum(tl.load(OUT + offs, mask=offs < P, other=0), 0))


@triton.jit
def _empty(X, N):  # does nothing: no program has id N = -1
    if tl.program_id(0) == N:
        tl.store(X, 1)


def row_bytes(B, Hkv, T, bits, G, D=128) -> int:
    """Bytes the table's floor counts: ba.store_bytes of ba.make_store (ba.RES_LEN-token window) on
    the meta device (no memory, no GPU)."""
    dev, ba.DEV = ba.DEV, torch.device("meta")  # make_store allocates on the module's DEV
    try:
        return ba.store_bytes(ba.make_store(B, Hkv, T, D, bits, G))
    finally:
        ba.DEV = dev


def shapes(batches=(1, 8)):
    """(batch, q heads, kv heads, seq_len, bits, G): the rows measured."""
    return [(B, Hq, Hkv, T, bits, G) for B in batches for Hq, Hkv in ((32, 32), (32, 8))
            for T in (4096, 16384, 32768, 131072) for bits, G in ((2, 32), (2, 128), (4, 32))]


def variants(n, sms):
    """(BLOCK, num_warps, programs) for n int32 elements: one program per chunk, and persistent."""
    chunks = {blk: triton.cdiv(n, blk) for blk in BLOCKS}
    return [(blk, nw, p) for blk, c in chunks.items() for nw in (4, 8)
            for p in sorted({c} | {min(k * sms, c) for k in (1, 2, 4)})]


def launch(buf, out, n, cfg):  # cfg: (BLOCK, num_warps, programs)
    _read[(cfg[2],)](buf, out, n, BLOCK=cfg[0], num_warps=cfg[1])


def measure(nbytes, sms):
    """(best read us, its cfg, worst us, read + tiny launch us, copies). Buffers: nbytes rounded up to
    64 B (n int32, n % 16 == 0; <= 60 B more than the floor counts), copies as the table's."""
    n = triton.cdiv(nbytes, 64) * 16  # int32 elements
    assert n < 2**31 - 4 * sms * 16384 * 2, "int32 offsets"
    ncopy = copies_for(4 * n, torch.cuda.mem_get_info()[0])
    bufs = [torch.empty(4 * n, dtype=torch.uint8, device="cuda").random_(0, 256).view(torch.int32)
            for _ in range(ncopy)]
    times = {}
    for cfg in variants(n, sms):
        out = torch.empty(cfg[2], dtype=torch.int32, device="cuda")
        times[cfg] = graph_us([lambda b=b, o=out, c=cfg: launch(b, o, n, c) for b in bufs])
    best = min(times, key=times.get)
    out, res = torch.empty(best[2], dtype=torch.int32, device="cuda"), torch.empty(1, dtype=torch.int32, device="cuda")
    if n <= 1 << 26:  # the best variant really reads everything: its sums vs torch's, mod 2^32
        launch(bufs[0], out, n, best)
        assert (out.long().sum() - bufs[0].long().sum()) % 2**32 == 0, f"read kernel wrong: {best}"
    plus_us = graph_us([lambda b=b: (launch(b, out, n, best), _tiny[(1,)](out, res, best[2], BLOCK=1024))
                        for b in bufs])  # the best read, then a split-reduce-like 1-program launch
    del bufs
    torch.cuda.empty_cache()
    return times[best], best, max(times.values()), plus_us, ncopy


def attention_rows(path):
    """(batch, q_heads, kv_heads, seq_len, bits, group_size) -> (kvpass_ms, sdpa_bf16_ms) strings."""
    with open(path) as f:
        return {tuple(int(r[k]) for k in ("batch", "q_heads", "kv_heads", "seq_len", "bits", "group_size")):
                (r["kvpass_ms"], r["sdpa_bf16_ms"]) for r in csv.DictReader(f)}


def check():
    """The kernels under the interpreter (CPU): per-program sums vs torch, mod 2^32."""
    torch.manual_seed(0)
    n = 1000  # not a multiple of BLOCK: the masked tail
    buf = torch.randint(-2**31, 2**31 - 1, (n,), dtype=torch.int32)
    want = int(buf.to(torch.int64).sum()) % 2**32
    for blk, p in ((64, triton.cdiv(n, 64)), (64, 3), (128, 1), (256, 2)):  # chunks, persistent
        out, res = torch.zeros(p, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
        _read[(p,)](buf, out, n, BLOCK=blk, num_warps=4)
        _tiny[(1,)](out, res, p, BLOCK=1024)
        got, tiny = int(out.long().sum()) % 2**32, int(res.long()) % 2**32
        print(f"check BLOCK {blk} programs {p}: sum {got} torch {want} tiny {tiny}")
        assert got == want == tiny, "MISMATCH"
    _empty[(4,)](torch.zeros(1, dtype=torch.int32), -1)
    print("check ok")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--dry-run", action="store_true", help="CPU: byte counts and table skeleton, no timing")
    ap.add_argument("--check", action="store_true", help="interpreter run of the kernels vs torch (CPU)")
    ap.add_argument("--attention-csv", default=os.path.join(RESULTS, "attention.csv"))
    ap.add_argument("--batches", default="1,8", help="comma list of the batch sizes to measure")
    args = ap.parse_args()
    if args.check:
        return check()
    ref = attention_rows(args.attention_csv) if os.path.exists(args.attention_csv) else {}
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    if not args.dry_run:
        info = ba.env_info(date)
        bw = ba.copy_bandwidth()  # bytes/s, read + written
        x = torch.zeros(1, dtype=torch.int32, device="cuda")
        empty_us = graph_us(lambda: _empty[(1,)](x, -1, num_warps=1))
        print(f"{info['gpu']} copy bandwidth {bw / 1e12:.3f} TB/s, empty kernel {empty_us:.2f} us/graph node")
    rows = []
    for B, Hq, Hkv, T, bits, G in shapes(tuple(int(b) for b in args.batches.split(","))):
        nbytes = row_bytes(B, Hkv, T, bits, G)
        kv, sd = ref.get((B, Hq, Hkv, T, bits, G), ("", ""))
        r = {**dict.fromkeys(COLS + ["best_cfg"], ""), **dict(batch=B, heads=f"{Hq}/{Hkv}", seq_len=T, bits=bits,
             G=G, bytes_MB=f"{nbytes / 1e6:.3f}", kvpass_ms=kv, sdpa_ms=sd)}
        msg = f"B{B} {Hq}/{Hkv} T{T} b{bits} G{G}: {nbytes} B"
        if not args.dry_run:
            floor = nbytes / bw * 1e6  # us
            best, cfg, worst, plus, ncopy = measure(nbytes, info["sms"])
            r.update(floor_us=f"{floor:.2f}", best_read_us=f"{best:.2f}", read_floor_ratio=f"{floor / best:.2f}",
                     read_plus_launch_us=f"{plus:.2f}", best_cfg=f"BLOCK{cfg[0]} nw{cfg[1]} P{cfg[2]} copies{ncopy}")
            msg += (f", floor {floor:.2f} us, read {best:.2f} us ({r['best_cfg']}; worst {worst:.2f}), "
                    f"floor/read {floor / best:.2f}, read+launch {plus:.2f} us")
        print(msg + f", kvpass {kv or '-'} ms, sdpa {sd or '-'} ms", flush=True)
        rows.append(r)
    table = "\n".join(["| " + " | ".join(COLS) + " |", "|" + "---:|" * len(COLS)]
                      + ["| " + " | ".join(str(r[c]) or "-" for c in COLS) + " |" for r in rows])
    print("\n" + table)
    if args.dry_run:
        return
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "read_floor.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["gpu", "date"] + COLS + ["best_cfg"])
        w.writeheader()
        w.writerows({"gpu": info["gpu"], "date": date, **r} for r in rows)
    with open(os.path.join(args.out, "read_floor.md"), "w") as f:
        f.write(f"# Achievable read floor at the attention table's sizes\n\n{info['gpu']} ({info['sms']} SMs), "
                f"{date}, torch {info['torch']}, triton {info['triton']}, CUDA {info['cuda']}. Copy bandwidth "
                f"(read+write, bench_attention.copy_bandwidth) {bw / 1e12:.3f} TB/s; empty kernel {empty_us:.2f} us "
                f"per graph node.\n\nbytes: bench_attention.store_bytes (codes + scales/zeros + {ba.RES_LEN}-token "
                "bf16 window), head_dim 128; floor_us = bytes / copy bandwidth (the table's floor_ms). best_read_us: "
                "fastest Triton streaming read of those bytes (16-byte loads; BLOCK "
                f"{'/'.join(map(str, BLOCKS))} int32, 4/8 warps, one program per chunk or persistent 1/2/4 x SMs), "
                "CUDA-graph replays of 20 calls round-robin over copies totalling 4x L2, at most 16 as in the table "
                "(copies in the csv's best_cfg; 16 copies of a row under 4x L2 / 16 total less, so some L2 hits are "
                "possible). read_plus_launch_us: the best read, then a 1-program kernel summing its partials. "
                f"kvpass_ms / sdpa_ms: {os.path.relpath(args.attention_csv)} (an earlier run).\n\n{table}\n")


if __name__ == "__main__":
    main()
