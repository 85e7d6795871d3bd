"""Building blocks of the heads: projection, classifier pieces, and the mechanisms the methods share."""
from __future__ import annotations

import torch
from torch import nn


class Projection(nn.Module):
    """``P_m(x) = ReLU(W_m x + b_m)``: maps a cached feature to the head's hidden width."""

    def __init__(self, dim_in: int, hidden: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.linear(x))
