"""Main demo of the workspace (placeholder until the end-to-end demo issue lands).

For now it checks that the five packages import and prints their versions.
"""

from __future__ import annotations

import importlib

PACKAGES = ["cvmm_kernel", "switchhead", "moeut", "colt5_routing", "softmax_n"]


def main() -> None:
    import torch

    print(f"torch {torch.__version__} (CUDA available: {torch.cuda.is_available()})")
    for name in PACKAGES:
        module = importlib.import_module(name)
        print(f"{name} {module.__version__}")


if __name__ == "__main__":
    main()
