"""Bad and unusual inputs to cvmm: a clear error before any kernel runs, or the right result.

Every case either raises (``pytest.raises`` with the message it must name) or returns what a
float64 reference computed from scratch here returns: ``out[i, j] = x[i] @ W[sel[i, j]]``, summed
over ``j`` with the reduction weights when there are any. NaN and Inf must propagate as they do
in float64. The Triton cases run under ``TRITON_INTERPRET=1`` only (``-m interpret``).
"""

from __future__ import annotations

import pytest
import torch
from cvmm_kernel import CVMMSel, cvmm, cvmm_prepare_sel, cvmm_prepare_sel2
from cvmm_kernel.validation import check_backend_dtype, check_cvmm_inputs

NAN, INF = float("nan"), float("inf")
L = torch.long


def randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64).to(dtype)


def ref_k(x, sel, weights, rw=None) -> torch.Tensor:
    """float64, one row at a time: ``out[i, j] = x[i] @ W[sel[i, j]]``; weighted sum over j."""
    d_in, d_out = weights.shape[1], weights.shape[2]
    rows = x.detach().double().reshape(-1, d_in)
    k = sel.shape[-1]
    idx = sel.reshape(rows.shape[0], k).long()
    w64 = weights.detach().double()
    out = torch.zeros(rows.shape[0], k, d_out, dtype=torch.float64)
    for i in range(rows.shape[0]):
        for j in range(k):
            out[i, j] = rows[i] @ w64[idx[i, j]]
    if rw is None:
        return out.reshape(*sel.shape, d_out)
    summed = (rw.double().reshape(rows.shape[0], k, 1) * out).sum(1)
    return summed.reshape(*sel.shape[:-1], d_out)


def ref_1(x, sel, weights) -> torch.Tensor:
    """One matrix per row: ``out[i] = x[i] @ W[sel.flatten()[i]]``, ``[*sel.shape, d_out]``."""
    return ref_k(x, sel.reshape(-1, 1), weights).reshape(*sel.shape, weights.shape[2])


def ref_fields(x, sel: CVMMSel, weights) -> torch.Tensor:
    """A hand-made selection: ``out[out_index[p]] = x[sel_index[p]] @ W[sel[p]]``."""
    rows = x.double().reshape(-1, weights.shape[1])
    out_index = sel.sel_index if sel.out_index is None else sel.out_index
    out = torch.zeros(sel.sel.numel(), weights.shape[2], dtype=torch.float64)
    for p, e in enumerate(sel.sel.flatten().tolist()):
        out[int(out_index[p])] = rows[int(sel.sel_index[p])] @ weights[e].double()
    return out.reshape(*sel.sel.shape, weights.shape[2])


def _with_nan(t: torch.Tensor, *index, value=NAN) -> torch.Tensor:
    t = t.clone()
    t[index] = value
    return t


def _hand_made(index_dtype: torch.dtype = L, with_out_index: bool = True, **kw) -> CVMMSel:
    """Experts [0, 0, 1, 2] (sorted); input rows [2, 0, 3, 1]; outputs [1, 3, 0, 2]."""
    fields = dict(
        raw_sel=torch.tensor([0, 0, 1, 2]),
        sel=torch.tensor([0, 0, 1, 2]),
        sel_index=torch.tensor([2, 0, 3, 1], dtype=index_dtype),
        out_index=torch.tensor([1, 3, 0, 2], dtype=index_dtype) if with_out_index else None,
    )
    fields.update(kw)
    return CVMMSel(**fields)


def _meta(sel: CVMMSel) -> CVMMSel:
    """The selection on the meta device, built without running ops there (the first meta sort
    costs seconds of lazy imports)."""
    fields = ("raw_sel", "sel", "sel_index", "out_index", "reduction_weight")
    return CVMMSel(
        **{f: None if getattr(sel, f) is None else getattr(sel, f).to("meta") for f in fields}
    )


