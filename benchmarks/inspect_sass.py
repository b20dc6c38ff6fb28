"""Offline SASS statistics of the decode kernels for sm_90, without a GPU: registers and the
instruction mix of the two longest loops, per thread (the main loop over the quantized tokens is
the one with LOP3/FFMA/LDG of codes; the window loop can be the longer one), and their false waits
on recent global loads (`sass_waits`: the cause of most "same SASS, 10-30 % slower" builds).

    PYTHONPATH=. python3 benchmarks/inspect_sass.py [--variant rows|dot|mma] [--block-n 32] [--warps 2]
        [--bits 2] [--group 32] [--head-dim 128] [--no-asm] [--stages 2] [--maxnreg N] [--hb 4] [--softcap C]
        [--dump FILE]

`--variant mma` is the Gluon kernel (templates/decode_mma.py; --rep, --dtype, --mask; --mma-kernel
OTHER.py compiles another version of that file, e.g. a patch from benchmarks/results). Per loop the
report also says how soon its global loads are first read within the same iteration (a prefetch
read a few instructions after its load waits for memory right there).

Uses the local Triton's bundled ptxas/nvdisasm/cuobjdump (Triton 3.9 here; the device runs 3.6, so
counts can differ a little). benchmarks/NOTES.md (session 4) shows what these counts predicted.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import sass_waits  # noqa: E402
from kvpass.templates import decode_attention as da  # noqa: E402

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
_UNSPECIALIZED = set(da._DNS)


def compile_decode(variant: str, bits: int, group: int, head_dim: int, block_n: int, warps: int, use_asm: bool,
                   fuse_reduce: bool = True, device_lengths: bool = False, single: bool = False,
                   num_stages: int = 2, maxnreg: int | None = None, hb: int = 4, rep: int | None = None,
                   softcap: float = 0.0):
    """The kernel compiled for sm_90 as the launcher specializes it (bf16 model, strides % 16; checked
    against the cubins of real launches on the device, session 9): REP == 1 becomes a constant,
    a single-split launch passes `out` (bf16) for OP/OM/OL/CNT. rep: query heads per program's KV
    head (default: 1 for rows, hb for dot)."""
    fn = da._kvpass_decode_rows if variant == "rows" else da._kvpass_decode_dot
    d_pad = max(16, 1 << (head_dim - 1).bit_length())
    rep = (1 if variant == "rows" else hb) if rep is None else rep
    const = dict(KEY_BITS=bits, VALUE_BITS=bits, GROUP_SIZE=group, HEAD_DIM=head_dim, D_PAD=d_pad,
                 BLOCK_N=block_n, MASK_KIND=0, SINGLE=single, LENGTHS_ON_DEVICE=device_lengths, USE_ASM=use_asm,
                 FUSE_REDUCE=fuse_reduce and not single, SOFTCAP=softcap * da.LOG2E)
    if rep == 1:
        const["REP"] = 1
    if not device_lengths:
        const["LENS"] = None
    if variant == "dot":
        const.update(HB=hb, EMULATE_DOT=False)
    part = "*bf16" if single else "*fp32"
    ptr = dict(Q="*bf16", KC="*i32", KS="*fp16", KZ="*fp16", VC="*i32", VS="*fp16", VZ="*fp16", RK="*bf16",
               RV="*bf16", MASK="*bf16", OP=part, OM=part, OL=part, OUT="*bf16",
               CNT="*i32" if fuse_reduce and not single else "*bf16", LENS="*i32")
    names = list(fn.arg_names)
    sig = {n: "constexpr" if n in const else ptr.get(n, "fp32" if n == "qk_scale" else "i32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if sig[n].startswith("*") or (n.startswith("s_") and n not in _UNSPECIALIZED)}
    src = ASTSource(fn, sig, {(names.index(k),): v for k, v in const.items() if k in names}, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=num_stages,
                                                                               maxnreg=maxnreg))


def compile_mma(bits: int, group: int, rep: int = 4, dtype: str = "bf16", maxnreg: int | None = None,
                host_lengths: bool = False, mask: str = "none", softcap: float = 0.0, module=None,
                fuse_reduce: bool = True):
    """The Gluon kernel `_kvpass_decode_mma` compiled for sm_90 as `decode_attention_mma` launches it
    (one warp, pointers and strides % 16 except the runtime lengths, qk_scale and the mask's key
    stride; device lengths unless host_lengths; mask none, bool or additive, the same for all
    heads, or bool-heads / additive-heads; the split reduce in the kernel for rep 1 when fuse_reduce,
    the build that MHA launches without window splits use, `decode_mma.fuse_reduce`). module: another decode_mma.py's module
    (`ab_decode.load_mma_module`), else the package's."""
    from triton.experimental.gluon._runtime import GluonASTSource
    from kvpass.templates import decode_mma
    fn = (module or decode_mma)._kvpass_decode_mma
    names = list(fn.arg_names)
    kind = mask.split("-")[0]
    const = dict(BITS=bits, GROUP_SIZE=group, HEAD_DIM=128, REP=rep, HOST_LENS=host_lengths,
                 MASK_KIND={"none": 0, "bool": 1, "additive": 2}[kind], MASK_HEADS=mask.endswith("-heads"),
                 SOFTCAP=softcap * da.LOG2E, FUSE_REDUCE=fuse_reduce and rep == 1)
    ptr = dict(Q=f"*{dtype}", KC="*i32", KS="*fp16", KZ="*fp16", VC="*i32", VS="*fp16", VZ="*fp16", RK=f"*{dtype}",
               RV=f"*{dtype}", MASK="*u8" if kind == "bool" else f"*{dtype}", OP="*fp32", OM="*fp32", OL="*fp32",
               LENS="*i32", OUT=f"*{dtype}", CNT="*i32")
    sig = {n: "constexpr" if n in const else ptr.get(n, "fp32" if n == "qk_scale" else "i32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if n not in const and not n.startswith("WIN_")
             and n not in ("KV_LEN", "NUM_SPLITS_RT", "LQ_HOST", "L_HOST", "qk_scale", "s_mk")}
    src = GluonASTSource(fn, sig, {(names.index(k),): v for k, v in const.items() if k in names}, attrs)
    opts = dict(num_warps=1, **({"maxnreg": maxnreg} if maxnreg else {}))
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)


