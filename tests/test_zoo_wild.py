"""The embedded `wild` pool: its packaged training data, its design, its committed files, and the
measurements it is built for (task-vector norms, Karcher vs linear)."""

import hashlib
import json
import math

import pytest
import torch
from safetensors.torch import save_file

from mergebench.errors import MergebenchError
from mergebench.zoo import wild, wild_data
from mergebench.zoo.wild_train import WildSpec, WildSpecError, examples

# --------------------------------------------------------------------------- parsers

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _enc(n: int) -> str:
    """dictd's base64 number encoding, written independently of the parser."""
    s = ""
    while True:
        s = _B64[n % 64] + s
        n //= 64
        if n == 0:
            return s


def test_freedict_parser_reads_the_first_translation_of_each_entry():
    entries = [
        ("00databaseinfo", "00databaseinfo\nFreeDict header\n"),
        ("Albania", "Albania /ælbeiniə/\nAlbanie\n"),
        ("Albanian", "Albanian /ælbeiniən/\n1. albanais\n2. Albanais\n"),
        ("check-in area", ("check-in area /x/\nAbfertigungshalle <fem>, Abfertigungsbereich <masc> [aviat.]\n"
                          "         Note: im Flughafengebäude\n")),
        ("blank", "blank /b/\n   Note: no sense line\n"),
    ]
    body, index = b"", []
    for head, text in entries:
        raw = text.encode()
        index.append(f"{head}\t{_enc(len(body))}\t{_enc(len(raw))}")
        body += raw
    pairs = wild_data.freedict_pairs("\n".join(index), body)
    assert pairs == [("Albania", "Albanie"), ("Albanian", "albanais"), ("check-in area", "Abfertigungshalle")]


def test_fortune_and_lexgrog_parsers():
    assert wild_data.fortune_entries("one\n%\ntwo\nlines\n\t\t-- A\n%\n") == ["one", "two\nlines\n\t\t-- A"]
    lines = ['ls.1.gz: "ls - list directory contents"', 'gcloud.1.gz: parse failed',
             'x.1.gz: "dir, vdir - list directory contents"', 'l2.1.gz: "ls - another"']
    assert wild_data.man_descriptions(lines) == {"ls": "list directory contents", "dir": "list directory contents",
                                                 "vdir": "list directory contents"}


def test_iso_rows_keep_living_individual_languages_only():
    rows = wild_data.iso_rows(
        {"639-3": [{"alpha_3": "aaa", "name": "Ghotuo", "scope": "I", "type": "L"},
                   {"alpha_3": "ang", "name": "Old English", "scope": "I", "type": "H"},
                   {"alpha_3": "zza", "name": "Zaza", "scope": "M", "type": "L"}]},
        {"4217": [{"alpha_3": "EUR", "name": "Euro"}]},
        {"3166-1": [{"alpha_3": "FRA", "name": "France"}]})
    assert [(r["id"], r["answer"]) for r in rows] == [("lang-aaa", " aaa"), ("cur-EUR", " EUR"), ("cty-FRA", " FRA")]


def test_committed_wild_data_matches_its_manifest():
    d = wild_data.data_dir()
    man = json.loads((d / "MANIFEST.json").read_text())
    assert man["seed"] == wild_data.SEED
    for name, entry in man["sources"].items():
        path = d / f"{name}.jsonl"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"], name
        rows = wild_data.load_rows(name)
        assert len(rows) == entry["rows"] > 0
        assert all(set(r) == {"id", "prompt", "answer"} and r["answer"].strip() for r in rows)
        assert len({r["id"] for r in rows}) == len(rows)


def test_missing_wild_source_is_a_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setenv("MERGEBENCH_SUITES", str(tmp_path))
    with pytest.raises(wild_data.DataSourceError, match="wild training data 'manpages' not found"):
        wild_data.load_rows("manpages")


# --------------------------------------------------------------------------- pool design


def test_at_most_a_third_of_the_experts_train_on_a_scored_task():
    scored = [s for s in wild.EXPERTS if s.scored_tasks]
    assert 3 * len(scored) <= len(wild.EXPERTS)
    for s in wild.EXPERTS:  # the tags say what the data says
        assert s.tags["scored_train"] == bool(s.scored_tasks), s.name
        assert ("task" in s.tags) == bool(s.scored_tasks), s.name


