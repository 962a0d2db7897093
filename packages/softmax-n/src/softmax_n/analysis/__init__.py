"""Statistics of activations and weights (outliers, kurtosis) to study softmax_n's effect."""

from .hooks import ActivationStatistics, compute_weight_statistics, register_activation_hooks
from .io import load_results, save_results
from .moments import OUTLIER_SIGMAS, RunningMoments, tensor_statistics
from .plot import plot_statistics

__all__ = [
    "OUTLIER_SIGMAS",
    "ActivationStatistics",
    "RunningMoments",
    "compute_weight_statistics",
    "load_results",
    "plot_statistics",
    "register_activation_hooks",
    "save_results",
    "tensor_statistics",
]
