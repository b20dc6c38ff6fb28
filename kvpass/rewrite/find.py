"""Finding cache writes, the attention sites that read them, and the view chains in between."""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch.fx import Graph, Node

from kvpass.rewrite import nodes as N


@dataclass
class CacheWrite:
    """One cache tensor written in the graph.

    kind "append": `result = cat([anchor, new], dim=-2)` stored back (DynamicCache);
    kind "positional": `anchor[:, :, positions] = new` in place (StaticCache `index_copy_`,
    slice assignment into a model's own buffer); reads after it use `anchor` itself.
    """

    kind: str
    node: Node
    anchor: Node
    new: Node
    positions: Node | None

    @property
    def results(self) -> set:
        """Nodes that stand for the whole cache after this write."""
        return {self.node} if self.kind == "append" else {self.anchor, self.node}


@dataclass
class Chain:
    """How a reader reached a cache tensor: the write, the view ops, and what they amount to."""

    write: CacheWrite
    result: Node  # the node of write.results the chain starts from
    steps: list = field(default_factory=list)  # view nodes, from the cache outward
    pure: bool = True  # only repeat_kv / length slicing / contiguous: SDPA can be fused
    kv_repeat: int = 1
    slice_end: object = None  # int or Node: the reader sees tokens [0, slice_end)


@dataclass
class EagerScores:
    """HF's eager attention between its two matmuls, as `kvpass::attention` arguments:
    P = softmax(softcap * tanh(q k^T * scale / softcap) + mask, fp32), out = P @ v."""

    q: Node
    qk: Node                 # the q @ k^T matmul
    pv: Node                 # the P @ v matmul (its output is the attention output)
    nodes: list              # every node from qk to pv, in graph order: dead once pv is replaced
    scale: float = 1.0
    softcap: float = 0.0     # 0: none
    mask: Node | None = None


@dataclass
class AttentionSite:
    """An attention read: an SDPA call or an eager softmax(QK^T)V, with its K and V chains."""

    kind: str  # "sdpa" | "eager"
    node: Node  # the sdpa node, or the softmax node
    where: str
    k: Chain | None = None
    v: Chain | None = None
    reason: str = ""
    eager: EagerScores | None = None  # eager sites whose score chain kvpass::attention can take over


def _is_full_slice(s) -> bool:
    return isinstance(s, slice) and s.start in (None, 0) and s.stop is None and s.step in (None, 1)


def _position_index(index):
    """positions node when `index` selects dim 2 of a 4-D tensor with a tensor, else None."""
    if not isinstance(index, tuple):
        return None
    items = [i for i in index if i is not Ellipsis] if index and index[0] is Ellipsis else list(index)
    if index and index[0] is Ellipsis:
        # [..., positions, :] selects dim -2
        if len(items) == 2 and isinstance(items[0], Node) and _is_full_slice(items[1]):
            return items[0]
        return None
    if len(items) >= 3 and _is_full_slice(items[0]) and _is_full_slice(items[1]) and isinstance(items[2], Node):
        if all(_is_full_slice(i) or i is Ellipsis for i in items[3:]):
            return items[2]
    return None


def _anchor_ok(node) -> bool:
    """A positional write's target must be a graph input or a buffer allocated in the graph."""
    return isinstance(node, Node) and (node.op == "placeholder" or N.is_call(node, N.ALLOC))


def find_writes(graph: Graph, output_values: set) -> tuple[list[CacheWrite], list[tuple[str, str]]]:
    """All cache writes in the graph, plus (where, reason) for cache-like writes left alone."""
    writes, skipped = [], []
    for node in graph.nodes:
        if N.is_call(node, N.CAT):
            tensors, dim = N.arg(node, 0, "tensors"), N.arg(node, 1, "dim", 0)
            if not (isinstance(tensors, (list, tuple)) and len(tensors) == 2 and dim in (-2, 2)):
                continue
            anchor, new = tensors
            a = N.value(anchor)
            if N.ndim(new) != 4 or not isinstance(a, torch.Tensor) or not (a.dim() == 4 or a.numel() == 0):
                continue
            if a.dim() == 4 and anchor.op != "placeholder":
                continue  # a cat of computed tensors (e.g. a sliding window's kept slice), not a cache
            if node in output_values:
                writes.append(CacheWrite("append", node, anchor, new, None))
            elif any(N.is_sdpa(u) or N.is_matmul(u) or N.is_view(u) for u in node.users):
                skipped.append((N.module_path(node), "cache concatenation is not stored back whole "
                                "(sliding-window cache keeps a slice): left in full precision"))
        elif N.is_call(node, (), {"index_copy_"}):
            target, dim, index, src = (list(node.args) + [None] * 4)[:4]
            if dim in (2, -2) and N.ndim(target) == 4 and N.ndim(src) == 4 and _anchor_ok(target):
                writes.append(CacheWrite("positional", node, target, src, index))
        elif N.is_call(node, {operator.setitem}):
            target, index, src = node.args
            pos = _position_index(index)
            if pos is not None and N.ndim(target) == 4 and N.ndim(src) == 4 and _anchor_ok(target):
                writes.append(CacheWrite("positional", node, target, src, pos))
    return writes, skipped


