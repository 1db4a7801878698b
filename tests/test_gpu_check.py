"""`make gpu-check` (benchmarks/gpu_check.py, gpu_kernels.py, gpu_bench.py) on CPU: the shape
sets, the comparisons and their tolerances against independent oracles, the kernel comparison
itself under Triton's interpreter (tiny shapes), the benchmark's floor arithmetic, the pytest
plugin that selects the CUDA tests, the time limits, the report, and the exit without CUDA."""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    # before triton is imported (conftest.py sets it too): the kernels run interpreted on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(BENCHMARKS))

import gpu_bench  # noqa: E402
import gpu_check  # noqa: E402
import gpu_kernels as gk  # noqa: E402

import danlu  # noqa: E402

DEVICE = torch.device("cuda" if ON_GPU else "cpu")
# the optimizers that declare a Triton path in their registration
ALGORITHMS = tuple(n for n, info in sorted(danlu.REGISTRY.items()) if "triton" in info.paths)


@pytest.fixture
def triton_path(monkeypatch):
    """On CPU, ``fused=True`` reaches the Triton kernels (interpreted) and the reference the
    single-tensor loop; on CUDA that is what the public options choose anyway."""
    pytest.importorskip("triton")
    if not ON_GPU:
        for name in ALGORITHMS:
            module = importlib.import_module(f"danlu.algorithms.{name}.functional")
            monkeypatch.setattr(
                module,
                "select_path",
                lambda foreach, fused, tensors: "triton" if fused else "single",
            )


# ---------------------------------------------------------------------------------------------
# Shapes and variants


def test_llama_1b_shape_set():
    shapes = gk.SHAPE_SETS["llama1b"].shapes
    vocab, dim, hidden, layers = 32000, 2048, 5632, 16
    per_layer = 4 * dim * dim + 3 * dim * hidden + 2 * dim
    assert gk.SHAPE_SETS["llama1b"].numel == 2 * vocab * dim + layers * per_layer + dim
    assert 0.9e9 < gk.SHAPE_SETS["llama1b"].numel < 1.0e9
    assert len(shapes) == 3 + 9 * layers
    assert shapes[0] == ("embed_tokens", (vocab, dim), "embedding")
    assert shapes[-1] == ("lm_head", (vocab, dim), "matrix")
    distinct = gk.SHAPE_SETS["llama1b-distinct"]
    assert {s for _, s, _ in distinct.shapes} == {s for _, s, _ in shapes}
    assert {s for _, s, _ in distinct.shapes} == {
        (vocab, dim),
        (dim, dim),
        (hidden, dim),
        (dim, hidden),
        (dim,),
    }
    assert distinct.numel == 2 * vocab * dim + per_layer + dim
    assert {k for _, _, k in distinct.shapes} == {"embedding", "matrix", "elementwise"}


def _triton_kernel_algorithms() -> set[str]:
    """The algorithms with a Triton kernel in the sources (a ``@triton.jit`` function named
    after the algorithm), wherever the kernels live."""
    found = set()
    for path in Path(danlu.__file__).parent.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        if "@triton.jit" not in text:
            continue
        for name in danlu.REGISTRY:
            if f"def _{name}_" in text and "kernel" in text:
                found.add(name)
    return found


def test_variants_cover_every_kernel_and_option():
    variants = gk.variants()
    assert len({v.key for v in variants}) == len(variants)
    kernels = _triton_kernel_algorithms()
    assert kernels == set(ALGORITHMS)
    for name in kernels:
        mine = [v for v in variants if v.algorithm == name]
        assert mine[0].dtype == torch.float32  # each kernel's plain case comes first
        assert {torch.float32, torch.bfloat16} <= {v.dtype for v in mine}
        assert any(v.stochastic for v in mine), name
        assert any(v.options.get("maximize") for v in mine), name
        assert any(v.options.get("weight_decay", 0) > 0 for v in mine), name
    assert any(v.options.get("grad_accum_steps", 1) > 1 for v in variants)
    assert any(v.options.get("state_dtype") == torch.bfloat16 for v in variants)
    assert any(v.tensor_lr for v in variants) and any(v.nonfinite for v in variants)
    assert {v.options.get("momentum_mode") for v in variants} >= {None, "scaled"}
    # interleaved: the first four cover the four kernels
    assert {v.algorithm for v in variants[:4]} == set(ALGORITHMS)


