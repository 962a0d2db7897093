"""Integer arithmetic for launch grids and block sizes, on the host.

``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr functions from Triton 3.5 on (usable
inside kernels too), and a host call costs about 3 us, which adds up over the dozens of calls of
an eager MoE layer; these are the plain Python versions.
"""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints, ``b > 0``."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ``>= n`` for ``n >= 1`` (0 for 0, as Triton's)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0
