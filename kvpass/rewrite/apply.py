"""Applying the rewrite to a copy of Dynamo's FX graph.

Per attention site whose key and value caches were both traced to writes:
    writes  -> one `kvpass::kv_write` (returns a token registered to the store)
    SDPA    -> `kvpass::attention(q, token, ...)` when K/V reach it only through repeat_kv/slicing
    eager   -> the same, when its score chain is HF's eager attention (scale, softcap, mask, softmax;
               `find.match_eager_scores`) and K/V reach it only through repeat_kv/slicing
    others  -> `kvpass::dequant(token, ...)` replaces the cache tensor for that reader
    stored-back cache tensors (graph outputs) -> NaN stand-ins of the same logical shape
Anything not understood is left untouched and reported with the reason.
"""
from __future__ import annotations

import copy
import operator

import torch
from torch.fx import Graph, GraphModule, Node

import kvpass.lowering.ops  # noqa: F401  (registers torch.ops.kvpass)
from kvpass.config import KVPassConfig
from kvpass.report import GraphReport, SiteReport
from kvpass.rewrite import nodes as N
from kvpass.rewrite.find import AttentionSite, CacheWrite, find_attention, find_writes

ops = torch.ops.kvpass


def _size(graph: Graph, node: Node, dim: int):
    """An int when the recorded size is static, else a graph node computing it."""
    v = N.value(node)
    if isinstance(v, torch.Tensor) and isinstance(v.shape[dim], int):
        return v.shape[dim]
    return graph.call_method("size", (node, dim))


def _add(graph: Graph, a, b):
    if isinstance(a, int) and isinstance(b, int):
        return a + b
    return graph.call_function(operator.add, (a, b))


def _impure(node: Node) -> bool:
    """Keep in-place calls (cumulative_length.add_) alive: FX's DCE would drop them."""
    if node.op in ("placeholder", "output"):
        return True
    if node.op == "call_method" and str(node.target).endswith("_"):
        return True
    if node.op == "call_function" and node.target is operator.setitem:
        return True
    return node.is_impure()