@pytest.mark.parametrize("variant", gk.variants(), ids=lambda v: v.key)
def test_every_variant_builds_both_sides(variant):
    shape_set = gk.SHAPE_SETS["tiny"]
    params = gk.make_params(shape_set, variant.dtype, torch.device("cpu"))
    kernel = gk.build_optimizer(variant, params, shape_set, reference=False)
    ref_params = [torch.nn.Parameter(p.detach().to(gk.reference_dtype(variant))) for p in params]
    ref = gk.build_optimizer(variant, ref_params, shape_set, reference=True)
    assert kernel.param_groups[0]["fused"] is True
    assert ref.param_groups[0]["fused"] is False and ref.param_groups[0]["foreach"] is False
    assert kernel.param_groups[0]["stochastic_rounding"] is variant.stochastic
    assert ref.param_groups[0]["stochastic_rounding"] is False


# ---------------------------------------------------------------------------------------------
# The comparisons


def _nextafter_neighbours(x64, dtype):
    """The two ``dtype`` values around float64 ``x64``, from torch.nextafter (an independent
    oracle for gk.neighbours)."""
    n = x64.to(dtype)
    below = torch.nextafter(n, torch.full_like(n, -math.inf))
    above = torch.nextafter(n, torch.full_like(n, math.inf))
    nd = n.double()
    down = torch.where(nd > x64, below.double(), nd)
    up = torch.where(nd < x64, above.double(), nd)
    return down, up


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_neighbours_and_spacing_agree_with_nextafter(dtype):
    gen = torch.Generator().manual_seed(0)
    tiny = torch.finfo(dtype).tiny
    x = torch.cat(
        [
            torch.randn(4000, generator=gen, dtype=torch.float64) * 0.02,
            torch.randn(1000, generator=gen, dtype=torch.float64) * 100,
            torch.rand(1000, generator=gen, dtype=torch.float64) * tiny * 3,  # subnormals
            torch.tensor([0.0, 1.0, -1.0, 2.0**-20, 0.75, -(2.0**5)], dtype=torch.float64),
        ]
    )
    if dtype == torch.float16:
        x = x.clamp(-60000, 60000)
    down, up = gk.neighbours(x, dtype)
    want_down, want_up = _nextafter_neighbours(x, dtype)
    assert torch.equal(down, want_down) and torch.equal(up, want_up)
    # on the grid: the distance to the next value away from 0
    on_grid = x.to(dtype).abs()
    away = torch.nextafter(on_grid, torch.full_like(on_grid, math.inf))
    assert torch.equal(gk.spacing(on_grid.double(), dtype), away.double() - on_grid.double())


def _stats(mode, got, want, **kw):
    stats = gk.OutputStats("x", str(got.dtype), mode)
    gk.accumulate(stats, got, want, **kw)
    return stats


def test_fp32_parameters_allow_roundings_and_a_thousandth_of_the_step():
    gen = torch.Generator().manual_seed(1)
    old = torch.randn(10_000, generator=gen) * 0.02
    step = torch.randn(10_000, generator=gen) * 1e-4
    want = old + step
    one_ulp = torch.nextafter(want, torch.full_like(want, math.inf))
    assert _stats("fp32-param", one_ulp, want, old=old).verdict() == (True, "")
    # the update 0.5 % too large: beyond tolerance wherever the step is well above an ulp
    wrong = old + step * 1.005
    stats = _stats("fp32-param", wrong, want, old=old)
    assert not stats.verdict()[0] and stats.beyond > 5_000
    # a dropped update
    assert _stats("fp32-param", old.clone(), want, old=old).beyond > 9_000


