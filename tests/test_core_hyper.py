"""danlu.core.hyper.accepts_keywords: a path taking one hyper-parameter dataclass can also be
called with the dataclass's fields as keywords."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from danlu.core.hyper import accepts_keywords


@dataclass(frozen=True)
class Plain:
    lr: float
    beta: float = 0.9


@dataclass(frozen=True)
class Checked:
    lr: float

    @classmethod
    def of(cls, **fields):
        if fields["lr"] < 0:
            raise ValueError(f"lr must be >= 0, got {fields['lr']}")
        return cls(**fields)


def _path(values, hyper, *, scale=1.0):
    """A stand-in for a path: records what it was given."""
    return values, hyper, scale


def test_fields_as_keywords_build_the_dataclass_and_other_keywords_pass_through():
    path = accepts_keywords(Plain)(_path)
    values, hyper, scale = path([1.0], lr=0.1, scale=2.0)
    assert values == [1.0] and hyper == Plain(lr=0.1, beta=0.9) and scale == 2.0


@pytest.mark.parametrize("as_keyword", [True, False])
def test_a_dataclass_passed_in_is_used_as_it_is(as_keyword):
    path = accepts_keywords(Plain)(_path)
    given = Plain(lr=0.5, beta=0.1)
    _, hyper, _ = path([1.0], hyper=given) if as_keyword else path([1.0], given)
    assert hyper is given


def test_the_checked_constructor_runs_when_the_type_has_one():
    path = accepts_keywords(Checked)(_path)
    assert path([], lr=0.2)[1] == Checked(lr=0.2)
    with pytest.raises(ValueError, match="lr must be >= 0"):
        path([], lr=-1.0)


def test_the_wrapped_path_keeps_its_name_and_docstring():
    path = accepts_keywords(Plain)(_path)
    assert path.__name__ == "_path" and path.__doc__ == _path.__doc__
