"""Perplexity through the decode path, so a KV-cache compression is measured as used.

``perplexity`` prefills a prompt of ``prefix`` tokens, then teacher-forces the
rest ``chunk`` tokens per step, feeding the cache back each time: every scored
token attends to the (possibly compressed) cache exactly as during generation.
``full_sequence_perplexity`` is the plain one-forward reference for the same
scored positions.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from transformers import DynamicCache


def _token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """NLL summed per sequence; logits [B, T, V] predict targets [B, T]. log-softmax in fp32."""
    logp = torch.log_softmax(logits.float(), dim=-1)              # [B, T, V]
    return -logp.gather(-1, targets.unsqueeze(-1)).sum(dim=(1, 2))  # [B]


def compiled_forward(model, backend):
    """model itself when backend is None, else a torch.compile wrapper around it.

    The wrapper leaves ``model`` uncompiled for the caller; dynamo state from
    earlier compilations is reset first so it cannot leak into this run.
    """
    if backend is None:
        return model
    torch._dynamo.reset()
    return torch.compile(model, backend=backend, dynamic=None)


def _check_inputs(input_ids: torch.Tensor, prefix: int) -> int:
    if input_ids.dim() != 2 or input_ids.shape[0] < 1:
        raise ValueError(f"input_ids must be [B, N] (B texts of N tokens, no padding), "
                         f"got {tuple(input_ids.shape)}")
    n = input_ids.shape[1]
    if not 1 <= prefix < n:
        raise ValueError(f"need 1 <= prefix < N, got prefix={prefix}, N={n}")
    return n


@torch.no_grad()
def sequence_nll(model, input_ids: torch.Tensor, *, backend=None, prefix: int = 512,
                 chunk: int = 1, cache_factory: Callable[[], object] | None = None,
                 progress: bool | None = None) -> torch.Tensor:
    """Summed NLL [B] of tokens prefix..N-1 of each row of input_ids [B, N], via the decode path.

    Rows are independent texts of equal length decoded as one batch (no padding), so B texts
    cost about one text's Python overhead. Arguments as for ``perplexity``.
    """
    n = _check_inputs(input_ids, prefix)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    fwd = compiled_forward(model, backend)
    cache = cache_factory() if cache_factory is not None else DynamicCache()

    # Prefill: only the last position's logits are needed; they score token `prefix`.
    out = fwd(input_ids=input_ids[:, :prefix], past_key_values=cache, use_cache=True,
              logits_to_keep=1)
    total = _token_nll(out.logits[:, -1:], input_ids[:, prefix:prefix + 1])   # [B]
    cache = out.past_key_values

    # Decode: feed tokens a..b-1 (positions), their logits score tokens a+1..b.
    starts = range(prefix, n - 1, chunk)
    if progress is None:
        progress = n - prefix > 512
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc="perplexity", unit="step", leave=False)
    for a in starts:
        b = min(a + chunk, n - 1)
        out = fwd(input_ids=input_ids[:, a:b], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        total += _token_nll(out.logits, input_ids[:, a + 1:b + 1])  # logits [B, b-a, V]
    return total.cpu()


def perplexity(model, input_ids: torch.Tensor, *, backend=None, prefix: int = 512,
               chunk: int = 1, cache_factory: Callable[[], object] | None = None,
               progress: bool | None = None) -> float:
    """exp(mean NLL) of tokens prefix..N-1 of input_ids [B, N], scored via the decode path
    (pooled over the B rows; see ``sequence_nll`` for per-row sums).

    backend: None for the uncompressed model, else a torch.compile backend
    (e.g. ``kvpass.backend(bits=2)``). cache_factory: returns a fresh cache
    (default DynamicCache), used for cache-side baselines. progress: tqdm bar
    (None: on when more than 512 tokens are scored).
    """
    nll = sequence_nll(model, input_ids, backend=backend, prefix=prefix, chunk=chunk,
                       cache_factory=cache_factory, progress=progress)
    return math.exp(nll.sum().item() / (nll.numel() * (input_ids.shape[1] - prefix)))


@torch.no_grad()
def full_sequence_perplexity(model, input_ids: torch.Tensor, prefix: int = 512) -> float:
    """Reference: one plain forward over input_ids [B, N], scoring tokens prefix..N-1 (pooled)."""
    n = _check_inputs(input_ids, prefix)
    input_ids = input_ids.to(next(model.parameters()).device)
    # Keep logits of positions prefix-1..N-1; the last one predicts past the end.
    out = model(input_ids=input_ids, use_cache=False, logits_to_keep=n - prefix + 1)
    total = _token_nll(out.logits[:, :-1], input_ids[:, prefix:])   # [B]
    return math.exp(total.sum().item() / (input_ids.shape[0] * (n - prefix)))
