"""kvpass.lowering: custom ops, their plain-torch reference implementations and device dispatch."""
