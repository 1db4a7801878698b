"""danlu under torch.distributed (docs/distributed.md): every optimizer and wrapper under FSDP2
(DTensor parameters, two placements) and DDP gives the parameters of a single process on the
full batch; non-finite decisions and lazy rows agree across ranks; distributed checkpoints
resume bit for bit on 2 ranks and on 1.

The 2-process half runs once (gloo on CPU, one process group for every scenario:
tests/distributed_worker.py); the references are single-process runs of the same cases
(tests/distributed_cases.py), so the oracle is the unsharded algorithm, whose own correctness
the functional tests establish against docs/reference/algorithms.md and the NumPy references.

Tolerance: 1e-6 relative (‖sharded − single‖ / ‖single‖ per tensor, float32). Two ranks
average their gradients exactly as a single process averaging the two half-batch gradients
would (halving is exact), but not as the full-batch mean does, so runs differ by float
rounding; the model has no key bias (its gradient is zero up to rounding, and a sign optimizer
would amplify that noise into ±lr steps).
"""

from __future__ import annotations

import copy
import os

import distributed_cases as C
import distributed_worker as W
import pytest
import torch
import torch.distributed as dist
from torch import nn

import danlu
from danlu.distributed import (
    agree,
    get_optimizer_state_dict,
    new_state,
    set_gradient_sync,
    set_optimizer_state_dict,
    sharded_mean,
    sharded_norm,
    sharded_sum,
)

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")

REL = 1e-6
ELEMENTWISE = ("lion", "adamw", "adax")  # no whole-tensor statistic: sharded = DDP bit for bit


