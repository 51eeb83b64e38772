"""Every built-in method passes the plugin conformance kit (one pytest item per check)."""

import pytest

from mergebench.methods import list_methods
from mergebench.testing import method_checks

CHECKS = [c for m in list_methods() if m.source.startswith("mergebench.baselines.") for c in method_checks(m)]


@pytest.mark.parametrize("check", CHECKS, ids=[c.name for c in CHECKS])
def test_conformance(check):
    check()
