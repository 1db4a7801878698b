"""Worker for the 2-process gloo test of NoiseScaleMonitor (tests/test_noise_monitor.py).

Kept apart from the test module so that the spawned processes import only torch and danlu.
"""

import gc

import torch
import torch.distributed as dist
from torch import nn

from danlu.scaling import NoiseScaleMonitor


def linear_model(weight, bias):
    model = nn.Linear(weight.shape[1], 1)
    with torch.no_grad():
        model.weight.copy_(weight)
        model.bias.copy_(bias)
    return model


def mse(model, x, y):
    return (model(x).squeeze(-1) - y).square().mean()


def run(rank, world, init_file, out_dir, micro, local_passes, x, y, weight, bias):
    """DDP over ``world`` ranks, ``local_passes`` micro-batches of ``micro`` samples per rank
    (no_sync on all but the last, losses divided by local_passes); saves the estimate."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = nn.parallel.DistributedDataParallel(linear_model(weight, bias))
        monitor = NoiseScaleMonitor(model, micro_batch_size=micro)
        per_rank = local_passes * micro
        xs = x[rank * per_rank : (rank + 1) * per_rank].split(micro)
        ys = y[rank * per_rank : (rank + 1) * per_rank].split(micro)
        for i, (xb, yb) in enumerate(zip(xs, ys, strict=True)):
            loss = mse(model, xb, yb) / local_passes
            if i < local_passes - 1:
                with model.no_sync():
                    loss.backward()
            else:
                loss.backward()
        est = monitor.update()
        torch.save({"trace": est.trace_sigma, "g2": est.grad_sq_norm}, f"{out_dir}/{rank}.pt")
        # Every collective done, and DDP's reducer freed while the process group is still
        # registered: freeing it last (at the function's return) could deadlock in torch's
        # teardown (the reducer's destructor holds the GIL while joining a gloo thread that is
        # waiting for the GIL to free the all-gather's tensors).
        dist.barrier()
        del model, monitor, est
        gc.collect()
    finally:
        dist.destroy_process_group()
