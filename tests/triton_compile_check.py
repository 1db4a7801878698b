"""Compile each Triton kernel with the real Triton compiler for an sm_90 GPU target (to PTX
and machine code with the ptxas that ships with Triton): no GPU is needed. Run by
tests/test_kernels_triton.py in a subprocess, because the interpreter (TRITON_INTERPRET=1)
replaces the kernels in the process that runs the interpreter tests.

Prints one JSON line per compiled variant: the kernel, its settings and the number of
128-bit global loads in the PTX.
"""

import json
import os
import re
import sys

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import danlu.core.triton as shared
from danlu.algorithms.adafactor.triton import (
    _adafactor_reduce_kernel,
    _adafactor_update_kernel,
)
from danlu.algorithms.adax.triton import _adax_kernel
from danlu.algorithms.lion.triton import _lion_kernel
from danlu.algorithms.tiger.triton import _tiger_kernel

TARGET = GPUTarget("cuda", 90, 32)
TABLES = {"sizes": "*i64", "block_tensor": "*i32", "block_index": "*i32"}


def compile_variant(kernel, types, consts):
    signature = {n: "constexpr" if n in consts else types[n] for n in kernel.arg_names}
    compiled = triton.compile(
        ASTSource(fn=kernel, signature=signature, constexprs=consts), target=TARGET
    )
    ptx = compiled.asm["ptx"]
    label = {k: str(v) for k, v in consts.items() if k != "BLOCK"}
    return {
        "kernel": kernel.__name__,
        **label,
        "v4_loads": len(re.findall(r"ld\.global(\.\w+)*\.v4", ptx)),
    }


def compute(dtype):
    return tl.float64 if dtype == tl.float64 else tl.float32


def scalar_ptr(dtype):
    return "*fp64" if dtype == tl.float64 else "*fp32"


def variants(full):
    f32, bf16, f64, f16 = tl.float32, tl.bfloat16, tl.float64, tl.float16
    for p, m, sr in [(f32, f32, False), (bf16, f32, True), (f16, f32, True)] + (
        [(f32, bf16, False), (f64, f64, False)] if full else []
    ):
        c = compute(p)
        types = {
            "p_addrs": "*i64",
            "g_addrs": "*i64",
            "m_addrs": "*i64",
            **TABLES,
            "lr_ptr": scalar_ptr(c),
            "hyper_ptr": scalar_ptr(c),
            "seed_ptr": "*i64",
        }
        yield (
            _lion_kernel,
            types,
            {
                "MAXIMIZE": True,
                "STOCHASTIC": sr,
                "ALIGNED": True,
                "P_DTYPE": p,
                "G_DTYPE": p,
                "M_DTYPE": m,
                "COMPUTE": c,
                "BLOCK": 1024,
            },
        )
    for p, m, sr, rowwise, nonfinite in [
        (f32, f32, False, False, 1),
        (bf16, bf16, True, True, 2),
    ] + ([(f64, f64, False, False, 0)] if full else []):
        c = compute(p)
        types = {
            "p_addrs": "*i64",
            "g_addrs": "*i64",
            "m_addrs": "*i64",
            **TABLES,
            "eta_ptr": scalar_ptr(c),
            "ok_ptr": "*i8",
            "hyper_ptr": scalar_ptr(c),
            "seed_ptr": "*i64",
            "width": "i32",
        }
        yield (
            _tiger_kernel,
            types,
            {
                "K1": not rowwise,
                "FIRST": True,
                "LAST": True,
                "ROWWISE": rowwise,
                "MAXIMIZE": False,
                "NONFINITE": nonfinite,
                "DECAY": True,
                "STOCHASTIC": sr,
                "ALIGNED": True,
                "P_DTYPE": p,
                "G_DTYPE": p,
                "M_DTYPE": m,
                "COMPUTE": c,
                "BLOCK": 1024,
            },
        )
    for p, v in [(f32, f32), (bf16, f32), (f16, f32)] + ([(f64, f64)] if full else []):
        types = {
            "p_addrs": "*i64",
            "g_addrs": "*i64",
            "m_addrs": "*i64",
            "v_addrs": "*i64",
            **TABLES,
            "lr_ptr": scalar_ptr(v),
            "hyper_ptr": scalar_ptr(v),
            "seed_ptr": "*i64",
        }
        yield (
            _adax_kernel,
            types,
            {
                "MAXIMIZE": True,
                "EPS_INSIDE_SQRT": p == bf16,
                "DECAY": True,
                "STOCHASTIC": p != f32,
                "ALIGNED": True,
                "P_DTYPE": p,
                "G_DTYPE": p,
                "M_DTYPE": p,
                "V_DTYPE": v,
                "COMPUTE": v,
                "BLOCK": 1024,
            },
        )
    layouts = [(True, (True, True, True), tl.int32), (False, (True, True, True), tl.int32)]
    if full:
        layouts.append((True, (False, False, False), tl.int64))
    for p, v in [(f32, f32), (bf16, f32), (f16, f32)] + ([(f64, f64)] if full else []):
        for factored, (p1, q1, s1), index in layouts:
            s = scalar_ptr(v)
            common = {
                "FACTORED": factored,
                "ALIGNED": True,
                "P_DTYPE": p,
                "G_DTYPE": p,
                "V_DTYPE": v,
                "COMPUTE": v,
                "P1": p1,
                "Q1": q1,
                "S1": s1,
                "INDEX": index,
                "BLOCK": 1024,
            }
            types = {
                "p_addrs": "*i64",
                "g_addrs": "*i64",
                "v_addrs": "*i64",
                **TABLES,
                "info_ptr": "*i64",
                "factors_ptr": s,
                "hyper_ptr": s,
                "bound_ptr": s,
                "partials": "*fp64",
                "num_programs": "i32",
            }
            yield (
                _adafactor_reduce_kernel,
                types,
                {"UPDATE_V": not factored, "CLIP": True, "SCALE": True, **common},
            )
            types = {
                "p_addrs": "*i64",
                "g_addrs": "*i64",
                "v_addrs": "*i64",
                "m_addrs": "*i64",
                **TABLES,
                "info_ptr": "*i64",
                "factors_ptr": s,
                "hyper_ptr": s,
                "bound_ptr": s,
                "step_ptr": s,
                "clip_ptr": s,
                "factor_ptr": s,
                "coef_ptr": s,
                "seed_ptr": "*i64",
            }
            for momentum in (0, 1, 2) if full or (p == f32 and factored) else (1,):
                yield (
                    _adafactor_update_kernel,
                    types,
                    {
                        "UPDATE_V": not factored,
                        "MOMENTUM": momentum,
                        "MAXIMIZE": True,
                        "DECAY": True,
                        "STOCHASTIC": p != f32,
                        "M_DTYPE": p,
                        **common,
                    },
                )
    for s in ("*fp32", "*fp64"):  # AdaFactor's partial sums are float64
        yield (
            shared._segment_sum_kernel,
            {
                "partials": s,
                "offsets": "*i32",
                "out": s,
                "num_programs": "i32",
                "num_tensors": "i32",
            },
            {"BLOCK": 256},
        )


if __name__ == "__main__":
    for kernel, types, consts in variants(full="--all" in sys.argv):
        print(json.dumps(compile_variant(kernel, types, consts)), flush=True)
