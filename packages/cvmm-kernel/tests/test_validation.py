"""Clear errors for inputs that cvmm cannot multiply, raised before any kernel runs."""

from __future__ import annotations

import os

import pytest
import torch
from cvmm_kernel import CVMMSel, cvmm, cvmm_prepare_sel2


def test_expert_index_out_of_range():
    with pytest.raises(IndexError, match="expert index"):
        cvmm(
            torch.randn(4, 8),
            cvmm_prepare_sel2(torch.tensor([[0], [5], [1], [2]])),
            torch.randn(5, 8, 3),
        )


def test_negative_expert_index():
    with pytest.raises(IndexError, match="expert index"):
        cvmm(torch.randn(2, 8), cvmm_prepare_sel2(torch.tensor([[0], [-1]])), torch.randn(5, 8, 3))


def test_mismatched_d_in():
    with pytest.raises(ValueError, match="d_in"):
        cvmm(
            torch.randn(4, 7),
            cvmm_prepare_sel2(torch.zeros(4, 1, dtype=torch.long)),
            torch.randn(2, 8, 3),
        )


def test_float_indices_are_rejected():
    with pytest.raises(TypeError, match="integer"):
        cvmm_prepare_sel2(torch.zeros(4, 2))
    with pytest.raises(TypeError, match="integer"):
        cvmm(torch.randn(4, 8), torch.zeros(4), torch.randn(2, 8, 3))


def test_weights_must_be_3d():
    with pytest.raises(ValueError, match="n_matrices"):
        cvmm(torch.randn(4, 8), torch.zeros(4, dtype=torch.long), torch.randn(8, 3))


def test_row_count_must_match_raw_selection():
    with pytest.raises(ValueError, match="one row per selection"):
        cvmm(torch.randn(5, 8), torch.zeros(4, dtype=torch.long), torch.randn(2, 8, 3))


def test_input_row_out_of_range():
    sel = cvmm_prepare_sel2(torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(IndexError, match="input row"):
        cvmm(torch.randn(3, 8), sel, torch.randn(2, 8, 3))  # sel was made for 4 rows


def test_reduction_weight_size():
    sel = cvmm_prepare_sel2(torch.zeros(4, 2, dtype=torch.long), torch.rand(4, 3))
    with pytest.raises(ValueError, match="reduction_weight"):
        cvmm(torch.randn(4, 8), sel, torch.randn(2, 8, 3))


def test_dtype_mismatch_outside_autocast():
    with pytest.raises(TypeError, match="same dtype"):
        cvmm(
            torch.randn(4, 8),
            torch.zeros(4, dtype=torch.long),
            torch.randn(2, 8, 3, dtype=torch.float64),
        )


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown cvmm backend"):
        cvmm(
            torch.randn(4, 8),
            torch.zeros(4, dtype=torch.long),
            torch.randn(2, 8, 3),
            backend="cuda",
        )


def test_triton_backend_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        cvmm(
            torch.randn(4, 8),
            torch.zeros(4, dtype=torch.long),
            torch.randn(2, 8, 3),
            backend="triton",
        )


@pytest.mark.gpu
def test_devices_must_match():
    sel = CVMMSel(
        raw_sel=torch.zeros(4, dtype=torch.long),
        sel=torch.zeros(4, dtype=torch.long),
        sel_index=torch.arange(4),
    )
    with pytest.raises(ValueError, match="one device"):
        cvmm(torch.randn(4, 8, device="cuda"), sel, torch.randn(2, 8, 3, device="cuda"))


def test_unsorted_selection_is_rejected():
    sel = CVMMSel(
        raw_sel=torch.tensor([1, 0, 2]), sel=torch.tensor([1, 0, 2]), sel_index=torch.arange(3)
    )
    with pytest.raises(ValueError, match="sorted"):
        cvmm(torch.randn(3, 8), sel, torch.randn(3, 8, 2))


def test_repeated_output_rows_are_rejected():
    sel = cvmm_prepare_sel2(torch.zeros(4, 1, dtype=torch.long))
    sel.out_index = torch.tensor([0, 0, 1, 2])
    with pytest.raises(ValueError, match="must not repeat"):
        cvmm(torch.randn(4, 8), sel, torch.randn(1, 8, 2))


def test_constructed_layouts_are_trusted_until_reindexed():
    sel = cvmm_prepare_sel2(torch.randint(0, 3, (5, 2)))
    assert sel.layout_group == 2
    clone = sel.clone()
    assert clone.layout_group == 2 and clone.sel_index is sel.sel_index
    clone.sel_index = clone.out_index
    assert clone.layout_group == 0 and sel.layout_group == 2
    per_group = sel.with_input_rows_per_group(2)
    assert per_group.layout_group == 2
    assert torch.equal(per_group.sel_index, sel.out_index // 2)


def test_trusted_layout_still_checks_the_expert_range():
    sel = cvmm_prepare_sel2(torch.tensor([[0, 4], [1, 2]]))
    with pytest.raises(IndexError, match="expert index"):
        cvmm(torch.randn(2, 8), sel, torch.randn(4, 8, 3))


def test_index_bound_checks_on_the_host_without_reading_indices(monkeypatch):
    x, w = torch.randn(5, 8), torch.randn(4, 8, 3)
    sel = cvmm_prepare_sel2(torch.randint(0, 4, (5, 2)), index_bound=4)
    read_back = []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: read_back.append(t) or real_tolist(t))
    from cvmm_kernel.validation import check_cvmm_inputs

    assert check_cvmm_inputs(x, sel, w) == 2
    assert read_back == []  # no device read-back for a promised range
    with pytest.raises(IndexError, match="up to 3, but there are 3"):
        check_cvmm_inputs(x, sel, torch.randn(3, 8, 3))
    assert sel.with_input_rows_per_group(2).index_bound == 4
    assert sel.clone().index_bound == 4
    rebuilt = sel.clone()
    rebuilt.sel = sel.sel  # re-indexing by hand drops the promise
    assert rebuilt.index_bound is None and rebuilt.layout_group == 0


def test_interpreting_follows_the_environment(monkeypatch):
    """``interpreting()`` reads ``TRITON_INTERPRET`` at each call (its fast lookup included)."""
    from cvmm_kernel.interpreter import interpreting

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert interpreting()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not interpreting()
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not interpreting()
    monkeypatch.setitem(os.environ, "TRITON_INTERPRET", "1")
    assert interpreting()