def test_fp32_state_tolerance_is_relative_to_the_operands():
    gen = torch.Generator().manual_seed(2)
    old = torch.randn(10_000, generator=gen)
    want = old * 0.9 + torch.randn(10_000, generator=gen) * 0.1
    near_zero = want.abs() < 1e-3
    got = want + 1e-7 * old.abs() * near_zero  # cancellation: error on the operands' scale
    assert _stats("fp-state", got, want, old=old).verdict()[0]
    assert not _stats("fp-state", want * (1 + 3e-5), want, old=old).verdict()[0]
    nan = want.clone()
    nan[5] = math.nan
    assert _stats("fp-state", nan, want, old=old).beyond == 1
    assert _stats("fp-state", nan, nan, old=old).beyond == 0  # NaN where the reference has NaN


def _exact_fp32_values(n, seed):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=gen) * 0.02).float()


def test_nearest_mode_accepts_nearest_and_catches_a_lost_update():
    x = _exact_fp32_values(20_000, 3)
    assert _stats("nearest", x.bfloat16(), x).verdict() == (True, "")
    old = (x + 3e-5).bfloat16()  # the value before an update of -3e-5 (below bf16's spacing)
    stats = _stats("nearest", old, x, old=old.float())
    assert not stats.verdict()[0] and stats.differ > 1_000
    # one spacing off: beyond
    off = torch.nextafter(x.bfloat16(), torch.full_like(x, math.inf).bfloat16())
    off = torch.where(off.float() > x, torch.nextafter(off, off * 0 + math.inf), off)
    assert _stats("nearest", off, x).beyond > 10_000


def _stochastic(x, dtype, gen):
    """Stochastic rounding written out: up with probability (x - down)/(up - down)."""
    down, up = _nextafter_neighbours(x.double(), dtype)
    gap = torch.where(up > down, up - down, torch.ones_like(up))
    go_up = torch.rand(x.shape, generator=gen, dtype=torch.float64) < (x.double() - down) / gap
    return torch.where(go_up, up, down).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_statistics(dtype):
    gen = torch.Generator().manual_seed(4)
    x = _exact_fp32_values(40_000, 5)
    good = _stats("stochastic", _stochastic(x, dtype, gen), x)
    assert good.verdict() == (True, "")
    assert abs(good.sr_z) < 4 and abs(good.sr_spread - 1) < 0.05
    # rounding to nearest: unbiased on average but half as spread
    nearest = _stats("stochastic", x.to(dtype), x)
    assert not nearest.verdict()[0] and 0.4 < nearest.sr_spread < 0.6
    # always down: biased
    down = _nextafter_neighbours(x.double(), dtype)[0].to(dtype)
    assert "biased" in _stats("stochastic", down, x).verdict()[1]
    # a value that is not a neighbour
    far = _stochastic(x * 1.01, dtype, gen)
    assert _stats("stochastic", far, x).beyond > 1_000
    # nothing to round
    exact = x.to(dtype)
    assert "not exercised" in _stats("stochastic", exact, exact.float()).verdict()[1]


def test_adjacent_and_exclusions():
    gen = torch.Generator().manual_seed(6)
    x = (1.25 + 0.5 * torch.rand(1_000, generator=gen)).bfloat16()  # in [1, 2): one spacing
    up = torch.nextafter(x, torch.full_like(x, math.inf))
    stats = _stats("adjacent", up, x)
    assert stats.beyond == 0 and stats.differ == 1_000 and not stats.verdict()[0]  # 100 % differ
    two_up = torch.nextafter(up, torch.full_like(x, math.inf))
    assert _stats("adjacent", two_up, x).beyond == 1_000
    x = x.repeat(10)
    exclude = torch.zeros(10_000, dtype=torch.bool)
    exclude[:3] = True
    got = x.clone()
    got[:3] = 5.0
    stats = _stats("adjacent", got, x, exclude=exclude)
    assert stats.verdict() == (True, "") and stats.excluded == 3 and stats.numel == 9_997
    exclude[:100] = True  # 1 % of the elements are ties: too many
    assert "ties" in _stats("adjacent", x, x, exclude=exclude).verdict()[1]