def trace_chain(node, writes: list[CacheWrite], order: dict, reader: Node) -> Chain | None:
    """Walk from a reader's operand back through view ops to a cache write's result."""
    steps = []
    while isinstance(node, Node):
        for w in writes:
            if node in w.results and order[w.node] < order[reader]:
                return _classify(Chain(w, node, list(reversed(steps))))
        if not N.is_view(node):
            return None
        steps.append(node)
        node = node.args[0]
    return None


def _classify(chain: Chain) -> Chain:
    """Decide whether the chain is only repeat_kv and/or a [:, :, :n] slice (fusable into SDPA)."""
    base = N.value(chain.result)
    for step in chain.steps:
        name = step.target if step.op == "call_method" else getattr(step.target, "__name__", "")
        if name in ("expand", "reshape", "view", "contiguous", "repeat_interleave", "clone"):
            continue
        if name in ("getitem", "__getitem__"):
            index = step.args[1]
            index = index if isinstance(index, tuple) else (index,)
            if len(index) >= 3 and all(_is_full_slice(i) for i in index[:2]) and index[2] is None:
                continue  # repeat_kv's [:, :, None]
            if (len(index) >= 3 and all(_is_full_slice(i) for i in index[:2]) and isinstance(index[2], slice)
                    and index[2].start in (None, 0) and index[2].step in (None, 1) and index[2].stop is not None
                    and all(_is_full_slice(i) for i in index[3:]) and chain.slice_end is None):
                chain.slice_end = index[2].stop
                continue
        chain.pure = False
        return chain
    final = N.value(chain.steps[-1]) if chain.steps else base
    if not (isinstance(final, torch.Tensor) and final.dim() == 4 and isinstance(base, torch.Tensor)):
        chain.pure = False
        return chain
    heads, base_heads = final.shape[1], base.shape[1]
    if not (isinstance(heads, int) and isinstance(base_heads, int)) or heads % base_heads:
        chain.pure = False
        return chain
    chain.kv_repeat = heads // base_heads
    return chain


def _walk_back_to_matmul(node: Node) -> Node | None:
    """From softmax's input back through scaling/masking/softcapping to the QK^T matmul."""
    frontier, seen, found = [node], set(), []
    while frontier:
        n = frontier.pop()
        if not isinstance(n, Node) or n in seen:
            continue
        seen.add(n)
        if N.is_matmul(n):
            found.append(n)
        elif N.is_call(n, N.SCORE_FUNCTIONS, N.SCORE_METHODS):
            frontier.extend(a for a in n.args if isinstance(a, Node))
    return found[0] if len(found) == 1 else None


def _walk_forward_to_matmul(node: Node) -> Node | None:
    """From softmax forward through casts and dropout to the P @ V matmul."""
    n = node
    for _ in range(8):
        users = list(n.users)
        if len(users) != 1:
            return None
        (u,) = users
        if N.is_matmul(u) and u.args[0] is n:
            return u
        if not N.is_call(u, N.PROB_FUNCTIONS, N.PROB_METHODS):
            return None
        n = u
    return None


