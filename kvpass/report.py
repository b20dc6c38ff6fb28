"""What the pass did: per compiled graph, the rewritten sites and the skipped ones, and `explain()`
(with which implementation each kvpass op ran through in this process)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvpass.lowering import paths
from kvpass.lowering.codecs import make_codec


@dataclass
class SiteReport:
    """One rewritten attention site."""

    where: str
    attention: str  # "sdpa" | "eager"
    write: str  # "append" (DynamicCache cat) | "positional" (StaticCache / own buffers)
    read: str  # "fused sdpa" | "fused eager" | "dequant" | a fused kind + dequant
    kv_heads: int
    head_dim_k: int
    head_dim_v: int
    dtype: torch.dtype


@dataclass
class GraphReport:
    """One compiled graph's rewrite."""

    sites: list[SiteReport] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Report:
    """`kvpass.explain(backend)`: what was rewritten across the graphs compiled so far.

    rewritten: attention sites rewritten in the largest compiled graph (one forward's layers;
        prefill and decode graphs each hold every layer once).
    skipped: distinct (site, reason) pairs left untouched, across all graphs.
    full_bytes_per_token / kvpass_bytes_per_token: cache bytes one token costs over the
        rewritten layers, before and after (quantized part; the residual window of R tokens
        stays full precision).
    graphs: number of distinct graphs the backend compiled.
    runtime: (op, implementation) pairs that ran in this process so far, in first-run order: which
        kernel served decode attention, quantize-append and store reads, or the reference with the
        reason (`kvpass.lowering.paths`; process-wide, autotuning trials included; under CUDA graphs
        recorded at capture). Empty before the first forward.
    """

    rewritten: int
    skipped: list[tuple[str, str]]
    full_bytes_per_token: float
    kvpass_bytes_per_token: float
    graphs: int
    sites: list[SiteReport]
    config: object
    runtime: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        c = self.config
        lines = [f"kvpass: key_bits={c.key_bits} value_bits={c.value_bits} group_size={c.group_size} "
                 f"residual_length={c.residual_length}; {self.graphs} graph(s) compiled",
                 f"{'site':<44} {'attention':<9} {'write':<10} {'read':<12} {'heads':>5} {'dim':>4}"]
        for s in self.sites:
            lines.append(f"{s.where[-44:]:<44} {s.attention:<9} {s.write:<10} {s.read:<12} {s.kv_heads:>5} {s.head_dim_k:>4}")
        lines.append(f"rewritten: {self.rewritten} attention site(s)")
        if self.full_bytes_per_token:
            ratio = self.full_bytes_per_token / self.kvpass_bytes_per_token
            lines.append(f"cache bytes per token: {self.full_bytes_per_token:,.0f} full precision -> "
                         f"{self.kvpass_bytes_per_token:,.1f} kvpass ({ratio:.2f}x smaller)")
        if self.skipped:
            lines.append(f"skipped: {len(self.skipped)}")
            for where, reason in self.skipped:
                lines.append(f"  - {where}: {reason}")
        if not self.sites:
            lines.append("nothing matched: the model runs unmodified (full-precision cache).")
        if self.runtime:
            lines.append("ran in this process (op: implementation):")
            lines += [f"  - {op}: {impl}" for op, impl in self.runtime]
        return "\n".join(lines)


def build_report(graph_reports: list[GraphReport], config) -> Report:
    best = max(graph_reports, key=lambda r: len(r.sites), default=GraphReport())
    skipped = list(dict.fromkeys(s for r in graph_reports for s in r.skipped))
    full = quant = 0.0
    for s in best.sites:
        kc = make_codec("key", config.key_bits, config.group_size, s.dtype, s.head_dim_k)
        vc = make_codec("value", config.value_bits, config.group_size, s.dtype, s.head_dim_v)
        full += s.kv_heads * (s.head_dim_k + s.head_dim_v) * s.dtype.itemsize
        quant += s.kv_heads * (kc.bytes_per_token(s.head_dim_k) + vc.bytes_per_token(s.head_dim_v))
    return Report(len(best.sites), skipped, full, quant, len(graph_reports), best.sites, config, paths.seen())


def explain(backend) -> Report:
    """The report of a kvpass backend (see `Report`)."""
    from kvpass.backend import KVPassBackend

    if not isinstance(backend, KVPassBackend):
        raise TypeError(
            f"kvpass.explain expects the object returned by kvpass.backend(...), got {type(backend).__name__}; "
            "keep a reference: b = kvpass.backend(bits=2); model.compile(backend=b); kvpass.explain(b)."
        )
    return backend.report()