def test_lion_sign_ties():
    variant = next(v for v in gk.variants() if v.key == "lion-fp32")
    m = torch.tensor([1.0, 0.5, -2.0])
    g = torch.tensor([-9.0, 1.0, 18.0])  # 0.9·m + 0.1·g = 0, 0.55, 0
    ties = gk.sign_ties(variant, g, {"exp_avg": m}, {})
    assert ties.tolist() == [True, False, True]
    adax = next(v for v in gk.variants() if v.algorithm == "adax")
    assert gk.sign_ties(adax, g, {"exp_avg": m}, {}) is None


def test_comparison_modes():
    f32, bf16 = torch.float32, torch.bfloat16
    assert gk.comparison_mode(f32, f32, param=True, stochastic=False) == "fp32-param"
    assert gk.comparison_mode(f32, f32, param=False, stochastic=False) == "fp-state"
    assert gk.comparison_mode(bf16, f32, param=True, stochastic=True) == "stochastic"
    assert gk.comparison_mode(bf16, f32, param=False, stochastic=True) == "nearest"
    assert gk.comparison_mode(bf16, bf16, param=True, stochastic=False) == "adjacent"
    assert gk.comparison_mode(torch.int64, torch.int64, param=False, stochastic=False) == "exact"


# ---------------------------------------------------------------------------------------------
# The kernel comparison, run (tiny shapes; Triton's interpreter on CPU)

RUN = ["tiger-fp32-nonfinite", "adax-bf16-sr", "adafactor-fp32-unit"]


def _run(keys, **kw):
    records = []
    chosen = [v for v in gk.variants() if v.key in keys]
    ok = gk.run(chosen, gk.SHAPE_SETS["tiny"], DEVICE, seconds=600, emit=records.append, **kw)
    return ok, records


def test_kernel_comparison_passes_on_the_kernels(triton_path):
    ok, records = _run(RUN)
    variants = [r for r in records if r["kind"] == "variant"]
    assert [r["variant"] for r in variants] == [v.key for v in gk.variants() if v.key in RUN]
    assert ok, [(r["variant"], r["error"], [o for o in r["outputs"] if not o["passed"]])
                for r in variants if not r["passed"]]  # fmt: skip
    by_key = {r["variant"]: r for r in variants}
    outputs = {o["output"] for o in by_key["adafactor-fp32-unit"]["outputs"]}
    assert {"param", "exp_avg", "exp_avg_sq_row", "exp_avg_sq_col"} <= outputs
    sr = next(o for o in by_key["adax-bf16-sr"]["outputs"] if o["output"] == "param")
    assert sr["mode"] == "stochastic" and sr["numel"] > 10_000 and abs(sr["sr_spread"] - 1) < 0.1
    # AdaX's bf16 momentum is kept in fp32 by the fp32 reference: compared as its rounding
    m = next(o for o in by_key["adax-bf16-sr"]["outputs"] if o["output"] == "exp_avg")
    assert m["mode"] == "nearest" and m["dtype"] == "bfloat16"
    assert by_key["tiger-fp32-nonfinite"]["reference"] == "float32"
    # the report renders what the part wrote
    part = gpu_check.PartResult("kernels", status="passed", records=records)
    text = "\n".join(gpu_check.render_kernels(part))
    assert "| adax | bf16, stochastic rounding | float32 | param | bfloat16 |" in text
    assert "**FAIL**" not in text


def _mutated(monkeypatch, change):
    """Build the kernel side with ``change(variant)`` instead of the variant."""
    original = gk.build_optimizer

    def build(variant, params, shape_set, *, reference):
        return original(variant if reference else change(variant), params, shape_set,
                        reference=reference)  # fmt: skip

    monkeypatch.setattr(gk, "build_optimizer", build)


