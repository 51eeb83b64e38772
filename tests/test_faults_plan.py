"""Fault injection through the command line: every mistake a user can make before `eval` or `plan`
does any work is one line ``error: ...`` naming the culprit, a non-zero exit and no traceback;
a genuine bug still shows its traceback, and ``--debug`` shows one for a mergebench error too.

Runs on the tiny random pool and suite of ``conftest.tiny_suites`` (and, for the embedded zoo,
those checkpoints "materialized" into a private cache under the real expert names): nothing
here builds or evaluates the SmolLM pool.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mergebench.cli import app
from mergebench.zoo import pool as zoo_pool
from mergebench.zoo.base import BASE_NAME
from mergebench.zoo.base import MANIFEST as BASE_MANIFEST
from mergebench.zoo.files import sha256

runner = CliRunner()
TASKS = ["mb_capitals", "mb_sentiment", "mb_elements"]
ZOO_EXPERTS = ("capitals", "sentiment", "elements")  # real names: their stamps carry the committed adapters' sha256s
MERGEBENCH = Path(sys.executable).with_name("mergebench")


def _one_line_error(res, code: int, *culprits: str) -> str:
    """``res`` failed with ``code`` and printed exactly one line, ``error: ...``, naming every culprit."""
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert "Traceback" not in res.output, res.output
    assert res.exit_code == code, (res.exit_code, res.output)
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    for c in culprits:
        assert c in lines[0], (c, lines[0])
    return lines[0]


# --------------------------------------------------------------------------- building faults


def _suite(root: Path, name: str, *, pools=None, edit=None) -> str:
    """A copy of the tiny suite named ``name`` (on ``pools``), changed in place by ``edit(data)``."""
    data = json.loads((root / "tiny.yaml").read_text())
    data["name"] = name
    prof = data["profiles"]["embedded"]
    if pools:
        prof["pools"] = pools
    if edit:
        edit(data)
    (root / f"{name}.yaml").write_text(json.dumps(data))
    return name


def _raw_suite(root: Path, name: str, text: str) -> str:
    (root / f"{name}.yaml").write_text(text)
    return name


def _damaged_pool(root: Path, tiny_pool, where: Path, damage) -> str:
    """A suite on a pool whose expert ``e1`` is a copy changed by ``damage(folder)``."""
    base, experts = tiny_pool
    e1 = where / "e1"
    shutil.copytree(experts[1], e1)
    damage(e1)
    folders = [experts[0], e1, experts[2]]
    pool = {"name": "damaged", "base": {"name": "base", "path": str(base)},
            "experts": [{"name": f"e{i}", "path": str(p), "tags": {"task": TASKS[i]}} for i, p in enumerate(folders)]}
    (root / "pools" / "damaged.yaml").write_text(json.dumps(pool))
    return _suite(root, "ondamaged", pools=["damaged"])


def _edit_config(change):
    def damage(folder: Path):
        cfg = json.loads((folder / "config.json").read_text())
        change(cfg)
        (folder / "config.json").write_text(json.dumps(cfg))
    return damage


def _profile(**changes):
    def edit(data):
        data["profiles"]["embedded"].update(changes)
    return edit


def _task(i: int, **changes):
    def edit(data):
        data["profiles"]["embedded"]["tasks"][i].update(changes)
    return edit


@pytest.fixture()
def fake_zoo(tiny_suites, tiny_pool, tmp_path, monkeypatch):
    """The tiny checkpoints materialized as the embedded zoo in a private cache (a base with its
    own manifest, three experts stamped with the committed adapters), a pool of them and a
    suite on it. Returns the cache folder."""
    base, experts = tiny_pool
    cache = tmp_path / "cache"
    monkeypatch.setenv("MERGEBENCH_CACHE", str(cache))
    b = zoo_pool.materialized_path("base", cache)
    shutil.copytree(base, b)
    digests = {p.name: sha256(p) for p in b.iterdir()}
    (b / BASE_MANIFEST).write_text(json.dumps({"format": 1, "name": BASE_NAME, "files": digests}))
    zoo_pool.record_weights(b, digests)
    manifest = zoo_pool.read_manifest()
    for name, src in zip(ZOO_EXPERTS, experts):
        d = zoo_pool.materialized_path(name, cache)
        shutil.copytree(src, d)
        (d / zoo_pool.EXPERT_STAMP).write_text(json.dumps({"adapter_files": manifest["experts"][name]["files"]}))
        zoo_pool.record_weights(d)
    pool = {"name": "fakezoo", "base": {"zoo": "base"},
            "experts": [{"zoo": n, "tags": {"task": t}} for n, t in zip(ZOO_EXPERTS, TASKS)]}
    (tiny_suites / "pools" / "fakezoo.yaml").write_text(json.dumps(pool))
    _suite(tiny_suites, "onzoo", pools=["fakezoo"])
    return cache


def _garbage(folder: Path, n: int = 4096, offset: int = 1024) -> Path:
    """Overwrite ``n`` bytes of the weights with random garbage (same size; the mtime changes)."""
    path = folder / "model.safetensors"
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(os.urandom(n))
    return path


# --------------------------------------------------------------------------- the table

PLAN = ["plan", "--suite", "tiny", "--method", "linear"]
EVAL = ["eval", "--suite", "tiny", "--method", "linear", "--no-progress"]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


def _argv(base, *extra):
    return lambda env: [*base, *extra]


def _on(suite_fn, *extra, cmd=PLAN):
    """argv running ``cmd`` on the suite that ``suite_fn(env)`` writes."""
    def build(env):
        name = suite_fn(env)
        return [cmd[0], "--suite", name, *cmd[3:], *extra]
    return build


FAULTS = [
    # the command line itself
    ("plan --set without =", _argv(PLAN, "--set", "novalue"), 2, ["--set expects key=value", "'novalue'"]),
    ("eval --set without =", _argv(EVAL, "--set", "novalue"), 2, ["--set expects key=value", "'novalue'"]),
    ("plan --set empty key", _argv(PLAN, "--set", "=3"), 2, ["--set expects key=value", "'=3'"]),
    ("unknown method", _argv(["plan", "--suite", "tiny", "--method", "nosuch"]), 2, ["unknown merge method 'nosuch'"]),
    ("unknown suite", _argv(["plan", "--suite", "nosuch", "--method", "linear"]), 2, ["unknown suite 'nosuch'"]),
    ("unknown profile", _argv(PLAN, "--profile", "nosuch"), 2, ["no profile 'nosuch'"]),
    ("unknown pool", _argv(PLAN, "--pool", "nosuch"), 2, ["pool 'nosuch'"]),
    ("parameter out of range", _argv(["plan", "--suite", "tiny", "--method", "ties", "--set", "density=3"]), 2,
     ["'density' must be in"]),
    ("unknown parameter", _argv(PLAN, "--set", "dens=0.5"), 2, ["no parameter 'dens'"]),
    ("--method and --methods", _argv(PLAN, "--methods", "ties"), 2, ["not both"]),
    ("plan without a method", _argv(["plan", "--suite", "tiny"]), 2, ["give --method"]),
    ("sweep, bad executor", _argv(["sweep", "--suite", "tiny", "--methods", "linear", "--executor", "slurm"]), 2,
     ["--executor must be local or ray", "'slurm'"]),
    # devices
    ("plan --device tpu", _argv(PLAN, "--device", "tpu"), 2, ["'tpu'"]),
    ("eval --device tpu", _argv(EVAL, "--device", "tpu"), 2, ["'tpu'"]),
    ("eval --device cuda", _argv(EVAL, "--device", "cuda"), 2, ["--device cuda", "CUDA"], NO_CUDA),
    ("plan --device cuda:3", _argv(PLAN, "--device", "cuda:3"), 2, ["--device cuda:3"], NO_CUDA),
    # results folder
    ("plan --results is a file", lambda env: [*PLAN, "--results", str(env.file)], 2, ["is a file"]),
    ("plan --results under a file", lambda env: [*PLAN, "--results", str(env.file / "sub")], 2,
     ["lies under", "which is a file"]),
    ("eval --results is a file", lambda env: [*EVAL, "--results", str(env.file)], 2, ["is a file"]),
    # tasks and metrics of the suite
    ("metric no task reports", _on(lambda env: _suite(env.root, "badmetric", edit=_task(0, metric="f1_nosuch"))), 2,
     ["badmetric.yaml", "profiles.embedded.tasks.0", "'mb_capitals'", "'f1_nosuch'", "acc, acc_norm"]),
    ("metric no task reports (eval)", _on(lambda env: _suite(env.root, "badmetric2", edit=_task(2, metric="mcc")),
                                          cmd=EVAL), 2, ["'mb_elements'", "'mcc'"]),
    ("unknown task", _on(lambda env: _suite(env.root, "badtask", edit=_task(1, name="mb_nosuch"))), 2,
     ["profiles.embedded.tasks.1", "'mb_nosuch'", "mb_capitals"]),
    # expert folders
    ("expert without config.json", _on(lambda env: _damaged_pool(
        env.root, env.tiny_pool, env.tmp, lambda d: (d / "config.json").unlink())), 2,
     ["expert e1", "e1/config.json is missing"]),
    ("config.json without model_type", _on(lambda env: _damaged_pool(
        env.root, env.tiny_pool, env.tmp, _edit_config(lambda c: c.pop("model_type")))), 2,
     ["expert e1", "e1/config.json has no model_type"]),
    ("config.json not JSON", _on(lambda env: _damaged_pool(
        env.root, env.tiny_pool, env.tmp, lambda d: (d / "config.json").write_text("{\"model_type\": "))), 2,
     ["e1/config.json is not valid JSON"]),
    # suite files
    ("suite YAML syntax", _on(lambda env: _raw_suite(env.root, "syntax", "name: syntax\nprofiles: [unclosed\n")), 2,
     ["syntax.yaml", "not valid YAML"]),
    ("suite YAML not a mapping", _on(lambda env: _raw_suite(env.root, "alist", "- a\n- b\n")), 2,
     ["alist.yaml", "expected a mapping"]),
    ("suite YAML unknown key", _on(lambda env: _suite(env.root, "colour", edit=lambda d: d.update(colour="red"))), 2,
     ["colour.yaml", "colour: Extra inputs are not permitted"]),
    ("suite YAML uniform without sizes", _on(lambda env: _suite(env.root, "nosizes", edit=_profile(
        sampler={"mode": "uniform", "seed": 0}))), 2, ["nosizes.yaml", "profiles.embedded.sampler", "needs sizes"]),
    ("suite YAML unknown split", _on(lambda env: _suite(env.root, "split", edit=_profile(
        docs={"budget": 5, "split": "tset"}))), 2, ["split.yaml", "profiles.embedded.docs.split"]),
    ("suite YAML name differs from file", _on(lambda env: _suite(env.root, "renamed", edit=lambda d: d.update(
        name="other"))), 2, ["renamed.yaml", "called 'other'"]),
    ("suite YAML task twice", _on(lambda env: _suite(env.root, "twice", edit=lambda d: d["profiles"]["embedded"][
        "tasks"].append({"name": "mb_capitals"}))), 2, ["twice.yaml", "tasks listed twice: mb_capitals"]),
    ("suite YAML circular extends", _on(lambda env: _suite(env.root, "circle", edit=lambda d: d["profiles"].update(
        a={"extends": "b"}, b={"extends": "a"}))), 2, ["circle.yaml", "circular"]),
    # pool files
    ("pool placeholder without value", _on(lambda env: _placeholder_pool(env.root)), 2,
     ["pool 'holes'", "WHERE (folder of e0)", "--set WHERE=..."]),
]


def _placeholder_pool(root: Path) -> str:
    pool = json.loads((root / "pools" / "tiny.yaml").read_text())
    pool.update(name="holes", placeholders={"WHERE": "folder of e0"})
    pool["experts"][0]["path"] = "${WHERE}"
    (root / "pools" / "holes.yaml").write_text(json.dumps(pool))
    return _suite(root, "onholes", pools=["holes"])


class _Env:
    def __init__(self, root, tiny_pool, tmp):
        self.root, self.tiny_pool, self.tmp = root, tiny_pool, tmp
        self.file = tmp / "results.txt"
        self.file.write_text("not a folder")


@pytest.mark.parametrize("argv, code, culprits", [pytest.param(*f[1:4], id=f[0], marks=f[4:]) for f in FAULTS])
def test_a_fault_is_one_line_naming_its_culprit(tiny_suites, tiny_pool, tmp_path, argv, code, culprits):
    env = _Env(tiny_suites, tiny_pool, tmp_path)
    args = argv(env)
    if "--results" not in args:  # never the checkout's own results/
        args += ["--results", str(tmp_path / "results")]
    res = runner.invoke(app, args)
    _one_line_error(res, code, *culprits)
    assert not list(tmp_path.glob("results*/*")), "nothing may be written before the checks pass"


def test_there_are_at_least_25_fault_cases():
    assert len(FAULTS) >= 25


def test_the_tiny_suite_itself_plans_cleanly(tiny_suites, tmp_path):
    """The faults above differ from a working setup by the one thing they break."""
    res = runner.invoke(app, [*PLAN, "--results", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert "7 of 7 unit(s) to run" in " ".join(res.output.split())


# --------------------------------------------------------------------------- the embedded zoo


def test_garbage_in_a_materialized_expert_is_found_by_plan(fake_zoo, tmp_path):
    ok = runner.invoke(app, ["plan", "--suite", "onzoo", "--method", "linear", "--results", str(tmp_path / "r")])
    assert ok.exit_code == 0, ok.output
    path = _garbage(zoo_pool.materialized_path("sentiment", fake_zoo))
    res = runner.invoke(app, ["plan", "--suite", "onzoo", "--method", "linear", "--results", str(tmp_path / "r")])
    _one_line_error(res, 2, "'sentiment'", str(path), "changed content", "`mergebench zoo materialize --force`")


def test_garbage_appended_to_the_materialized_base_is_found_by_eval(fake_zoo, tmp_path):
    path = zoo_pool.materialized_path("base", fake_zoo) / "model.safetensors"
    with open(path, "ab") as f:
        f.write(os.urandom(4096))
    res = runner.invoke(app, ["eval", "--suite", "onzoo", "--method", "linear", "--results", str(tmp_path / "r")])
    _one_line_error(res, 2, "'base'", "changed size", "mergebench zoo materialize --force")
    assert not (tmp_path / "r").exists()


def test_plan_before_materialization_lists_the_models_and_the_command(fake_zoo, tmp_path):
    shutil.rmtree(fake_zoo)
    res = runner.invoke(app, ["plan", "--suite", "onzoo", "--method", "linear", "--results", str(tmp_path / "r")])
    assert res.exit_code == 3 and "Traceback" not in res.output
    assert res.stdout.split() == ["zoo:base", "zoo:capitals", "zoo:sentiment", "zoo:elements"]
    assert "`mergebench zoo materialize`" in res.output


def test_a_materialization_from_before_weight_records_gets_one(fake_zoo, tmp_path):
    """A zoo materialized by an older mergebench is not rebuilt: an expert's record is taken from
    its files, the base's only after a full check against its own manifest."""
    import hashlib

    expert = zoo_pool.materialized_path("capitals", fake_zoo)
    (expert / zoo_pool.WEIGHTS_RECORD).unlink()
    plan = ["plan", "--suite", "onzoo", "--method", "linear", "--results", str(tmp_path / "r")]
    assert runner.invoke(app, plan).exit_code == 0
    rec = json.loads((expert / zoo_pool.WEIGHTS_RECORD).read_text())["files"]["model.safetensors"]
    assert rec["sha256"] == hashlib.sha256((expert / "model.safetensors").read_bytes()).hexdigest()
    base = zoo_pool.materialized_path("base", fake_zoo)
    (base / zoo_pool.WEIGHTS_RECORD).unlink()
    _garbage(base)
    _one_line_error(runner.invoke(app, plan), 2, "'base'", BASE_MANIFEST, "mergebench zoo materialize --force")


