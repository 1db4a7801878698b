"""Every implementation path each optimizer declares in its registration
(``OptimizerInfo.paths``) against its single-tensor path, through the public constructor.

Generated from the registry: a new optimizer's paths are checked as soon as it declares them.
Each optimizer runs with its conformance keywords (tests/optimizer_cases.py) plus the keywords
that select the path, over three steps on parameters of every kind (a matrix larger than the
chunked loop's slice, so that a slice boundary and a partial tail are crossed, a vector, an
embedding, a 0-d tensor), and its parameters and state are compared with the single-tensor
path's:

* ``"chunked"``: bit for bit (the single-tensor rule on slices; tests/test_kernels.py);
* ``"foreach"`` and ``"compiled"``: the tolerance of tests/test_kernels.py's compiled checks
  (fp64: rtol 1e-13, atol 1e-15; fp32: rtol 1e-6, atol 1e-7). The foreach paths of the six
  optimizers measured bit-identical on CPU when this was written; no test promised it;
* ``"triton"``: the same tolerance, under Triton's interpreter on CPU (small shapes: the
  interpreter is slow) or natively on CUDA.

The reference is the single-tensor path forced where its keywords select another path on CPU
(``foreach=False, fused=False`` gives the chunked loop there): the algorithm's functional
module's ``select_path`` is made to answer "single", as tests/test_kernels_triton.py forces
"triton". ``"dtensor"`` needs a process group: tests/test_distributed.py covers it.
"""

from __future__ import annotations

import importlib
import math
from types import ModuleType

import pytest
import torch
from optimizer_cases import CASES

from danlu.core.chunked import CHUNK
from danlu.core.tensors import triton_available
from danlu.registry import REGISTRY

ON_GPU = torch.cuda.is_available()
CPU_PATHS = ("foreach", "chunked", "compiled")
EXACT = ("chunked",)
TOL = {
    torch.float64: {"rtol": 1e-13, "atol": 1e-15},
    torch.float32: {"rtol": 1e-6, "atol": 1e-7},
}
STEPS = 3

# a matrix of more than one slice of the chunked loop, with a partial last slice
ROWS = CHUNK // 509 + 3
LARGE = {"matrix": (ROWS, 509), "vector": (37,), "embedding": (23, 6), "scalar": ()}
SMALL = {"matrix": (33, 70), "vector": (1500,), "embedding": (23, 6), "scalar": ()}
KINDS = {"matrix": "matrix", "vector": "elementwise", "embedding": "embedding", "scalar": None}

# (name, path, dtype); "compiled" in float64 only: each compile costs seconds of a CI core
CASES_CPU = [
    (n, p, dtype)
    for n in sorted(REGISTRY)
    for p in CPU_PATHS
    if p in REGISTRY[n].paths
    for dtype in ((torch.float64,) if p == "compiled" else (torch.float64, torch.float32))
]
CASES_TRITON = [n for n in sorted(REGISTRY) if "triton" in REGISTRY[n].paths]


def functional_module(name: str) -> ModuleType | None:
    """The module whose ``select_path`` chooses the optimizer's path, if it has one."""
    package = REGISTRY[name].cls.__module__.rpartition(".")[0]
    try:
        module = importlib.import_module(f"{package}.functional")
    except ImportError:
        return None
    return module if hasattr(module, "select_path") else None


def make_params(shapes: dict, dtype: torch.dtype) -> list[dict]:
    """One group per kind (the ``kind`` tags Tiger and Amos read), values like a model's."""
    gen = torch.Generator().manual_seed(0)
    groups = []
    for key, shape in shapes.items():
        value = torch.randn(shape, generator=gen, dtype=torch.float64) * 0.5
        param = torch.nn.Parameter(value.to(dtype))
        group = {"params": [param]}
        if KINDS[key] is not None:
            group["kind"] = KINDS[key]
        groups.append(group)
    return groups


def make_grads(groups: list[dict], dtype: torch.dtype) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    params = [p for g in groups for p in g["params"]]
    return [
        [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype) for p in params]
        for _ in range(STEPS)
    ]


