"""The 2-process (gloo, CPU) half of tests/test_distributed.py.

One process group runs every scenario (process start-up costs seconds); each rank saves what
it saw to ``rank{r}.pt`` and the test process compares it with single-process references
built from the same cases (tests/distributed_cases.py). Kept apart from the test module so
that the spawned processes import only torch, danlu and the cases.
"""

from __future__ import annotations

import datetime
import os
import warnings

import distributed_cases as C
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

import danlu
from danlu.distributed import (
    agree,
    any_over_shards,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

LAYOUTS = ("fsdp_rows", "fsdp_cols", "ddp")
TRAIN_STEPS = 4
DCP_STEPS = 2


def shard_columns(p: torch.Tensor):
    """FSDP2 placement that splits matrices along their second axis (rows stay whole only on
    one rank per column block): every row statistic then needs a collective."""
    return Shard(1) if p.dim() == 2 and p.shape[1] % C.WORLD == 0 else Shard(0)


def distribute(model: nn.Module, layout: str, mesh) -> nn.Module:
    if layout == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    if layout == "fsdp_rows":  # FSDP2's defaults: its own mesh per call, Shard(0)
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    for block in model.blocks:
        fully_shard(block, mesh=mesh, shard_placement_fn=shard_columns)
    fully_shard(model, mesh=mesh, shard_placement_fn=shard_columns)
    return model


def local_data(rank: int, steps: int) -> list[torch.Tensor]:
    return [C.shard(batch, rank) for batch in C.batches(steps)]


def run(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=180),
    )
    try:
        mesh = init_device_mesh("cpu", (world,))
        results: dict = {}
        for scenario in (
            training,
            accumulation,
            nonfinite,
            lazy_rows,
            helpers,
            lora_pro,
            checkpoints,
        ):
            scenario(results, rank, mesh, out_dir)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


# -- every optimizer, FSDP2 (two placements) and DDP -------------------------------------------


def training(results: dict, rank: int, mesh, out_dir: str) -> None:
    for layout in LAYOUTS:
        for name in C.OPTIMIZERS:
            model = distribute(C.make_model(), layout, mesh)
            opt = C.make_optimizer(name, model)
            C.train(model, opt, local_data(rank, TRAIN_STEPS))
            results[f"train/{layout}/{name}"] = C.parameters(model)
            if layout != "ddp":
                results[f"state/{layout}/{name}"] = {
                    (pname, key): (str(value.placements), tuple(value.shape), value.dtype)
                    for pname, p in model.named_parameters()
                    for key, value in opt.state[p].items()
                    if isinstance(value, DTensor)
                }


# -- accumulation --------------------------------------------------------------------------------


class AllReduceCounter:
    def __init__(self) -> None:
        self.calls = 0


def counting_hook(counter: AllReduceCounter, bucket):
    counter.calls += 1
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    return allreduce_hook(None, bucket)


def accumulation(results: dict, rank: int, mesh, out_dir: str) -> None:
    windows = 3
    # Tiger's accumulation inside the momentum, gradients synchronised on every micro-step.
    model = distribute(C.make_model(), "ddp", mesh)
    opt = C.make_optimizer("tiger", model, grad_accum_steps=2)
    C.train(model, opt, local_data(rank, windows), micro=2)
    results["accum/tiger_ddp"] = C.parameters(model)
    # GradientAccumulation with no_sync on the first micro-step of each window.
    for with_module in (True, False):
        model = distribute(C.make_model(), "ddp", mesh)
        counter = AllReduceCounter()
        model.register_comm_hook(counter, counting_hook)
        inner = C.make_optimizer("lion", model)
        opt = danlu.GradientAccumulation(inner, 2, module=model if with_module else None)
        C.train(model, opt, local_data(rank, windows), micro=2)
        key = "accum/lion_ddp" + ("_module" if with_module else "")
        results[key] = C.parameters(model)
        results[key + "/allreduces"] = counter.calls
    # The same under FSDP2 (set_requires_gradient_sync).
    model = distribute(C.make_model(), "fsdp_rows", mesh)
    opt = danlu.GradientAccumulation(C.make_optimizer("lion", model), 2, module=model)
    C.train(model, opt, local_data(rank, windows), micro=2)
    results["accum/lion_fsdp_module"] = C.parameters(model)


