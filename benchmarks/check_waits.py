"""False waits on global loads (`sass_waits`) in the main loops of the decode kernel's default
specializations, compiled offline for sm_90. Run it with the Triton the GPU runs (the device has
Triton 3.6: `pip install --target DIR --no-deps triton==3.6.0`, then PYTHONPATH=DIR:.), before
spending device time on a kernel edit: a build with a false wait in its main loop runs 10-30 %
slower with the same instructions (benchmarks/NOTES.md, session 9).

    TRITON_DEFAULT_FP_FUSION=1 PYTHONPATH=DIR:. python3 benchmarks/check_waits.py [--kernel OLD.py]

Prints one row per specialization: variant, bits, group, REP, lengths mode, splits, registers,
main-loop instructions, false waits in the main loop (and the second-longest loop).
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import inspect_sass, sass_waits  # noqa: E402


def specializations():
    """(variant, bits, group, block_n, warps, rep, device_lengths, single) of the default configs
    (templates/decode_configs.py: rows for MHA and GQA batch 1, 1-warp tensor-core for GQA batch >= 2)."""
    for bits, group, rep, dev, single in itertools.product((2, 4), (32, 128), (1, 4), (True, False), (False, True)):
        if rep == 4 and single:
            continue  # GQA batch 1 always splits
        yield "rows", bits, group, 32, 1 if bits == 2 else 2, rep, dev, single
    for bits, group, dev in itertools.product((2, 4), (32, 128), (True, False)):
        yield "dot", bits, group, 64 if group >= 64 else 32, 1, 4, dev, False


def check(spec) -> str:
    variant, bits, group, block_n, warps, rep, dev, single = spec
    k = inspect_sass.compile_decode(variant, bits, group, 128, block_n, warps, True, True, dev, single, 2, None,
                                    hb=4, rep=rep)
    _, hex_sass, regs = inspect_sass.disassemble(k)
    instrs, labels = sass_waits.parse_hex_sass(hex_sass)
    spans = sass_waits.loops(instrs, labels)[:2]
    waits = [len(sass_waits.false_load_waits(instrs, s)) for s in spans]
    size = sum(1 for i in instrs if spans and spans[0][0] <= i.addr <= spans[0][1])
    return (f"| {variant} | {bits} | {group} | {rep} | {'device' if dev else 'host'} | {'1' if single else 'many'} | "
            f"{regs} | {size} | {' / '.join(map(str, waits))} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernel", default=None, help="path of another decode_attention.py to check instead")
    ap.add_argument("--only", default=None, help="rows or dot")
    ap.add_argument("--quick", action="store_true", help="device lengths only (what CUDA-graph decode runs)")
    a = ap.parse_args()
    if a.kernel:
        from benchmarks import ab_decode
        ab_decode.load_kernel_module(a.kernel)
        inspect_sass.da = ab_decode.da
    import triton
    print(f"Triton {triton.__version__}\n")
    print("| variant | bits | G | REP | lengths | splits | registers | main loop instr | false waits (main / 2nd loop) |")
    print("|---|---:|---:|---:|---|---|---:|---:|---|")
    for spec in specializations():
        if (a.only and spec[0] != a.only) or (a.quick and not spec[6]):
            continue
        print(check(spec), flush=True)


if __name__ == "__main__":
    main()