class _SiteRewrite:
    """Rewrites one attention site's writes and reads."""

    def __init__(self, graph: Graph, site: AttentionSite, cfg: KVPassConfig, order: dict):
        self.graph, self.site, self.cfg, self.order = graph, site, cfg, order
        self.wk: CacheWrite = site.k.write
        self.wv: CacheWrite = site.v.write

    def readers(self, write: CacheWrite) -> list[Node]:
        return [u for r in write.results for u in r.users
                if u is not write.node and u.op != "output" and self.order.get(u, -1) > self.order[write.node]
                and not (write.kind == "positional" and u in (self.wk.node, self.wv.node))]

    def check(self):
        last = max(self.order[self.wk.node], self.order[self.wv.node])
        for w in (self.wk, self.wv):
            if any(self.order[u] < last for u in self.readers(w)):
                return "a cache read happens between the key and value writes"
        k, v = N.value(self.wk.new), N.value(self.wv.new)
        self.cfg.check_site(k.shape[-1], v.shape[-1], k.dtype, self.site.where)
        return ""

    def standin_for_alloc(self, alloc: Node):
        """Replace `torch.zeros(B, H, T, D)` (a static cache allocated in the graph) by a NaN stand-in."""
        shape = alloc.args[0] if len(alloc.args) == 1 and isinstance(alloc.args[0], (tuple, list)) else alloc.args
        g = self.graph
        with g.inserting_before(alloc.next):
            numel = 1
            for s in shape:
                numel = _add(g, numel, _add(g, s, -1))
            flat = g.call_function(torch.full, ((numel,), float("nan")),
                                   {k: v for k, v in alloc.kwargs.items() if k in ("dtype", "device")})
            standin = g.call_function(torch.as_strided, (flat, tuple(shape), (1, 1, 1, 1)))
        alloc.replace_all_uses_with(standin)
        g.erase_node(alloc)
        return standin

    def run(self) -> SiteReport:
        g, cfg = self.graph, self.cfg
        for w in (self.wk, self.wv):
            if w.kind == "positional" and N.is_call(w.anchor, N.ALLOC):
                new_anchor = self.standin_for_alloc(w.anchor)
                w.anchor = new_anchor
        wk, wv = self.wk, self.wv
        later = wk.node if self.order[wk.node] > self.order[wv.node] else wv.node
        with g.inserting_before(later.next):  # one block: nodes land in program order
            token = g.call_function(ops.kv_write.default, (
                wk.anchor, wv.anchor, wk.new, wv.new, wk.positions,
                cfg.key_bits, cfg.value_bits, cfg.group_size, cfg.residual_length))
            B, H = _size(g, wk.new, 0), _size(g, wk.new, 1)
            if wk.kind == "append":
                kv_len = _size(g, wk.new, 2)
                if N.ndim(wk.anchor) == 4:
                    kv_len = _add(g, _size(g, wk.anchor, 2), kv_len)
            else:
                kv_len = _size(g, wk.anchor, 2)
            standins = {}
            for w in (wk, wv):
                if w.kind == "append":  # the stored-back cache becomes a stand-in
                    flat = g.call_method("view", (token, 1, 1, 1, 1))
                    standins[w.node] = g.call_method("expand", (flat, B, H, kv_len, N.value(w.new).shape[-1]))
        fused = self._fuse(token, kv_len)
        dequantized = 0
        for which, w in ((0, wk), (1, wv)):
            D = N.value(w.new).shape[-1]
            readers = self.readers(w)
            if readers:
                with g.inserting_before(min(readers, key=lambda n: self.order[n])):
                    deq = g.call_function(ops.dequant.default, (token, which, [B, H, kv_len, D]))
                for r in readers:
                    for res in w.results:
                        r.replace_input_with(res, deq)
                dequantized += 1
            w.node.replace_all_uses_with(standins.get(w.node, w.anchor))
            g.erase_node(w.node)
        fused_as = f"fused {self.site.kind}"
        read = fused_as if fused and not dequantized else ("dequant" if not fused else f"{fused_as} + dequant")
        return SiteReport(self.site.where, self.site.kind, wk.kind, read,
                          N.value(wk.new).shape[1], N.value(wk.new).shape[-1], N.value(wv.new).shape[-1],
                          N.value(wk.new).dtype)

    def _fuse(self, token: Node, kv_len) -> bool:
        """Replace the site's attention by one `kvpass::attention` when K and V reach it only through
        repeat_kv / a length slice: an SDPA call with its own arguments, or an eager chain that
        `match_eager_scores` understood (scale, softcap, mask lifted out of it)."""
        site = self.site
        if not (site.k.pure and site.v.pure):
            return False
        if site.k.kv_repeat != site.v.kv_repeat or site.k.slice_end != site.v.slice_end:
            return False
        length = site.k.slice_end if site.k.slice_end is not None else kv_len
        sizes = (length, site.k.kv_repeat, N.value(site.v.write.new).shape[-1])   # kv_len, kv_repeat, head_dim_v
        if site.kind == "sdpa":
            a = N.sdpa_args(site.node)
            if not isinstance(a["dropout_p"], (int, float)) or not isinstance(a["is_causal"], bool):
                return False
            replaced, dead = site.node, [site.node]
            args = (a["query"], token, a["attn_mask"], *sizes, float(a["dropout_p"]), a["is_causal"], a["scale"],
                    bool(a["enable_gqa"]), 0.0, False)
        elif site.eager is not None:
            e = site.eager
            replaced, dead = e.pv, e.nodes + [e.qk.args[1]]   # + the k^T transpose
            args = (e.q, token, e.mask, *sizes, 0.0, False, e.scale, False, e.softcap, True)
        else:
            return False
        g = self.graph
        with g.inserting_before(replaced):   # args in the op's order (lowering/ops.py)
            out = g.call_function(ops.attention.default, args)
        replaced.replace_all_uses_with(out)
        # the attention math and the repeat_kv/slice views feed nothing now: erased users first
        for node in sorted({*dead, *site.k.steps, *site.v.steps}, key=self.order.__getitem__, reverse=True):
            if not node.users:
                g.erase_node(node)
        return True


def rewrite_graph(gm: GraphModule, cfg: KVPassConfig) -> tuple[GraphModule, GraphReport]:
    """Return a rewritten copy of `gm` (Dynamo's own module is never touched) and its report."""
    graph = copy.deepcopy(gm.graph)
    output = next(n for n in graph.nodes if n.op == "output")
    outs = set(_flatten(output.args))
    report = GraphReport()
    writes, skipped_writes = find_writes(graph, outs)
    order = {n: i for i, n in enumerate(graph.nodes)}
    sites = find_attention(graph, writes, order)
    report.skipped.extend(skipped_writes)
    claimed: dict = {}
    for site in sites:
        if site.reason:
            report.skipped.append((site.where, site.reason))
            continue
        pair = (site.k.write.node, site.v.write.node)
        for w in pair:
            if claimed.setdefault(w, pair) != pair:
                site.reason = "one cache tensor is paired with two different partners"
        if site.reason:
            report.skipped.append((site.where, site.reason))
    done = set()
    for site in sites:
        if site.reason:
            continue
        pair = (site.k.write.node, site.v.write.node)
        if pair in done:  # a second reader of an already rewritten pair is rewritten with it
            continue
        rewrite = _SiteRewrite(graph, site, cfg, order)
        reason = rewrite.check()
        if reason:
            report.skipped.append((site.where, reason))
            continue
        report.sites.append(rewrite.run())
        done.add(pair)
    if report.sites:
        graph.eliminate_dead_code(is_impure_node=_impure)
        graph.lint()
    return GraphModule(gm, graph), report


def _flatten(x):
    if isinstance(x, (list, tuple)):
        for y in x:
            yield from _flatten(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _flatten(y)
    elif isinstance(x, Node):
        yield x
