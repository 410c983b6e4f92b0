"""The enumerations of docs/formats.md: the public names the document gives are the enums'
values, in its order; membership by value; docstrings that say what each value means."""

from __future__ import annotations

import re

import pytest

from kfac_cli.enums import ComputeDtype, FisherType, KFACType, Layout, LossReduction
from tests.conftest import ROOT

DOC = (ROOT / "docs" / "formats.md").read_text().split("## Enumerations", 1)[1]


@pytest.mark.parametrize("enum", [KFACType, FisherType, LossReduction, Layout], ids=str)
def test_values_are_the_documented_names(enum):
    """Each enum's bullet in docs/formats.md lists its values: the first backticked word
    of each clause after the class name."""
    bullet = re.search(rf"\(`{enum.__name__}`\):(.*?)(?:\n- |\Z)", DOC, flags=re.DOTALL)
    assert bullet, f"docs/formats.md documents no {enum.__name__}"
    text = re.sub(r"\([^()]*(?:\([^()]*\)[^()]*)*\)", "", bullet.group(1))  # drop asides
    assert re.findall(r"`([^`]+)`", text) == [m.value for m in enum]


def test_membership_by_value():
    assert "reduce" in KFACType and KFACType.EXPAND in KFACType
    assert "foo" not in KFACType and 3 not in KFACType and "mc" not in KFACType
    assert "forward-only" in FisherType and "type2" not in FisherType
    assert KFACType("reduce") is KFACType.REDUCE and FisherType("type-2") is FisherType.TYPE2
    assert str(FisherType.EMPIRICAL) == "empirical" and f"{ComputeDtype.FLOAT64}" == "float64"


@pytest.mark.parametrize("enum", [KFACType, FisherType])
def test_docstrings_say_what_each_value_means(enum):
    for member in enum:
        assert f"``{member.value}``" in enum.__doc__
