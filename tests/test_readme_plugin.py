"""The README's "Write a merge method" section, followed verbatim by someone new to the project.

Its two files (kernel and complete ``pyproject.toml``) must be ``examples/median-plugin``'s, byte
for byte; the slow test writes them into a fresh package under a unique name (so it cannot clash
with the installed example), pip-installs it editable into the running venv, and drives it as
the README says: ``mergebench methods``, ``check_method``, ``mergebench merge`` on tiny random
checkpoints (against a float64 median computed here) and ``mergebench plan`` of a suite. It
uninstalls the package afterwards, and checks that it is gone.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from mergebench.methods import InputContract, MethodSpec
from mergebench.testing import CheckFailure, ConformanceReport, check_method, method_checks

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "median-plugin"
BIN = Path(sys.executable).parent


def _env() -> dict[str, str]:  # read per call: fixtures set MERGEBENCH_SUITES
    return {**os.environ, "COLUMNS": "250", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Write a merge method")
    return text[start:text.index("\n## ", start + 3)]


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```$", _section(), flags=re.S | re.M)


def test_the_readme_shows_the_example_plugin_verbatim_and_how_to_use_it():
    kernel, check_snippet = _blocks("python")
    (toml,) = _blocks("toml")
    assert kernel == (EXAMPLE / "mergebench_median" / "__init__.py").read_text()
    assert toml == (EXAMPLE / "pyproject.toml").read_text()
    for part in ("[build-system]", 'name = "mergebench-median"', "version =", '"mergebench"',
                 '[project.entry-points."mergebench.methods"]'):
        assert part in toml, part
    (steps,) = _blocks("bash")
    assert "source .venv/bin/activate" in steps and "pip install -e my-plugin" in steps
    assert "mergebench methods median" in steps and "mergebench merge --method median" in steps
    prose = " ".join(_section().split())
    assert "`eval`, `sweep`, `report` and the leaderboard find the method through the entry point" in prose
    assert 'check_method(get_method("median"))' in check_snippet


def _mean(base, experts, weights, params, ctx):
    return base + torch.stack([e - base for e in experts]).mean(0)


def test_check_method_prints_and_returns_a_one_line_summary(capsys):
    spec = MethodSpec(name="kit_mean", version="2.1", kernel=_mean, citation="test",
                      contract=InputContract(base="required"), properties={"idempotent", "order_invariant"})
    report = check_method(spec)
    assert isinstance(report, ConformanceReport)
    every = [c.name for c in method_checks(spec)]
    gpu = torch.cuda.is_available()
    assert report.skipped == (() if gpu else ("kit_mean:devices",))
    assert sorted(report.passed + report.skipped) == sorted(every) and len(set(report.passed)) == len(report.passed)
    want = f"kit_mean 2.1: {len(every) - (0 if gpu else 1)} checks passed"
    assert capsys.readouterr().out == want + ("" if gpu else ", 1 skipped (need CUDA: devices)") + "\n"
    assert str(check_method(spec, quiet=True)).startswith(want) and capsys.readouterr().out == ""


def test_check_method_still_raises_listing_every_failure_and_prints_nothing(capsys):
    # twice expert 0's task vector, plus 1: neither idempotent nor the base on zero task vectors
    spec = MethodSpec(name="kit_bad", kernel=lambda b, e, w, p, c: b + 2 * (e[0] - b) + 1, citation="test",
                      contract=InputContract(base="required"), properties={"idempotent", "identity_on_base"})
    with pytest.raises(CheckFailure) as exc:
        check_method(spec)
    msg = str(exc.value)
    assert "method 'kit_bad' failed 2 conformance check(s)" in msg
    assert "kit_bad:idempotent: identical experts" in msg and "kit_bad:identity_on_base: experts identical" in msg
    assert capsys.readouterr().out == ""


def _run(*args: str, ok: bool = True) -> str:
    res = subprocess.run(list(args), capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300)
    assert (res.returncode == 0) == ok, f"{args}: exit {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res.stdout + res.stderr


@pytest.mark.slow
def test_a_new_user_follows_the_readme_plugin_steps(tmp_path, tiny_suites, tiny_pool):
    from safetensors.torch import load_file

    kernel, check_snippet = _blocks("python")
    (toml,) = _blocks("toml")
    tag = uuid.uuid4().hex[:8]
    name, pkg, dist = f"median_{tag}", f"mbreadme_{tag}", f"mbreadme-{tag}"
    swaps = [(kernel, '    "median",\n', f'    "{name}",\n'), (toml, 'name = "mergebench-median"', f'name = "{dist}"'),
             (toml, 'median = "mergebench_median:median"', f'{name} = "{pkg}:median"'),
             (check_snippet, 'get_method("median")', f'get_method("{name}")')]
    for text, old, _new in swaps:
        assert text.count(old) == 1, old  # the README still has the line this test renames
    kernel = kernel.replace(*swaps[0][1:])
    toml = toml.replace(*swaps[1][1:]).replace(*swaps[2][1:])
    check_snippet = check_snippet.replace(*swaps[3][1:])

    src = tmp_path / "my-plugin"
    (src / pkg).mkdir(parents=True)
    (src / pkg / "__init__.py").write_text(kernel)
    (src / "pyproject.toml").write_text(toml)
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(src)]
    try:
        _run(*pip)
        listed = _run(str(BIN / "mergebench"), "methods", name)
        assert f"{name} v0.1.0" in listed and "lambda=1.0" in listed and "base: required" in listed

        printed = _run(sys.executable, "-c", check_snippet)
        (shown,) = _blocks("text")
        assert re.fullmatch(rf"{name} 0\.1\.0: \d+ checks passed.*\n", printed), printed
        if not torch.cuda.is_available():  # the README shows a CPU machine's line
            assert printed == shown.replace("median", name, 1), (printed, shown)

        base, experts = tiny_pool
        out = tmp_path / "merged"
        _run(str(BIN / "mergebench"), "merge", "--method", name, "--base", str(base),
             "--experts", ",".join(map(str, experts)), "--out", str(out))
        merged = load_file(str(out / "model.safetensors"))
        b = load_file(str(base / "model.safetensors"))
        es = [load_file(str(e / "model.safetensors")) for e in experts]
        assert set(merged) == set(b)
        for k in b:  # 3 experts: base + the middle task vector, element by element, in float64
            deltas = torch.stack([e[k].double() - b[k].double() for e in es])
            want = b[k].double() + deltas.median(dim=0).values
            torch.testing.assert_close(merged[k].double(), want, atol=1e-6, rtol=1e-6)
        assert not torch.equal(merged["model.embed_tokens.weight"], b["model.embed_tokens.weight"])

        planned = _run(str(BIN / "mergebench"), "plan", "--method", name, "--suite", "tiny",
                       "--results", str(tmp_path / "rows"))
        assert name in planned and "units of work" in planned
    finally:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", dist], capture_output=True, env=_env(),
                       timeout=120)
    gone = _run(str(BIN / "mergebench"), "methods", name, ok=False)
    assert name in gone  # uninstalled: a fresh process no longer finds the method
