"""tests/sass_loops.py on hand-written SASS listings: what the sm_90 gate counts as spill traffic inside
innermost loops (tests/test_sm90_compile.py relies on it)."""
from sass_loops import inner_loop_local, loops

LISTING = """\
Function:k
STL [R1], R2;
LBB0:
  LDG.E R4, desc[UR4][R2.64];
LBB1:
  HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24;
  LDL R5, [R1];
  @P0 BRA LBB1;
  STL [R1+0x4], R5;
  @P1 BRA LBB0;
LDL R6, [R1+0x4];
EXIT;
"""


def test_counts_only_what_the_innermost_loop_holds():
    lines = LISTING.splitlines()
    assert loops(lines) == [(2, 9), (4, 7)]
    assert inner_loop_local(LISTING) == 1  # the LDL in LBB1; the outer loop's STL and the epilogue's LDL are not


def test_two_back_edges_to_one_label_are_one_loop():
    sass = """\
LBB0:
  LDL R5, [R1];
  @P0 BRA LBB0;
  STL [R1], R5;
  @P1 BRA LBB0;
EXIT;
"""
    assert loops(sass.splitlines()) == [(0, 4)]
    assert inner_loop_local(sass) == 2  # both local instructions are in the loop's body


def test_forward_branches_make_no_loop():
    sass = """\
  @P0 BRA LBB0;
  STL [R1], R5;
LBB0:
  LDL R5, [R1];
EXIT;
"""
    assert loops(sass.splitlines()) == []
    assert inner_loop_local(sass) == 0
