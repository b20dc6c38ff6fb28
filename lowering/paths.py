"""Which implementation served each kvpass op in this process (a kernel, or the reference with the
reason), for `kvpass.explain`: a model that silently ran a slow fallback is what this makes visible.

Recorded once per distinct (op, implementation) pair, at call time: under CUDA graphs at capture.
"""
from __future__ import annotations

_SEEN: dict[tuple[str, str], None] = {}   # insertion-ordered set of (op, implementation)


def record(op: str, implementation: str) -> None:
    """Note that `op` ran through `implementation` (cheap: one dict lookup once seen)."""
    key = (op, implementation)
    if key not in _SEEN:
        _SEEN[key] = None


def seen() -> list[tuple[str, str]]:
    """(op, implementation) pairs in the order they first ran in this process."""
    return list(_SEEN)


def clear() -> None:
    """Forget what ran so far (tests; or to see one phase of a program on its own)."""
    _SEEN.clear()
