"""Finds false waits on global loads in a loop of sm_90 SASS: an instruction that waits on a
dependency barrier (scoreboard) that a global load issued shortly before it also set, while it does
not read that load's registers. ptxas has 6 barriers per warp and shares one between unrelated
variable-latency results when it runs short; when a shuffle's or shared load's consumer shares
the barrier of the loop's prefetch loads, it waits the full memory latency every iteration.

Found in session 9 (benchmarks/NOTES.md): the rows kernel's single-split build ran 19 % slower
(batch 32 T16k, 826 vs 694 us) with the same main-loop instructions; Nsight Compute put 24 % of
all warp samples on one `FADD R136, R84, R85` stalled on the long scoreboard, and this check
flags exactly that FADD (it waits on the barrier of a prefetch LDG issued two instructions earlier).

Control bits of an sm_90 instruction (high 64-bit word of `nvdisasm -hex`, bits 41..): stall
cycles [4], yield [1], write barrier [3] (7: none), read barrier [3], wait mask [6], reuse [4].
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_LINE = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);\s+/\* (0x[0-9a-f]{16}) \*/")
_HI = re.compile(r"\s+/\* (0x[0-9a-f]{16}) \*/")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")


@dataclass
class Instr:
    addr: int
    text: str
    write_barrier: int  # 7: none
    read_barrier: int
    wait_mask: int


def parse_hex_sass(text: str) -> tuple[list[Instr], dict[str, int]]:
    """Instructions with their control bits, and label -> address, from `nvdisasm -c -hex` output."""
    lines = text.splitlines()
    out, labels, pending = [], {}, None
    for i, line in enumerate(lines):
        m = _LABEL.match(line)
        if m:
            pending = m.group(1)
            continue
        m = _LINE.match(line)
        if not m or i + 1 >= len(lines):
            continue
        hi = _HI.match(lines[i + 1])
        if not hi:
            continue
        c = int(hi.group(1), 16) >> 41
        addr = int(m.group(1), 16)
        if pending:
            labels[pending], pending = addr, None
        out.append(Instr(addr, m.group(2).strip(), (c >> 5) & 7, (c >> 8) & 7, (c >> 11) & 63))
    return out, labels


def loops(instrs: list[Instr], labels: dict[str, int]) -> list[tuple[int, int]]:
    """(start, end) address of every backward branch's span, longest first."""
    spans = []
    for ins in instrs:
        m = re.search(r"BRA.*?(\.L_x_\d+)", ins.text)
        if m and labels.get(m.group(1), ins.addr + 1) < ins.addr:
            spans.append((labels[m.group(1)], ins.addr))
    return sorted(spans, key=lambda s: s[0] - s[1])


def _body(text: str) -> tuple[str, list[str]]:
    text = re.sub(r"^@!?U?P\w+\s+", "", text)
    opcode = text.split()[0]
    return opcode, [a.strip() for a in text[len(opcode):].split(",")]


def _load_dests(text: str) -> set[int]:
    opcode, args = _body(text)
    m = re.match(r"R(\d+)", args[0]) if args else None
    if not m:
        return set()
    width = 4 if ".128" in opcode else 2 if ".64" in opcode else 1
    return {int(m.group(1)) + i for i in range(width)}


def _sources(text: str) -> set[int]:
    opcode, args = _body(text)
    regs = set()
    for a in (args if opcode.startswith(("ST", "RED", "ATOM")) else args[1:]):
        for r in re.findall(r"\bR(\d+)\b", a):
            regs.update((int(r), int(r) + 1) if ".64" in a or ".64" in opcode else (int(r),))
    return regs


def false_load_waits(instrs: list[Instr], span: tuple[int, int], max_distance: int = 300) -> list[str]:
    """Instructions in the loop `span` that wait on a barrier b whose latest setter, at most
    max_distance instructions earlier in the same iteration, is a global load they do not read,
    while what they do read on b (if anything) is no global load: a short wait made a memory one."""
    body = [i for i in instrs if span[0] <= i.addr <= span[1]]
    found = []
    for k, ins in enumerate(body):
        srcs = _sources(ins.text)
        for b in range(6):
            if not (ins.wait_mask >> b) & 1:
                continue
            latest, needed = None, False
            for j in range(k - 1, -1, -1):
                prev = body[j]
                if prev.write_barrier == b:
                    latest = latest if latest is not None else j
                    needed |= "LDG" in prev.text and bool(_load_dests(prev.text) & srcs)
                if (prev.wait_mask >> b) & 1:  # b was cleared here: older setters are done
                    break
            if latest is not None and "LDG" in body[latest].text and not needed and k - latest <= max_distance:
                setter = body[latest]
                found.append(f"{ins.addr:#06x} {ins.text}  waits on {setter.addr:#06x} {setter.text} "
                             f"({k - latest} instructions before)")
    return found


def report(hex_sass: str, n_loops: int = 2) -> list[str]:
    """One line per loop (the n_loops longest): its size and its false waits on global loads."""
    instrs, labels = parse_hex_sass(hex_sass)
    lines = []
    for span in loops(instrs, labels)[:n_loops]:
        waits = false_load_waits(instrs, span)
        lines.append(f"loop {span[0]:#x}-{span[1]:#x}: {len(waits)} false waits on recent global loads")
        lines += [f"    {w}" for w in waits]
    return lines
