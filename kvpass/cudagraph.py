"""CUDA-graph replay of compiled steps whose kvpass ops run on the device only.

`torch.compile(model, backend=kvpass.backend(...), mode="reduce-overhead")` wraps every graph
that holds kvpass ops in a `CudaGraphRunner`. Inductor's own CUDA graphs cannot be used there:
they copy every non-parameter input into a static buffer (a static cache's stand-ins are inputs
whose logical size is the whole cache) and know nothing of the store's state. The runner:
  * keys each call by its input signature (shapes, dtypes, strides of the inputs it copies, and
    the addresses of the inputs it does not: parameters, buffers, tensors Dynamo marked static,
    kvpass stand-ins and tokens (with the identity of their store), and anything over 16 MiB);
  * runs a call normally until one ran without touching any store's host-side state
    (`kvpass.store.host_path_uses` unchanged: every write was a device-lengths decode write and
    every read the decode kernel), then captures that signature's step in a CUDA graph;
  * inputs a step updates in place (found by their version counters in the run before the capture:
    e.g. transformers' per-layer length counters of a StaticCache) are used in place from then on:
    the signature is rebuilt with their addresses in it (one more uncaptured run), so a replay
    updates the caller's tensors itself, with no copy in and out (a 7B model has 32 such counters:
    ~64 copy launches per step less);
  * replays it afterwards: copies the other small inputs into the captured buffers, replays, and
    returns fresh copies of the outputs (outputs that are kvpass tokens or alias a static input
    are returned as they are).
Host cost: building a full signature looks at every input (a 7B model's decode graph takes ~400:
parameters, cache tensors), ~0.5 ms of Python per step. So the runner keeps a plan of the
signature it replayed last and checks a call against it first: the same objects (by identity and
data pointer) in every position it uses in place, the same shapes/strides/dtypes of the inputs it
copies, the same non-tensor values and live stores; only a call that differs takes the full path.
Signatures that keep using host-side state (dynamic caches, prefills, eager-attention models,
the reference path) are never captured and run as compiled, after one log line saying why.
"""
from __future__ import annotations

import logging
import operator
import weakref

import torch

from kvpass import store as kv_store

log = logging.getLogger("kvpass")

_BIG_INPUT_BYTES = 16 << 20   # larger inputs must keep their address (copying them would cost a step)
_MAX_SIGNATURES = 8           # distinct captured input signatures per compiled graph
_MAX_DIRTY_RUNS = 3           # runs using host-side store state before a signature is given up


def _is_static(t: torch.Tensor) -> bool:
    return (isinstance(t, torch.nn.Parameter) or getattr(t, "_dynamo_static_input_type", None) is not None
            or t.numel() * t.element_size() > _BIG_INPUT_BYTES)


class _Signature:
    """One captured (or warming-up) input signature."""

    def __init__(self):
        self.clean_runs = 0
        self.dirty_runs = 0
        self.failed = False
        self.graph: torch.cuda.CUDAGraph | None = None
        self.copies: list[tuple[int, torch.Tensor]] = []  # (arg index, captured buffer)
        self.stores: list = []                        # weak references to the stores it recorded
        self.outputs = None
        self.keep: list[bool] = []                    # per output: returned as is (else cloned)


class _Plan:
    """What a call must match to replay `sig` without building its full signature (module docstring)."""

    def __init__(self, sig: _Signature, args, static_idx: list[int]):
        self.sig = sig
        self.n = len(args)
        self.pick = operator.itemgetter(*static_idx) if len(static_idx) > 1 else (lambda a: tuple(a[i] for i in static_idx))
        static = self.pick(args)
        self.static_idx = list(static_idx)
        self.ids = list(map(id, static))
        self.ptrs = list(map(torch.Tensor.data_ptr, static))
        self.ptrs_at = [None] * len(args)      # data pointers by argument index, for _PTRS_EQUAL
        for i, p in zip(static_idx, self.ptrs):
            self.ptrs_at[i] = p
        in_place = set(static_idx)
        self.copied = [(i, a.shape, a.stride(), a.dtype) for i, a in enumerate(args)
                       if isinstance(a, torch.Tensor) and i not in in_place]
        self.values = [(i, a) for i, a in enumerate(args) if not isinstance(a, torch.Tensor)]

    def matches(self, args) -> bool:
        if len(args) != self.n:
            return False
        static = self.pick(args)
        if list(map(id, static)) != self.ids:
            return False
        if _PTRS_EQUAL is not None:
            if not _PTRS_EQUAL(list(args), self.ptrs_at, self.static_idx):
                return False
        elif list(map(torch.Tensor.data_ptr, static)) != self.ptrs:
            return False
        for i, shape, stride, dtype in self.copied:
            a = args[i]
            if not isinstance(a, torch.Tensor) or a.shape != shape or a.stride() != stride or a.dtype != dtype:
                return False
        if any(type(args[i]) is not type(v) or args[i] != v for i, v in self.values):
            return False
        return all(ref() is not None for ref in self.sig.stores)


_RUNNERS: "weakref.WeakSet[CudaGraphRunner]" = weakref.WeakSet()
# CUDA builds of torch compare many data pointers in C++ (what Inductor's CUDA-graph trees use);
# the plan check falls back to a Python map elsewhere (CPU tests)
_PTRS_EQUAL = getattr(torch._C, "_tensors_data_ptrs_at_indices_equal", None)


