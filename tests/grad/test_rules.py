"""Every registered gradient rule against central finite differences, parametrised over the rule table.

A rule without cases fails ``test_every_rule_has_cases``, so no rule can land untested.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import pytest
from harness import Case, check_case
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from uncnn_rt.converters.grad.registry import RULES

CaseFn = object


def _collect_cases() -> dict[str, list]:
    cases: dict[str, list] = {}
    here = Path(__file__).parent
    for info in pkgutil.iter_modules([str(here)]):
        if info.name.startswith("cases_"):
            module = importlib.import_module(info.name)
            for op_type, fns in module.CASES.items():
                cases.setdefault(op_type, []).extend(fns)
    return cases


CASES = _collect_cases()


def test_every_rule_has_cases() -> None:
    missing = sorted(set(RULES) - set(CASES))
    assert not missing, f"gradient rules without test cases: {missing}"


def test_no_cases_for_unknown_ops() -> None:
    unknown = sorted(set(CASES) - set(RULES))
    assert not unknown, f"test cases for ops that have no rule: {unknown}"


PARAMS = [pytest.param(op, fn, id=f"{op}-{fn.__name__}") for op in sorted(CASES) for fn in CASES[op]]


@pytest.mark.parametrize(("op_type", "case_fn"), PARAMS)
@settings(
    max_examples=6,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_rule_matches_finite_differences(op_type: str, case_fn, data: st.DataObject) -> None:
    case: Case = case_fn(data.draw)
    check_case(case)
