"""Over-parameterized layers under DistributedDataParallel (gloo, two CPU processes): training on
halves of the global batch gives the factors of one process training on the whole batch."""

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from multiprocess import run_processes
from small_models import conv_mlp, conv_mlp_data


STEPS = 3


_model, _data = conv_mlp, conv_mlp_data


def _train(model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(STEPS):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _worker(rank: int, world: int, out_path: str) -> None:
    torch.set_num_threads(1)
    model = nn.parallel.DistributedDataParallel(_model())
    x, y = _data()
    shard = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
    _train(model, x[shard], y[shard])
    if rank == 0:
        torch.save(model.module.state_dict(), out_path)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_two_processes_equal_one_process(tmp_path):
    out_path = str(tmp_path / "ddp.pt")
    run_processes(_worker, 2, tmp_path, out_path)
    ddp_state = torch.load(out_path, weights_only=True)
    single = _model()
    _train(single, *_data())
    for name, value in single.state_dict().items():
        err = ((ddp_state[name] - value).norm() / value.norm()).item()
        assert err < 1e-12, f"{name}: relative difference {err:.2e} between DDP and one process"
