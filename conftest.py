"""Suite-wide settings.

Under pytest-xdist each worker shares the machine's cores with the others (CI: 2 workers on 2 cores);
torch's default of one OpenMP thread per core would oversubscribe them, and spinning OpenMP barriers
on a descheduled thread slow tiny matmuls by up to 10×. One intra-op thread per worker.
"""

import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