# --------------------------------------------------------------------------------------------
# Clear errors. Each case: (call, exception, message); the call builds its tensors when run.
# --------------------------------------------------------------------------------------------


def _sel2(*rows_k, dtype=L, w=None):
    return cvmm_prepare_sel2(torch.tensor(rows_k, dtype=dtype), w)


ERRORS = [
    # shapes
    pytest.param(
        lambda: cvmm(torch.tensor(1.0), _sel2([0]), randn(2, 1, 3)),
        ValueError,
        "last dim",
        id="x-rank0",
    ),
    pytest.param(
        lambda: cvmm(
            randn(2, 3, 7), cvmm_prepare_sel2(torch.zeros(2, 3, 1, dtype=L)), randn(2, 8, 3)
        ),
        ValueError,
        r"last dim \(7\) must equal d_in of the weights \(8\)",
        id="x-3d-d_in-mismatch",
    ),
    pytest.param(
        lambda: cvmm(randn(2, 8), _sel2([0], [1]), randn(2, 2, 8, 3)),
        ValueError,
        "n_matrices, d_in, d_out",
        id="weights-rank4",
    ),
    pytest.param(
        lambda: cvmm(randn(2, 8), _sel2([0], [0]), randn(8)),
        ValueError,
        "n_matrices",
        id="weights-rank1",
    ),
    pytest.param(
        lambda: cvmm(randn(4, 0), _sel2([0], [1], [1], [0]), randn(2, 0, 3)),
        ValueError,
        r"d_in >= 1",
        id="d_in-zero",
    ),
    pytest.param(
        lambda: cvmm(randn(2, 2, 8), torch.zeros(3, dtype=L), randn(2, 8, 3)),
        ValueError,
        r"one row per selection \(3\), got 4 rows",
        id="raw-sel-vs-rows",
    ),
    pytest.param(
        lambda: cvmm(randn(4, 8), _hand_made(sel_index=torch.tensor([2, 0, 3])), randn(3, 8, 2)),
        ValueError,
        "one entry per selection",
        id="sel_index-length",
    ),
    pytest.param(
        lambda: cvmm(randn(4, 8), _hand_made(out_index=torch.arange(5)), randn(3, 8, 2)),
        ValueError,
        "one entry per selection",
        id="out_index-length",
    ),
    # dtypes of x and weights
    pytest.param(
        lambda: cvmm(
            torch.ones(4, 8, dtype=L), _sel2([0], [1], [0], [1]), torch.ones(2, 8, 3, dtype=L)
        ),
        TypeError,
        "floating-point x and weights",
        id="int-x-int-w",
    ),
    pytest.param(
        lambda: cvmm(
            torch.ones(4, 8, dtype=torch.int32), _sel2([0], [1], [0], [1]), randn(2, 8, 3)
        ),
        TypeError,
        "floating-point x and weights",
        id="int-x-float-w",
    ),
    pytest.param(
        lambda: cvmm(
            randn(4, 8), _sel2([0], [1], [0], [1]), torch.ones(2, 8, 3, dtype=torch.uint8)
        ),
        TypeError,
        "floating-point x and weights",
        id="float-x-uint8-w",
    ),
    pytest.param(
        lambda: cvmm(
            randn(4, 8).to(torch.complex64),
            _sel2([0], [1], [0], [1]),
            randn(2, 8, 3).to(torch.complex64),
        ),
        TypeError,
        "floating-point x and weights",
        id="complex",
    ),
    pytest.param(
        lambda: cvmm(
            randn(4, 8).to(torch.float8_e4m3fn),
            _sel2([0], [1], [0], [1]),
            randn(2, 8, 3).to(torch.float8_e4m3fn),
        ),
        TypeError,
        "float16, bfloat16, float32 and float64; x is torch.float8_e4m3fn",
        id="float8",
    ),
    *[
        pytest.param(
            lambda a=a, b=b: cvmm(
                randn(4, 8, dtype=a), _sel2([0], [1], [0], [1]), randn(2, 8, 3, dtype=b)
            ),
            TypeError,
            "same dtype outside autocast",
            id=f"mix-{str(a)[6:]}-{str(b)[6:]}",
        )
        for a, b in [
            (torch.float16, torch.float32),
            (torch.bfloat16, torch.float16),
            (torch.float64, torch.bfloat16),
            (torch.bfloat16, torch.float32),
            (torch.float16, torch.float64),
        ]
    ],
    # devices
    pytest.param(
        lambda: cvmm(randn(4, 8).to("meta"), _meta(_hand_made()), randn(3, 8, 3).to("meta")),
        ValueError,
        "meta tensors",
        id="meta-selection",
    ),
    pytest.param(
        lambda: check_cvmm_inputs(
            randn(4, 8).to("meta"),
            _meta(_hand_made(with_out_index=False, reduction_weight=torch.rand(2, 2))),
            randn(3, 8, 3).to("meta"),
        ),
        ValueError,
        "meta tensors",
        id="meta-reduced",
    ),
    pytest.param(
        lambda: cvmm(randn(4, 8).to("meta"), _sel2([0], [1], [0], [1]), randn(2, 8, 3).to("meta")),
        ValueError,
        "one device",
        id="meta-x-cpu-sel",
    ),
    pytest.param(
        lambda: cvmm(
            randn(4, 8),
            _sel2([0], [1], [0], [1], w=torch.rand(4, 1, device="meta")),
            randn(2, 8, 3),
        ),
        ValueError,
        "one device",
        id="meta-reduction-weight",
    ),
    # expert index values and dtypes
    pytest.param(
        lambda: cvmm(randn(4, 8), _sel2([0], [1], [0], [1]), randn(0, 8, 3)),
        IndexError,
        r"expert index \(sel\) out of range: values in \[0, 1\], valid range \[0, 0\)",
        id="zero-experts",
    ),
    pytest.param(
        lambda: cvmm(randn(3, 8), torch.tensor([0, 2**40, 1]), randn(3, 8, 2)),
        IndexError,
        "expert index",
        id="raw-index-huge",
    ),
    pytest.param(
        lambda: cvmm(randn(3, 8), torch.tensor([0, 3, 1]), randn(3, 8, 2)),
        IndexError,
        r"valid range \[0, 3\)",
        id="raw-index-equals-n",
    ),
    pytest.param(
        lambda: cvmm(randn(4, 8), _hand_made(sel=torch.tensor([-1, 0, 1, 2])), randn(3, 8, 2)),
        IndexError,
        r"expert index \(sel\) out of range: values in \[-1, 2\]",
        id="hand-made-negative",
    ),
    pytest.param(
        lambda: cvmm(randn(2, 8), _sel2([0, -3], [1, 2], dtype=torch.int8), randn(3, 8, 2)),
        IndexError,
        "expert index",
        id="int8-negative",
    ),
    pytest.param(
        lambda: cvmm(randn(2, 8), _sel2([0], [100], dtype=torch.int8), randn(128, 8, 2)),
        TypeError,
        "torch.int8 address at most 127 matrices, but weights has 128",
        id="int8-128-experts",
    ),
    pytest.param(
        lambda: cvmm(randn(2, 8), _sel2([0], [200], dtype=torch.uint8), randn(256, 8, 2)),
        TypeError,
        "torch.uint8 address at most 255 matrices",
        id="uint8-256-experts",
    ),
    pytest.param(
        lambda: cvmm(
            randn(2, 8),
            _hand_made(sel=torch.tensor([0, 0, 1, 2], dtype=torch.uint16)),
            randn(3, 8, 2),
        ),
        TypeError,
        "sel must be an integer tensor of dtype int64, int32, int16, int8, uint8",
        id="uint16-sel",
    ),
    pytest.param(
        lambda: cvmm(randn(4, 8), _hand_made(torch.uint8), randn(3, 8, 2)),
        TypeError,
        "sel_index must be an integer tensor of dtype int64, int32, got torch.uint8",
        id="uint8-row-indices",
    ),
    pytest.param(
        lambda: cvmm(
            randn(4, 8),
            _hand_made(out_index=torch.tensor([1, 3, 0, 2], dtype=torch.int16)),
            randn(3, 8, 2),
        ),
        TypeError,
        "out_index must be an integer tensor of dtype int64, int32",
        id="int16-out_index",
    ),
    # bool, float and complex selections
    pytest.param(
        lambda: cvmm(randn(4, 8), torch.tensor([True, False, True, False]), randn(2, 8, 3)),
        TypeError,
        "integer tensor, got torch.bool",
        id="bool-raw",
    ),
    pytest.param(
        lambda: cvmm_prepare_sel2(torch.ones(4, 2, dtype=torch.bool)),
        TypeError,
        "integer tensor, got torch.bool",
        id="bool-sel2",
    ),
    pytest.param(
        lambda: cvmm_prepare_sel(torch.zeros(4, dtype=torch.float64)),
        TypeError,
        "integer tensor, got torch.float64",
        id="float64-sel",
    ),
    pytest.param(
        lambda: cvmm(
            randn(4, 8), _hand_made(sel=torch.tensor([0.0, 0.0, 1.0, 2.0])), randn(3, 8, 2)
        ),
        TypeError,
        "sel must be an integer tensor, got torch.float32",
        id="hand-made-float-sel",
    ),
    pytest.param(
        lambda: cvmm(
            randn(4, 8), _hand_made(sel_index=torch.ones(4, dtype=torch.bool)), randn(3, 8, 2)
        ),
        TypeError,
        "sel_index must be an integer tensor, got torch.bool",
        id="hand-made-bool-sel_index",
    ),
    pytest.param(
        lambda: cvmm(
            randn(4, 8), _hand_made(sel=torch.zeros(4, dtype=torch.complex64)), randn(3, 8, 2)
        ),
        TypeError,
        "sel must be an integer tensor, got torch.complex64",
        id="hand-made-complex-sel",
    ),
    # reduction weights
    pytest.param(
        lambda: cvmm(randn(1, 8), _sel2([0], w=torch.tensor(0.5)), randn(2, 8, 3)),
        ValueError,
        r"reduction_weight must have one entry per selection \(1\), got shape \(\)",
        id="reduction-scalar",
    ),
    pytest.param(
        lambda: cvmm(randn(2, 8), _sel2([0, 1], [1, 0], w=torch.rand(2, 3)), randn(2, 8, 3)),
        ValueError,
        r"reduction_weight must have one entry per selection \(4\), got shape \(2, 3\)",
        id="reduction-too-many",
    ),
    pytest.param(
        lambda: cvmm(
            randn(2, 8), _sel2([0, 1], [1, 0], w=torch.ones(2, 2, dtype=torch.bool)), randn(2, 8, 3)
        ),
        TypeError,
        "reduction_weight must be floating point, got torch.bool",
        id="reduction-bool",
    ),
    pytest.param(
        lambda: cvmm(
            randn(2, 8), _sel2([0, 1], [1, 0], w=torch.ones(2, 2, dtype=L)), randn(2, 8, 3)
        ),
        TypeError,
        "reduction_weight must be floating point",
        id="reduction-int",
    ),
    # the validation function itself
    pytest.param(
        lambda: check_cvmm_inputs(randn(4, 8), torch.zeros(4, dtype=L), randn(2, 8, 3)),
        TypeError,
        "sel must be a CVMMSel",
        id="check-raw-tensor-sel",
    ),
    pytest.param(
        lambda: check_cvmm_inputs(
            randn(4, 8, dtype=torch.float64),
            _sel2([0], [1], [0], [1]),
            randn(2, 8, 3, dtype=torch.float64),
            backend="triton",
        ),
        TypeError,
        "Triton backend multiplies float16, bfloat16 and float32, not torch.float64",
        id="check-float64-triton",
    ),
    pytest.param(
        lambda: check_cvmm_inputs(
            randn(4, 8), _sel2([0], [1], [0], [1]), randn(2, 8, 3), backend="cuda"
        ),
        ValueError,
        "unknown cvmm backend 'cuda'",
        id="check-unknown-backend",
    ),
]


