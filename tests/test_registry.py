"""Discovery through entry points, the decorator, and name collisions."""

import importlib.metadata as md

import pytest

from mergebench.methods import ENTRY_POINT_GROUP, MethodSpec, get_method, list_methods, register
from mergebench.methods.registry import UnknownMethodError

# Every method the seed papers use must be a built-in, discovered through the entry point group.
SEED_METHODS = {
    "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "della_linear", "della_ties",
    "breadcrumbs", "slerp", "multislerp", "layer_adaptive_slerp", "karcher", "model_stock", "sce",
    "arcee_fusion", "tsv_merge", "iso_c", "subspace_boosting",
}


def test_builtins_come_through_the_plugin_entry_point_group():
    groups = {ep.value for ep in md.entry_points(group=ENTRY_POINT_GROUP)}
    assert "mergebench.baselines.linear" in groups
    builtins = {m.name for m in list_methods() if m.source.startswith("mergebench.baselines.")}
    missing = SEED_METHODS - builtins
    assert not missing, f"seed methods not registered: {sorted(missing)}"


def test_unknown_method_suggests_close_names():
    with pytest.raises(UnknownMethodError, match="did you mean karcher"):
        get_method("karcer")


def test_name_collision_is_an_error():
    other = MethodSpec(name="linear", kernel=lambda b, e, w, p, c: e[0], source="someone.else")
    with pytest.raises(ValueError, match="registered twice"):
        register(other)


def test_example_plugin_is_discovered_and_conforms():
    names = {ep.name for ep in md.entry_points(group=ENTRY_POINT_GROUP)}
    assert "median" in names, "the example plugin is not installed: run scripts/install.sh"
    from mergebench.testing import check_method

    spec = get_method("median")
    assert spec.source == "mergebench_median"
    check_method(spec)


def test_a_broken_plugin_does_not_hide_the_others(monkeypatch):
    from mergebench.methods import registry

    class FakeEP:
        name, value = "broken_one", "no_such_module:thing"

        def load(self):
            raise ImportError("No module named 'no_such_module'")

    real = registry.md.entry_points
    monkeypatch.setattr(registry.md, "entry_points", lambda group: [*real(group=group), FakeEP()])
    monkeypatch.setattr(registry, "_BROKEN", {})
    with pytest.warns(UserWarning, match="broken_one"):
        registry.load_entry_points(force=True)
    assert get_method("linear").name == "linear"
    with pytest.raises(UnknownMethodError, match="plugin 'broken_one' failed to load"):
        get_method("no_such_method")


def test_readme_lists_every_builtin_method():
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    missing = [m.name for m in list_methods() if m.source.startswith("mergebench.baselines.") and f"`{m.name}`" not in readme]
    assert not missing, f"README does not mention {missing}"
