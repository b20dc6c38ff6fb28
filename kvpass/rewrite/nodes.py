"""Recognizers for torch-level Dynamo FX nodes: which call is SDPA, a cat, an in-place write, a view.

Dynamo graphs spell one operation several ways (torch function, Tensor method, operator), so
each recognizer lists every spelling seen in traced Hugging Face models.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch.fx import Node

SDPA = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
CAT = {torch.cat, torch.concat, torch.concatenate}
SOFTMAX = {torch.softmax, F.softmax, torch.nn.functional.softmax}
MATMUL = {torch.matmul, operator.matmul, torch.bmm}
ALLOC = {torch.zeros, torch.empty}
# Ops a cache tensor passes through on its way to attention (repeat_kv, slicing, casts, transposes).
VIEW_METHODS = {"expand", "reshape", "view", "contiguous", "transpose", "to", "float", "half", "bfloat16",
                "type", "repeat_interleave", "clone", "permute", "__getitem__", "type_as", "mT"}
VIEW_FUNCTIONS = {operator.getitem, torch.reshape, torch.transpose, torch.repeat_interleave, torch.permute}
# Element-wise steps between QK^T and softmax in eager attention (scale, mask, softcap, casts).
SCORE_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.mul, torch.div,
                   torch.tanh, torch.where, torch.masked_fill, torch.sub, operator.iadd, operator.imul, operator.itruediv}
SCORE_METHODS = {"add", "mul", "div", "tanh", "to", "float", "masked_fill", "type", "sub", "__add__", "__mul__",
                 "__truediv__", "add_", "mul_", "div_", "masked_fill_"}
PROB_FUNCTIONS = {F.dropout, torch.dropout, torch.nn.functional.dropout}
PROB_METHODS = {"to", "type", "float", "half", "bfloat16", "type_as", "contiguous"}


def value(node) -> object:
    """The example value Dynamo recorded for a node (a FakeTensor, SymInt, ...), or None."""
    return node.meta.get("example_value") if isinstance(node, Node) else None


def is_call(node, functions=(), methods=()) -> bool:
    if not isinstance(node, Node):
        return False
    if node.op == "call_function":
        return node.target in functions
    if node.op == "call_method":
        return node.target in methods
    return False


def is_sdpa(node) -> bool:
    return is_call(node, SDPA)


def sdpa_args(node: Node) -> dict:
    """SDPA call arguments by name, defaults filled in."""
    out = dict(zip(SDPA_PARAMS, (None, None, None, None, 0.0, False, None, False)))
    out.update(zip(SDPA_PARAMS, node.args))
    out.update(node.kwargs)
    return out


def is_softmax(node) -> bool:
    return is_call(node, SOFTMAX, {"softmax"})


def is_matmul(node) -> bool:
    return is_call(node, MATMUL, {"matmul", "__matmul__", "bmm"})


def is_view(node) -> bool:
    return is_call(node, VIEW_FUNCTIONS, VIEW_METHODS)


def ndim(node) -> int | None:
    v = value(node)
    return v.dim() if isinstance(v, torch.Tensor) else None


def arg(node: Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def module_path(node: Node) -> str:
    """The nn.Module the node was traced in, e.g. 'model.layers.3.self_attn' (best effort)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return node.name
    path = list(stack.values())[-1][0]
    return path.replace("L['self'].", "").replace("L['self']", "model")