@pytest.mark.parametrize(("call", "error", "match"), ERRORS)
def test_clear_error(call, error, match):
    torch.manual_seed(0)
    with pytest.raises(error, match=match):
        call()


# --------------------------------------------------------------------------------------------
# Results equal to the float64 reference. Each case: () -> (result, expected, tolerance).
# --------------------------------------------------------------------------------------------


def _k_case(x, sel, w, rw=None, *, ref_rw=None, sel_dtype=None, backend="reference", tol=2e-5):
    """cvmm_prepare_sel2 with optional reduction weights, against ref_k."""
    s = sel if sel_dtype is None else sel.to(sel_dtype)
    out = cvmm(x, cvmm_prepare_sel2(s, rw), w, backend=backend)
    return out, ref_k(x, sel, w, rw if ref_rw is None else ref_rw), tol


def _sel(*shape: int, n: int) -> torch.Tensor:
    return torch.randint(0, n, shape)


def _nan_x():
    x = _with_nan(randn(5, 8), 2, 3)
    return _k_case(x, _sel(5, 2, n=3), randn(3, 8, 4))


def _inf_x():
    x = _with_nan(randn(5, 8), 1, 0, value=INF)
    x[3, 5] = -INF
    return _k_case(x, _sel(5, 2, n=3), randn(3, 8, 4))


