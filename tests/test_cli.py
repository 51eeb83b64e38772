"""The command line as a user drives it: listing methods, merging from flags and from YAML, errors."""

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from mergebench.cli import app
from mergebench.methods import list_methods

runner = CliRunner()


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_methods_json_lists_every_method_with_params_and_citation():
    res = runner.invoke(app, ["methods", "--json"])
    assert res.exit_code == 0, res.output
    listed = {m["name"]: m for m in json.loads(res.stdout)}
    assert set(listed) == {m.name for m in list_methods()}
    ties = listed["ties"]
    assert {p["name"] for p in ties["params"]} >= {"density", "lambda", "normalize"}
    assert "Yadav" in ties["citation"]
    assert listed["karcher"]["base"] == "unused"


def test_an_unknown_method_is_one_line():
    res = runner.invoke(app, ["methods", "nosuch"])
    assert res.exit_code == 2 and res.output == "error: unknown merge method 'nosuch' (run `mergebench methods` to list them)\n"


def test_methods_table_and_detail():
    res = runner.invoke(app, ["methods", "karcher"])
    assert res.exit_code == 0 and "max_iter" in res.stdout and "karcher" in res.stdout


def test_merge_from_flags_equals_a_float64_weighted_average(tiny_pool, tmp_path):
    base, experts = tiny_pool
    out = tmp_path / "lin"
    res = runner.invoke(
        app,
        ["merge", "--method", "linear", "--experts", ",".join(map(str, experts)), "--weights", "1,2,1", "--out", str(out), "-q"],
    )
    assert res.exit_code == 0, res.output
    merged = _weights(out)
    ins = [_weights(e) for e in experts]
    for name, t in merged.items():
        ref = (ins[0][name].double() + 2 * ins[1][name].double() + ins[2][name].double()) / 4
        torch.testing.assert_close(t.double(), ref, rtol=1e-6, atol=1e-7)
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()


def test_merge_from_mergekit_yaml_matches_the_same_merge_from_flags(tmp_path):
    from pathlib import Path

    tiny = Path(__file__).parents[1] / "examples" / "tiny"
    a, b = tmp_path / "yaml", tmp_path / "flags"
    res = runner.invoke(app, ["merge", str(tiny / "ties.yaml"), "--out", str(a), "-q"])
    assert res.exit_code == 0, res.output
    experts = ",".join(str(tiny / f"expert_{i}") for i in range(3))
    res = runner.invoke(
        app,
        ["merge", "--method", "ties", "--base", str(tiny / "base"), "--experts", experts, "--weights", "1,1,0.5",
         "--set", "density=0.5,0.5,0.3", "--set", "lambda=1.0", "--set", "normalize=true", "--out", str(b), "-q"],
    )
    assert res.exit_code == 0, res.output
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--method", "ties", "--set", "density=1.5"], "'density' must be in [0"),
        (["--method", "ties", "--set", "dens=0.5"], "has no parameter 'dens'"),
        (["--method", "ties", "--set", "density"], "--set expects key=value"),
        (["--method", "slerp"], "at most 2 experts"),
        (["--method", "nope"], "unknown merge method 'nope'"),
        (["--method", "linear", "--weights", "1,x,1"], "--weights must be comma-separated numbers"),
        (["--method", "linear", "--dtype", "float8"], "dtype: Input should be 'float32'"),  # pydantic, one line
        (["--method", "linear", "--device", "tpu"], "unknown device 'tpu'"),
    ],
)
def test_bad_input_is_a_one_line_error_and_leaves_no_output(tiny_pool, tmp_path, args, fragment):
    base, experts = tiny_pool
    out = tmp_path / "never"
    res = runner.invoke(app, ["merge", *args, "--base", str(base), "--experts", ",".join(map(str, experts)), "--out", str(out)])
    assert res.exit_code == 2
    assert fragment in res.output and res.output.count("\n") == 1 and res.output.startswith("error: "), res.output
    assert "Traceback" not in res.output
    assert not out.exists() and not list(tmp_path.iterdir())


def test_missing_checkpoint_is_named(tiny_pool, tmp_path):
    base, experts = tiny_pool
    res = runner.invoke(app, ["merge", "--method", "linear", "--experts", f"{experts[0]},{tmp_path / 'missing'}", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "missing" in res.output and not (tmp_path / "o").exists()


def test_existing_output_needs_overwrite(tiny_pool, tmp_path):
    _, experts = tiny_pool
    out = tmp_path / "o"
    args = ["merge", "--method", "linear", "--experts", ",".join(map(str, experts)), "--out", str(out), "-q"]
    assert runner.invoke(app, args).exit_code == 0
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "--overwrite" in " ".join(res.output.split())
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0


def test_the_example_plugin_merges_through_the_cli(tiny_pool, tmp_path):
    """The third-party method is discovered through its entry point and used like a built-in."""
    base, experts = tiny_pool
    out = tmp_path / "median"
    res = runner.invoke(
        app, ["merge", "--method", "median", "--base", str(base), "--experts", ",".join(map(str, experts)), "--out", str(out), "-q"]
    )
    assert res.exit_code == 0, res.output
    merged, b = _weights(out), _weights(base)
    ins = [_weights(e) for e in experts]
    for name, t in merged.items():
        deltas = torch.stack([e[name].double() - b[name].double() for e in ins])
        torch.testing.assert_close(t.double(), b[name].double() + deltas.median(dim=0).values, rtol=1e-6, atol=1e-6)