def run(name: str, path: str, shapes: dict, dtype: torch.dtype, device: str, force: str | None):
    """Three steps on ``path``'s keywords; ``force``: the path ``select_path`` must answer."""
    info = REGISTRY[name]
    groups = make_params(shapes, dtype)
    for group in groups:
        group["params"] = [torch.nn.Parameter(p.detach().to(device)) for p in group["params"]]
    params = [p for g in groups for p in g["params"]]
    kwargs = {**CASES[name]["kwargs"], **info.paths[path]}
    if "stochastic_rounding" in info.defaults:
        kwargs["stochastic_rounding"] = False
    opt = info.cls(groups, **kwargs)
    module = functional_module(name)
    if force is not None and module is None:
        # the keywords alone must then reach the path (they do for "single" without "chunked")
        assert force == "single" and "chunked" not in info.paths, (
            f"{name}: no functional module with select_path to force {force!r} through"
        )
    asked = []
    with pytest.MonkeyPatch.context() as patch:
        if force is not None and module is not None:
            patch.setattr(module, "select_path", lambda *a, **k: asked.append(1) or force)
        for step_grads in make_grads(groups, dtype):
            for p, g in zip(params, step_grads, strict=True):
                p.grad = g.to(device)
            opt.step()
    assert not (force and module) or asked, f"{name}: select_path was never asked: not forced"
    state = [
        (i, key, value.cpu())
        for i, p in enumerate(params)
        for key, value in sorted(opt.state[p].items())
        if torch.is_tensor(value) and value.is_floating_point()
    ]
    return [p.detach().cpu() for p in params], state


def reference(name: str, shapes: dict, dtype: torch.dtype, device: str = "cpu"):
    return run(name, "single", shapes, dtype, device, force="single")


def assert_same(name, path, got, want, shapes, dtype, exact):
    (p_got, s_got), (p_want, s_want) = got, want
    start = [p.detach() for g in make_params(shapes, dtype) for p in g["params"]]
    moved = [not torch.equal(a, b) for a, b in zip(p_want, start, strict=True)]
    assert all(moved), f"{name}: a parameter did not move: the comparison would prove nothing"
    assert [(i, k) for i, k, _ in s_got] == [(i, k) for i, k, _ in s_want], f"{name} {path}"
    pairs = list(zip(p_got, p_want, strict=True))
    pairs += [(a, b) for (_, _, a), (_, _, b) in zip(s_got, s_want, strict=True)]
    for a, b in pairs:
        assert a.dtype == b.dtype and a.shape == b.shape
        if exact:
            assert torch.equal(a, b), f"{name} {path}: not bit-identical to the single path"
        else:
            torch.testing.assert_close(a, b, **TOL[dtype], msg=f"{name} {path}")


def test_every_optimizer_declares_a_path_this_file_can_check():
    for name, info in REGISTRY.items():
        assert set(info.paths) - {"single", "dtensor", "triton"}, (
            f"{name} declares no CPU path besides 'single' (its paths: {sorted(info.paths)}): "
            "declare 'foreach' (and 'chunked'/'compiled' where it has them) in its register() call"
        )


@pytest.mark.parametrize(
    ("name", "path", "dtype"), CASES_CPU, ids=[f"{n}-{p}-{str(d)[6:]}" for n, p, d in CASES_CPU]
)
def test_path_matches_the_single_tensor_path(name, path, dtype):
    if path == "compiled":
        torch._dynamo.reset()
    want = reference(name, LARGE, dtype)
    got = run(name, path, LARGE, dtype, "cpu", force=None)
    assert_same(name, path, got, want, LARGE, dtype, exact=path in EXACT)


@pytest.mark.parametrize("name", CASES_TRITON)
def test_triton_path_matches_the_single_tensor_path(name):
    pytest.importorskip("triton")
    if ON_GPU and not triton_available():
        pytest.skip("triton does not import on this CUDA machine")
    device = "cuda" if ON_GPU else "cpu"
    dtype = torch.float64
    want = reference(name, SMALL, dtype, device)
    # on CUDA the keywords select the kernels; on CPU the interpreter runs them when forced
    got = run(name, "triton", SMALL, dtype, device, force=None if ON_GPU else "triton")
    assert_same(name, "triton", got, want, SMALL, dtype, exact=False)


def test_the_chunked_case_crosses_a_slice_boundary():
    assert math.prod(LARGE["matrix"]) > CHUNK and math.prod(LARGE["matrix"]) % CHUNK != 0