def _nan_weight_one_expert():
    w = _with_nan(randn(3, 8, 4), 1, 2, 3)
    sel = torch.tensor([[0, 1], [2, 0], [1, 1], [2, 2]])
    out, expected, tol = _k_case(randn(4, 8), sel, w)
    assert not out[3].isnan().any()  # rows that never use expert 1 stay finite
    return out, expected, tol


def _inf_weight_reduced():
    w = _with_nan(randn(3, 4, 10), 2, 0, 1, value=INF)  # wide: the fused reduction op
    return _k_case(randn(4, 4), _sel(4, 2, n=3), w, torch.rand(4, 2))


def _nan_reduction_weight():
    rw = _with_nan(torch.rand(4, 2), 1, 0)
    return _k_case(randn(4, 8), _sel(4, 2, n=3), randn(3, 8, 4), rw)


def _inf_reduction_weight_narrow():
    rw = _with_nan(torch.rand(4, 3), 2, 1, value=-INF)  # narrow: the bmm reduction
    return _k_case(randn(4, 8), _sel(4, 3, n=3), randn(3, 8, 4), rw)


def _raw(x, sel, w, backend="reference", tol=2e-5):
    return cvmm(x, sel, w, backend=backend), ref_1(x, sel, w), tol


RESULTS = [
    # NaN / Inf propagate as in float64
    pytest.param(_nan_x, id="nan-in-x"),
    pytest.param(_inf_x, id="inf-in-x"),
    pytest.param(_nan_weight_one_expert, id="nan-in-one-expert"),
    pytest.param(_inf_weight_reduced, id="inf-in-weights-fused-reduction"),
    pytest.param(_nan_reduction_weight, id="nan-reduction-weight"),
    pytest.param(_inf_reduction_weight_narrow, id="neg-inf-reduction-weight"),
    # non-contiguous, transposed, expanded
    pytest.param(
        lambda: _k_case(randn(5, 16)[:, ::2], _sel(5, 2, n=3), randn(3, 8, 4)), id="x-strided"
    ),
    pytest.param(
        lambda: _k_case(randn(8, 5).t(), _sel(5, 2, n=3), randn(3, 8, 4)), id="x-transposed"
    ),
    pytest.param(
        lambda: _k_case(randn(8, 3, 2).permute(1, 2, 0), _sel(3, 2, 2, n=3), randn(3, 8, 4)),
        id="x-permuted-3d",
    ),
    pytest.param(
        lambda: _k_case(randn(1, 8).expand(5, 8), _sel(5, 2, n=3), randn(3, 8, 4)), id="x-expanded"
    ),
    pytest.param(
        lambda: _k_case(randn(5, 8), _sel(5, 2, n=3), randn(3, 4, 8).transpose(1, 2)),
        id="w-transposed",
    ),
    pytest.param(
        lambda: _k_case(randn(5, 8), _sel(5, 2, n=3), randn(3, 8, 8)[:, :, ::2]), id="w-strided"
    ),
    pytest.param(
        lambda: _k_case(randn(5, 8), _sel(5, 2, n=3), randn(1, 8, 4).expand(3, 8, 4)),
        id="w-expanded",
    ),
    pytest.param(
        lambda: _k_case(
            randn(8, 5).t(), _sel(5, 3, n=4), randn(4, 4, 8).transpose(1, 2), torch.rand(5, 3)
        ),
        id="both-transposed-reduced-narrow",
    ),
    pytest.param(
        lambda: _k_case(
            randn(4, 5).t(), _sel(5, 2, n=3), randn(3, 16, 4).transpose(1, 2), torch.rand(2, 5).t()
        ),
        id="both-transposed-reduced-wide",
    ),
    # empty tensors
    pytest.param(lambda: _k_case(randn(0, 8), _sel(0, 2, n=3), randn(3, 8, 4)), id="zero-rows"),
    pytest.param(
        lambda: _k_case(randn(0, 8), _sel(0, 2, n=3), randn(3, 8, 4), torch.rand(0, 2)),
        id="zero-rows-reduced",
    ),
    pytest.param(
        lambda: _k_case(randn(0, 8), _sel(0, 2, n=1), randn(0, 8, 4)), id="zero-experts-zero-rows"
    ),
    pytest.param(lambda: _k_case(randn(4, 8), _sel(4, 0, n=3), randn(3, 8, 4)), id="k0"),
    pytest.param(
        lambda: _k_case(randn(4, 8), _sel(4, 0, n=3), randn(3, 8, 4), torch.rand(4, 0)),
        id="k0-reduced",
    ),
    pytest.param(lambda: _k_case(randn(4, 8), _sel(4, 1, n=3), randn(3, 8, 0)), id="d_out-zero"),
    pytest.param(
        lambda: _raw(randn(0, 8), torch.zeros(0, dtype=L), randn(2, 8, 3)), id="raw-zero-rows"
    ),
    # ranks
    pytest.param(lambda: _raw(randn(8), torch.tensor([1]), randn(2, 8, 3)), id="x-rank1"),
    pytest.param(lambda: _k_case(randn(2, 3, 8), _sel(2, 3, 2, n=4), randn(4, 8, 5)), id="x-rank3"),
    pytest.param(lambda: _raw(randn(2, 3, 8), _sel(2, 3, n=4), randn(4, 8, 5)), id="raw-rank2-sel"),
    # small index dtypes: accepted while the dtype can count the matrices
    pytest.param(
        lambda: _k_case(
            randn(6, 4),
            torch.tensor([[0, 199], [254, 3], [7, 7], [128, 129], [1, 0], [5, 254]]),
            randn(255, 4, 3),
            sel_dtype=torch.uint8,
        ),
        id="uint8-255-experts",
    ),
    pytest.param(
        lambda: _k_case(randn(5, 4), _sel(5, 2, n=127), randn(127, 4, 3), sel_dtype=torch.int8),
        id="int8-127-experts",
    ),
    pytest.param(
        lambda: _k_case(randn(5, 4), _sel(5, 2, n=300), randn(300, 4, 3), sel_dtype=torch.int16),
        id="int16",
    ),
    pytest.param(
        lambda: _raw(randn(5, 4), _sel(5, n=3).to(torch.uint8), randn(3, 4, 3)), id="uint8-raw"
    ),
    pytest.param(
        lambda: (lambda x, s, w: (cvmm(x, s, w), ref_fields(x, s, w), 2e-5))(
            randn(4, 8), _hand_made(torch.int32), randn(3, 8, 2)
        ),
        id="hand-made-int32-rows",
    ),
    pytest.param(
        lambda: (lambda x, s, w: (cvmm(x, s, w), ref_fields(x, s, w), 2e-5))(
            randn(4, 8),
            _hand_made(with_out_index=False, sel=torch.tensor([0, 0, 1, 2], dtype=torch.int8)),
            randn(3, 8, 2),
        ),
        id="hand-made-int8-sel",
    ),
    # dtypes that every path handles
    pytest.param(
        lambda: _k_case(
            randn(5, 8, dtype=torch.float64),
            _sel(5, 2, n=3),
            randn(3, 8, 4, dtype=torch.float64),
            tol=1e-12,
        ),
        id="float64",
    ),
    pytest.param(
        lambda: _k_case(
            randn(5, 8, dtype=torch.float16),
            _sel(5, 2, n=3),
            randn(3, 8, 4, dtype=torch.float16),
            tol=1e-2,
        ),
        id="float16",
    ),
    pytest.param(
        lambda: _k_case(
            randn(5, 8, dtype=torch.bfloat16),
            _sel(5, 2, n=3),
            randn(3, 8, 4, dtype=torch.bfloat16),
            tol=3e-2,
        ),
        id="bfloat16",
    ),
    pytest.param(
        lambda: _k_case(
            randn(4, 8), _sel(4, 2, n=3), randn(3, 8, 4), torch.rand(4, 2, dtype=torch.float64)
        ),
        id="float64-reduction-weight",
    ),
]


