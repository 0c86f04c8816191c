import os
import sys
from pathlib import Path

# pytest runs with --import-mode=importlib, which does not put tests/ on sys.path; make `import helpers` work.
_TESTS = str(Path(__file__).parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

# Without a GPU, Triton kernels (ours, and optimi's, which it picks whenever Triton is installed) run in Triton's
# interpreter on the CPU; without it they fail to find a GPU driver. Set before any kernel is defined: Triton reads
# it when a function is decorated with @triton.jit.
if "TRITON_INTERPRET" not in os.environ:
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    except ImportError:  # pragma: no cover
        pass


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Every test starts from the same random state: torch seeds each process from the OS (torch 2.13's
    ``initial_seed`` differs from run to run), so a test that builds a model without seeding would otherwise see
    other weights at every run, and an assertion that holds for most weights would fail at random."""
    import torch

    torch.manual_seed(0)
