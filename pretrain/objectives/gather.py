"""The one collective in the math: gather features from every rank, uneven per-rank sizes allowed.

The local slice keeps its autograd graph, and remote slices carry gradients back to the ranks that own them
(``torch.distributed.nn.functional.all_gather``), so with each rank's loss scaled to ``world_size x (its share of
the global mean)``, DeepSpeed's gradient averaging yields exactly the gradient of the single-process loss over the
global batch. At world size 1 everything here is the identity.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    group: object = None

    def all_sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum of a (non-differentiable) tensor over ranks."""
        if self.world_size == 1:
            return value
        import torch.distributed as dist

        value = value.clone()
        dist.all_reduce(value, group=self.group)
        return value


def rows_per_rank(counts: list[int], ctx: DistContext, device=None) -> list[list[int]]:
    """Every rank's ``counts`` (one entry per tensor about to be gathered), in one collective:
    ``[rank][i]``. Passing a column of it to ``gather_rows`` saves that call its own size exchange."""
    if ctx.world_size == 1:
        return [list(counts)]
    import torch.distributed as dist

    mine = torch.tensor(counts, dtype=torch.long, device=device)
    every = [torch.zeros_like(mine) for _ in range(ctx.world_size)]
    dist.all_gather(every, mine, group=ctx.group)
    return [row.tolist() for row in every]


def gather_rows(x: torch.Tensor, ctx: DistContext, sizes: list[int] | None = None) -> tuple[torch.Tensor, int]:
    """``[n_rank, ...]`` on each rank → (``[sum n, ...]`` in rank order, offset of this rank's rows).
    ``sizes``: every rank's row count, if already known (``rows_per_rank``); else exchanged here."""
    if ctx.world_size == 1:
        return x, 0
    import torch.distributed.nn.functional as dist_nn

    if sizes is None:
        sizes = [row[0] for row in rows_per_rank([x.shape[0]], ctx, x.device)]
    longest = max(sizes)
    padded = torch.cat([x, x.new_zeros(longest - x.shape[0], *x.shape[1:])]) if x.shape[0] < longest else x
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        parts = dist_nn.all_gather(padded, group=ctx.group)
    gathered = torch.cat([part[:n] for part, n in zip(parts, sizes)])
    return gathered, sum(sizes[: ctx.rank])