@pytest.mark.parametrize("case", RESULTS)
def test_matches_float64_reference(case):
    torch.manual_seed(0)
    out, expected, tol = case()
    assert out.shape == expected.shape
    assert out.device == expected.device
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol, equal_nan=True)


def test_dtype_mixes_are_fine_under_autocast():
    torch.manual_seed(0)
    x, w, sel = randn(4, 8), randn(3, 8, 4, dtype=torch.float64), _sel(4, 2, n=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = cvmm(x, cvmm_prepare_sel2(sel), w)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref_k(x, sel, w), rtol=3e-2, atol=3e-2)


# --------------------------------------------------------------------------------------------
# Backend dtype limits (no kernel runs here: the CUDA cases only ask the device's capability).
# --------------------------------------------------------------------------------------------

CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("dtype", "device", "backend", "capability", "match"),
    [
        pytest.param(torch.float64, CUDA, "triton", (9, 0), "not torch.float64", id="f64-triton"),
        pytest.param(torch.bfloat16, CPU, "triton", None, "interpreter", id="bf16-interpreter"),
        pytest.param(torch.bfloat16, CUDA, "triton", (7, 5), r"Ampere.*has 7\.5", id="bf16-turing"),
        pytest.param(torch.bfloat16, CUDA, "triton", (7, 0), r"Ampere.*has 7\.0", id="bf16-volta"),
        pytest.param(torch.bfloat16, CUDA, "triton", (8, 0), None, id="bf16-ampere-ok"),
        pytest.param(torch.float16, CUDA, "triton", (7, 0), None, id="f16-volta-ok"),
        pytest.param(torch.float32, CPU, "triton", None, None, id="f32-interpreter-ok"),
        pytest.param(torch.float64, CPU, "reference", None, None, id="f64-reference-ok"),
        pytest.param(torch.float64, CPU, None, None, None, id="no-backend-ok"),
    ],
)
def test_backend_dtype_limits(monkeypatch, dtype, device, backend, capability, match):
    if capability is not None:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if match is None:
        check_backend_dtype(dtype, device, backend)
    else:
        with pytest.raises(TypeError, match=match):
            check_backend_dtype(dtype, device, backend)


