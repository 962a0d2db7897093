"""The shared test helpers (root ``testing_support.py``): the tolerance table is DESIGN.md's, and
the relative error is the one the table is stated in."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from testing_support import TOLERANCES, assert_rel_close, rel_error, tolerance

DESIGN = Path(__file__).resolve().parents[1] / "DESIGN.md"
ROWS = {  # DESIGN.md's "inputs" column -> (dtype, kinds)
    "float64 reference": (torch.float64, ("matmul", "attention")),
    "float32 (reference, or kernels with IEEE dots)": (torch.float32, ("matmul", "attention")),
    "bfloat16 matmul-type ops": (torch.bfloat16, ("matmul",)),
    "bfloat16 attention kernels": (torch.bfloat16, ("attention",)),
    "float16": (torch.float16, ("matmul", "attention")),
}


def test_tolerances_are_design_md_table():
    section = DESIGN.read_text().split("## Tests and tolerances", 1)[1].split("\n## ", 1)[0]
    table = dict(re.findall(r"(?m)^\| ([^|]+?) \| ([0-9.e-]+) \|", section))
    assert table.keys() == ROWS.keys()
    expected = {
        (dtype, kind): float(table[row]) for row, (dtype, kinds) in ROWS.items() for kind in kinds
    }
    assert expected == TOLERANCES
    assert tolerance(torch.bfloat16) == 1e-2 and tolerance(torch.bfloat16, "attention") == 3e-2
    with pytest.raises(ValueError, match="no tolerance"):
        tolerance(torch.int64)


def test_rel_error_and_assert_rel_close():
    b = torch.tensor([3.0, 4.0], dtype=torch.float64)
    a = torch.tensor([3.0, 4.5], dtype=torch.float32, requires_grad=True)
    assert rel_error(a, b) == pytest.approx(0.1)  # ||(0, 0.5)|| / ||(3, 4)||
    assert rel_error(torch.zeros(2), torch.zeros(2)) == 0.0
    assert rel_error(torch.full((2,), 1e-20), torch.zeros(2)) > 1  # a zero oracle: exact only
    assert assert_rel_close(a, b, 0.11) == pytest.approx(0.1)
    with pytest.raises(AssertionError, match=r"x: relative error 1\.000e-01 >= 1\.0e-05"):
        assert_rel_close(a, b, msg="x")  # the table's float32 bound
    c = torch.tensor([3.0, 4.1], dtype=torch.bfloat16)  # 4.09375: relative error 0.019
    assert_rel_close(c, b, kind="attention")  # < 3e-2
    with pytest.raises(AssertionError):
        assert_rel_close(c, b)  # bfloat16 matmul-type: 1e-2
