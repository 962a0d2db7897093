"""``autocast_off``: the same autocast state inside and after as ``torch.autocast(...,
enabled=False)``, eager and under torch.compile."""

import pytest
import torch
from cvmm_kernel.autocast_off import autocast_off


def _mm_dtype() -> torch.dtype:
    a = torch.ones(2, 2)
    return (a @ a).dtype


def test_off_inside_autocast_and_restored_after():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _mm_dtype() == torch.bfloat16
        with autocast_off("cpu"):
            assert not torch.is_autocast_enabled("cpu")
            assert _mm_dtype() == torch.float32
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert _mm_dtype() == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")


def test_outside_autocast_it_changes_nothing():
    with autocast_off("cpu"):
        assert not torch.is_autocast_enabled("cpu")
        assert _mm_dtype() == torch.float32
    assert not torch.is_autocast_enabled("cpu")


def test_restored_when_the_body_raises():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(RuntimeError, match="inside"), autocast_off("cpu"):
            raise RuntimeError("inside")
        assert torch.is_autocast_enabled("cpu")


def test_other_device_types_keep_their_state():
    with torch.autocast("cpu", dtype=torch.bfloat16), autocast_off("cuda"):
        assert torch.is_autocast_enabled("cpu")
        assert _mm_dtype() == torch.bfloat16


def test_compiled_fullgraph_matches_eager():
    def f(a):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = a @ a
            with autocast_off("cpu"):
                full = a @ a
        return low, full

    a = torch.randn(4, 4)
    low, full = torch.compile(f, fullgraph=True, backend="aot_eager")(a)
    assert low.dtype == torch.bfloat16 and full.dtype == torch.float32
    torch.testing.assert_close(full, a @ a)