def test_zoo_materialize_refuses_a_damaged_model_and_force_rebuilds_only_it(fake_zoo, monkeypatch):
    from mergebench.zoo import base as zoo_base

    base_dir = zoo_pool.materialized_path("base", fake_zoo)
    monkeypatch.setattr(zoo_base, "materialize_base", lambda cache=None, force=False: base_dir)
    from transformers.utils import logging as hf_logging

    rebuilt, bars = [], []
    monkeypatch.setattr(zoo_pool, "_materialize_expert",
                        lambda name, *a: (rebuilt.append(name), bars.append(hf_logging.is_progress_bar_enabled())))
    expert = zoo_pool.materialized_path("elements", fake_zoo)
    path = _garbage(expert)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, json.loads((expert / zoo_pool.WEIGHTS_RECORD).read_text())
                       ["files"]["model.safetensors"]["mtime_ns"]))  # the fast path cannot see it now
    materialize = ["zoo", "materialize", "--cache", str(fake_zoo), "--experts", ",".join(ZOO_EXPERTS)]
    res = runner.invoke(app, materialize)
    assert res.exit_code == 0 and rebuilt == [], res.output  # size and mtime as recorded: trusted
    with pytest.raises(zoo_pool.MaterializedModelError, match="'elements' is damaged"):
        zoo_pool.check_materialized("elements", expert, full=True)
    _garbage(expert)  # now with a fresh mtime
    res = runner.invoke(app, materialize)
    _one_line_error(res, 2, "'elements'", "mergebench zoo materialize --force")
    res = runner.invoke(app, [*materialize, "--force"])
    assert res.exit_code == 0 and rebuilt == ["elements"], res.output
    assert bars == [False] and hf_logging.is_progress_bar_enabled()  # transformers' bars off while building only


