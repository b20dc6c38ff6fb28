"""kvpass: low-bit KV-cache quantization for any Hugging Face decoder, as a torch.compile backend.

    model.compile(backend=kvpass.backend(bits=2))
    print(kvpass.explain(backend))
"""
import os as _os

# From a source checkout (PYTHONPATH=.), `kvpass.lowering` and `kvpass.templates` live in the repo
# root's lowering/ and templates/; an installed wheel maps them into kvpass/ (pyproject).
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "lowering")) and _os.path.isfile(
    _os.path.join(_root, "lowering", "ops.py")
):
    __path__.append(_root)  # type: ignore[name-defined]

from kvpass.config import KVPassConfig  # noqa: E402
from kvpass.backend import KVPassBackend, backend  # noqa: E402
from kvpass.report import Report, explain  # noqa: E402

__all__ = ["backend", "explain", "KVPassBackend", "KVPassConfig", "Report"]
__version__ = "0.1.0"