def _spawn(out_dir: str) -> None:
    import torch.multiprocessing as mp

    init_file = os.path.join(out_dir, "init")
    mp.start_processes(
        W.run,
        args=(C.WORLD, init_file, out_dir),
        nprocs=C.WORLD,
        start_method="spawn",
    )


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """(rank 0's results, rank 1's results, their directory): spawned once per test session,
    shared by pytest-xdist workers through a file lock."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    out = root / "danlu_distributed"
    failed = out / "failed.txt"
    with FileLock(str(root / "danlu_distributed.lock")):
        if failed.exists():  # one failed spawn is enough: do not start it again per test
            pytest.fail(failed.read_text(), pytrace=False)
        if not all((out / f"rank{r}.pt").exists() for r in range(C.WORLD)):
            out.mkdir(exist_ok=True)
            try:
                _spawn(str(out))
            except Exception as error:
                failed.write_text(f"the 2-process run failed: {error}")
                raise
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(C.WORLD)]
    return ranks[0], ranks[1], out


def assert_close_rel(got: dict, want: dict, rel: float = REL) -> None:
    assert got.keys() == want.keys()
    for name, value in want.items():
        error = (got[name] - value).norm() / value.norm().clamp_min(1e-30)
        assert error <= rel, f"{name}: relative error {error:.3g} > {rel:g}"


def assert_equal(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert torch.equal(got[name], value), name


# -- every optimizer -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(C.OPTIMIZERS))
def test_sharded_and_ddp_training_equals_single_process(runs, name):
    r0, r1, _ = runs
    single = C.reference_run(name, W.TRAIN_STEPS)
    for layout in ("fsdp_rows", "fsdp_cols", "ddp"):
        assert_close_rel(r0[f"train/{layout}/{name}"], single)
    # DDP keeps one copy per rank: both ranks hold the same parameters.
    assert_equal(r1["train/ddp/" + name], r0["train/ddp/" + name])
    if name in ELEMENTWISE:
        for layout in ("fsdp_rows", "fsdp_cols"):
            assert_equal(r0[f"train/{layout}/{name}"], r0[f"train/ddp/{name}"])


def test_state_is_placed_like_its_parameter(runs):
    r0, _, _ = runs
    state = r0["state/fsdp_rows/adafactor"]
    # head.weight (33, 16) is row-sharded; its largest axis (0) is averaged into the row
    # statistic, which is therefore replicated, while the column statistic keeps axis 0.
    assert state[("head.weight", "exp_avg_sq_row")][:2] == ("(Replicate(),)", (1, 16))
    assert state[("head.weight", "exp_avg_sq_col")][:2] == ("(Shard(dim=0),)", (33, 1))
    # fc2.weight (16, 24): the largest axis is 1, so the row statistic keeps the sharded axis.
    assert state[("blocks.0.fc2.weight", "exp_avg_sq_row")][:2] == ("(Shard(dim=0),)", (16, 1))
    assert state[("blocks.0.fc2.weight", "exp_avg_sq_col")][:2] == ("(Replicate(),)", (1, 24))
    assert state[("head.weight", "exp_avg")] == ("(Shard(dim=0),)", (33, 16), torch.float32)
    amos = r0["state/fsdp_cols/amos"]
    # per-output slots of a column-sharded matrix: the sharded axis is the reduced one
    assert amos[("head.weight", "exp_avg_sq")][:2] == ("(Replicate(),)", (33, 1))
    assert amos[("embed.weight", "b")][:2] == ("(Replicate(),)", (33, 1))
    assert r0["state/fsdp_cols/tiger"][("head.weight", "exp_avg")][0] == "(Shard(dim=1),)"


# -- accumulation --------------------------------------------------------------------------------


def test_tiger_accumulation_under_ddp_equals_mean_gradient(runs):
    """Tiger(grad_accum_steps=2) on 2 ranks × 2 micro-batches = Tiger(k=1) on the full batch."""
    r0, r1, _ = runs
    assert_close_rel(r0["accum/tiger_ddp"], C.reference_run("tiger", 3))
    assert_equal(r1["accum/tiger_ddp"], r0["accum/tiger_ddp"])


def test_gradient_accumulation_syncs_once_per_window(runs):
    r0, r1, _ = runs
    single = C.reference_run("lion", 3)
    for key in ("accum/lion_ddp", "accum/lion_ddp_module", "accum/lion_fsdp_module"):
        assert_close_rel(r0[key], single)
        assert_equal(r1[key], r0[key])
    # 3 windows of 2 micro-batches, one DDP bucket: with module= the first micro-batch of each
    # window runs without sync, so the gradients are all-reduced 3 times instead of 6.
    assert r0["accum/lion_ddp_module/allreduces"] == 3
    assert r0["accum/lion_ddp/allreduces"] == 6


# -- a NaN on one rank ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    ["tiger_tensor", "tiger_global", "tiger_rows_split", "guard_shrink", "guard_skip_global"],
)
def test_nonfinite_gradient_on_one_rank_same_action_everywhere(runs, case):
    """The NaN sits in one rank's slice only; the single-process reference has it at the same
    entry of the whole tensor. Had the other rank stepped its slice while the first shrank or
    skipped, the gathered tensor would match neither."""
    r0, r1, _ = runs
    _, name, overrides, guard, _, param, _, whole_index, step = W.NAN_CASES[case]
    wrap = None if guard is None else (lambda opt: danlu.NonFiniteGuard(opt, **guard))
    single = C.reference_run(
        name, 3, wrap=wrap, after_backward=C.nonfinite_at(param, whole_index, step), **overrides
    )
    assert_close_rel(r0[f"nan/{case}"], single)
    if guard is not None:
        assert r0[f"nan/{case}/counters"] == r1[f"nan/{case}/counters"]
        skipped_tensors = r0[f"nan/{case}/counters"][1]
        assert skipped_tensors == (1 if guard.get("scope", "tensor") == "tensor" else 29)


def test_nan_loss_on_one_ddp_rank_shrinks_everywhere(runs):
    r0, r1, _ = runs
    single = C.reference_run(
        "tiger", 3, loss_factor=lambda step: float("nan") if step == 1 else 1.0
    )
    assert_close_rel(r0["nan/tiger_ddp_loss"], single)
    assert_equal(r1["nan/tiger_ddp_loss"], r0["nan/tiger_ddp_loss"])


# -- lazy rows -----------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["fsdp_rows", "fsdp_cols", "ddp"])
def test_lazy_rows_under_fsdp2_and_ddp(runs, layout):
    r0, _, _ = runs
    single = C.reference_run("tiger", 3, wrap=lambda opt: danlu.Lazy(opt, lazy_moments=True))
    assert_close_rel(r0[f"lazy/{layout}"], single)


def test_row_flags_and_decisions_agree_across_ranks(runs):
    r0, r1, _ = runs
    # rows split over the 2 ranks: rank 0 saw row 0, rank 1 row 3 → both see rows 0 and 3
    for r in (r0, r1):
        assert r["helpers/any_over_shards"].tolist() == [True, False, False, True]
        assert r["helpers/agree"].tolist() == [True, False, True]
    # whole rows on each rank: nothing to combine, each keeps its own flags
    assert r0["helpers/any_over_row_shards"].tolist() == [True, False, False, False]
    assert r1["helpers/any_over_row_shards"].tolist() == [False, False, False, True]
    assert "DTensor" in r0["helpers/step_in_backward"]


# -- LoRA-Pro ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["efficient", "full"])
def test_lora_pro_on_sharded_factors(runs, mode):
    r0, _, _ = runs
    model = C.make_lora_model()
    opt = danlu.lora.LoRAPro(model, mode=mode, lr=1e-2, weight_decay=0.01)
    C.train(model, opt, C.batches(3))
    assert_close_rel(r0[f"lora/{mode}"], C.parameters(model))
    assert "before fully_shard" in r0["lora/ga_sharded"]


# -- distributed checkpoints ---------------------------------------------------------------------

DCP_CASE_NAMES = [*C.OPTIMIZERS, "tiger_wrapped"]


@pytest.mark.parametrize("case", DCP_CASE_NAMES)
def test_checkpoint_resumes_bit_identically_on_two_ranks(runs, case):
    r0, r1, _ = runs
    for r in (r0, r1):
        assert_equal(r[f"dcp/{case}/resumed"], r[f"dcp/{case}/continued"])
        assert r[f"dcp/{case}/resumed_dtypes"] == r[f"dcp/{case}/dtypes"]
    if case in C.OPTIMIZERS and C.takes_state_dtype(case):  # bf16 state stays bf16 through DCP
        assert set(r0[f"dcp/{case}/dtypes"].values()) >= {torch.bfloat16}
    if case == "tiger_wrapped":  # GradientAccumulation's and NonFiniteGuard's counters
        assert r0[f"dcp/{case}/records"] == (0, 2)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
@pytest.mark.parametrize("case", DCP_CASE_NAMES)
def test_checkpoint_from_two_ranks_resumes_on_one(runs, case):
    """Load the 2-rank FSDP2 checkpoint into a plain model in this process (no process group):
    the parameters are the saved ones bit for bit, state dtypes are kept, and training goes on
    as it did on 2 ranks."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        set_model_state_dict,
    )

    r0, _, out = runs
    model = C.make_model(seed=321)
    opt = W.build_for_checkpoint(case, model, None)
    state = {
        case: {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    }
    dcp.load(state, checkpoint_id=str(out / "checkpoint"))  # this case's keys only
    set_model_state_dict(model, state[case]["model"])
    set_optimizer_state_dict(model, opt, state[case]["optim"])
    assert_equal(C.parameters(model), r0[f"dcp/{case}/saved"])
    assert W.state_dtypes(opt) == r0[f"dcp/{case}/dtypes"]
    micro = 2 if W.DCP_CASES[case][2] else 1
    C.train(model, opt, C.batches(2 * W.DCP_STEPS)[W.DCP_STEPS :], micro=micro)
    assert_close_rel(C.parameters(model), r0[f"dcp/{case}/continued"])


# -- single-process checks of the helpers --------------------------------------------------------


def test_plain_tensors_take_the_ordinary_paths():
    x = torch.randn(5, 7)
    torch.testing.assert_close(sharded_sum(x, x, 1), x.sum(1, keepdim=True), rtol=0, atol=0)
    torch.testing.assert_close(sharded_mean(x, x, [0, 1]), x.mean().reshape(1, 1))
    torch.testing.assert_close(sharded_norm(x, x), torch.linalg.vector_norm(x), rtol=0, atol=0)
    flags = torch.tensor([True, False])
    assert agree(flags, [x, x]) is flags  # no communication for plain tensors
    state = new_state(x, (5, 1), torch.float64, fill=0.5)
    assert state.shape == (5, 1) and state.dtype == torch.float64 and bool((state == 0.5).all())
    with pytest.raises(ValueError, match="dim"):
        sharded_sum(x, x, [])


def test_sync_module_must_be_ddp_or_fsdp2():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="module must be a DistributedDataParallel"):
        danlu.GradientAccumulation(danlu.Lion(model.parameters()), 2, module=model)
    with pytest.raises(ValueError, match="module must be"):
        set_gradient_sync(model, False)


