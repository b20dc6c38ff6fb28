"""CUDA-graph timing shared by the benchmarks: `calls` calls captured back to back in one graph
(no host launch gaps, as a decode step under mode="reduce-overhead" runs them), the calls going
round-robin over copies of their inputs so that the L2 cache does not hold one call's data for the
next (a model reads other layers' weights and caches between two attention calls of a layer).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch


def l2_bytes(device=0) -> int:
    """The GPU's L2 size (50 MiB on the H100 when torch does not report it)."""
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))


def copies_for(nbytes: int, free_bytes: int, min_total_l2: float = 4.0, max_copies: int = 16, device=0) -> int:
    """Input copies whose total is at least `min_total_l2` L2 sizes (1 when one copy already is),
    limited to half the free memory and to max_copies."""
    if nbytes <= 0:
        return 1
    want = -(-int(min_total_l2 * l2_bytes(device)) // nbytes)
    fit = max(1, (free_bytes // 2) // nbytes)
    return max(1, min(want, fit, max_copies))


def graph_us(fns: Callable[[], object] | Sequence[Callable[[], object]], calls: int = 20, reps: int = 5) -> float:
    """Median microseconds per call over `reps` replays of a CUDA graph of `calls` calls of `fns`
    (one callable, or one per input copy, called round-robin). Each callable runs once uncaptured
    first (compiles, plans and allocates outside the capture)."""
    fns = [fns] if callable(fns) else list(fns)
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fns[i % len(fns)]()
    g.replay()  # the first replay uploads the graph
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls)
    del g
    return sorted(times)[len(times) // 2]