def test_zoo_verify_hashes_every_weight_file(fake_zoo, monkeypatch):
    """`zoo verify` checks content by sha256, so garbage whose mtime was put back is found too."""
    from mergebench.zoo import base as zoo_base

    monkeypatch.setattr(zoo_base, "materialize_base", lambda cache=None, force=False:
                        zoo_pool.materialized_path("base", fake_zoo))
    expert = zoo_pool.materialized_path("capitals", fake_zoo)
    recorded = json.loads((expert / zoo_pool.WEIGHTS_RECORD).read_text())["files"]["model.safetensors"]["mtime_ns"]
    path = _garbage(expert)
    os.utime(path, ns=(recorded, recorded))
    res = runner.invoke(app, ["zoo", "verify", "--experts", "capitals"])
    _one_line_error(res, 2, "'capitals'", "changed content", "mergebench zoo materialize --force")


# --------------------------------------------------------------------------- bugs and --debug


def test_a_genuine_bug_keeps_its_traceback(tiny_suites, monkeypatch):
    import mergebench.evaluation.runner

    def broken(*args, **kwargs):
        return 1 / 0

    monkeypatch.setattr(mergebench.evaluation.runner, "plan_eval", broken)
    res = runner.invoke(app, PLAN)
    assert isinstance(res.exception, ZeroDivisionError) and res.exit_code == 1
    assert "error:" not in res.output


