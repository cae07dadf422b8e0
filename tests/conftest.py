import os
from pathlib import Path

import pytest
import torch

# torch's thread count changes how reductions are split, hence the last bits of sums: the suite
# must pass at any count, so OMP_NUM_THREADS (set by .ci/test's numerics matrix) is respected;
# unset, at most 2 threads as on the CI machine
if not os.environ.get("OMP_NUM_THREADS"):
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

DTYPES = [torch.float32, torch.float64]
SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def tolerances(dtype):
    """(rtol, atol) used to compare against references."""
    return (1e-5, 1e-6) if dtype == torch.float32 else (1e-10, 1e-12)


@pytest.fixture(params=DTYPES, ids=["float32", "float64"])
def dtype(request):
    return request.param


@pytest.fixture
def shared_dir():
    """../shared beside the repository; tests that need it skip cleanly when it is absent."""
    if not SHARED.is_dir():
        pytest.skip("../shared is not present beside the repository")
    return SHARED