# -- a NaN on one rank ---------------------------------------------------------------------------

#: case → (layout, optimizer, overrides, guard kwargs, rank that sees the NaN, parameter,
#: index into that rank's slice, the same entry's index in the whole tensor, micro-step).
#: Row-sharded (33, 16) tensors: rank 0 holds rows 0-16, rank 1 rows 17-32; column-sharded
#: (33, 16) and (48, 16) ones: rank 1 holds columns 8-15.
NAN_CASES = {
    "tiger_tensor": ("fsdp_rows", "tiger", {}, None, 0, "blocks.0.fc1.weight", (0, 0), (0, 0), 1),
    "tiger_global": (
        "fsdp_rows",
        "tiger",
        {"nonfinite_scope": "global"},
        None,
        1,
        "embed.weight",
        (0, 0),
        (17, 0),
        1,
    ),
    "tiger_rows_split": ("fsdp_cols", "tiger", {}, None, 1, "head.weight", (3, 1), (3, 9), 1),
    "guard_shrink": (
        "fsdp_rows",
        "adamw",
        {},
        {"mode": "shrink"},
        1,
        "head.weight",
        (0, 0),
        (17, 0),
        1,
    ),
    "guard_skip_global": (
        "fsdp_cols",
        "lion",
        {},
        {"mode": "skip", "scope": "global"},
        0,
        "blocks.1.qkv.weight",
        (2, 2),
        (2, 2),
        2,
    ),
}


def nonfinite(results: dict, rank: int, mesh, out_dir: str) -> None:
    for case, spec in NAN_CASES.items():
        layout, name, overrides, guard, bad_rank, param, index, _, step = spec
        model = distribute(C.make_model(), layout, mesh)
        opt = C.make_optimizer(name, model, **overrides)
        if guard is not None:
            opt = danlu.NonFiniteGuard(opt, **guard)
        inject = C.nonfinite_at(param, index, step) if rank == bad_rank else None
        C.train(model, opt, local_data(rank, 3), after_backward=inject)
        results[f"nan/{case}"] = C.parameters(model)
        if guard is not None:
            results[f"nan/{case}/counters"] = (opt.skipped_steps, opt.skipped_tensors)
    # DDP: a NaN loss on one rank reaches every rank through the gradient all-reduce.
    model = distribute(C.make_model(), "ddp", mesh)
    opt = C.make_optimizer("tiger", model)
    C.train(
        model,
        opt,
        local_data(rank, 3),
        loss_factor=lambda step: float("nan") if step == 1 and rank == 1 else 1.0,
    )
    results["nan/tiger_ddp_loss"] = C.parameters(model)


# -- lazy rows -----------------------------------------------------------------------------------


def lazy_rows(results: dict, rank: int, mesh, out_dir: str) -> None:
    for layout in ("fsdp_rows", "fsdp_cols", "ddp"):
        model = distribute(C.make_model(), layout, mesh)
        inner = C.make_optimizer("tiger", model)
        opt = danlu.Lazy(inner, lazy_moments=True)
        C.train(model, opt, local_data(rank, 3))
        results[f"lazy/{layout}"] = C.parameters(model)


def helpers(results: dict, rank: int, mesh, out_dir: str) -> None:
    """agree / any_over_shards on hand-made local values (each rank a different one)."""
    table = distribute_tensor(torch.zeros(4, 6), mesh, [Shard(1)])  # rows split over ranks
    flags = (
        torch.tensor([True, False, False, False])
        if rank == 0
        else torch.tensor([False] * 3 + [True])
    )
    results["helpers/any_over_shards"] = any_over_shards(flags, table, -1)
    rows = distribute_tensor(torch.zeros(4, 6), mesh, [Shard(0)])  # each rank whole rows
    results["helpers/any_over_row_shards"] = any_over_shards(flags, rows, -1)
    ok = torch.tensor([True, rank == 0, True])
    plain = torch.zeros(3)
    results["helpers/agree"] = agree(ok, [table, rows, plain])
    weight = nn.Parameter(distribute_tensor(torch.ones(4, 6), mesh, [Shard(0)]))
    try:
        danlu.step_in_backward(danlu.Tiger([weight]))
    except ValueError as error:
        results["helpers/step_in_backward"] = str(error)


# -- LoRA-Pro ------------------------------------------------------------------------------------