def test_bf16_under_the_interpreter_env_is_refused_even_on_cuda(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    with pytest.raises(TypeError, match="interpreter"):
        check_backend_dtype(torch.bfloat16, CUDA, "triton")


def test_backend_check_uses_the_autocast_dtype():
    x, w, sel = randn(4, 8), randn(2, 8, 3), _sel2([0], [1], [0], [1])
    assert check_cvmm_inputs(x, sel, w, backend="triton") == 1  # float32 is fine
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match="interpreter"):
        check_cvmm_inputs(x, sel, w, backend="triton")
    # Without a backend only what every path needs is checked (the default is unchanged).
    x64, w64 = x.double(), w.double()
    assert check_cvmm_inputs(x64, sel, w64) == check_cvmm_inputs(x64, sel, w64, backend="reference")


# --------------------------------------------------------------------------------------------
# The Triton kernels under TRITON_INTERPRET=1 (float32; bf16 and float64 must be refused).
# --------------------------------------------------------------------------------------------

INTERPRET = [
    pytest.param(
        lambda: _k_case(
            randn(8, 5).t(), _sel(5, 2, n=3), randn(3, 4, 8).transpose(1, 2), backend="triton"
        ),
        id="transposed",
    ),
    pytest.param(
        lambda: _k_case(
            _with_nan(randn(5, 8), 1, 2), _sel(5, 2, n=3), randn(3, 8, 4), backend="triton"
        ),
        id="nan",
    ),
    pytest.param(
        lambda: _k_case(
            randn(4, 4), _sel(4, 2, n=3), randn(3, 4, 20), torch.rand(4, 2), backend="triton"
        ),
        id="reduced-wide",
    ),
    pytest.param(
        lambda: _k_case(randn(4, 8), _sel(4, 0, n=3), randn(3, 8, 4), backend="triton"), id="k0"
    ),
    pytest.param(
        lambda: _k_case(randn(0, 8), _sel(0, 2, n=3), randn(3, 8, 4), backend="triton"),
        id="zero-rows",
    ),
    pytest.param(
        lambda: _k_case(
            randn(5, 4), _sel(5, 2, n=20), randn(20, 4, 3), sel_dtype=torch.uint8, backend="triton"
        ),
        id="uint8-sel",
    ),
]


