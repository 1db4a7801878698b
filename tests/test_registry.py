"""The registry's records (danlu.registry): what each optimizer declares, that every table the
tests keep per optimizer has its entry, and that the CLI reads its choices and settings from it.
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import pytest
import torch
from fuzz_strategies import SPECS
from optimizer_cases import CASES

import danlu
from danlu.cli.common import Baseline, optimizer_choices, transfer_hparams
from danlu.recipes import adamw_to_lion
from danlu.registry import PATHS, REGISTRY, CompareSettings, compare_names, register

ROOT = Path(__file__).resolve().parents[1]
NAMES = sorted(REGISTRY)


def anchors(page: Path) -> set[str]:
    return set(re.findall(r"\{#([a-z0-9-]+)\}", page.read_text()))


def test_every_registered_optimizer_has_its_test_entries():
    """The one per-optimizer table of the shared suites (tests/optimizer_cases.py); everything
    else the tests list per optimizer is generated from the registry or falls back to it."""
    missing = [
        f"{name}: add {key!r} to its entry in tests/optimizer_cases.py CASES ({what})"
        for name in NAMES
        for key, what in (
            ("kwargs", "conformance: keywords for the small test problems"),
            ("invalid", "conformance: (argument, bad value) pairs that must raise"),
            ("fuzz", "fuzz: every constructor argument's valid and invalid values"),
        )
        if key not in CASES.get(name, {})
    ]
    assert not missing, "\n".join(missing)
    assert set(SPECS) == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_reference_is_an_anchor_of_the_algorithms_reference(name):
    page, _, anchor = REGISTRY[name].reference.partition("#")
    assert page == "docs/reference/algorithms.md", REGISTRY[name].reference
    assert anchor in anchors(ROOT / page), f"{name}: no {{#{anchor}}} in {page}"


@pytest.mark.parametrize("name", NAMES)
def test_declared_paths_are_known_and_select_with_accepted_keywords(name):
    info = REGISTRY[name]
    assert "single" in info.paths and set(info.paths) <= set(PATHS)
    for options in info.paths.values():
        info.cls([torch.nn.Parameter(torch.ones(2))], **options)  # accepted


def test_register_refuses_unknown_paths_and_keywords():
    class Toy(torch.optim.SGD):
        def __init__(self, params, lr: float = 0.1, foreach: bool | None = None):
            super().__init__(params, lr=lr, foreach=foreach)

    common = {"reference": "docs/x.md#y", "summary": "s", "state_bytes": "0"}
    with pytest.raises(ValueError, match="unknown path 'fast'"):
        register("toy-a", Toy, **common, state_bytes_accum="0", paths={"single": {}, "fast": {}})
    with pytest.raises(ValueError, match="must include 'single'"):
        register("toy-b", Toy, **common, state_bytes_accum="0", paths={"foreach": {}})
    with pytest.raises(ValueError, match="'fused'"):
        register("toy-c", Toy, **common, state_bytes_accum="0", paths={"single": {"fused": True}})
    assert not {"toy-a", "toy-b", "toy-c"} & set(REGISTRY)


def test_spec_section_is_a_deprecated_alias_of_reference():
    info = REGISTRY["tiger"]
    with pytest.warns(DeprecationWarning, match="reference"):
        assert info.spec_section == info.reference


def test_register_accepts_the_deprecated_spec_section_keyword():
    class Toy(torch.optim.SGD):
        pass

    try:
        with pytest.warns(DeprecationWarning, match="reference="):
            info = register(
                "toy-old",
                Toy,
                spec_section="docs/old.md#toy",
                summary="s",
                state_bytes="0",
                state_bytes_accum="0",
            )
        assert info.reference == "docs/old.md#toy" and dict(info.paths) == {"single": {}}
    finally:
        REGISTRY.pop("toy-old", None)


def test_compare_choices_are_the_registry_in_rank_order():
    ranks = {n: REGISTRY[n].compare.rank for n in NAMES if REGISTRY[n].compare is not None}
    assert optimizer_choices() == compare_names() == tuple(sorted(ranks, key=ranks.get))
    assert len(set(ranks.values())) == len(ranks), "two optimizers share a compare rank"
    colours = [REGISTRY[n].compare.colour for n in ranks]
    assert len(set(colours)) == len(colours), "two optimizers share a colour"
    assert optimizer_choices()[0] == "adamw"  # the baseline every gap is measured against


@pytest.mark.parametrize("name", [n for n in NAMES if REGISTRY[n].compare is not None])
def test_compare_settings_are_complete(name):
    settings = REGISTRY[name].compare
    base = Baseline(lr=3e-3, weight_decay=0.1, batches_per_epoch=100)
    hparams = settings.rule(base)
    assert hparams["lr"] > 0 and settings.rule_note
    REGISTRY[name].cls([torch.nn.Parameter(torch.ones(2))], **hparams)  # the rule is valid
    if settings.rule_claim or settings.matches_adamw_claim:
        assert settings.blog and settings.blog.isdigit(), f"{name}: claims need a blog article"
    assert set(settings.centres) <= {"digits", "charlm"}
    assert set(settings.grid_overrides) <= {"digits", "charlm"}


def test_transfer_rules_are_the_blogs():
    base = Baseline(lr=3e-3, weight_decay=0.1, batches_per_epoch=400)
    lion = adamw_to_lion(base.lr, base.weight_decay)  # the recipe the rule calls
    assert transfer_hparams("lion", base, None) == {
        "lr": lion.lr,
        "weight_decay": lion.weight_decay,
    }
    assert transfer_hparams("adamw", base, None) == {"lr": 3e-3, "weight_decay": 0.1}
    assert transfer_hparams("adax", base, 1e-2) == {"lr": 1e-2, "weight_decay": 0.1}
    assert transfer_hparams("amos", base, None) == {"lr": 1 / math.sqrt(400)}
    assert transfer_hparams("adafactor", base, None) == {"lr": 1e-3}
    assert transfer_hparams("tiger", base, None)["beta"] == 0.965
    vision = Baseline(lr=3e-3, weight_decay=0.1, batches_per_epoch=400, vision=True)
    assert transfer_hparams("tiger", vision, None) == {
        "lr": 2e-3,
        "weight_decay": 0.01,
        "beta": 0.945,
    }


def test_a_newly_registered_optimizer_is_offered_by_the_cli():
    from danlu.cli.compare import build_parser

    class SignSGD(torch.optim.SGD):
        def __init__(self, params, lr: float = 1e-3):
            super().__init__(params, lr=lr)

    settings = CompareSettings(
        rule=lambda base: {"lr": base.lr / 3}, rule_note="a third", rank=99, colour="#000000"
    )
    try:
        register(
            "toysign",
            SignSGD,
            reference="docs/reference/algorithms.md#lion-rule",
            summary="s",
            state_bytes="0",
            state_bytes_accum="4",
            compare=settings,
        )
        assert optimizer_choices()[-1] == "toysign"
        assert "toysign" in build_parser().format_help()
        base = Baseline(lr=3e-3, weight_decay=0.1, batches_per_epoch=100)
        assert transfer_hparams("toysign", base, None) == {"lr": 1e-3}
    finally:
        REGISTRY.pop("toysign")
    assert "toysign" not in optimizer_choices()


def test_the_registry_is_danlus():
    assert danlu.REGISTRY is REGISTRY and NAMES
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reading the new fields warns about nothing
        for info in REGISTRY.values():
            assert info.reference and info.paths


def test_step_bench_floor_comes_from_the_registrys_state_bytes():
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import step_bench

    # read p, g and the state, write p and the state (4 bytes each per fp32 number)
    expected = {"lion": 20, "tiger": 20, "adamw": 28, "adax": 28, "adafactor": 12, "amos": 12}
    assert {n: step_bench.floor_bytes(n) for n in expected} == expected
    assert {name for name, _, _ in step_bench._danlu_impls()} == set(REGISTRY)
