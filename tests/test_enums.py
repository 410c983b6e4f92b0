"""The enumerations of SPEC.md: string values, membership by value, docstrings."""

from __future__ import annotations

import pytest

from kfac_cli import FisherType, KFACType


def test_values_and_membership():
    assert [t.value for t in KFACType] == ["expand", "reduce"]
    assert [t.value for t in FisherType] == ["type-2", "mc", "empirical", "forward-only"]
    assert "reduce" in KFACType and "expand" in KFACType and KFACType.EXPAND in KFACType
    assert "foo" not in KFACType and 3 not in KFACType and "mc" not in KFACType
    assert "forward-only" in FisherType and "type2" not in FisherType
    assert KFACType("reduce") is KFACType.REDUCE and FisherType("type-2") is FisherType.TYPE2
    assert str(FisherType.EMPIRICAL) == "empirical" and KFACType.EXPAND == "expand"


@pytest.mark.parametrize("enum", [KFACType, FisherType])
def test_docstrings_say_what_each_value_means(enum):
    for member in enum:
        assert f"``{member.value}``" in enum.__doc__
