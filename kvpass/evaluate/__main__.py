"""``python -m kvpass.evaluate``: see kvpass.evaluate.cli."""
import sys

from kvpass.evaluate.cli import main_eval

sys.exit(main_eval())
