"""DCNv2: a low-rank cross network over [dense MLP output, flattened embeddings], then a deep MLP."""

from __future__ import annotations

import torch
from torchrec.modules.crossnet import LowRankCrossNet
from torchrec.modules.mlp import MLP


class DCNv2Dense(torch.nn.Module):
    """The dense part of DCN-V2 (Wang et al. 2021), stacked form, from torchrec's modules.

    Args:
        num_dense: dense input width.
        num_sparse: F.
        embedding_dim: D.
        bottom_mlp: layer sizes applied to the dense features before crossing.
        top_mlp: deep layers after the cross net, ending in 1.
        cross_layers: number of cross layers.
        low_rank: rank of each cross layer's weight.
    """

    def __init__(
        self,
        num_dense: int,
        num_sparse: int,
        embedding_dim: int,
        bottom_mlp: list[int],
        top_mlp: list[int],
        cross_layers: int = 3,
        low_rank: int = 64,
    ) -> None:
        super().__init__()
        if top_mlp[-1] != 1:
            raise ValueError(f"top_mlp must end in 1 (a logit), got {top_mlp}")
        self.bottom = MLP(num_dense, bottom_mlp)
        width = bottom_mlp[-1] + num_sparse * embedding_dim
        self.cross = LowRankCrossNet(width, cross_layers, low_rank)
        self.deep = MLP(width, top_mlp[:-1]) if len(top_mlp) > 1 else torch.nn.Identity()
        self.head = torch.nn.Linear(top_mlp[-2] if len(top_mlp) > 1 else width, 1)

    def forward(self, dense: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """dense [B, num_dense], pooled [B, F, D] -> logits [B]."""
        x = torch.cat([self.bottom(dense), pooled.flatten(1)], dim=1)  # [B, d + F * D]
        return self.head(self.deep(self.cross(x))).squeeze(-1)  # [B]