@pytest.mark.interpret
@pytest.mark.parametrize("case", INTERPRET)
def test_triton_interpreter_matches_float64_reference(case):
    torch.manual_seed(0)
    out, expected, tol = case()
    assert out.shape == expected.shape
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol, equal_nan=True)


@pytest.mark.interpret
@pytest.mark.parametrize(
    ("dtype", "autocast", "match"),
    [
        pytest.param(torch.float64, False, "not torch.float64", id="float64"),
        pytest.param(torch.bfloat16, False, "interpreter", id="bfloat16"),
        pytest.param(torch.float32, True, "interpreter", id="autocast-bfloat16"),
    ],
)
def test_triton_interpreter_refuses_dtypes_it_cannot_multiply(dtype, autocast, match):
    x, w = randn(4, 8, dtype=dtype), randn(2, 8, 3, dtype=dtype)
    with (
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast),
        pytest.raises(TypeError, match=match),
    ):
        cvmm(x, _sel2([0], [1], [0], [1]), w, backend="triton")


@pytest.mark.gpu
def test_bf16_triton_refused_before_ampere(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    x, w = randn(4, 8, dtype=torch.bfloat16).cuda(), randn(2, 8, 3, dtype=torch.bfloat16).cuda()
    sel = cvmm_prepare_sel2(torch.tensor([[0], [1], [0], [1]], device="cuda"))
    with pytest.raises(TypeError, match="Ampere"):
        cvmm(x, sel, w, backend="triton")
    # float16 passes the check on any GPU. Nothing is launched while the capability is faked:
    # Triton would compile for it and keep that binary for the real device's later calls.
    check_backend_dtype(torch.float16, x.device, "triton")
