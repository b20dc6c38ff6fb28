"""A/B timings of the decode kernel that need one process per variant (Triton compiles a kernel's
helpers once per process): the default config at given shapes, CUDA-graph timed as
`tune_decode_graph.py` times it, optionally with the session-7 two-pass split reduce swapped in
(--old-reduce), the one-pass reduce with another block of splits (--reduce-block), or with an empty full-precision window (--empty-window: L = Lq, so the split that
reaches Lq has no window tokens to add), in host- or device-lengths mode.

    PYTHONPATH=. python3 benchmarks/ab_decode.py --shapes 1x32x16384,8x32x8x16384 [--bits 2] [--group 32]
        [--old-reduce] [--empty-window] [--host-lengths] [--mask bool|additive] [--kernel OLD_DECODE_ATTENTION.py]
        [--tag NAME] [--window-splits=-1,0] [--rounds 3] [--table-store [--regs 0,168] [--fuse-reduce 0,1]] [--mma-kernel OLD_DECODE_MMA.py]

Prints one line per shape: tag, shape, bits, group, lengths mode, microseconds per call.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.timing import copies_for, graph_us  # noqa: E402
from benchmarks.tune_decode_graph import make_store  # noqa: E402
from kvpass.templates import decode_attention as da  # noqa: E402
from kvpass.templates import decode_mma  # noqa: E402


@triton.jit
def _reduce_row_two_pass(OP, OM, OL, OUT, orow, NUM_SPLITS_RT,
                         HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, S_BLOCK: tl.constexpr):
    """The session-7 reduce (max pass, then weighted-sum pass, 16 splits per block; S_BLOCK is
    ignored, kept so the kernels call it as they call `_reduce_row`)."""
    sp = tl.arange(0, 16)
    d = tl.arange(0, D_PAD)
    d_ok = d < HEAD_DIM
    base = orow * NUM_SPLITS_RT
    m_max = tl.full([], float("-inf"), tl.float32)
    for s0 in range(0, NUM_SPLITS_RT, 16):
        s_ok = s0 + sp < NUM_SPLITS_RT
        m = tl.load(OM + base + s0 + sp, mask=s_ok, other=float("-inf"), cache_modifier=".cg")
        m_max = tl.maximum(m_max, tl.max(m, axis=0))
    o = tl.zeros([D_PAD], tl.float32)
    denom = tl.zeros([], tl.float32)
    for s0 in range(0, NUM_SPLITS_RT, 16):
        s_ok = s0 + sp < NUM_SPLITS_RT
        m = tl.load(OM + base + s0 + sp, mask=s_ok, other=float("-inf"), cache_modifier=".cg")
        lsum = tl.load(OL + base + s0 + sp, mask=s_ok, other=0.0, cache_modifier=".cg")
        w = tl.where(m == float("-inf"), 0.0, tl.exp2(m - m_max))
        denom += tl.sum(w * lsum, axis=0)
        part = tl.load(OP + (base + s0 + sp)[:, None] * HEAD_DIM + d[None, :],
                       mask=s_ok[:, None] & d_ok[None, :], other=0.0, cache_modifier=".cg")
        o += tl.sum(part * w[:, None], axis=0)
    tl.store(OUT + orow * HEAD_DIM + d, (o / denom).to(OUT.dtype.element_ty), mask=d_ok)


def use_variant(old_reduce: bool, reduce_block: int = 0):
    """Before any compile (the kernels look their helpers and constexpr globals up in the module)."""
    if old_reduce:
        da._reduce_row = _reduce_row_two_pass
    if reduce_block:
        da.FUSED_REDUCE_BLOCK = tl.constexpr(reduce_block)


def call_for(q, st, kv_len, empty_window: bool, host: bool, empty_store: bool = False, config=None, mask=None):
    """One decode call over store st (the default config, or `config`; with `mask` if given), with the
    window emptied if asked, or (empty_store, device lengths) with lengths (0, 0): no token attended
    but the zero tail."""
    if not (empty_window or empty_store):
        return lambda: da.decode_attention_store(q, st, attn_mask=mask, kv_len=kv_len, config=config)
    kb, vb = st.keys.buffers, st.values.buffers
    parts = (kb["codes"], kb["scale"], kb["zero"], vb["codes"], vb["scale"], vb["zero"])
    bits = dict(key_bits=st.cfg.key_bits, value_bits=st.cfg.value_bits, group_size=st.cfg.group_size)
    Lq = st.quantized_length
    if host:
        rk, rv = st.res_k[:, :, :0], st.res_v[:, :, :0]
        return lambda: da.decode_attention(q, *parts, rk, rv, quantized_length=Lq, length=Lq, kv_len=kv_len, **bits)
    lengths = st.device_lengths.clone()
    lengths[1] = lengths[0]
    if empty_store:
        lengths[:2] = 0
    return lambda: da.decode_attention(q, *parts, st.window_k, st.window_v, kv_len=kv_len, lengths=lengths, **bits)


def load_kernel_module(path: str):
    """Another version of templates/decode_attention.py (e.g. `git show HEAD:templates/decode_attention.py
    > old.py`) in place of the package's, for an A/B of two kernel versions in separate processes."""
    global da
    spec = importlib.util.spec_from_file_location("kvpass_ab_decode_attention", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    da = mod


def load_mma_module(path: str):
    """Another version of templates/decode_mma.py (e.g. `git show 61f222f:templates/decode_mma.py >
    old_mma.py`) as a module of its own, to time its kernel against the package's in one process
    (separate processes differ by a few percent at batch 1: benchmarks/NOTES.md, session 17)."""
    spec = importlib.util.spec_from_file_location(f"kvpass_ab_mma_{abs(hash(path))}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def with_mma(fn, module):
    """fn with `decode_attention`'s Gluon launcher taken from `module` while it runs (None: as is)."""
    if module is None:
        return fn

    def run():
        real = decode_mma.decode_attention_mma
        decode_mma.decode_attention_mma = module.decode_attention_mma
        try:
            return fn()
        finally:
            decode_mma.decode_attention_mma = real
    return run


def interleaved_us(variants, calls_for, rounds: int) -> dict:
    """{tag: [us of each round]} of variants (tag, config, mma module or None): each round times every
    variant once, graph-timed over `calls_for(config)` (one call per store copy), so that a drift of
    the clocks hits all variants alike. With several rounds, one more round goes first and is not
    kept: in session 18's A/Bs the first round of a shape was often 2-6 % faster than the next two
    (results/ab_s18.log: 13.56 then 14.45, 14.46 us; 27.71 then 28.50, 28.54), which a median of 3
    only just absorbs."""
    timings = {tag: [] for tag, _, _ in variants}
    warmup = 1 if rounds > 1 else 0
    for r in range(warmup + rounds):
        for tag, cfg, module in variants:
            us = graph_us([with_mma(fn, module) for fn in calls_for(cfg)])
            if r >= warmup:
                timings[tag].append(us)
    return timings


def median_text(ts: list) -> str:
    """'M us' (the median), with every round when there were several."""
    med = sorted(ts)[len(ts) // 2]
    return f"{med:.2f} us" + (f" (rounds {', '.join(f'{t:.2f}' for t in ts)})" if len(ts) > 1 else "")


def table_ab(args, q, B, Hq, H, T, n):
    """--table-store: the attention table's store and call (`bench_attention.table_row`: 100-token
    window, kv_len = L, device lengths) for each --window-splits variant, interleaved over --rounds."""
    from benchmarks import bench_attention as ba
    stores = [ba.make_store(B, H, T, 128, args.bits, args.group, seed=i) for i in range(n)]
    lengths = torch.tensor([stores[0]["quantized_length"], stores[0]["length"]], dtype=torch.int32, device="cuda")
    spec = da.DecodeSpec(args.bits, args.bits, args.group, 128, torch.bfloat16, Hq // H)
    base = da.default_config_for(spec, B)
    variants = [(f"package window_splits={w}", dataclasses.replace(base, window_splits=int(w)), None)
                for w in (args.window_splits or "-1").split(",")]
    variants += [(f"package max_regs={r}", dataclasses.replace(base, max_regs=int(r)), None)
                 for r in args.regs.split(",") if args.regs]
    variants += [(f"package fuse_reduce={f}", dataclasses.replace(base, fuse_reduce=bool(int(f))), None)
                 for f in args.fuse_reduce.split(",") if args.fuse_reduce]
    variants += [(f"mma_kernel={path}", base, load_mma_module(path)) for path in args.mma_kernel]
    timings = interleaved_us(
        variants, lambda cfg: [lambda s=s: ba.run_kvpass_device(q, s, lengths, cfg) for s in stores], args.rounds)
    ref = ba.run_kvpass_device(q, stores[0], lengths, base).float()
    for tag, cfg, module in variants:
        got = with_mma(lambda: ba.run_kvpass_device(q, stores[0], lengths, cfg), module)().float()
        print(f"AB {tag} {B}x{Hq}x{H}x{T} b{args.bits} g{args.group} table store: {median_text(timings[tag])} "
              f"(max |variant - package default| {(got - ref).abs().max().item():.2e}, "
              f"max |default| {ref.abs().max().item():.2e})", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="1x32x16384")
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--group", type=int, default=32)
    ap.add_argument("--old-reduce", action="store_true")
    ap.add_argument("--reduce-block", type=int, default=0, help="splits per round of the one-pass fused reduce")
    ap.add_argument("--empty-window", action="store_true")
    ap.add_argument("--host-lengths", action="store_true")
    ap.add_argument("--tag", default="")
    ap.add_argument("--mma", type=int, default=0, metavar="MIN_GROUPS",
                    help="the Gluon tensor-core kernel (DecodeConfig.use_mma) with this min_groups_per_split; "
                         "its max deviation from the default config is printed too")
    ap.add_argument("--max-regs", type=int, default=0, help="(with --mma) DecodeConfig.max_regs")
    ap.add_argument("--no-mma", action="store_true",
                    help="the default config with use_mma off (the Triton kernel a call falls back to)")
    ap.add_argument("--window-splits", default="", metavar="N[,N...]",
                    help="the default config with DecodeConfig.window_splits = N (-1 automatic, 0 window rows over "
                         "all splits, k > 0 forced), each timed in this process")
    ap.add_argument("--mma-kernel", action="append", default=[], metavar="OLD_DECODE_MMA.py",
                    help="another templates/decode_mma.py whose launcher and kernel are timed beside the "
                         "package's, interleaved in this process (repeatable)")
    ap.add_argument("--regs", default="", metavar="N[,N...]",
                    help="(--table-store) the default config with DecodeConfig.max_regs = N (register cap per "
                         "thread; the split plan fills the waves it allows), each timed in this process")
    ap.add_argument("--fuse-reduce", default="", metavar="0|1[,...]",
                    help="(--table-store) the default config with DecodeConfig.fuse_reduce = 0/1 (the Gluon kernel "
                         "reduces MHA splits in the kernel when 1), each timed in this process")
    ap.add_argument("--table-store", action="store_true",
                    help="the attention table's store and call (bench_attention.py) instead of a KVStore")
    ap.add_argument("--rounds", type=int, default=1, help="time the variants this many times, interleaved; "
                    "print the median (and every round)")
    ap.add_argument("--kernel", default=None, help="path of another decode_attention.py to time instead")
    ap.add_argument("--mask", default="none", choices=("none", "bool", "additive"),
                    help="an attention mask [1, 1, 1, kv_len] as HF passes it (attend to the stored tokens, "
                         "not the static tail)")
    args = ap.parse_args()
    for flag, value in (("--regs", args.regs), ("--fuse-reduce", args.fuse_reduce)):
        if value and not args.table_store:
            ap.error(f"{flag} {value} is timed in the table's store only: add --table-store")
    if args.kernel:
        load_kernel_module(args.kernel)
    use_variant(args.old_reduce, args.reduce_block)
    mode = "host" if args.host_lengths else "device"
    for shape in args.shapes.split(","):
        dims = [int(x) for x in shape.split("x")]
        B, Hq, H, T = dims if len(dims) == 4 else (dims[0], dims[1], dims[1], dims[2])
        n = copies_for(B * H * T * (2 * 128 * args.bits // 8 + 8), torch.cuda.mem_get_info()[0])
        q = torch.randn(B, Hq, 1, 128, device="cuda", dtype=torch.bfloat16)
        if args.table_store:
            table_ab(args, q, B, Hq, H, T, n)
            continue
        stores = [make_store(B, H, T, bits=args.bits, G=args.group, device_lengths=not args.host_lengths)
                  for _ in range(n)]
        kv_len = T + 64
        cfg = da.DecodeConfig(use_mma=True, ctas_per_sm=0, min_groups_per_split=args.mma,
                              max_regs=args.max_regs) if args.mma else None
        spec = da.DecodeSpec(args.bits, args.bits, args.group, 128, torch.bfloat16, Hq // H)
        if args.no_mma:
            cfg = dataclasses.replace(da.default_config_for(spec, B), use_mma=False)
        variants = [(args.tag or "default", cfg, None)]
        if args.window_splits:
            variants = [(f"package window_splits={w}", dataclasses.replace(cfg or da.default_config_for(spec, B),
                                                                   window_splits=int(w)), None)
                        for w in args.window_splits.split(",")]
        variants += [(f"mma_kernel={path}", cfg, load_mma_module(path)) for path in args.mma_kernel]
        mask = None
        if args.mask != "none":
            keep = (torch.arange(kv_len, device="cuda") < stores[0].length).view(1, 1, 1, kv_len)
            mask = keep if args.mask == "bool" else torch.zeros(keep.shape, dtype=q.dtype, device="cuda").masked_fill(
                ~keep, torch.finfo(q.dtype).min)
        timings = interleaved_us(
            variants, lambda cfg: [call_for(q, s, kv_len, args.empty_window, args.host_lengths, config=cfg, mask=mask)
                                   for s in stores], args.rounds)
        for tag, cfg, module in variants:
            dev = ""
            if cfg is not None or module is not None:
                ref = da.decode_attention_store(q, stores[0], attn_mask=mask, kv_len=kv_len).float()
                got = with_mma(lambda: da.decode_attention_store(q, stores[0], attn_mask=mask, kv_len=kv_len,
                                                                 config=cfg), module)().float()
                dev = (f" (max |variant - default| {(got - ref).abs().max().item():.2e}, "
                       f"max |default| {ref.abs().max().item():.2e})")
            print(f"AB {tag} {shape} b{args.bits} g{args.group} {mode}"
                  f"{' empty-window' if args.empty_window else ''}{'' if mask is None else ' mask ' + args.mask}: "
                  f"{median_text(timings[tag])}{dev}", flush=True)
        del stores
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
