"""Streaming, numerically stable moments (count, mean, variance, skewness, kurtosis), max |x| and
the fraction of outliers beyond 6 sigma.

Batches are reduced in float64 and merged with the pairwise update of Chan et al. / Pébay (central
moments ``M2, M3, M4`` are combined exactly, no raw power sums), so statistics over a stream equal
those of the concatenated data up to rounding.

Outliers: an element of a batch counts as an outlier when ``|x - mean| > 6 * std`` with the mean and
standard deviation of everything seen up to and including that batch (for a single batch these
are that batch's own statistics).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

OUTLIER_SIGMAS = 6.0


@dataclass
class RunningMoments:
    """Moments of every element seen by :meth:`update` (population statistics, excess kurtosis)."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0
    m3: float = 0.0
    m4: float = 0.0
    max_abs: float = 0.0
    outliers: int = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Add all elements of ``x`` (any shape, any float dtype)."""
        x = x.detach().reshape(-1).to(torch.float64)
        n_b = x.numel()
        if n_b == 0:
            return
        mean_t = x.mean()
        d = x - mean_t
        d2 = d * d
        m2_b, m3_b, m4_b = (t.item() for t in (d2.sum(), (d2 * d).sum(), (d2 * d2).sum()))
        mean_b, max_b = mean_t.item(), x.abs().max().item()
        n_a, n = self.count, self.count + n_b
        delta = mean_b - self.mean
        m2_a, m3_a, m4_a = self.m2, self.m3, self.m4
        self.m4 = (
            m4_a
            + m4_b
            + delta**4 * n_a * n_b * (n_a * n_a - n_a * n_b + n_b * n_b) / n**3
            + 6 * delta**2 * (n_a * n_a * m2_b + n_b * n_b * m2_a) / n**2
            + 4 * delta * (n_a * m3_b - n_b * m3_a) / n
        )
        self.m3 = (
            m3_a
            + m3_b
            + delta**3 * n_a * n_b * (n_a - n_b) / n**2
            + 3 * delta * (n_a * m2_b - n_b * m2_a) / n
        )
        self.m2 = m2_a + m2_b + delta**2 * n_a * n_b / n
        self.mean += delta * n_b / n
        self.count = n
        self.max_abs = max(self.max_abs, max_b)
        std = math.sqrt(self.variance)
        if std > 0:
            self.outliers += int(((x - self.mean).abs() > OUTLIER_SIGMAS * std).sum().item())

    @property
    def variance(self) -> float:
        return self.m2 / self.count if self.count else math.nan

    @property
    def skewness(self) -> float:
        if not self.count or self.m2 == 0:
            return math.nan
        return math.sqrt(self.count) * self.m3 / self.m2**1.5

    @property
    def kurtosis(self) -> float:
        """Excess kurtosis (0 for a normal distribution)."""
        if not self.count or self.m2 == 0:
            return math.nan
        return self.count * self.m4 / (self.m2 * self.m2) - 3.0

    @property
    def outlier_fraction(self) -> float:
        return self.outliers / self.count if self.count else math.nan

    def as_dict(self) -> dict[str, Any]:
        """The statistics (and the raw moments, so that a loaded result can be merged again)."""
        return {
            "count": self.count,
            "mean": self.mean,
            "variance": self.variance,
            "skewness": self.skewness,
            "kurtosis": self.kurtosis,
            "max_abs": self.max_abs,
            "outlier_fraction": self.outlier_fraction,
            "raw": asdict(self),
        }


def tensor_statistics(x: torch.Tensor) -> dict[str, Any]:
    """The statistics of all elements of one tensor (e.g. a weight)."""
    moments = RunningMoments()
    moments.update(x)
    return moments.as_dict()