def test_kernel_comparison_catches_a_wrong_step(triton_path, monkeypatch):
    _mutated(
        monkeypatch,
        lambda v: dataclasses.replace(v, options={**v.options, "lr": v.options["lr"] * 1.01}),
    )
    ok, records = _run(["lion-fp32"])
    (record,) = [r for r in records if r["kind"] == "variant"]
    assert not ok and not record["passed"]
    param = next(o for o in record["outputs"] if o["output"] == "param")
    assert param["beyond"] > 0.5 * param["numel"]


def test_kernel_comparison_catches_rounding_to_nearest(triton_path, monkeypatch):
    _mutated(monkeypatch, lambda v: dataclasses.replace(v, stochastic=False))
    ok, records = _run(["lion-bf16-sr"])
    (record,) = [r for r in records if r["kind"] == "variant"]
    param = next(o for o in record["outputs"] if o["output"] == "param")
    assert not ok and "not stochastic rounding" in param["problem"]


def test_kernel_comparison_reports_errors_and_stops_in_time(triton_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(gk, "compare_variant", broken)
    ok, records = _run(["lion-fp32", "tiger-fp32"])
    assert not ok
    assert [r["kind"] for r in records] == ["meta", "start", "variant", "start", "variant"]
    assert records[2]["error"] == "RuntimeError: boom" and not records[2]["passed"]
    ok, records = _run(["lion-fp32", "tiger-fp32"], min_seconds_left=10_000)
    assert not ok and [r["kind"] for r in records] == ["meta", "skipped", "skipped"]


# ---------------------------------------------------------------------------------------------
# The benchmark


def test_bench_floor_and_rows(monkeypatch):
    lion = [r for r in gpu_bench.step_bench._danlu_impls() if r[1].startswith("danlu.Lion")]
    adamw = ("adamw", "torch AdamW (fused)", lambda ps: torch.optim.AdamW(ps.params, fused=True))
    adam = ("adamw", "torch AdamW (for-loop)", lambda ps: torch.optim.AdamW(ps.params))
    monkeypatch.setattr(gpu_bench.step_bench, "_danlu_impls", lambda: lion)
    monkeypatch.setattr(gpu_bench.step_bench, "_peer_impls", lambda device: [adam, adamw])
    # torch's fused AdamW first, danlu's fused=True rows left out (the default path is the
    # Triton kernel on CUDA; Amos's would compile), then the other peers
    labels = [r[1] for r in gpu_bench.implementations(torch.device("cpu"))]
    assert labels == [
        "torch AdamW (fused)",
        "danlu.Lion",
        "danlu.Lion(state_dtype=bf16)",
        "torch AdamW (for-loop)",
    ]
    monkeypatch.setattr(gpu_bench.step_bench, "_peer_impls", lambda device: [adamw])
    records = []
    ok = gpu_bench.run(gk.SHAPE_SETS["tiny"], torch.device("cpu"), seconds=600,
                       emit=records.append, warmup=1, reps=2)  # fmt: skip
    assert ok
    bandwidth = records[0]
    assert bandwidth["kind"] == "bandwidth" and bandwidth["add"] > 0 and bandwidth["copy"] > 0
    rows = {(r["dtype"], r["label"]): r for r in records[1:]}
    # bytes per parameter: θ read and written, g read, the state read and written
    assert rows["float32", "torch AdamW (fused)"]["floor_bytes"] == 2 * 4 + 4 + 2 * 8
    assert rows["float32", "danlu.Lion"]["floor_bytes"] == 2 * 4 + 4 + 2 * 4
    assert rows["float32", "danlu.Lion(state_dtype=bf16)"]["floor_bytes"] == 2 * 4 + 4 + 2 * 2
    assert rows["bfloat16", "danlu.Lion"]["floor_bytes"] == 2 * 2 + 2 + 2 * 2
    assert ("bfloat16", "danlu.Lion(state_dtype=bf16)") not in rows  # fp32 only
    for r in rows.values():
        assert r["error"] is None
        assert math.isclose(r["ratio"], r["seconds"] / r["floor_seconds"])
        floor = r["floor_bytes"] * gk.SHAPE_SETS["tiny"].numel / bandwidth["add"]
        assert math.isclose(r["floor_seconds"], floor)
    part = gpu_check.PartResult("bench", status="passed", records=records)
    text = "\n".join(gpu_check.render_bench(part))
    assert "| float32 | danlu.Lion(state_dtype=bf16) |" in text
    # out of time: every row skipped, and danlu's count as not run
    records = []
    assert not gpu_bench.run(gk.SHAPE_SETS["tiny"], torch.device("cpu"), seconds=600,
                             emit=records.append, min_seconds_left=10_000)  # fmt: skip
    assert {r["kind"] for r in records[1:]} == {"skipped"}


# ---------------------------------------------------------------------------------------------
# The tests part, the time limits, the report, the exit without CUDA


def test_cuda_test_files(tmp_path):
    names = [p.name for p in gpu_check.cuda_test_files()]
    assert "test_kernels_triton.py" in names and "test_gpu_check.py" not in names
    for path in (ROOT / "tests").glob("test_*.py"):
        lines = path.read_text(encoding="utf-8").splitlines()
        if any(line.strip().startswith("@pytest.mark.gpu") for line in lines):
            assert path.name in names
    (tmp_path / "test_a.py").write_text("import pytest\npytestmark = pytest.mark.gpu\n")
    (tmp_path / "test_b.py").write_text("x = '@pytest.mark.gpu'\n")
    (tmp_path / "test_c.py").write_text("class T:\n    @pytest.mark.gpu\n    def test(self): ...\n")
    assert [p.name for p in gpu_check.cuda_test_files(tmp_path)] == ["test_a.py", "test_c.py"]


def test_pytest_plugin_selects_and_records(tmp_path):
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n\n"
        "@pytest.mark.gpu\ndef test_gpu_ok():\n    pass\n\n"
        "@pytest.mark.gpu\ndef test_gpu_bad():\n    assert 1 == 2, 'expected failure'\n\n"
        "@pytest.mark.gpu\ndef test_gpu_skip():\n    pytest.skip('no reason')\n\n"
        "def test_cpu_only():\n    pass\n"
    )
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: gpu\n")
    records = tmp_path / "records.jsonl"
    env = gpu_check.child_env(records)
    env[gpu_check.SELECT_ENV] = "1"
    command = gpu_check.tests_command([tmp_path / "test_sample.py"], workers=1)
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 1, result.stdout + result.stderr
    summary = gpu_check.summarize_tests(gpu_check.read_records(records))
    assert summary["counts"] == {"passed": 1, "failed": 1, "skipped": 1}
    assert "expected failure" in summary["failures"][0]["message"]
    part = gpu_check.finish_part(
        gpu_check.PartResult("tests", returncode=1), gpu_check.read_records(records)
    )
    assert part.status == "failed"
    assert "test_sample.py::test_gpu_bad" in "\n".join(gpu_check.render_tests(part))