def _wrapped(model):
    return danlu.GradientAccumulation(danlu.NonFiniteGuard(danlu.Tiger(model.parameters())), 2)


def _window(model, opt, x):
    for piece in x.chunk(2):
        opt.zero_grad()
        model(piece).square().mean().backward()
        opt.step()


def test_wrapper_records_ride_through_the_state_dict_helpers():
    """danlu.distributed.get/set_optimizer_state_dict keep the wrappers' counters (torch's
    helpers drop every key but state and param_groups), and continuation is bit-identical."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = _wrapped(model)
    x = torch.randn(3, 8, 4)
    _window(model, opt, x[0])
    saved = get_optimizer_state_dict(model, opt)
    assert [r["type"] for r in saved["danlu_wrappers"]] == [
        "NonFiniteGuard",
        "GradientAccumulation",
    ]
    expected_model = nn.Linear(4, 3)
    expected_model.load_state_dict(model.state_dict())
    expected_opt = _wrapped(expected_model)
    expected_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    resumed_model = nn.Linear(4, 3)
    resumed_model.load_state_dict(model.state_dict())
    resumed_opt = _wrapped(resumed_model)
    set_optimizer_state_dict(resumed_model, resumed_opt, copy.deepcopy(saved))
    assert resumed_opt.optimizer.steps == 1
    for m, o in ((expected_model, expected_opt), (resumed_model, resumed_opt)):
        for batch in x[1:]:
            _window(m, o, batch)
    for a, b in zip(expected_model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_wrapper_checkpoint_errors():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = _wrapped(model)
    opt.zero_grad()
    model(torch.randn(2, 4)).sum().backward()
    opt.step()  # one micro-step into a window
    with pytest.raises(ValueError, match="micro-steps into a window"):
        get_optimizer_state_dict(model, opt)
    bare = danlu.Tiger(model.parameters())
    with pytest.raises(ValueError, match="0 danlu wrapper records"):
        set_optimizer_state_dict(model, opt, get_optimizer_state_dict(model, bare))
    other = danlu.GradientAccumulation(danlu.UpdateEvery(danlu.Tiger(model.parameters()), 2), 2)
    saved = get_optimizer_state_dict(model, other)
    before = {k: v.clone() for k, v in opt.optimizer.optimizer.state[model.weight].items()}
    with pytest.raises(ValueError, match=r"does not match danlu\.NonFiniteGuard"):
        set_optimizer_state_dict(model, opt, saved)
    for key, value in before.items():  # nothing was loaded
        assert torch.equal(opt.optimizer.optimizer.state[model.weight][key], value)


def test_multi_optimizer_through_the_state_dict_helpers():
    """torch's helpers cannot read MultiOptimizer.state_dict(); danlu's pass its inner
    optimizers, and the resumed pair continues bit for bit."""
    data = C.batches(4)

    def build():
        model = C.make_model()
        return model, danlu.MultiOptimizer.adam_for_embeddings(model, danlu.Tiger, lr=1e-2)

    model, opt = build()
    C.train(model, opt, data[:2])
    saved = copy.deepcopy(get_optimizer_state_dict(model, opt))
    assert "embed.weight" in saved["state"] and "head.weight" in saved["state"]
    resumed_model, resumed_opt = build()
    resumed_model.load_state_dict(model.state_dict())
    set_optimizer_state_dict(resumed_model, resumed_opt, saved)
    C.train(model, opt, data[2:])
    C.train(resumed_model, resumed_opt, data[2:])
    assert_equal(C.parameters(resumed_model), C.parameters(model))
