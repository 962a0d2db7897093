"""The host-side grid arithmetic equals Triton's own (which costs ~3 us per host call)."""

from __future__ import annotations

import pytest
from cvmm_kernel.host_math import cdiv, next_power_of_2

triton = pytest.importorskip("triton")


def test_cdiv_and_next_power_of_2_match_triton():
    for a in [*range(0, 300), 4095, 4096, 4097, 131072, 131073, 2**31 + 5]:
        assert next_power_of_2(a) == triton.next_power_of_2(a), a
        for b in (1, 2, 3, 16, 64, 128, 387):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)