def load_use(body: list[str]) -> tuple[int, int | None]:
    """Of a loop body's instructions: (global loads whose destination is read later in the same
    iteration, the smallest such distance in instructions)."""
    def regs(ins):
        op, _, rest = re.sub(r"^@!?U?P\w+\s+", "", ins).partition(" ")
        fields = [re.findall(r"\bR\d+\b", f) for f in rest.split(",")]
        if op.startswith(("ST", "RED", "ATOM", "BAR", "BRA")):
            return op, [], sum(fields, [])
        return op, (fields[0] if fields else []), sum(fields[1:], [])
    count, nearest = 0, None
    for i, ins in enumerate(body):
        op, dst, _ = regs(ins)
        if not op.startswith("LDG") or op.startswith("LDGSTS") or not dst:   # LDGSTS: to shared memory
            continue
        base = int(dst[0][1:])
        width = 4 if ".128" in op else 2 if ".64" in op else 1
        mine = {f"R{base + k}" for k in range(width)}
        for j in range(i + 1, len(body)):
            if mine & set(regs(body[j])[2]):
                count += 1
                nearest = j - i if nearest is None else min(nearest, j - i)
                break
    return count, nearest


def disassemble(kernel) -> tuple[str, str, str]:
    """(SASS, SASS with encodings (`nvdisasm -hex`), registers per thread) of a compiled kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    sass = subprocess.run([os.path.join(_BIN, "nvdisasm"), "-c", f.name], capture_output=True, text=True).stdout
    hex_sass = subprocess.run([os.path.join(_BIN, "nvdisasm"), "-c", "-hex", f.name], capture_output=True,
                              text=True).stdout
    usage = subprocess.run([os.path.join(_BIN, "cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    regs = re.search(r"REG:(\d+)", usage)
    return sass, hex_sass, regs.group(1) if regs else "?"


def sass_report(kernel, loops: int = 2) -> tuple[str, str]:
    """(report, SASS text): registers, then per loop (backward branch) its instruction count and mix."""
    sass, hex_sass, regs = disassemble(kernel)
    instrs, labels, pending = [], {}, None
    for line in sass.splitlines():
        m = re.match(r"^\s*(\.L_x_\d+):", line)
        if m:
            pending = m.group(1)
            continue
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            addr = int(m.group(1), 16)
            if pending:
                labels[pending], pending = addr, None
            instrs.append((addr, m.group(2)))
    spans = []
    for addr, ins in instrs:
        m = re.search(r"BRA.*?(\.L_x_\d+)", ins)
        if m and labels.get(m.group(1), addr + 1) < addr:
            spans.append((labels[m.group(1)], addr))
    out = [f"registers {regs}, {len(instrs)} instructions"]
    for start, end in sorted(spans, key=lambda s: s[0] - s[1])[:loops]:
        body = [ins for a, ins in instrs if start <= a <= end]
        mix = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", b).split()[0].split(".")[0] for b in body)
        out.append(f"loop {start:#x}-{end:#x}: {len(body)} instr: " + ", ".join(f"{k} {v}" for k, v in mix.most_common(12)))
        n_read, nearest = load_use(body)
        out.append(f"  {n_read} global loads read in the same iteration" + (f", the soonest {nearest} instructions after it"
                                                                             if nearest is not None else ""))
    out += sass_waits.report(hex_sass, loops)
    return "\n".join(out), sass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="rows", choices=("rows", "dot", "mma"))
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"), help="(mma) the model dtype")
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--group", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-n", type=int, default=32)
    ap.add_argument("--warps", type=int, default=2)
    ap.add_argument("--no-asm", action="store_true")
    ap.add_argument("--separate-reduce", action="store_true", help="the reduce in a launch of its own (no fused "
                    "epilogue; mma: rep 1 only, GQA always has it)")
    ap.add_argument("--device-lengths", action="store_true", help="the LENGTHS_ON_DEVICE specialization")
    ap.add_argument("--single", action="store_true", help="the one-split specialization (SINGLE)")
    ap.add_argument("--host-lengths", action="store_true", help="(mma) the HOST_LENS specialization")
    ap.add_argument("--mask", default="none", choices=("none", "bool", "additive", "bool-heads", "additive-heads"),
                    help="(mma) the MASK_KIND / MASK_HEADS specialization")
    ap.add_argument("--stages", type=int, default=2, help="num_stages")
    ap.add_argument("--hb", type=int, default=4, help="(dot) query rows per program: 4 is GQA 32/8 unpadded (pad_heads=1)")
    ap.add_argument("--rep", type=int, default=None, help="query heads per KV head (default: 1 for rows, --hb for dot)")
    ap.add_argument("--maxnreg", type=int, default=None, help="register cap per thread (DecodeConfig.max_regs)")
    ap.add_argument("--old-reduce", action="store_true", help="the session-7 two-pass reduce (benchmarks/ab_decode.py)")
    ap.add_argument("--reduce-block", type=int, default=0, help="splits per round of the one-pass fused reduce")
    ap.add_argument("--softcap", type=float, default=0.0, help="the model's logit softcap (0: none; Gemma2: 50)")
    ap.add_argument("--dump", default=None, help="write the SASS here")
    ap.add_argument("--kernel", default=None, help="path of another decode_attention.py to compile instead")
    ap.add_argument("--mma-kernel", default=None, help="(mma) path of another decode_mma.py to compile instead")
    a = ap.parse_args()
    if a.kernel:
        global da
        from benchmarks import ab_decode
        ab_decode.load_kernel_module(a.kernel)
        da = ab_decode.da
    from benchmarks.ab_decode import load_mma_module, use_variant
    use_variant(a.old_reduce, a.reduce_block)
    if a.variant == "mma":
        k = compile_mma(a.bits, a.group, a.rep or 4, a.dtype, a.maxnreg, a.host_lengths, a.mask, a.softcap,
                        load_mma_module(a.mma_kernel) if a.mma_kernel else None, not a.separate_reduce)
        report, sass = sass_report(k)
        lens = "host" if a.host_lengths else "device"
        fused = ", reduce fused" if (a.rep or 4) == 1 and not a.separate_reduce else ""
        print(f"mma b{a.bits} g{a.group} rep {a.rep or 4} {a.dtype} {lens} lengths{fused}: {report}")
    else:
        k = compile_decode(a.variant, a.bits, a.group, a.head_dim, a.block_n, a.warps, not a.no_asm,
                           not a.separate_reduce, a.device_lengths, a.single, a.stages, a.maxnreg, a.hb, a.rep,
                           a.softcap)
        report, sass = sass_report(k)
        print(f"{a.variant} b{a.bits} g{a.group} d{a.head_dim} BLOCK_N {a.block_n}, {a.warps} warps: {report}")
    if a.dump:
        with open(a.dump, "w") as f:
            f.write(sass)


if __name__ == "__main__":
    main()
