"""Fault injection for `mergebench merge`: every bad input is one line naming the culprit.

Each case builds a bad input on tiny random Llama checkpoints, runs the real command through
typer's CliRunner and asserts: a non-zero exit code, exactly one line of output that names the
culprit (file, tensor, parameter or value), no traceback, and nothing left behind (no output
folder, no temporary folder; an existing output untouched).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from _faults import fill_disk, private_tmpfs
from mergebench.cli import app
from mergebench.toy import make_tiny_pool, tiny_llama_state, write_checkpoint

runner = CliRunner()
TENSOR = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """A base, two experts and one broken variant of them per fault (built once)."""
    root = tmp_path_factory.mktemp("faults")
    base, (e0, e1) = make_tiny_pool(root, 2)
    p = types.SimpleNamespace(root=root, base=base, e0=e0, e1=e1)
    state = load_file(str(e0 / "model.safetensors"))

    def variant(name, change, **kw):
        sd = {k: v.clone() for k, v in state.items()}
        change(sd)
        _, cfg = tiny_llama_state(0)
        return write_checkpoint(root / name, sd, cfg, tokenizer=False, **kw)

    def poke(value, tensor=TENSOR, index=(3, 5)):
        def change(sd):
            sd[tensor][index] = value

        return change

    p.nan = variant("nan_expert", poke(float("nan")))
    p.inf_base = variant("inf_base", poke(float("inf"), "model.layers.0.self_attn.q_proj.weight", (1, 2)))
    p.ninf = variant("ninf_expert", poke(float("-inf"), "model.embed_tokens.weight", (7, 0)))
    p.nan_bf16 = variant("nan_bf16", poke(float("nan")), dtype=torch.bfloat16)
    p.huge = variant("huge_expert", poke(3e5))  # finite, but too large for float16 (also halved)
    def fisher(sd, bad=None):  # a diagonal Fisher estimate is nonnegative
        for k in sd:
            sd[k] = sd[k].abs()
        if bad is not None:
            poke(bad)(sd)

    p.fisher_nan = variant("fisher_nan", lambda sd: fisher(sd, float("nan")))
    p.fisher_ok = variant("fisher_ok", fisher)
    p.shape = variant("shape_mismatch", lambda sd: sd.__setitem__(TENSOR, torch.zeros(32, 60)))
    p.missing_tensor = variant("missing_tensor", lambda sd: sd.pop(TENSOR))
    _, cfg = tiny_llama_state(0, {"vocab_size": 300})
    sd = {k: v.clone() for k, v in state.items()}
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        sd[k] = torch.cat([sd[k], torch.zeros(40, sd[k].shape[1])])
    p.vocab = write_checkpoint(root / "vocab_300", sd, cfg, tokenizer=False)

    def broken(name, write):
        folder = root / name
        shutil.copytree(e0, folder)
        write(folder)
        return folder

    raw = (e0 / "model.safetensors").read_bytes()
    p.truncated = broken("truncated", lambda f: (f / "model.safetensors").write_bytes(raw[: len(raw) // 2]))
    p.garbage = broken("garbage", lambda f: (f / "model.safetensors").write_bytes(b"\xff" * 64 + raw[64:]))
    p.empty = broken("empty", lambda f: (f / "model.safetensors").write_bytes(b""))
    p.no_weights = broken("no_weights", lambda f: (f / "model.safetensors").unlink())
    p.bad_config = broken("bad_config", lambda f: (f / "config.json").write_text("{not json"))
    p.bad_index = broken("bad_index", lambda f: (f / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {TENSOR: "model-00002-of-00002.safetensors"}})))
    p.pickle = broken("pickle", lambda f: ((f / "model.safetensors").unlink(), (f / "pytorch_model.bin").write_bytes(b"x")))
    p.corrupt_pickle = p.pickle
    p.file = root / "a_file.txt"
    p.file.write_text("not a folder")
    return p


@dataclass
class Case:
    id: str
    args: object  # callable(pool, out: Path) -> list[str]
    fragment: str  # must appear in the one-line message
    culprit: object = None  # callable(pool) -> str also named in the message (a path, a tensor)
    setup: object = None  # callable(pool, out: Path, monkeypatch) -> None, before the run
    skip: str | None = None


def lin(*experts, w=None, method="linear", extra=()):
    """`--method METHOD --experts ...` with optional weights."""

    def build(p, out):
        args = ["--method", method, "--experts", ",".join(str(getattr(p, e, e)) for e in experts)]
        return args + (["--weights", w] if w else []) + list(extra)

    return build


def with_base(base, *experts, method="ties", w=None, extra=()):
    def build(p, out):
        return ["--base", str(getattr(p, base))] + lin(*experts, w=w, method=method, extra=extra)(p, out)

    return build


def yaml_case(text):
    def build(p, out):
        cfg = out.parent / "merge.yaml"
        cfg.write_text(textwrap.dedent(text).format(base=p.base, e0=p.e0, e1=p.e1, nan=p.nan))
        return [str(cfg)]

    return build


def full_disk(p, out, monkeypatch):
    fill_disk(monkeypatch, 4096)  # ENOSPC after 4 KiB, and again on close (the final flush)


def existing_output(p, out, monkeypatch):
    out.mkdir()
    (out / "keep.txt").write_text("old output")


no_cuda = "CUDA is available here" if torch.cuda.is_available() else None
is_root = "running as root: permissions are not enforced" if hasattr(os, "geteuid") and os.geteuid() == 0 else None


def unreadable(p, out, monkeypatch):
    folder = out.parent / "unreadable"
    shutil.copytree(p.e0, folder)
    (folder / "model.safetensors").chmod(0)


CASES = [
    # -- weights
    Case("weights-nan", lin("e0", "e1", w="nan,1"), "'weights' must be finite", lambda p: "nan"),
    Case("weights-inf", lin("e0", "e1", w="1,inf"), "weight 1 is inf"),
    Case("weights-neg-inf", lin("e0", "e1", w="-inf,1"), "weight 0 is -inf"),
    Case("weights-zero-sum", lin("e0", "e1", w="1,-1"), "sums to zero", lambda p: "[1, -1]"),
    Case("weights-zero-sum-normalized-ta", with_base("base", "e0", "e1", method="task_arithmetic", w="2,-2",
         extra=["--set", "normalize=true"]), "sums to zero", lambda p: "normalize=true"),
    Case("weights-karcher-negative", lin("e0", "e1", w="1,-0.5", method="karcher"), "must be nonnegative", lambda p: "-0.5"),
    Case("weights-karcher-zero", lin("e0", "e1", w="0,0", method="karcher"), "sums to zero"),
    Case("weights-count", lin("e0", "e1", w="1,1,1"), "'weights': 3 weights given for 2 experts"),
    Case("weights-not-numbers", lin("e0", "e1", w="1,x"), "--weights must be comma-separated numbers"),
    Case("weights-not-taken", with_base("base", "e0", "e1", method="model_stock", w="1,1"), "does not take per-expert weights"),
    # -- tensor values
    Case("nan-in-expert", lin("e0", "nan"), "1 NaN and 0 inf value(s)", lambda p: f"{p.nan}"),
    Case("nan-names-tensor", lin("e0", "nan"), f"tensor '{TENSOR}'", lambda p: "--allow-nonfinite"),
    Case("inf-in-base", with_base("inf_base", "e0", "e1"), "0 NaN and 1 inf value(s)",
         lambda p: "base ("),
    Case("neg-inf-in-expert", lin("ninf", "e1", method="task_arithmetic", extra=["--base", "{base}"]), "inf value(s)",
         lambda p: "model.embed_tokens.weight"),
    Case("nan-in-bf16-expert", lin("e0", "nan_bf16"), "NaN", lambda p: str(p.nan_bf16)),
    Case("nan-in-fisher", lin("e0", "e1", method="karcher", extra=["--aux", "fisher={fisher_nan},{fisher_ok}"]), "NaN",
         lambda p: "aux fisher[0]"),
    Case("compute-dtype-overflow", lin("e0", "huge", extra=["--dtype", "float16"]), "overflows the compute dtype float16",
         lambda p: str(p.huge)),
    Case("output-dtype-overflow", lin("e0", "huge", extra=["--out-dtype", "float16"]), "overflows the output dtype float16",
         lambda p: TENSOR),
    # -- checkpoints
    Case("missing-expert", lin("e0", "{root}/does_not_exist"), "does not exist", lambda p: "does_not_exist"),
    Case("missing-base", lin("e0", "e1", method="ties", extra=["--base", "{root}/no_base"]), "does not exist",
         lambda p: "no_base"),
    Case("truncated-safetensors", lin("e0", "truncated"), "past the end of the file", lambda p: str(p.truncated)),
    Case("garbage-safetensors", lin("e0", "garbage"), "not a safetensors file", lambda p: str(p.garbage)),
    Case("empty-safetensors", lin("e0", "empty"), "shorter than 8 bytes", lambda p: str(p.empty)),
    Case("no-weights", lin("e0", "no_weights"), "no model.safetensors", lambda p: str(p.no_weights)),
    Case("corrupt-config", lin("e0", "bad_config"), "corrupt config.json", lambda p: str(p.bad_config)),
    Case("index-names-missing-shard", lin("e0", "bad_index"), "names shard(s) that do not exist", lambda p: str(p.bad_index)),
    Case("pickle-refused", lin("e0", "pickle"), "refuses it", lambda p: str(p.pickle)),
    Case("pickle-corrupt", lin("e0", "pickle", extra=["--allow-pickle"]), "cannot load this pickle checkpoint",
         lambda p: str(p.pickle)),
    Case("unreadable-file", lin("e0", "{tmp}/unreadable"), "Permission denied", lambda p: "unreadable", setup=unreadable,
         skip=is_root),
    Case("shape-mismatch", lin("e0", "shape"), "shape", lambda p: TENSOR),
    Case("missing-tensor", lin("e0", "missing_tensor"), "missing", lambda p: TENSOR),
    Case("vocab-mismatch", lin("e0", "vocab"), "vocab"),
    # -- method and parameters
    Case("unknown-method", lin("e0", "e1", method="nope"), "unknown merge method 'nope'"),
    Case("param-out-of-range", with_base("base", "e0", "e1", extra=["--set", "density=1.5"]), "'density' must be in [0"),
    Case("param-unknown", with_base("base", "e0", "e1", extra=["--set", "dens=0.5"]), "has no parameter 'dens'"),
    Case("param-wrong-type", with_base("base", "e0", "e1", extra=["--set", "density=abc"]), "'density' must be of type float"),
    Case("param-choice", lin("e0", "e1", method="slerp", extra=["--set", "norm=unit"]), "'norm' must be one of raw, interpolate"),
    Case("set-without-value", with_base("base", "e0", "e1", extra=["--set", "density"]), "--set expects key=value"),
    Case("needs-base", lin("e0", "e1", method="ties"), "needs a base model"),
    Case("slerp-one-model", lin("e0", method="slerp"), "needs 2 models"),
    Case("slerp-three-experts", lin("e0", "e1", "nan", method="slerp"), "at most 2 experts"),
    Case("aux-count", lin("e0", "e1", method="karcher", extra=["--aux", "fisher={fisher_ok}"]), "1 checkpoint(s) for 2 experts"),
    Case("aux-unknown", lin("e0", "e1", extra=["--aux", "hessian={e0},{e1}"]), "takes no auxiliary input 'hessian'"),
    Case("bad-dtype", lin("e0", "e1", extra=["--dtype", "float8"]), "dtype"),
    # -- device
    Case("device-tpu", lin("e0", "e1", extra=["--device", "tpu"]), "unknown device 'tpu': use cpu, cuda, cuda:N or mps"),
    Case("device-cuda", lin("e0", "e1", extra=["--device", "cuda"]), "--device cuda: this torch build has no CUDA",
         skip=no_cuda or (None if torch.version.cuda is None else "a CUDA build of torch")),
    # -- output
    Case("out-under-a-file", lin("e0", "e1", extra=["--out", "{file}/sub/out"]), "which is a file", lambda p: str(p.file)),
    Case("out-is-a-file", lin("e0", "e1", extra=["--out", "{file}"]), "exists and is not a folder", lambda p: str(p.file)),
    Case("out-exists", lin("e0", "e1"), "pass overwrite=True (--overwrite)", setup=existing_output),
    Case("disk-full", lin("e0", "e1"), "disk full while writing", lambda p: "No space left on device", setup=full_disk),
    # -- mergekit YAML
    Case("yaml-syntax", yaml_case("merge_method: [linear\n"), "invalid YAML", lambda p: "merge.yaml"),
    Case("yaml-unknown-key", yaml_case("merge_method: linear\nmodels: [{{model: {e0}}}]\nslicez: 1\n"), "slicez: unknown key"),
    Case("yaml-unknown-method", yaml_case("merge_method: frankenmerge\nmodels: [{{model: {e0}}}]\n"),
         "unknown merge method 'frankenmerge'", lambda p: "merge.yaml"),
    Case("yaml-unsupported-method", yaml_case("merge_method: passthrough\nmodels: [{{model: {e0}}}]\n"), "not supported"),
    Case("yaml-no-models", yaml_case("merge_method: linear\n"), "models: missing (required)"),
    Case("yaml-weight-not-number", yaml_case("merge_method: linear\nmodels:\n  - model: {e0}\n    parameters: {{weight: heavy}}\n"),
         "models[0].parameters.weight: must be a number"),
    Case("yaml-nan-weight", yaml_case(
        "merge_method: linear\nmodels:\n  - model: {e0}\n    parameters: {{weight: .nan}}\n  - model: {e1}\n    parameters: {{weight: 1}}\n"),
        "models[0].parameters.weight: must be a finite number", lambda p: "merge.yaml"),
    Case("yaml-nan-tensor", yaml_case("merge_method: linear\nmodels: [{{model: {e0}}}, {{model: {nan}}}]\n"), "NaN",
         lambda p: str(p.nan)),
    Case("yaml-missing-file", lambda p, out: [str(out.parent / "absent.yaml")], "cannot read mergekit config",
         lambda p: "absent.yaml"),
    Case("yaml-and-flags", lambda p, out: [str(out.parent / "x.yaml"), "--method", "linear"], "not both"),
]


def _expand(args, p, tmp):
    names = {"root": p.root, "tmp": tmp, "file": p.file, "base": p.base, "e0": p.e0, "e1": p.e1,
             "fisher_nan": p.fisher_nan, "fisher_ok": p.fisher_ok}
    return [a.format(**names) for a in args]


def _leftovers(folder: Path) -> list[str]:
    return sorted(str(x) for x in folder.rglob("*") if ".tmp-" in x.name or ".old-" in x.name)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fault_is_one_line_naming_the_culprit(pool, tmp_path, monkeypatch, case):
    if case.skip:
        pytest.skip(case.skip)
    out = tmp_path / "out"
    if case.setup is not None:
        case.setup(pool, out, monkeypatch)
    args = _expand(case.args(pool, out), pool, tmp_path)
    before = sorted(str(x) for x in tmp_path.rglob("*"))
    if "--out" not in args:
        args += ["--out", str(out)]
    res = runner.invoke(app, ["merge", *args, "-q"])
    text = res.output
    assert res.exit_code != 0, text
    assert res.exit_code == 2, f"exit {res.exit_code}: {text}"  # a user error, not a crash
    assert "Traceback" not in text, text
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), text
    assert case.fragment in lines[0], text
    if case.culprit is not None:
        assert case.culprit(pool) in lines[0], text
    # nothing half-written: no new output folder, no temporary or trash folders anywhere
    assert sorted(str(x) for x in tmp_path.rglob("*")) == before, "the failed merge left files behind"
    assert _leftovers(pool.root) == [] and _leftovers(tmp_path) == []
    if case.setup is existing_output:
        assert (out / "keep.txt").read_text() == "old output"


def test_enough_distinct_faults():
    assert len({c.id for c in CASES}) == len(CASES) >= 30


def test_allow_nonfinite_passes_them_through(pool, tmp_path):
    """The same NaN expert merges with --allow-nonfinite: the NaN reaches the output, the
    rest is the ordinary merge, and the provenance notes it."""
    out = tmp_path / "out"
    res = runner.invoke(app, ["merge", "--method", "linear", "--experts", f"{pool.e0},{pool.nan}", "--allow-nonfinite",
                              "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    merged = load_file(str(out / "model.safetensors"))
    assert torch.isnan(merged[TENSOR][3, 5]) and int(torch.isnan(merged[TENSOR]).sum()) == 1
    a, b = load_file(str(pool.e0 / "model.safetensors")), load_file(str(pool.nan / "model.safetensors"))
    k = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(merged[k], (a[k] + b[k]) / 2)
    notes = json.loads((out / "mergebench_merge.json").read_text())["notes"]
    assert any("non-finite input values passed through" in n and TENSOR in n for n in notes)


def test_disk_full_on_a_real_tiny_filesystem(pool, tmp_path):
    """A 64 KiB tmpfs mounted in a private user+mount namespace (affects nobody else; skipped
    where unprivileged namespaces are not allowed): the merge fails with one line and the
    filesystem is left empty."""
    mnt = private_tmpfs(tmp_path, "64k")
    merge = [sys.executable, "-m", "mergebench.cli", "merge", "--method", "linear", "--experts", f"{pool.e0},{pool.e1}",
             "--out", f"{mnt}/out", "-q"]
    script = f"mount -t tmpfs -o size=64k tmpfs {mnt} && {' '.join(merge)}; echo rc=$?; ls -A {mnt}"
    res = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    text = res.stdout + res.stderr
    assert "rc=2" in res.stdout, text
    errors = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: disk full while writing"), text
    assert f"{mnt}/out" in errors[0] and "Traceback" not in text
    listed = res.stdout.split("rc=2", 1)[1].split()
    assert listed == [], f"left on the full filesystem: {listed}"