def test_the_off_battery_sources_exist_and_are_not_embedded_tasks():
    from mergebench.zoo.tasks import task_info

    embedded = {i["task"] for i in task_info().values()}
    committed = set(json.loads((wild_data.data_dir() / "MANIFEST.json").read_text())["sources"])
    for s in wild.EXPERTS:
        for d in s.data:
            kind, _, name = d.partition(":")
            assert name in (embedded if kind == "task" else committed), (s.name, d)


def test_far_experts_are_full_module_or_large_rank():
    assert len(wild.FAR) >= 4
    for s in wild.EXPERTS:
        if s.name in wild.FAR:
            assert s.mode == "full" or s.rank >= 32, s.name


@pytest.mark.parametrize("kw, field", [
    ({"mode": "adapter"}, "mode"), ({"modules": ("lm_head",)}, "modules"), ({"data": ("capitals",)}, "data"),
    ({"steps": 0}, "steps"), ({"lr": 0.0}, "lr"), ({"layers": (5, 2)}, "layers"),
])
def test_inconsistent_specs_are_refused(kw, field):
    args = {"name": "x", "data": ("wild:manpages",), **kw}
    with pytest.raises(WildSpecError, match=f"x: {field}") as exc:
        WildSpec(**args)
    assert isinstance(exc.value, MergebenchError)


def test_unknown_expert_is_refused():
    with pytest.raises(wild.WildPoolError, match="no expert 'nope' in the wild pool"):
        wild.expert_spec("nope")


# --------------------------------------------------------------------------- committed files

built = pytest.mark.skipif(not wild.manifest_path().is_file(), reason="the wild pool is not built")


@built
def test_every_expert_is_built_and_matches_the_manifest():
    man = wild.read_manifest()
    assert sorted(man["experts"]) == sorted(s.name for s in wild.EXPERTS)  # manifest keys are sorted
    wild.verify_files(man)
    for name, entry in man["experts"].items():
        assert entry["zoo"] == f"wild/{name}"
        assert entry["spec"] == wild.expert_spec(name).to_dict()


@built
def test_committed_artifacts_fit_the_budget_with_the_smol_pool():
    """Issue 13: committed artifacts <= 150 MB in all (the smol pool's adapters included)."""
    from mergebench.zoo import pool

    size = sum(p.stat().st_size for d in (wild.pool_dir(), pool.pool_dir()) for p in d.rglob("*") if p.is_file())
    assert size <= 150 * 2**20


@built
def test_the_pool_file_lists_the_manifest_experts():
    from mergebench.config.pools import load_pool

    p = load_pool("wild")
    assert [e.name for e in p.experts] == sorted(s.name for s in wild.EXPERTS)
    assert all(e.spec == f"zoo:wild/{e.name}" for e in p.experts)


def test_wild_names_are_resolved_by_the_zoo_hook(tmp_path):
    from mergebench.zoo import pool

    assert pool.materialized_path("wild/iso-lora32", tmp_path) == tmp_path / "wild" / "iso-lora32"
    assert pool.materialized_path("capitals", tmp_path) == tmp_path / "smol" / "capitals"
    assert not pool.check_materialized("wild/iso-lora32", tmp_path / "absent")


# --------------------------------------------------------------------------- measurements


def _folder(path, tensors):
    path.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    return path


def test_distances_are_task_vector_norms(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"a": torch.randn(4, 3, generator=g), "b": torch.randn(5, generator=g)}
    d = torch.randn(4, 3, generator=g)
    paths = {"base": _folder(tmp_path / "base", base),
             "e": _folder(tmp_path / "e", {"a": base["a"] + d, "b": base["b"]})}
    out = wild.distances(paths)["e"]
    assert out["tensors_changed"] == 1
    assert out["norm"] == pytest.approx(float(d.double().norm()), rel=1e-6)
    assert out["rel_max"] == pytest.approx(float(d.double().norm() / base["a"].double().norm()), rel=1e-6)


