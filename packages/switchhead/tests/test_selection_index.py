"""``record_selection_index``: the experts a training forward chose, as the layer itself chose
them (both expert paths, expert dropout included), and nothing in eval mode or by default."""

from __future__ import annotations

import pytest
import torch
from switchhead import SwitchHeadRope


def oracle(logits: torch.Tensor, k: int, e: int) -> torch.Tensor:
    """Stable descending sort of the logits per head, first k, as ``head * E + expert``."""
    index = torch.sort(-logits.detach(), dim=-1, stable=True).indices[..., :k]
    return index + torch.arange(0, logits.shape[-2] * e, e)[:, None]


@pytest.mark.parametrize("expert_impl", ["dense", "cvmm"])
@pytest.mark.parametrize(("n_experts", "moe_k"), [(5, 2), (3, 3)])
def test_recorded_choice_is_the_layers_own(expert_impl, n_experts, moe_k):
    torch.manual_seed(0)
    m = SwitchHeadRope(32, 2, n_experts, d_head=8, moe_k=moe_k, expert_impl=expert_impl).train()
    x = torch.randn(2, 7, 32)
    assert m.last_selection_index is None
    m(x, x, x)
    assert m.last_selection_index is None  # off by default
    m.record_selection_index = m.record_selection_logits = True
    m(x, x, x)
    chosen, logits = m.last_selection_index, m.last_selection_logits
    assert set(chosen) == {"v", "o"}
    for key in ("v", "o"):
        assert chosen[key].dtype == torch.int64 and chosen[key].shape == (2, 7, 2, moe_k)
        want = oracle(logits[key], moe_k, n_experts)
        if moe_k < n_experts:  # in rank order
            assert torch.equal(chosen[key], want), key
        else:  # every expert (in index order)
            assert torch.equal(chosen[key], want.sort(-1).values), key
    m.eval()
    m(x, x, x)
    assert m.last_selection_index is None  # training forwards only


@pytest.mark.parametrize("expert_impl", ["dense", "cvmm"])
def test_expert_dropout_choice_is_recorded(expert_impl):
    """With expert dropout the recorded experts are the ones the forward used: the layer's
    output with every other value expert zeroed is unchanged."""
    torch.manual_seed(1)
    m = SwitchHeadRope(32, 2, 6, d_head=8, moe_k=2, expert_impl=expert_impl, expert_dropout=0.5)
    m.train().record_selection_index = True
    x = torch.randn(1, 9, 32)
    torch.manual_seed(2)
    out = m(x, x, x)[0]
    chosen = m.last_selection_index
    used = torch.zeros(2 * 6, dtype=torch.bool)
    used[chosen["v"].flatten()] = True
    used[chosen["o"].flatten()] = True
    assert 0 < int(used.sum()) <= 12
    with torch.no_grad():
        m.v.data[~used] = 0  # experts no token chose
        m.o.data[~used] = 0
    torch.manual_seed(2)
    torch.testing.assert_close(m(x, x, x)[0], out)
