"""The per-row 2-norm of an embedding, opaque to ``torch.compile``.

Tiger's ``kind="embedding"`` scales each row's step by the row's RMS, a reduction over the last
axis followed by the in-place update of the same rows. Inductor's CPU code generation (torch
2.13) fuses that pattern into an outer loop with a local buffer, which assumes every user of
the buffer loads it and fails for the mutated parameter with ``InductorError: KeyError:
'buf4'`` (pytorch#196570): every compiled training step of a language model built with
``danlu.param_groups`` failed. Inside a compiled region the norm is
therefore the custom op ``danlu::row_norm``, which Inductor calls as a kernel of its own
instead of fusing it; eagerly it is the same ``torch.linalg.vector_norm`` call, bit for bit.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["row_norm"]


@torch.library.custom_op("danlu::row_norm", mutates_args=())
def _row_norm_op(x: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=dtype)


@_row_norm_op.register_fake
def _(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x.new_empty((*x.shape[:-1], 1), dtype=dtype)


def row_norm(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=dtype)``; inside
    ``torch.compile`` through the opaque op ``danlu::row_norm`` (see the module docstring)."""
    if torch.compiler.is_compiling():
        return _row_norm_op(x, dtype)
    return torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=dtype)