def test_finish_part_statuses():
    def part(name, records, returncode=0):
        return gpu_check.finish_part(gpu_check.PartResult(name, returncode=returncode), records)

    ok = {"kind": "variant", "variant": "a", "passed": True}
    bad = {"kind": "variant", "variant": "b", "passed": False}
    start = {"kind": "start", "variant": "c"}
    assert part("kernels", [ok]).status == "passed"
    assert part("kernels", [ok, bad], 1).status == "failed"
    crashed = part("kernels", [ok, start], -11)
    assert crashed.status == "crashed" and "died in c" in crashed.note
    assert part("kernels", [ok, {"kind": "skipped", "variant": "d"}], 1).status == "incomplete"
    assert part("kernels", [], 0).status == "failed"
    traceback = part("bench", [], 1)
    assert traceback.status == "crashed" and "error" in traceback.note
    assert "exit status -9" in part("bench", [], -9).note
    row = {"kind": "row", "danlu": False, "error": "ImportError"}
    assert part("bench", [row, {"kind": "row", "danlu": True, "error": None}]).status == "passed"
    assert part("bench", [{**row, "danlu": True}], 1).status == "failed"
    passed = {"kind": "test", "nodeid": "t", "when": "call", "outcome": "passed"}
    assert part("tests", [passed]).status == "passed"
    assert part("tests", [], 0).status == "failed"  # nothing ran
    assert part("tests", [passed], 3).status == "crashed"  # pytest's internal error


