"""Shared test setup: offline hub, one torch thread per test process (no oversubscription)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

torch.set_num_threads(1)
