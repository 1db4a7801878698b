"""``torch.compile`` (Inductor, CPU) of the optimizer step of a real language model, for every
registered optimizer: a tiny randomly initialised ``transformers`` Llama (no download), its
parameters split by ``danlu.param_groups`` into every kind (embedding, norm gains, biases,
matrices, and the head: tied to the embedding or an untied output layer).

The compiled step must equal the eager one and must not recompile when a scheduler changes the
tensor lr. Tiger's per-row RMS of an embedding made Inductor's CPU code generation fail
(``InductorError: KeyError: 'buf4'``, pytorch#196570) on exactly the docs' recipe; it is the
opaque op ``danlu::row_norm`` inside a compiled step (danlu/core/row_norm.py).

Only ``opt.step()`` is compiled (the model's forward and backward run eagerly, identically in
both runs): each optimizer compiles one graph, which keeps the file short on a CI core.
"""

from __future__ import annotations

import pytest
import tiny_models
import torch
from optimizer_cases import CASES as OPTIMIZER_CASES
from torch._dynamo.testing import CompileCounterWithBackend

import danlu
from danlu.core.row_norm import row_norm
from danlu.registry import REGISTRY

VOCAB, STEPS = 64, 3
LR = {"lion": 1e-3, "tiger": 2e-3, "adafactor": 1e-2, "adax": 1e-3, "amos": 0.05, "adamw": 1e-3}

# One compile per optimizer (seconds of Inductor each on a CI core); the head alternates
# between tied to the embedding (Tiger: the docs' recipe, and the case the Inductor bug hit)
# and an untied output layer (Amos: its eta="output" group).
CASES = [
    ("lion", False),
    ("tiger", True),
    ("adafactor", False),
    ("adax", True),
    ("amos", False),
    ("adamw", True),
]

# A registered optimizer not listed above, at its conformance lr (tests/optimizer_cases.py),
# with the head tied and untied in turn. Add a line above to tune it.
for _i, _name in enumerate(sorted(set(REGISTRY) - {n for n, _ in CASES})):
    LR.setdefault(_name, OPTIMIZER_CASES[_name]["kwargs"]["lr"])
    CASES.append((_name, _i % 2 == 0))


def test_every_registered_optimizer_is_covered():
    assert {name for name, _ in CASES} == set(REGISTRY) == set(LR)
    assert {tied for _, tied in CASES} == {True, False}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def tiny_llama(tied: bool) -> torch.nn.Module:
    # attention_bias: bias parameters, the "elementwise" kind with centre 0
    return tiny_models.tiny_llama(
        VOCAB, hidden=32, heads=4, attention_bias=True, tie_word_embeddings=tied
    )


def groups_of(model: torch.nn.Module, tied: bool) -> list[dict]:
    head = None if tied else model.lm_head
    groups = danlu.param_groups(model, weight_decay=0.01, output_layer=head)
    kinds = {(g["kind"], g["center"], g["eta"]) for g in groups}
    expected = {
        ("matrix", 0.0, "auto"),
        ("embedding", 0.0, "auto"),
        ("elementwise", 1.0, 0.5),  # RMSNorm gains
        ("elementwise", 0.0, 0.5),  # attention biases
    }
    assert kinds == expected | ({("matrix", 0.0, "output")} if not tied else set())
    shared = model.lm_head.weight is model.model.embed_tokens.weight
    assert shared == tied
    return groups


def train(name: str, tied: bool, *, compiled: bool):
    """STEPS steps; returns (model, optimizer, frame counts after each step)."""
    model = tiny_llama(tied)
    opt = danlu.create_optimizer(name, groups_of(model, tied), lr=torch.tensor(LR[name]))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))

    def step():
        opt.step()
        opt.zero_grad()

    counter = CompileCounterWithBackend("inductor")
    stepper = torch.compile(step, backend=counter) if compiled else step
    frames = []
    for _ in range(STEPS):
        model(tokens, labels=tokens).loss.backward()
        stepper()
        sched.step()
        frames.append(counter.frame_count)
    return model, opt, frames


@pytest.mark.parametrize(
    ("name", "tied"), CASES, ids=[f"{n}-{'tied' if t else 'untied'}" for n, t in CASES]
)
def test_compiled_step_of_a_language_model_equals_eager(name, tied):
    eager_model, eager_opt, _ = train(name, tied, compiled=False)
    model, opt, frames = train(name, tied, compiled=True)
    assert frames[0] > 0
    assert frames == [frames[0]] * STEPS, f"recompiled: {frames}"
    initial = tiny_llama(tied)
    for (key, p), p_eager, p0 in zip(
        model.named_parameters(), eager_model.parameters(), initial.parameters(), strict=True
    ):
        assert not torch.equal(p, p0), f"{key} did not move"
        torch.testing.assert_close(p, p_eager, rtol=1e-5, atol=1e-6, msg=key)
        for state_key, value in eager_opt.state[p_eager].items():
            torch.testing.assert_close(
                opt.state[p][state_key], value, rtol=1e-5, atol=1e-6, msg=f"{key} {state_key}"
            )


def test_row_norm_is_the_eager_norm_bit_for_bit_and_an_opaque_op_when_compiled():
    x = torch.randn(5, 7, dtype=torch.bfloat16)
    for dtype in (torch.float32, torch.float64):
        expected = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=dtype)
        assert torch.equal(row_norm(x, dtype), expected)
        assert torch.equal(torch.ops.danlu.row_norm(x, dtype), expected)
    torch.library.opcheck(torch.ops.danlu.row_norm.default, (x, torch.float32))
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    out = torch.compile(lambda t: row_norm(t, torch.float32) * 2, backend=backend)(x)
    torch.testing.assert_close(out, expected.float() * 2)
    targets = [n.target for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert torch.ops.danlu.row_norm.default in targets
