"""The README's data-dependent example runs as written: it registers, passes the conformance kit,
and merges tiny checkpoints with engine-computed Fisher statistics (which change the result)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _example() -> dict:
    block = README.read_text().split("## Write a data-dependent method", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    ns: dict = {"__name__": "readme_example"}
    exec(compile(block, "README.md (data-dependent example)", "exec"), ns)
    return ns


@pytest.fixture()
def example():
    """The README's method, registered for one test only (the registry is process-wide)."""
    from mergebench.methods import unregister

    yield _example()["fisher_max"]
    unregister("fisher_max")


def test_readme_data_dependent_example_passes_the_kit_and_merges(tiny_pool, example):
    from safetensors.torch import load_file

    from mergebench.engine import merge
    from mergebench.engine.calibration import CalibrationData
    from mergebench.engine.request import MergeRequest
    from mergebench.methods import get_method
    from mergebench.testing import check_method

    spec = example
    assert get_method("fisher_max") is spec and spec.calibration.statistics == ("fisher",)
    assert len(check_method(spec, quiet=True).passed) > 10
    base, experts = tiny_pool
    data = CalibrationData.from_texts([[("Question: capital of France?\nAnswer:", " Paris")],
                                       [("Word: hot. Opposite:", " cold")]])
    result = merge(MergeRequest(method="fisher_max", base=str(base), experts=[str(e) for e in experts[:2]],
                                params={"docs": 1}), None, calibration=data)
    merged = result.state_dict if hasattr(result, "state_dict") else result.tensors
    e0, e1 = (load_file(str(next(Path(e).glob("*.safetensors")))) for e in experts[:2])
    name = next(n for n in e0 if n.endswith("q_proj.weight"))
    m = merged[name].to(torch.float32)
    assert torch.all((m == e0[name]) | (m == e1[name]))  # every entry comes from one expert
    assert not torch.equal(m, e0[name]) and not torch.equal(m, e1[name])  # the Fisher picked from both


def test_merge_command_reads_calibration_texts(tiny_pool, tmp_path):
    import json

    from typer.testing import CliRunner

    from mergebench.cli import app

    base, experts = tiny_pool
    texts = tmp_path / "cal.jsonl"
    texts.write_text("\n".join(json.dumps(d) for d in [
        {"prompt": "Capital of France?", "answer": " Paris", "expert": 0},
        {"prompt": "Opposite of hot?", "answer": " cold", "expert": 1}]) + "\n")
    args = ["merge", "--method", "regmean", "--base", str(base), "--experts", f"{experts[0]},{experts[1]}", "-q"]
    res = CliRunner().invoke(app, [*args, "--calibration-texts", str(texts), "--out", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "m" / "config.json").is_file()
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "m2")])
    assert res.exit_code == 2 and "needs calibration texts" in res.output and not (tmp_path / "m2").exists()
    texts.write_text('{"prompt": "x", "expert": 7}\n')
    res = CliRunner().invoke(app, [*args, "--calibration-texts", str(texts), "--out", str(tmp_path / "m3")])
    assert res.exit_code == 2 and f"{texts}, line 1" in res.output
