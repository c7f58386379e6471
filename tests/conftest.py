"""Shared test set-up."""

import torch

# Tests use small tensors: one intra-op thread avoids the thread-pool overhead (and the
# oversubscription on shared 2-core machines) that would otherwise dominate their run time.
torch.set_num_threads(1)
