"""Quality table for KV-cache configs on the real SmolLM2-135M model (CPU).

    python benchmarks/quality.py --out benchmarks/results            # full default list
    python benchmarks/quality.py --configs bf16,kivi-b2-g32-r128,naive-b2 --no-passkey

All options: python benchmarks/quality.py --help (see kvpass/evaluate/cli.py).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

from kvpass.evaluate.cli import main_eval  # noqa: E402

if __name__ == "__main__":
    sys.exit(main_eval())