def test_run_process_stops_a_part_at_its_limit():
    start = time.monotonic()
    code = "import time\nfor _ in range(600): time.sleep(0.1)"
    returncode, timed_out, seconds = gpu_check.run_process(
        [sys.executable, "-c", code], timeout=1.0, env=dict(os.environ)
    )
    assert timed_out and returncode is None and 1.0 <= seconds < 15
    assert time.monotonic() - start < 15
    assert gpu_check.run_process([sys.executable, "-c", "pass"], timeout=30, env=dict(os.environ))[
        :2
    ] == (0, False)


def test_time_limits():
    parts = list(gpu_check.PARTS)
    limits = gpu_check.part_limits(450.0, parts)
    assert math.isclose(sum(limits.values()), 450.0)
    # the first part may use what the later ones do not need
    assert math.isclose(gpu_check.time_for("tests", parts, limits, 450.0), limits["tests"])
    assert math.isclose(
        gpu_check.time_for("kernels", parts, limits, 450.0 - 10.0), 440.0 - limits["bench"]
    )
    assert math.isclose(gpu_check.time_for("bench", parts, limits, 100.0), 100.0)


def test_main_writes_the_report_before_and_after_each_part(tmp_path, monkeypatch):
    out = tmp_path / "RESULTS-cuda.md"
    seen = []

    def fake_run_part(name, limit, workdir, options):
        seen.append((name, limit, out.read_text(encoding="utf-8")))
        status = {"tests": "passed", "kernels": "timeout", "bench": "passed"}[name]
        return gpu_check.PartResult(name, status=status, seconds=1.0, limit=limit, note="n")

    monkeypatch.setattr(gpu_check, "no_cuda_reason", lambda: None)
    monkeypatch.setattr(
        gpu_check, "describe_machine", lambda: {"device": "Fake GPU", "software": "torch x"}
    )
    monkeypatch.setattr(gpu_check, "run_part", fake_run_part)
    assert gpu_check.main(["--out", str(out), "--budget", "300"]) == 1
    assert [name for name, _, _ in seen] == list(gpu_check.PARTS)
    assert "IN PROGRESS" in seen[0][2] and "| tests | not run |" in seen[0][2]
    assert "| tests | passed |" in seen[1][2]
    assert sum(limit for _, limit, _ in seen[:1]) <= 300
    text = out.read_text(encoding="utf-8")
    assert "**Result: FAIL**" in text and "| kernels | timeout |" in text
    assert "Device: Fake GPU." in text
    monkeypatch.setattr(
        gpu_check,
        "run_part",
        lambda name, limit, workdir, options: gpu_check.PartResult(name, status="passed"),
    )
    assert gpu_check.main(["--out", str(out), "--parts", "kernels"]) == 0
    assert "**Result: PASS**" in out.read_text(encoding="utf-8")


def test_exits_with_one_line_without_cuda(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "RESULTS-cuda.md"
    assert gpu_check.main(["--out", str(out)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: no CUDA device:"), captured.err
    assert captured.out == "" and not out.exists()


def test_report_json_roundtrip_of_records(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"kind": "meta"}) + "\n" + '{"kind": "vari')  # cut by a crash
    assert gpu_check.read_records(path) == [{"kind": "meta"}]
    assert gpu_check.read_records(tmp_path / "missing.jsonl") == []
