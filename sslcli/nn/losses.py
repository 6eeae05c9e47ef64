"""Contrastive losses shared by the methods."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sslcli.nn import dist


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """NT-Xent (SimCLR): each of 2N views scores its partner against the 2N-2 others.

    "the final loss is computed across all positive pairs, both (i, j) and (j, i), in a
    mini-batch" (Chen et al. 2020, Alg. 1): the mean over the 2N anchors of
    ``-log(exp(sim(i,p)/t) / sum_{k != i} exp(sim(i,k)/t))``. The official code returns
    the sum of the two directions' means, i.e. twice this value; we follow the paper's
    1/2N average so the loss is comparable across batch sizes and with other methods.

    Negatives come from every process (gathered with gradient); anchors are the local rows.

    Precision: fp32 throughout, autocast off (the official code computes its logits in
    fp32). Under bf16 autocast the similarity matrix would be rounded to 8 significant
    bits before the division by τ = 0.1, about a 2 % error in the gradient.
    """
    with torch.autocast(device_type=z1.device.type, enabled=False):
        z1 = F.normalize(z1.float(), dim=1)
        z2 = F.normalize(z2.float(), dim=1)
        n = z1.shape[0]
        g1, g2 = dist.gather_with_grad(z1), dist.gather_with_grad(z2)
        keys = torch.cat([g1, g2], 0)  # [2NW, D]
        anchors = torch.cat([z1, z2], 0)  # [2N, D]
        logits = anchors @ keys.T / temperature
        total = g1.shape[0]
        offset = dist.rank() * n
        local = torch.arange(n, device=z1.device) + offset
        self_idx = torch.cat([local, local + total])
        partner = torch.cat([local + total, local])
        rows = torch.arange(2 * n, device=z1.device)
        logits[rows, self_idx] = float("-inf")
        return F.cross_entropy(logits, partner)