def test_karcher_gap_of_two_equal_norm_experts_has_a_closed_form(tmp_path):
    """Two experts of equal norm r: the Karcher mean is r * m / ||m|| with m their midpoint,
    the linear mean is m, so the gap is (r - ||m||) / ||m - base||."""
    base = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    phi = 0.3
    e1 = torch.tensor([math.cos(phi), math.sin(phi), 0.0], dtype=torch.float64)
    e2 = torch.tensor([math.cos(phi), -math.sin(phi) * 0.5, math.sin(phi) * math.sqrt(0.75)], dtype=torch.float64)
    paths = {"base": _folder(tmp_path / "base", {"w": base}), "x": _folder(tmp_path / "x", {"w": e1}),
             "y": _folder(tmp_path / "y", {"w": e2})}
    m = (e1 + e2) / 2
    expected = float((1.0 - m.norm()) / (m - base).norm())
    got = wild.karcher_gap(paths, ["x", "y"])
    assert got["gap"] == pytest.approx(expected, rel=1e-6)
    same = wild.karcher_gap(paths, ["x", "x"])
    assert same["gap"] == pytest.approx(0.0, abs=1e-12)


def test_battery_average_uses_the_profile_metric():
    rows = [{"model": "m", "task": "mb_a", "metric": "acc", "value": 0.5, "stderr": 0.1},
            {"model": "m", "task": "mb_medical_defs", "metric": "acc", "value": 0.0, "stderr": 0.1},
            {"model": "m", "task": "mb_medical_defs", "metric": "acc_norm", "value": 0.7, "stderr": 0.2}]
    avg = wild.battery_average(rows)["m"]
    assert avg["avg"] == pytest.approx(0.6)
    assert avg["stderr"] == pytest.approx(math.sqrt(0.01 + 0.04) / 2)


@built
@pytest.mark.slow
def test_rebuilding_an_expert_reproduces_its_committed_file(tmp_path, monkeypatch):
    """Reproducibility: the smallest expert retrained (one thread) gives the committed adapter.

    Byte identity holds only on the CPU that built the pool: another CPU's matmul kernels sum in
    another order (measured on an AMD EPYC against the committed build: 99.3 % of float16
    elements equal, per-tensor relative error <= 3e-4).  So the check is what a rebuild anywhere
    must give: the same config file, the same loss curve ends to 4 decimals and every tensor
    within 1e-2 relative (a different seed, data or step count is off by O(1))."""
    import shutil

    from safetensors.torch import load_file

    from mergebench.zoo import wild_data as wd

    record = wild.read_manifest()["experts"]["capitals-tiny"]
    committed = load_file(str(wild.pool_dir() / "capitals-tiny" / "adapter_model.safetensors"))
    suites = tmp_path / "suites"
    shutil.copytree(wd.data_dir().parent.parent / "embedded", suites / "embedded")
    shutil.copytree(wd.data_dir(), suites / "wild" / "data")
    monkeypatch.setenv("MERGEBENCH_SUITES", str(suites))
    rebuilt = wild.build(["capitals-tiny"])["experts"]["capitals-tiny"]
    assert rebuilt["files"]["adapter_config.json"] == record["files"]["adapter_config.json"]
    assert rebuilt["first_train_loss"] == pytest.approx(record["first_train_loss"], abs=1e-4)
    assert rebuilt["final_train_loss"] == pytest.approx(record["final_train_loss"], abs=1e-4)
    new = load_file(str(wild.pool_dir() / "capitals-tiny" / "adapter_model.safetensors"))
    assert sorted(new) == sorted(committed)
    for key, ref in committed.items():
        assert new[key].dtype == ref.dtype and new[key].shape == ref.shape, key
        ref, got = ref.double(), new[key].double()
        assert float((got - ref).norm() / ref.norm()) <= 1e-2, key


def _tokenizer():
    from mergebench.zoo.base import BASE_NAME, default_cache_dir, verify_base

    folder = default_cache_dir() / BASE_NAME
    if not verify_base(folder, check_files=False):
        pytest.skip("the embedded base is not materialized")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def test_examples_put_the_loss_on_the_answer_and_eos_only():
    tok = _tokenizer()
    spec = WildSpec("x", ("wild:iso-codes", "task:capitals"), max_examples=3)
    exs = examples(spec, tok)
    assert len(exs) == 6
    row = wild_data.load_rows("iso-codes")[0]
    ids, n_prompt = exs[0]
    assert ids[-1] == tok.eos_token_id
    assert tok.decode(ids[n_prompt:-1]) == row["answer"]
    assert tok.decode(ids[:n_prompt]) == row["prompt"]
