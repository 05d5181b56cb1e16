"""Shared settings for the models tests: single-threaded torch (the CI machine is shared)."""

import torch

torch.set_num_threads(1)
