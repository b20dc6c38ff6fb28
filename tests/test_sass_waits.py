"""benchmarks/sass_waits.py: the false-wait finder on hand-written sm_90 SASS (no GPU, no Triton)."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from benchmarks import sass_waits  # noqa: E402


def _ins(addr: int, text: str, wb: int = 7, rb: int = 7, wait: int = 0) -> str:
    hi = (1 | (wb << 5) | (rb << 8) | (wait << 11)) << 41
    return (f"        /*{addr:04x}*/                   {text} ;   /* 0x0000000000000000 */\n"
            f"                                                   /* {hi:#018x} */\n")


def _loop(consumer: str) -> str:
    """A loop: a shuffle and a prefetch load share barrier 2, then `consumer` waits on barrier 2."""
    return (".L_x_1:\n" + _ins(0x10, "SHFL.BFLY PT, R85, R84, 0x10, 0x1f", wb=2)
            + _ins(0x20, "@!P1 LDG.E R206, desc[UR16][R80.64]", wb=2, rb=3)
            + _ins(0x30, consumer, wait=0b000100)
            + _ins(0x40, "@P0 BRA `(.L_x_1)"))


def test_consumer_of_a_shuffle_waiting_on_a_fresh_load_is_flagged():
    found = sass_waits.report(_loop("FADD R136, R84, R85"))
    assert found[0].endswith("1 false waits on recent global loads"), found
    assert "FADD R136, R84, R85" in found[1] and "LDG.E R206" in found[1]


def test_consumer_of_the_load_itself_is_not_flagged():
    found = sass_waits.report(_loop("FADD R136, R206, R85"))
    assert found == ["loop 0x10-0x40: 0 false waits on recent global loads"], found


def test_control_bits_decode():
    instrs, labels = sass_waits.parse_hex_sass(_loop("FADD R136, R84, R85"))
    assert [(i.write_barrier, i.read_barrier, i.wait_mask) for i in instrs] == [(2, 7, 0), (2, 3, 0), (7, 7, 4), (7, 7, 0)]
    assert labels == {".L_x_1": 0x10}