def _const(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _sole_user(node: Node, user: Node) -> bool:
    return list(node.users) == [user]


def _binary(node, functions, methods):
    """(tensor operand, constant) of `node` when it is one of the given binary ops of a node and a
    Python number (either order for commutative use by the caller), else (None, None)."""
    if not N.is_call(node, functions, methods) or len(node.args) != 2 or node.kwargs:
        return None, None
    a, b = node.args
    if isinstance(a, Node) and _const(b) is not None:
        return a, _const(b)
    if isinstance(b, Node) and _const(a) is not None and node.target not in (operator.truediv, torch.div, "div",
                                                                              "__truediv__"):
        return b, _const(a)
    return None, None


_MUL = ({operator.mul, torch.mul}, {"mul", "__mul__"})
_DIV = ({operator.truediv, torch.div}, {"div", "__truediv__"})
_ADD = ({operator.add, torch.add}, {"add", "__add__"})


def match_eager_scores(softmax: Node, qk: Node, pv: Node) -> EagerScores | None:
    """The eager chain qk -> [* scale | / d] -> [/ c -> tanh -> * c] -> [+ mask] -> softmax(dim=-1)
    -> casts / eval-mode dropout -> pv as `EagerScores`, each intermediate used only by the next;
    None for any other chain (the site then keeps its own math on `kvpass::dequant` reads)."""
    dim, dtype = _softmax_dim_dtype(softmax)
    if dim not in (-1, 3) or dtype not in (None, torch.float32):
        return None
    prob = [softmax]                       # softmax -> pv, through `_walk_forward_to_matmul`'s steps
    while prob[-1] is not pv.args[0]:
        prob.append(next(iter(prob[-1].users)))
    if any(N.is_call(n, N.PROB_FUNCTIONS) and not _eval_dropout(n) for n in prob[1:]):
        return None                        # dropout in training mode
    n, terms, chain = softmax.args[0], EagerScores(qk.args[0], qk, pv, []), []
    if N.is_call(n, *_ADD) and len(n.args) == 2 and not n.kwargs:
        a, b = n.args
        score, mask = (a, b) if _reaches(a, qk) else (b, a)
        if not (isinstance(mask, Node) and N.ndim(mask) is not None and _reaches(score, qk) and not _reaches(mask, qk)):
            return None
        terms.mask, chain, n = mask, chain + [n], score
    capped, c_out = _binary(n, *_MUL)
    if capped is not None and N.is_call(capped, {torch.tanh}, {"tanh"}):
        divided, c_in = _binary(capped.args[0], *_DIV)
        if divided is None or c_in != c_out or c_in <= 0:
            return None
        terms.softcap, chain, n = c_out, chain + [n, capped, capped.args[0]], divided
    scaled, c = _binary(n, *_MUL)
    if scaled is not None:
        terms.scale, chain, n = c, chain + [n], scaled
    else:
        scaled, c = _binary(n, *_DIV)
        if scaled is not None and c:
            terms.scale, chain, n = 1.0 / c, chain + [n], scaled
    if n is not qk:
        return None
    chain = [qk] + list(reversed(chain)) + [softmax]
    if not all(_sole_user(a, b) for a, b in zip(chain, chain[1:])):
        return None                        # an intermediate is read elsewhere (attention weights returned)
    terms.nodes = chain + prob[1:] + [pv]
    q, out = N.value(qk.args[0]), N.value(pv)
    if not (isinstance(q, torch.Tensor) and isinstance(out, torch.Tensor) and q.dim() == 4 and out.dim() == 4
            and out.dtype == q.dtype):
        return None
    return terms


def _reaches(node, target: Node, limit: int = 16) -> bool:
    """Whether `target` is `node` or among its inputs within `limit` steps (short score chains)."""
    frontier, seen = [node], set()
    for _ in range(limit):
        nxt = []
        for n in frontier:
            if n is target:
                return True
            if isinstance(n, Node) and n not in seen:
                seen.add(n)
                nxt.extend(n.all_input_nodes)
        frontier = nxt
    return False


def _softmax_dim_dtype(node: Node):
    """(dim, dtype) of a softmax call: x.softmax(dim, dtype), torch.softmax(x, dim, dtype), or
    F.softmax(x, dim, _stacklevel, dtype); None where not given."""
    dtype_at = 3 if node.op == "call_function" and node.target is not torch.softmax else 2

    def arg(name, at):
        return node.kwargs.get(name, node.args[at] if len(node.args) > at else None)

    return arg("dim", 1), arg("dtype", dtype_at)


def _eval_dropout(node: Node) -> bool:
    """A dropout call that is the identity (p == 0 or not training), by its constant arguments."""
    p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
    training = node.kwargs.get("training", node.kwargs.get("train", node.args[2] if len(node.args) > 2 else True))
    return (isinstance(p, (int, float)) and p == 0) or training is False


def _strip_transpose(node):
    """K^T operand of QK^T: the tensor before its last-two-dims transpose, else None."""
    if N.is_call(node, {torch.transpose}, {"transpose"}):
        dims = tuple(node.args[1:3])
        if dims in ((2, 3), (3, 2), (-1, -2), (-2, -1), (2, -1), (-1, 2), (-2, 3), (3, -2)):
            return node.args[0]
    if N.is_call(node, (), {"mT"}):
        return node.args[0]
    return None


def find_attention(graph: Graph, writes: list[CacheWrite], order: dict) -> list[AttentionSite]:
    """Every SDPA call and eager softmax attention, with K/V traced to cache writes where possible."""
    sites = []
    for node in graph.nodes:
        if N.is_sdpa(node):
            a = N.sdpa_args(node)
            site = AttentionSite("sdpa", node, N.module_path(node))
            site.k = trace_chain(a["key"], writes, order, node)
            site.v = trace_chain(a["value"], writes, order, node)
            sites.append(site)
        elif N.is_softmax(node):
            site = AttentionSite("eager", node, N.module_path(node))
            qk = _walk_back_to_matmul(node.args[0])
            pv = _walk_forward_to_matmul(node)
            k_t = _strip_transpose(qk.args[1]) if qk is not None else None
            if qk is None or pv is None or k_t is None:
                continue  # a softmax that is not attention (router, classifier, ...)
            site.k = trace_chain(k_t, writes, order, qk)
            site.v = trace_chain(pv.args[1], writes, order, pv)
            site.eager = match_eager_scores(node, qk, pv)
            sites.append(site)
    for site in sites:
        if site.k is None or site.v is None:
            site.reason = "key/value operand is not a recognized cache read (no cache, or a cache layout kvpass does not know)"
        elif site.k.write is site.v.write:
            site.reason = "key and value come from the same cache tensor"
        elif site.k.write.kind != site.v.write.kind or site.k.write.positions is not site.v.write.positions:
            site.reason = "key and value caches are written differently"
    return sites
