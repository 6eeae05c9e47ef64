"""The k nearest rows of a reference set by cosine similarity, computed in blocks.

The same blocked similarity as the kNN evaluator (:data:`sslcli.eval.knn.SIM_BLOCK`
elements per query-by-reference block), with the references blocked as well: a block of
queries meets one block of references at a time and keeps a running top-k, so neither
``N_query x N_ref`` similarities nor the whole reference set need to be in memory. The
inputs may be numpy memory maps (``ssl embed`` streams its embeddings to one) or tensors.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from sslcli.errors import SSLError
from sslcli.eval.knn import SIM_BLOCK


def _rows(a: Any, start: int, stop: int, device: torch.device | None) -> Tensor:
    """Rows ``start:stop`` of an array or tensor as L2-normalised float32 on ``device``."""
    block = a[start:stop]
    t = block if isinstance(block, Tensor) else torch.from_numpy(np.ascontiguousarray(block))
    return F.normalize(t.to(device).float(), dim=1)


@torch.no_grad()
def nearest(
    queries: Any,
    references: Any,
    k: int,
    *,
    exclude_self: bool = False,
    self_rows: Any = None,
    device: torch.device | None = None,
    block: int = SIM_BLOCK,
    out: tuple[Any, Any] | None = None,
) -> tuple[Any, Any]:
    """Indices [Nq, k] (int64) and cosine similarities [Nq, k] (float32) of each query's
    ``k`` most similar references, most similar first.

    ``exclude_self`` says that ``queries`` *are* ``references`` (same rows, same order):
    row ``i`` is then never its own neighbour, so a set searched against itself finds the
    other images (duplicates of an image still come first, with similarity 1).
    ``self_rows`` generalises this to queries taken from the references: query ``i`` is
    reference row ``self_rows[i]`` and never its own neighbour.
    ``out`` is a pair of preallocated arrays to fill (e.g. memory maps); else numpy arrays
    are returned.
    """
    nq, nr = len(queries), len(references)
    if exclude_self:
        self_rows = np.arange(nq)
    skip = None if self_rows is None else torch.as_tensor(np.asarray(self_rows), dtype=torch.int64)
    avail = nr - 1 if skip is not None else nr
    if k < 1:
        raise SSLError(f"the number of neighbours must be >= 1, got {k}")
    if k > avail:
        raise SSLError(
            f"{k} neighbours asked for, but only {avail} other images exist; use a smaller K"
        )
    # References are blocked too, so a reference set larger than memory (a memory map) is
    # read a block at a time: at most block/16 rows, and block/2 elements of them.
    dim = int(queries.shape[1])
    chunk_r = max(1, min(nr, block // 16, block // (2 * max(1, dim))))
    chunk_q = max(1, min(nq, 1024, block // chunk_r))
    idx_out, sim_out = out if out is not None else (
        np.empty((nq, k), dtype=np.int64), np.empty((nq, k), dtype=np.float32)
    )
    for qs in range(0, nq, chunk_q):
        qe = min(nq, qs + chunk_q)
        q = _rows(queries, qs, qe, device)
        best_s = torch.empty((qe - qs, 0), device=q.device)
        best_i = torch.empty((qe - qs, 0), dtype=torch.int64, device=q.device)
        for rs in range(0, nr, chunk_r):
            re = min(nr, rs + chunk_r)
            s = q @ _rows(references, rs, re, device).T
            cols = torch.arange(rs, re, device=q.device)
            if skip is not None:
                own = skip[qs:qe].to(q.device)
                s.masked_fill_(own[:, None] == cols[None, :], float("-inf"))
            cand_s = torch.cat([best_s, s], dim=1)
            cand_i = torch.cat([best_i, cols.expand(qe - qs, -1)], dim=1)
            kk = min(k, cand_s.shape[1])
            best_s, pos = cand_s.topk(kk, dim=1)
            best_i = cand_i.gather(1, pos)
        idx_out[qs:qe] = best_i.cpu().numpy()
        sim_out[qs:qe] = best_s.float().cpu().numpy()
    return idx_out, sim_out
