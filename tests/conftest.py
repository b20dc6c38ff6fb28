"""Shared test setup: repo root on sys.path, the tolerance table, and helpers."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# One tolerance table, keyed by dtype: max |logit difference| allowed between the compiled kvpass
# path and the eager simulation of the same quantization.
# - float32: both sides run the same quantization math on the same values; they may differ only by
#   op ordering of the surrounding model code (compiled vs eager), a few ulps of fp32 after ~10
#   layers of O(1) activations -> 1e-4.
# - bfloat16: 8-bit mantissa; one rounding flip of a cached value moves logits of these tiny models
#   by ~1e-2 -> 5e-2 (for logits of magnitude <= 1; bf16 rounding is relative, so a test whose
#   logits reach tens, Gemma2's, scales it by their magnitude).
LOGIT_ATOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def kvpass_ops_in(backend) -> set:
    """Names of kvpass ops in every graph the backend rewrote."""
    names = set()
    for gm in backend.graphs.values():
        for n in gm.graph.nodes:
            if n.op == "call_function" and str(n.target).startswith("kvpass."):
                names.add(str(n.target).split(".")[1])
    return names


@pytest.fixture
def mma_launches(monkeypatch):
    """Host lengths (Lq, L; (0, 0) in device-lengths mode) of each call of the Gluon decode kernel's
    launcher (templates/decode_mma.py); a fallback to the Triton kernel adds none."""
    from kvpass.templates import decode_mma

    calls = []
    real = decode_mma.decode_attention_mma

    def counting(*args, **kw):
        calls.append(kw.get("host_lengths"))
        return real(*args, **kw)

    monkeypatch.setattr(decode_mma, "decode_attention_mma", counting)
    return calls
