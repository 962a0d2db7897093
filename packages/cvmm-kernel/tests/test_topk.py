"""topk_indices against a stable-sort oracle: ties, -inf, NaN, widths, k, dtypes."""

from __future__ import annotations

import pytest
import torch
from cvmm_kernel import topk_indices

from testing_support import TRITON_CUDA, TRITON_INTERPRET

TRITON = [TRITON_INTERPRET, TRITON_CUDA]


def oracle(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Largest first, equal scores by lower index, NaN as +inf (a stable descending sort)."""
    key = torch.nan_to_num(scores.double(), nan=float("inf"))
    return torch.sort(-key, dim=-1, stable=True).indices[..., :k]


@pytest.mark.parametrize(("backend", "device"), TRITON)
@pytest.mark.parametrize(
    ("shape", "k"),
    [((64, 10), 2), ((37, 387), 16), ((3, 5, 40), 40), ((9, 1), 1), ((20, 600), 7)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_matches_stable_sort(backend, device, shape, k, dtype):
    g = torch.Generator().manual_seed(k)
    # few distinct values: many ties, which must go to the lower index
    scores = (torch.randint(0, 6, shape, generator=g) / 5).to(dtype).to(device)
    scores[..., ::7] = float("-inf")  # hidden experts (expert dropout)
    assert torch.equal(topk_indices(scores, k).cpu(), oracle(scores.cpu(), k))


@pytest.mark.parametrize(("backend", "device"), TRITON)
def test_distinct_scores_match_torch_topk(backend, device):
    scores = torch.rand(48, 387, generator=torch.Generator().manual_seed(0)).to(device)
    expected = scores.topk(16, dim=-1).indices
    assert torch.equal(topk_indices(scores, 16), expected)


@pytest.mark.parametrize(("backend", "device"), TRITON)
def test_nan_ranks_first_and_indices_stay_in_range(backend, device):
    scores = torch.full((4, 12), float("-inf"), device=device)
    scores[0, 5] = float("nan")
    scores[1] = float("nan")
    scores[2, 3] = 1.0
    got = topk_indices(scores, 3).cpu()
    assert got[0, 0] == 5 and got[2, 0] == 3
    assert torch.equal(got[1], torch.tensor([0, 1, 2]))
    assert torch.equal(got[3], torch.tensor([0, 1, 2]))  # all -inf: the lowest indices
    assert got.min() >= 0 and got.max() < 12


@pytest.mark.parametrize(("backend", "device"), TRITON)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_signed_zeros_tie_and_sigmoid_topk_agrees(backend, device, dtype):
    """Ties among signed zeros go to the lower index (-0.0 == +0.0), with -inf, NaN, a width
    and a k that are no powers of two; sigmoid_topk picks the same and gates them."""
    from cvmm_kernel import sigmoid_topk

    g = torch.Generator().manual_seed(3)
    scores = (torch.randint(-2, 1, (33, 45), generator=g) / 2).to(device, dtype)  # zeros win
    scores[::3, ::4] = -0.0
    scores[:, ::9] = float("-inf")
    scores[5, 7] = scores[6, 40] = float("nan")
    expected = oracle(scores.cpu(), 6)
    assert torch.equal(topk_indices(scores, 6).cpu(), expected)
    index, gate = sigmoid_topk(scores[:, None], 6, backend="triton")
    assert torch.equal(index.cpu().view(33, 6), expected)
    chosen = scores.cpu().gather(1, expected).float().sigmoid().to(dtype)
    torch.testing.assert_close(gate.cpu().view(33, 6), chosen, rtol=1e-6, atol=0, equal_nan=True)


@pytest.mark.parametrize(("backend", "device"), TRITON)
def test_strided_rows_and_empty(backend, device):
    wide = torch.rand(20, 392, generator=torch.Generator().manual_seed(1)).to(device)
    view = wide[:, :387]  # the padded selection logits' view in moeut
    assert torch.equal(topk_indices(view, 16).cpu(), oracle(view.cpu(), 16))
    assert topk_indices(wide[:0], 4).shape == (0, 4)
    assert topk_indices(wide, 0).shape == (20, 0)


def test_cpu_falls_back_to_torch_topk():
    scores = torch.rand(8, 30, generator=torch.Generator().manual_seed(2))
    assert torch.equal(topk_indices(scores, 5), scores.topk(5, dim=-1).indices)


@pytest.mark.parametrize(
    ("scores", "k", "error"),
    [
        (torch.zeros(3, 4, dtype=torch.long), 1, TypeError),
        (torch.zeros(3, 4), 5, ValueError),
        (torch.zeros(3, 4), -1, ValueError),
        (torch.zeros(()), 0, ValueError),
    ],
)
def test_bad_inputs(scores, k, error):
    with pytest.raises(error):
        topk_indices(scores, k)


@pytest.mark.gpu
def test_compiled_matches_eager_at_router_scale():
    """Compiled, the op's kernel is launched from the compiled graph itself (a triton_op,
    ``cvmm_kernel.traced_ops``) between Inductor's own kernels: the same indices as eagerly at
    MoEUT-244M's router shape (8192 rows of 387, k = 16) and at SwitchHead's (rows of 10, k = 2)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    scores = torch.randn(8192, 387, device="cuda", generator=g)
    heads = torch.randn(8, 1024, 4, 10, device="cuda", generator=g)

    def choose(s, h):
        return topk_indices(s.sigmoid(), 16), topk_indices(h * 2, 2), topk_indices(-s, 3)

    eager = choose(scores, heads)
    compiled = torch.compile(choose, fullgraph=True)(scores, heads)
    for mine, want in zip(compiled, eager):
        assert torch.equal(mine, want)