def lora_pro(results: dict, rank: int, mesh, out_dir: str) -> None:
    for mode in ("efficient", "full"):
        model = distribute(C.make_lora_model(), "fsdp_rows", mesh)
        opt = danlu.lora.LoRAPro(model, mode=mode, lr=1e-2, weight_decay=0.01)
        C.train(model, opt, local_data(rank, 3))
        results[f"lora/{mode}"] = C.parameters(model)
    try:  # LoRA-GA rewrites base weights: it must run before sharding, and says so
        danlu.lora.lora_ga_init_(model, gradients={})
    except ValueError as error:
        results["lora/ga_sharded"] = str(error)


# -- distributed checkpoints ---------------------------------------------------------------------

#: case → (optimizer, overrides, wrapped): the bf16 momenta check that load_state_dict keeps
#: state dtypes under DCP; "tiger_wrapped" nests GradientAccumulation(NonFiniteGuard(Tiger)).
#: Every registered optimizer (bf16 state where it takes ``state_dtype``), and Tiger wrapped in
#: GradientAccumulation(NonFiniteGuard(...)) saved mid-window.
DCP_CASES = {
    **{
        name: (
            name,
            {"state_dtype": torch.bfloat16} if C.takes_state_dtype(name) else {},
            False,
        )
        for name in C.OPTIMIZERS
    },
    "tiger_wrapped": ("tiger", {}, True),
}


def build_for_checkpoint(case: str, model: nn.Module, module: nn.Module | None):
    name, overrides, wrapped = DCP_CASES[case]
    opt = C.make_optimizer(name, model, **overrides)
    if wrapped:
        opt = danlu.GradientAccumulation(danlu.NonFiniteGuard(opt), 2, module=module)
    return opt


def state_dtypes(opt) -> dict:
    return {
        f"{i}/{key}": value.dtype
        for i, state in enumerate(opt.state.values())
        for key, value in state.items()
        if isinstance(value, torch.Tensor)
    }


def checkpoints(results: dict, rank: int, mesh, out_dir: str) -> None:
    """Every case saved in one DCP checkpoint (one save, one load: each is a collective with
    planning costs), under its own key."""
    path = os.path.join(out_dir, "checkpoint")
    data = local_data(rank, 2 * DCP_STEPS)
    runs, state = {}, {}
    for case, (_, _, wrapped) in DCP_CASES.items():
        micro = 2 if wrapped else 1
        model = distribute(C.make_model(), "fsdp_rows", mesh)
        opt = build_for_checkpoint(case, model, model)
        C.train(model, opt, data[:DCP_STEPS], micro=micro)
        state[case] = {
            "model": get_model_state_dict(model),
            "optim": get_optimizer_state_dict(model, opt),
        }
        runs[case] = (model, opt, micro)
    dcp.save(state, checkpoint_id=path)
    for case, (model, opt, micro) in runs.items():
        results[f"dcp/{case}/saved"] = C.parameters(model)
        results[f"dcp/{case}/dtypes"] = state_dtypes(opt)
        C.train(model, opt, data[DCP_STEPS:], micro=micro)
        results[f"dcp/{case}/continued"] = C.parameters(model)
    # Fresh models and optimizers on the same 2 ranks, resumed from the checkpoint.
    runs, state = {}, {}
    for case, (_, _, wrapped) in DCP_CASES.items():
        model = distribute(C.make_model(seed=123), "fsdp_rows", mesh)
        opt = build_for_checkpoint(case, model, model)
        state[case] = {
            "model": get_model_state_dict(model),
            "optim": get_optimizer_state_dict(model, opt),
        }
        runs[case] = (model, opt, 2 if wrapped else 1)
    dcp.load(state, checkpoint_id=path)
    for case, (model, opt, micro) in runs.items():
        set_model_state_dict(model, state[case]["model"])
        set_optimizer_state_dict(model, opt, state[case]["optim"])
        results[f"dcp/{case}/resumed_dtypes"] = state_dtypes(opt)
        if DCP_CASES[case][2]:
            results[f"dcp/{case}/records"] = (opt.micro_step, opt.optimizer.steps)
        C.train(model, opt, data[DCP_STEPS:], micro=micro)
        results[f"dcp/{case}/resumed"] = C.parameters(model)
