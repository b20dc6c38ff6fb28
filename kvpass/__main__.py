"""`python -m kvpass ...`: see kvpass.cli."""
import sys

from kvpass.cli import main

sys.exit(main())
