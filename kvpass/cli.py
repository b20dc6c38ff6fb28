"""Command line: `python -m kvpass demo` and `python -m kvpass eval` (also the `kvpass` script)."""
from __future__ import annotations

import sys

USAGE = """usage: kvpass {demo,eval} [options]
  demo   run the embedded SmolLM2-135M with and without a 2-bit kvpass cache (CPU, a few minutes)
  eval   perplexity and passkey retrieval for several kvpass configurations (see `kvpass eval -h`)"""


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from kvpass.demo import main as demo

        demo(rest)
        return 0
    if command == "eval":
        from kvpass.evaluate.cli import main_eval

        return main_eval(rest) or 0
    print(f"kvpass: unknown command {command!r}; valid: demo, eval\n{USAGE}", file=sys.stderr)
    return 2