@pytest.mark.parametrize("how", ["--debug", "MERGEBENCH_DEBUG=1"])
def test_debug_shows_the_traceback_of_a_mergebench_error(tiny_suites, how):
    from mergebench.errors import MergebenchError

    argv, env = ([how, *PLAN], None) if how == "--debug" else (PLAN, {"MERGEBENCH_DEBUG": "1"})
    res = runner.invoke(app, [*argv, "--set", "novalue"], env=env)
    assert isinstance(res.exception, MergebenchError) and "novalue" in str(res.exception)
    assert res.exit_code == 1 and "error:" not in res.output


def _run(args, env_extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env_extra}
    env.pop("MERGEBENCH_DEBUG", None)
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)


def test_the_installed_command_prints_one_line_and_debug_a_traceback(tiny_suites):
    """The `mergebench` script (pyproject: mergebench.cli:app) behaves as CliRunner's `app` does."""
    env = {"MERGEBENCH_SUITES": str(tiny_suites)}
    res = _run([str(MERGEBENCH), *PLAN, "--set", "novalue"], env)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.strip().splitlines() == ["error: --set expects key=value, got 'novalue'"]
    res = _run([str(MERGEBENCH), "--debug", *PLAN, "--set", "novalue"], env)
    assert res.returncode == 1 and "Traceback" in res.stderr and "UsageError: --set expects" in res.stderr


def test_the_installed_command_shows_a_bug_with_its_traceback(tiny_suites):
    code = ("import sys, mergebench.evaluation.runner as r; r.plan_eval = lambda *a, **k: 1 / 0; "
            "from mergebench.cli import main; sys.argv[0] = 'mergebench'; main()")
    res = _run([sys.executable, "-c", code, *PLAN], {"MERGEBENCH_SUITES": str(tiny_suites)})
    assert res.returncode == 1 and "Traceback" in res.stderr and "ZeroDivisionError" in res.stderr
    assert "error:" not in res.stderr
