"""Suite-wide settings.

Under pytest-xdist each worker shares the machine's cores with the others (CI: 2 workers on 2 cores);
torch's default of one OpenMP thread per core would oversubscribe them, and spinning OpenMP barriers
on a descheduled thread slow tiny matmuls by up to 10×. One intra-op thread per worker.
Modules of tiny models opt in to one thread in serial runs too with
`pytestmark = pytest.mark.usefixtures("one_torch_thread")` (PPO's rollouts measured 40× slower with two).
"""

import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module's tests, restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
