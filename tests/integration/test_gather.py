"""Gathering across ranks is part of the loss math: 2 gloo ranks with uneven batches give exactly the loss and the
gradients of 1 rank holding the whole batch."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from pretrain.objectives.contrastive import clip_loss, siglip_loss
from pretrain.objectives.gather import DistContext
from pretrain.objectives.masked import _global_mean, _token_loss

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
SPLIT = (3, 5)  # uneven per-rank batch sizes


def problem():
    torch.manual_seed(0)
    projection_a, projection_b = torch.nn.Linear(6, 4), torch.nn.Linear(6, 4)
    inputs_a, inputs_b = torch.randn(sum(SPLIT), 6), torch.randn(sum(SPLIT), 6)
    return projection_a, projection_b, inputs_a, inputs_b


def loss_and_grads(kind, rank, ctx, rows):
    projection_a, projection_b, inputs_a, inputs_b = problem()
    a = F.normalize(projection_a(inputs_a[rows]), dim=-1)
    b = F.normalize(projection_b(inputs_b[rows]), dim=-1)
    scale = torch.tensor(5.0)
    # The masked objectives' means over the global count of predicted items: here a sample predicts as many items
    # as its index modulo 5 says (0-4), so the ranks hold 3 and 10 of them.
    selected = (torch.arange(4).expand(sum(SPLIT), 4) < torch.arange(sum(SPLIT)).unsqueeze(1) % 5)[rows]
    if kind == "clip":
        loss = clip_loss(a, b, scale, ctx)
    elif kind == "siglip":
        loss = siglip_loss(a, b, scale, torch.tensor(-2.0), ctx)
    elif kind == "tokens":  # masked text: cross-entropy at the selected positions, a vocabulary of 4
        hidden = torch.cat([projection_a(inputs_a[rows]), inputs_b[rows, :2]], dim=-1).unsqueeze(1).expand(-1, 4, -1)
        targets = torch.arange(4).expand(hidden.shape[0], 4)
        loss = _token_loss(projection_b, hidden, targets, selected, ctx)
    else:  # masked patches: squared error on the masked patches
        error = ((projection_a(inputs_a[rows]) - projection_b(inputs_b[rows])) ** 2)
        loss = _global_mean((error * selected).sum(), int(selected.sum()), ctx, error.device)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in (*projection_a.parameters(), *projection_b.parameters())])
    return loss.detach(), grads


KINDS = ("clip", "siglip", "tokens", "patches")


def worker(rank, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    start = sum(SPLIT[:rank])
    for kind in KINDS:
        loss, grads = loss_and_grads(kind, rank, DistContext(rank, 2), slice(start, start + SPLIT[rank]))
        dist.all_reduce(grads)  # what DeepSpeed does with gradients: average over ranks
        results[(kind, rank)] = (loss.item(), (grads / 2).tolist())
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.get_context("spawn").Manager().dict()
    mp.start_processes(worker, args=(port, results), nprocs=2, start_method="spawn")
    return dict(results)


@pytest.mark.parametrize("kind", KINDS)
def test_two_ranks_equal_one_rank(kind, two_rank_results):
    single_loss, single_grads = loss_and_grads(kind, 0, DistContext(), slice(0, sum(SPLIT)))
    losses = [two_rank_results[(kind, r)][0] for r in range(2)]
    # Each rank's loss is world_size x its share of the global mean: their average is the global loss.
    assert sum(losses) / 2 == pytest.approx(single_loss.item(), rel=1e-5)
    for r in range(2):
        assert torch.allclose(torch.tensor(two_rank_results[(kind, r)][1]), single_grads, atol=1e-6)
