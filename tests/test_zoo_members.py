"""`mergebench eval` materializes only the missing members of the pool it runs on: the shared base
must not pull in the other embedded pool's experts (each pool is 13 x 0.5 GB)."""

from __future__ import annotations

import pytest

from mergebench.zoo import base as zbase
from mergebench.zoo import pool as zpool
from mergebench.zoo import wild


@pytest.fixture
def calls(monkeypatch):
    seen: list[tuple] = []
    monkeypatch.setattr(zpool, "materialize", lambda names=None, log=None: seen.append(("smol", tuple(names))))
    monkeypatch.setattr(wild, "materialize", lambda names=None, log=None: seen.append(("wild", tuple(names))))
    monkeypatch.setattr(zbase, "materialize_base", lambda *a, **k: seen.append(("base",)))
    return seen


@pytest.mark.parametrize(("names", "want"), [
    (["base", "wild/iso-attn", "wild/french-dict"], [("wild", ("iso-attn", "french-dict"))]),
    (["base"], [("base",)]),
    (["base", "analogies"], [("smol", ("analogies",))]),
    (["analogies", "wild/iso-attn"], [("smol", ("analogies",)), ("wild", ("iso-attn",))]),
])
def test_only_the_missing_members_of_their_own_pool_are_materialized(calls, names, want):
    zpool.materialize_members(names, log=lambda m: None)
    assert calls == want
