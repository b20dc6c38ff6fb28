"""The TorchDynamo backend: rewrite the traced graph, then compile it (Inductor by default)."""
from __future__ import annotations

import logging

import torch

from kvpass.config import KVPassConfig
from kvpass.report import GraphReport, build_report

log = logging.getLogger("kvpass")


class KVPassBackend:
    """A Dynamo backend callable. Compile-time work is pure: calling it twice for one frame
    (Dynamo restarts analysis) produces the same graph and records the report once (keyed by
    the graph's code)."""

    def __init__(self, config: KVPassConfig):
        self.config = config
        if config.autotune:
            from kvpass.templates.decode_configs import set_autotune

            set_autotune(True)
        self._reports: dict[str, GraphReport] = {}
        self.graphs: dict[str, torch.fx.GraphModule] = {}  # Dynamo graph code -> rewritten module (for inspection)

    def __repr__(self):
        return f"kvpass.backend({self.config})"

    def __call__(self, gm: torch.fx.GraphModule, example_inputs, **kwargs):
        from kvpass.rewrite import rewrite_graph

        new_gm, report = rewrite_graph(gm, self.config)
        self._reports[gm.code] = report
        self.graphs[gm.code] = new_gm
        if not report.sites:
            log.warning("kvpass: no attention site matched in this graph; it runs unmodified (%d skipped)",
                        len(report.skipped))
        for where, reason in report.skipped:
            log.info("kvpass: skipped %s: %s", where, reason)
        mode = kwargs.get("mode")
        compiled = self._compile(new_gm, example_inputs, mode, bool(report.sites))
        if mode == "reduce-overhead" and report.sites and _on_cuda(example_inputs):
            from kvpass.cudagraph import CudaGraphRunner

            return CudaGraphRunner(compiled, name=f"graph {len(self.graphs)}")
        return compiled

    def _compile(self, gm, example_inputs, mode, has_kvpass_ops):
        inner = self.config.inner
        if inner == "eager":
            return gm.forward
        if inner == "aot_eager":
            from torch._dynamo.backends.debugging import aot_eager

            return aot_eager(gm, example_inputs)
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs, config_patches=cudagraph_patch(mode, has_kvpass_ops))

    def report(self):
        return build_report(list(self._reports.values()), self.config)


def cudagraph_patch(mode, has_kvpass_ops: bool) -> dict:
    """Inductor config for one graph. A graph holding kvpass ops never runs under Inductor's CUDA
    graphs, even with a global `triton.cudagraphs=True`: they would copy the cache stand-ins and
    replay host-side store decisions (silently wrong results). Under mode="reduce-overhead" such a
    graph is wrapped in kvpass's own `CudaGraphRunner` instead (kvpass/cudagraph.py), which
    captures only steps whose kvpass ops run on the device (static caches on CUDA)."""
    if not has_kvpass_ops:
        return {"triton.cudagraphs": True} if mode == "reduce-overhead" else {}
    return {"triton.cudagraphs": False}


def _on_cuda(example_inputs) -> bool:
    return any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs)


def backend(bits=2, group_size=32, residual_length=128, key_bits=None, value_bits=None, inner="inductor",
            autotune=False) -> KVPassBackend:
    """A torch.compile backend that stores the KV cache quantized (KIVI: keys per-channel,
    values per-token, a full-precision window of the `residual_length` newest tokens).

    bits: 2, 4, 8, or 16 (no quantization); key_bits/value_bits override it per tensor.
    autotune: time the decode kernel's configs on first use and cache the fastest (KVPassConfig).
    Raises ValueError/TypeError on invalid arguments, naming the valid choices.
    """
    return KVPassBackend(KVPassConfig.from_args(bits, group_size, residual_length, key_bits, value_bits, inner, autotune))


def dynamo_backend(gm, example_inputs, **kwargs):
    """Entry point for `torch.compile(model, backend="kvpass")`: 2-bit, G=32, R=128."""
    return _DEFAULT(gm, example_inputs, **kwargs)


_DEFAULT = KVPassBackend(KVPassConfig())
