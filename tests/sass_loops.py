"""Loops of a SASS listing (as triton.tools.disasm.get_sass prints it) and the local-memory instructions inside
the innermost ones, for tests/sm90_compile.py. Plain text work, no Triton: tests/test_sass_loops.py checks it on
hand-written listings.

A loop is a label and the backward branches to it: its body runs from the label to the last of them (several
back edges to one label are one loop, e.g. a `continue`). Innermost: no other loop lies inside its body. Code
the compiler placed after the last back edge and jumps into from the body is not seen (ptxas lays loops out
contiguously in what it prints for these kernels; the gate only under-counts in that case)."""
import re

_LABEL = re.compile(r"^\s*(\.?L\w+):")
_BRANCH = re.compile(r"\bBRA\b.*?(\.?L\w+)")
_LOCAL = re.compile(r"\b(STL|LDL)\b")


def loops(lines):
    """[(first line, last line)] of every loop, one per label that a later branch jumps back to."""
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := _LABEL.match(line))}
    ends = {}
    for i, line in enumerate(lines):
        m = _BRANCH.search(line)
        if m and labels.get(m.group(1), i) < i:
            start = labels[m.group(1)]
            ends[start] = max(ends.get(start, i), i)
    return sorted(ends.items())


def inner_loop_local(sass):
    """Local-memory instructions (STL / LDL: spill traffic) inside the innermost loops of ``sass``."""
    lines = sass.splitlines()
    found = loops(lines)
    inner = [(a, b) for a, b in found if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in found)]
    return sum(1 for a, b in inner for line in lines[a:b + 1] if _LOCAL.search(line))