def total_replays() -> int:
    """CUDA-graph replays by every live runner (benchmarks and tests read it)."""
    return sum(r.replays for r in _RUNNERS)


class CudaGraphRunner:
    """Wraps a compiled graph callable `fn(*args)`; see the module docstring."""

    def __init__(self, fn, name: str = "graph"):
        _RUNNERS.add(self)
        self.fn = fn
        self.name = name
        self.signatures: dict[tuple, _Signature] = {}
        self.replays = 0
        self.fast_replays = 0   # replays that matched the last plan (no full signature built)
        self.disabled = False
        self._plan: _Plan | None = None
        self.in_place: set[int] = set()   # inputs some step updated in place: keyed by address, never copied

    def _key(self, args) -> tuple[tuple, list[int], list]:
        """(signature, indices of inputs used in place, the kvpass stores the inputs stand for).
        A stand-in's key holds its store's id: a graph recorded the addresses of that store's
        buffers, so another store behind a reused stand-in address must not replay it."""
        parts, static_idx, stores = [], [], []
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                store = kv_store.lookup(a)
                if store is not None:
                    stores.append(store)
                if store is not None or i in self.in_place or _is_static(a):
                    static_idx.append(i)
                    parts.append((i, "s", a.data_ptr(), tuple(a.shape), a.dtype, id(store)))
                else:
                    parts.append((i, "c", tuple(a.shape), a.stride(), a.dtype, a.device))
            else:
                parts.append((i, "v", a))
        return tuple(parts), static_idx, stores

    def __call__(self, *args):
        if self.disabled:
            return self.fn(*args)
        plan = self._plan
        if plan is not None and plan.matches(args):
            self.fast_replays += 1
            return self._replay(plan.sig, args)
        key, static_idx, stores = self._key(args)
        sig = self.signatures.get(key)
        if sig is not None and any(ref() is None for ref in sig.stores):
            del self.signatures[key]  # a store it recorded died (an id can be reused only then)
            sig = None
        if sig is None:
            for k in [k for k, old in self.signatures.items() if any(ref() is None for ref in old.stores)]:
                del self.signatures[k]  # graphs of dead stores: free them
            if self._plan is not None and all(self._plan.sig is not old for old in self.signatures.values()):
                self._plan = None
            if len(self.signatures) >= _MAX_SIGNATURES:
                self.disabled = True
                log.info("kvpass: %s: over %d input signatures, CUDA graphs off for it", self.name, _MAX_SIGNATURES)
                return self.fn(*args)
            sig = self.signatures[key] = _Signature()
            sig.stores = [weakref.ref(st) for st in stores]
        if sig.graph is not None:
            self._plan = _Plan(sig, args, static_idx)
            return self._replay(sig, args)
        if sig.failed:
            return self.fn(*args)
        before = kv_store.host_path_uses()
        versions = [a._version if isinstance(a, torch.Tensor) else None for a in args]
        out = self.fn(*args)
        mutated = {i for i, (a, v) in enumerate(zip(args, versions)) if v is not None and a._version != v}
        if not mutated <= set(static_idx):
            # a copied input was updated in place: key it by address from now on (see the docstring)
            self.in_place |= mutated
            del self.signatures[key]
            return out
        if kv_store.host_path_uses() != before:
            sig.dirty_runs += 1
            if sig.dirty_runs > _MAX_DIRTY_RUNS:
                sig.failed = True
                log.info("kvpass: %s runs without CUDA graphs for this input signature: its kvpass ops use "
                         "host-side cache state (a dynamic cache, a prefill, eager attention or the reference path)",
                         self.name)
            return out
        self._capture(sig, args, static_idx)
        return out

    def _capture(self, sig: _Signature, args, static_idx: list[int]):
        static = set(static_idx)
        run_args = list(args)
        copies = []
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor) and i not in static:
                buf = a.clone()
                run_args[i] = buf
                copies.append((i, buf))
        graph = torch.cuda.CUDAGraph()
        before = kv_store.host_path_uses()
        try:
            torch.cuda.synchronize()
            with torch.cuda.graph(graph):
                outputs = self.fn(*run_args)
        except RuntimeError as e:  # a host sync or an uncapturable op inside the step
            sig.failed = True
            log.warning("kvpass: %s: CUDA graph capture failed (%s); it runs without CUDA graphs", self.name, e)
            return
        if kv_store.host_path_uses() != before:
            sig.failed = True
            log.info("kvpass: %s: the captured step used host-side cache state; discarded", self.name)
            return
        static_storages = {args[i].untyped_storage().data_ptr() for i in static_idx}
        keep = []
        for o in _as_list(outputs):
            keep.append(not isinstance(o, torch.Tensor) or kv_store.lookup(o) is not None
                        or o.untyped_storage().data_ptr() in static_storages)
        sig.graph, sig.outputs, sig.keep, sig.copies = graph, outputs, keep, copies
        log.info("kvpass: %s: captured a CUDA graph (%d inputs copied per replay)", self.name, len(copies))

    def _replay(self, sig: _Signature, args):
        for i, buf in sig.copies:
            buf.copy_(args[i])
        sig.graph.replay()
        self.replays += 1
        outs = _as_list(sig.outputs)
        fresh = [o if k else o.clone() for o, k in zip(outs, sig.keep)]
        return type(sig.outputs)(fresh) if isinstance(sig.outputs, (list, tuple)) else fresh[0]


def _as_list(outputs) -> list:
    return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
