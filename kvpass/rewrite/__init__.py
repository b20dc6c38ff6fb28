"""The graph pass: find cache writes and the attention that reads them; rewrite both into kvpass ops."""
from kvpass.rewrite.apply import rewrite_graph

__all__ = ["rewrite_graph"]
