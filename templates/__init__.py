"""kvpass.templates: Triton kernel templates specialized per bits, group size, head_dim and dtype."""
