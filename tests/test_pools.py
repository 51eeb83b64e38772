"""Pools (mergebench.config.pools, suites/pools/*.yaml): the files load, every Hugging Face id is the
seed's own (checked against the seed text), placeholders, the embedded pool's manifest, and the
header-only compatibility check (tiny random checkpoints) with its offline missing-model report."""

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

import mergebench.zoo
from mergebench.config.pools import (
    ConfigError,
    MissingModelsError,
    PlaceholderError,
    PoolCompatibilityError,
    PoolError,
    describe_pools,
    find_missing,
    is_plausible_hf_id,
    list_pools,
    load_pool,
    pool_names,
    validate_pool_compatibility,
)
from mergebench.toy import tiny_llama_state, write_checkpoint

REPO = Path(__file__).resolve().parents[1]
SEEDS = Path(os.environ.get("MERGEBENCH_SEEDS", "/work/shared/seeds"))

EXPECTED_POOLS = {
    "inthewild-llama-3.2-3b-instruct", "inthewild-llama-3.1-8b-instruct", "inthewild-qwen3-4b", "inthewild-qwen3-8b",
    "homogeneous-qwen3-4b", "homogeneous-qwen3-8b", "openllm-qwen2.5-14b",
    "smollm2-135m", "smollm2-360m", "smollm2-1.7b", "glue", "smol", "wild",
}


def seed_text(seed: str) -> str:
    files = sorted(SEEDS.glob(f"{seed}_*.txt"))
    if not files:
        pytest.skip(f"seed {seed} text not available under {SEEDS}")
    return files[0].read_text()


@pytest.fixture
def suites_root(tmp_path, monkeypatch):
    """A private copy of suites/pools (plus the real embedded tasks) to add or break files in."""
    root = tmp_path / "suites"
    shutil.copytree(REPO / "suites" / "pools", root / "pools")
    (root / "embedded").mkdir()
    (root / "embedded" / "tasks").symlink_to(REPO / "suites" / "embedded" / "tasks")
    monkeypatch.setenv("MERGEBENCH_SUITES", str(root))
    return root


def write_pool(root: Path, name: str, text: str) -> Path:
    path = root / "pools" / f"{name}.yaml"
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- the declared pools


def test_every_pool_file_loads_and_is_named_after_its_file():
    assert set(pool_names()) == EXPECTED_POOLS
    for name in pool_names():
        if name == "smol":
            continue  # needs the zoo's manifest; tested below
        pool = load_pool(name)
        assert pool.name == name and pool.file.name == f"{name}.yaml"
        d = pool.describe(locate=False)
        json.dumps(d)
        assert d["base"]["name"] and len(d["experts"]) == len(pool.experts)


def test_pool_sizes_match_the_seeds():
    sizes = {p.name: len(p.experts) for p in list_pools() if p.name != "smol"}
    for name in sizes:
        if name.startswith("inthewild-"):
            assert sizes[name] == 12  # seed 001: 12 fine-tuned checkpoints per base
    assert sizes["homogeneous-qwen3-4b"] == sizes["homogeneous-qwen3-8b"] == 6
    for name in ("homogeneous-qwen3-4b", "homogeneous-qwen3-8b"):
        domains = [e.tags["domain"] for e in load_pool(name).experts]
        assert domains.count("math") == 3 and domains.count("medical") == 3
    assert sizes["openllm-qwen2.5-14b"] + 1 == 11  # seed 000 footnote 2: 11 models incl. the base
    assert sizes["glue"] == 8
    assert all(sizes[f"smollm2-{s}"] == 1 for s in ("135m", "360m", "1.7b"))


def _declared(pool):
    return [m for m in pool.models() if m.hf is not None]


def test_every_hf_id_is_plausible():
    for pool in list_pools():
        for m in _declared(pool):
            assert is_plausible_hf_id(m.hf), (pool.name, m.hf)
    assert not is_plausible_hf_id("AIDX-kt ds/kt dsbaseLM")
    assert not is_plausible_hf_id("org/name/extra") and not is_plausible_hf_id("noslash")
    assert not is_plausible_hf_id("-org/name") and not is_plausible_hf_id("org/na--me")


def test_every_seed_id_appears_in_its_seed_and_inferred_ids_do_not():
    """Transcription check: an id declared from a seed must be in that seed's text, literally or
    (``seed_text``) as printed there; an id marked inferred must not be (the seed does not name it)."""
    checked = 0
    for pool in list_pools():
        if pool.seed is None:
            continue
        text = seed_text(pool.seed)
        for m in _declared(pool):
            if m.inferred:
                assert m.hf not in text, f"{pool.name}: {m.hf} is in seed {pool.seed}; do not mark it inferred"
                assert m.note, f"{pool.name}: inferred {m.hf} needs a note saying why"
            elif m.seed_text is not None:
                assert m.seed_text in text, (pool.name, m.seed_text)
                assert re.sub(r"\s+", "", m.seed_text) == m.hf
                assert m.hf not in text  # otherwise seed_text is not needed
            else:
                assert m.hf in text, f"{pool.name}: {m.hf} is not in seed {pool.seed}"
            checked += 1
    assert checked >= 4 * 13 + 2 * 7 + 11 + 6


def _seed001_appendix_a(text: str) -> dict[str, list[str]]:
    """{base: [12 ids]} parsed from App. A's numbered lists."""
    part = text[text.index("A Fine-tuned Checkpoints"): text.index("B Taskwise Accuracy")]
    out: dict[str, list[str]] = {}
    base = None
    for line in part.splitlines():
        line = line.strip()
        m = re.fullmatch(r"(\d+)\. (.+)", line)
        if m:
            out[base].append(m.group(2))
        elif re.fullmatch(r"[\w.-]+/[\w.-]+", line):
            base = line
            out[base] = []
    return out


def test_inthewild_pools_are_appendix_a_in_order():
    listed = _seed001_appendix_a(seed_text("001"))
    assert len(listed) == 4 and all(len(v) == 12 for v in listed.values())
    by_base = {p.base.hf: p for p in list_pools() if p.name.startswith("inthewild-")}
    assert set(by_base) == set(listed)
    for base, ids in listed.items():
        pool = by_base[base]
        assert [e.seed_text or e.hf for e in pool.experts] == ids
        assert [e.tags["index"] for e in pool.experts] == list(range(1, 13))


def test_homogeneous_pools_are_table_4():
    text = seed_text("001")
    part = text[text.index("Table 4: List of domain-specific"): text.index("We construct two domain-specific")]
    rows, base, domain = [], None, None
    for line in part.splitlines()[1:]:
        cells = [c.strip() for c in line.split("\t")]
        if len(cells) == 3 and cells[0] and cells[0] != "Base Model":
            base, domain = cells[0], cells[1]
        ident = cells[-1]
        if re.fullmatch(r"[\w.-]+/[\w.-]+", ident or ""):
            rows.append((base, domain.lower(), ident))
    assert len(rows) == 12
    for name, label in (("homogeneous-qwen3-4b", "QWEN3 4B"), ("homogeneous-qwen3-8b", "QWEN3 8B")):
        pool = load_pool(name)
        want = [(d, i) for b, d, i in rows if b == label]
        assert [(e.tags["domain"], e.hf) for e in pool.experts] == want


def test_qwen14b_pool_is_footnote_2_in_order():
    text = seed_text("000")
    part = text[text.index("HuggingFace model IDs used in the 14B pool:"): text.index("Baselines.")]
    ids = re.findall(r"([A-Za-z][\w.-]*/[\w.-]*[\w])", part)
    pool = load_pool("openllm-qwen2.5-14b")
    assert len(ids) == 11
    assert [pool.base.hf] + [e.hf for e in pool.experts] == ids


def test_smollm_pairs_are_marked_inferred():
    text = seed_text("000")
    assert "SmolLM" not in text  # the seed names only the scales (Table 2)
    for scale in ("135M", "360M", "1.7B"):
        assert scale in text
        pool = load_pool(f"smollm2-{scale.lower()}")
        assert pool.base.hf == f"HuggingFaceTB/SmolLM2-{scale}" and pool.base.inferred
        assert [e.hf for e in pool.experts] == [f"HuggingFaceTB/SmolLM2-{scale}-Instruct"]
        assert pool.experts[0].inferred


# --------------------------------------------------------------------------- YAML errors


def test_invalid_pool_names_the_file_and_field(suites_root):
    path = write_pool(
        suites_root, "bad", "name: bad\nbase: {hf: org/base}\nexperts:\n  - {hf: org/ok}\n  - {hf: not an id}\n"
    )
    with pytest.raises(ConfigError) as e:
        load_pool("bad")
    msg = str(e.value)
    assert str(path) in msg and "experts.1" in msg and "org/name" in msg

    write_pool(suites_root, "bad2", "name: bad2\nbase: {hf: org/base}\nexperts:\n  - {hf: org/a, path: /x}\n")
    with pytest.raises(ConfigError, match=r"bad2.yaml: experts\.0: .*exactly one of hf, path, zoo"):
        load_pool("bad2")

    write_pool(suites_root, "bad3", "name: other\nbase: {hf: org/base}\nexperts: [{hf: org/a}]\n")
    with pytest.raises(ConfigError, match="bad3.yaml: name"):
        load_pool("bad3")

    write_pool(suites_root, "bad4", "name: bad4\nbase: {hf: org/base}\nexperts: [{hf: org/a}, {hf: org/a}]\n")
    with pytest.raises(ConfigError, match="repeated: org/a"):
        load_pool("bad4")

    write_pool(suites_root, "bad5", "name: bad5\nbase: {name: b, path: '${WHERE}'}\nexperts: [{hf: org/a}]\n")
    with pytest.raises(ConfigError, match="WHERE"):
        load_pool("bad5")

    write_pool(suites_root, "bad6", "name: bad6\nbase: {hf: org/base}\nexperts: [{hf: org/a, colour: red}]\n")
    with pytest.raises(ConfigError, match=r"experts\.0\.colour"):
        load_pool("bad6")

    with pytest.raises(PoolError, match="unknown pool 'nope'.*glue"):
        load_pool("nope")


# --------------------------------------------------------------------------- placeholders (GLUE)


def test_glue_placeholders_resolve_from_values_and_environment(monkeypatch):
    monkeypatch.delenv("GLUE_DIR", raising=False)
    monkeypatch.delenv("GLUE_BASE", raising=False)
    for t in ("COLA", "MNLI", "MRPC", "QNLI", "QQP", "RTE", "SST2", "WNLI"):
        monkeypatch.delenv(f"GLUE_{t}", raising=False)
    pool = load_pool("glue")
    assert pool.unresolved() == ["GLUE_DIR"]
    d = pool.describe(locate=False)
    assert d["unresolved"] == ["GLUE_DIR"] and d["experts"][0]["path"].startswith("${")

    with pytest.raises(PlaceholderError) as e:
        load_pool("glue", {})
    assert e.value.missing == ["GLUE_DIR"] and "--set GLUE_DIR=" in str(e.value)

    r = load_pool("glue", {"glue_dir": "/data/glue", "GLUE_RTE": "/other/rte"})
    paths = {x.name: x.path for x in r.experts}
    assert paths["cola"] == "/data/glue/cola" and paths["rte"] == "/other/rte" and len(paths) == 8
    assert r.base.path == "Qwen/Qwen2.5-3B"  # inferred default (seed 004 Table 11)
    assert [x.tags["task"] for x in r.experts] == ["cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "wnli"]

    monkeypatch.setenv("GLUE_DIR", "/env/glue")
    monkeypatch.setenv("GLUE_BASE", "/env/base")
    r = load_pool("glue").resolved()
    assert r.expert("sst2").path == "/env/glue/sst2" and r.base.path == "/env/base"
    assert load_pool("glue").resolved({"GLUE_DIR": "/cli"}).expert("qqp").path == "/cli/qqp"  # --set beats env


def test_every_task_set_individually_needs_no_glue_dir(monkeypatch):
    monkeypatch.delenv("GLUE_DIR", raising=False)
    values = {f"GLUE_{t}": f"/x/{t.lower()}" for t in ("COLA", "MNLI", "MRPC", "QNLI", "QQP", "RTE", "SST2", "WNLI")}
    assert load_pool("glue").unresolved(values) == []


# --------------------------------------------------------------------------- the embedded smol pool


def test_smol_without_manifest_says_to_materialize(suites_root):
    with pytest.raises(PoolError, match=r"mergebench zoo materialize.*experts/pool\.json"):
        load_pool("smol")
    entry = next(d for d in describe_pools(locate=False) if d["name"] == "smol")
    assert "mergebench zoo materialize" in entry["error"]
    assert "smol" not in {p.name for p in list_pools()}
    with pytest.raises(PoolError):
        list_pools(skip_unavailable=False)


def _zoo_manifest(root: Path, experts) -> Path:
    path = root / "embedded" / "experts" / "pool.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"base": {"name": "smollm2-135m-instruct"}, "experts": experts}))
    return path


def test_smol_reads_the_zoo_manifest_and_its_hook(suites_root, monkeypatch, tmp_path):
    _zoo_manifest(suites_root, {
        "calc": {"tags": {"domain": "math", "task": "mb_gsm8k_calc"}, "files": {}},
        "med-both": {"tags": {"domain": "medical", "task": "mb_medical_terms,mb_medical_defs"}},
    })
    pool = load_pool("smol")
    assert pool.expert_names() == ["calc", "med-both"] and pool.base.zoo == "base"
    assert all(m.source == "zoo" for m in pool.models())
    assert pool.select({"task": "mb_medical_defs"}) == ["med-both"]  # comma-separated tags
    assert pool.select({"domain": ["math", "medical"]}) == ["calc", "med-both"]

    folders = {"base": tmp_path / "b", "calc": tmp_path / "c"}
    for f in folders.values():
        f.mkdir()
    hook = lambda name: folders.get(name, tmp_path / "absent" / name)  # noqa: E731
    monkeypatch.setattr(mergebench.zoo, "materialized_path", hook, raising=False)
    d = pool.describe()
    assert d["base"]["local_path"] == str(folders["base"])
    assert [e["local_path"] for e in d["experts"]] == [str(folders["calc"]), None]
    assert find_missing(pool) == ["zoo:med-both"]

    # list form, as an alternative manifest layout
    _zoo_manifest(suites_root, [{"name": "a", "tags": {"domain": "general"}}, {"name": "b", "domain": "math"}])
    got = [(e.name, e.tags) for e in load_pool("smol").experts]
    assert got == [("a", {"domain": "general"}), ("b", {"domain": "math"})]


def test_smol_without_any_zoo_hook_is_simply_not_materialized(suites_root, monkeypatch, tmp_path):
    _zoo_manifest(suites_root, {"calc": {"tags": {"domain": "math"}}})
    monkeypatch.delattr(mergebench.zoo, "materialized_path", raising=False)
    monkeypatch.setitem(sys.modules, "mergebench.zoo.pool", None)  # import fails
    monkeypatch.setenv("MERGEBENCH_CACHE", str(tmp_path / "empty-cache"))
    d = load_pool("smol").describe()
    assert d["base"]["local_path"] is None and d["experts"][0]["local_path"] is None
    with pytest.raises(MissingModelsError) as e:
        validate_pool_compatibility(load_pool("smol"))
    assert e.value.missing == ["zoo:base", "zoo:calc"] and "mergebench zoo materialize" in str(e.value)


# --------------------------------------------------------------------------- compatibility


@pytest.fixture(scope="module")
def odd_checkpoints(tmp_path_factory):
    """Checkpoints that cannot join the tiny pool: another hidden size, another vocabulary."""
    root = tmp_path_factory.mktemp("odd")
    state, cfg = tiny_llama_state(5, {"hidden_size": 48})
    wide = write_checkpoint(root / "wide", state, cfg)
    state, cfg = tiny_llama_state(6, {"vocab_size": 300})
    vocab = write_checkpoint(root / "vocab", state, cfg, tokenizer=False)
    return wide, vocab


def local_pool(suites_root, name, base, experts, extra=""):
    lines = [f"name: {name}", f"base: {{path: '{base}'}}", "experts:"]
    lines += [f"  - {{name: e{i}, path: '{p}'}}" for i, p in enumerate(experts)]
    write_pool(suites_root, name, "\n".join(lines) + "\n" + extra)
    return load_pool(name)


def test_compatible_tiny_pool_passes_with_headers_only(suites_root, tiny_pool):
    base, experts = tiny_pool
    pool = local_pool(suites_root, "tiny", base, experts)
    report = validate_pool_compatibility(pool)
    from safetensors import safe_open

    with safe_open(str(base / "model.safetensors"), "pt") as f:
        n = len(list(f.keys()))
    assert report.n_tensors == n
    assert report.architecture == "LlamaForCausalLM" and report.vocab_size == 260
    assert list(report.paths) == ["base", "e0", "e1", "e2"]
    assert report.paths["e2"] == str(Path(experts[2]).resolve())
    assert len(set(report.fingerprints.values())) == 4  # distinct checkpoints
    described = pool.describe()
    assert described["experts"][1]["local_path"] == str(Path(experts[1]).resolve())
    assert validate_pool_compatibility(pool, experts=["e1"]).paths.keys() == {pool.base.name, "e1"}


def test_incompatible_hidden_size_is_reported_by_name(suites_root, tiny_pool, odd_checkpoints):
    base, experts = tiny_pool
    wide, _ = odd_checkpoints
    pool = local_pool(suites_root, "tiny-wide", base, [experts[0], wide, experts[1]])
    with pytest.raises(PoolCompatibilityError) as e:
        validate_pool_compatibility(pool)
    msg = str(e.value)
    assert "tiny-wide" in msg and "expert e1" in msg and "shape" in msg
    assert "48" in msg  # the odd hidden size is shown
    assert "expert e0" not in msg and "expert e2" not in msg
    validate_pool_compatibility(pool, experts=["e0", "e2"])  # the others are fine together


def test_vocabulary_mismatch_follows_the_pool_policy(suites_root, tiny_pool, odd_checkpoints):
    base, experts = tiny_pool
    _, vocab = odd_checkpoints
    pool = local_pool(suites_root, "tiny-vocab", base, [experts[0], vocab])
    with pytest.raises(PoolCompatibilityError, match="vocabulary sizes differ"):
        validate_pool_compatibility(pool)
    report = validate_pool_compatibility(pool, vocab_policy="base")
    assert report.vocab_size == 260 and any("vocab" in n for n in report.notes)
    pool = local_pool(suites_root, "tiny-vocab2", base, [experts[0], vocab], extra="vocab_policy: truncate\n")
    assert validate_pool_compatibility(pool).vocab_size == 260


def test_offline_missing_models_are_listed_not_raised_from_the_hub(suites_root, tiny_pool, monkeypatch, tmp_path):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base, experts = tiny_pool
    write_pool(suites_root, "mixed", "\n".join([
        "name: mixed",
        f"base: {{path: '{base}'}}",
        "experts:",
        f"  - {{name: here, path: '{experts[0]}'}}",
        "  - {hf: some-org/not-downloaded-a}",
        "  - {hf: some-org/not-downloaded-b, revision: v1}",
        f"  - {{name: gone, path: '{tmp_path / 'no-such-folder'}'}}",
    ]) + "\n")
    pool = load_pool("mixed")
    want = ["some-org/not-downloaded-a", "some-org/not-downloaded-b@v1", str(tmp_path / "no-such-folder")]
    assert find_missing(pool) == want
    with pytest.raises(MissingModelsError) as e:
        validate_pool_compatibility(pool)
    assert e.value.missing == want
    msg = str(e.value)
    assert "3 of 5 model(s)" in msg and "hf download some-org/not-downloaded-b --revision v1" in msg
    assert "never downloads" in msg and e.value.__cause__ is None and e.value.__context__ is None
    # the paper pools, offline with an empty cache: every model is reported
    paper = load_pool("inthewild-qwen3-4b")
    missing = find_missing(paper)
    assert missing == [paper.base.hf] + [x.hf for x in paper.experts]


def test_hf_ids_resolve_from_the_local_cache(suites_root, tiny_pool, monkeypatch, tmp_path):
    """A pool naming hub ids works offline once they are in the HF cache (no download)."""
    import huggingface_hub.constants as hc

    cache = tmp_path / "hub"
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    base, experts = tiny_pool
    for repo, src in (("org/tiny-base", base), ("org/tiny-e0", experts[0]), ("org/tiny-e1", experts[1])):
        folder = cache / f"models--{repo.replace('/', '--')}"
        snap = folder / "snapshots" / "0123456789abcdef"
        shutil.copytree(src, snap)
        (folder / "refs").mkdir(parents=True)
        (folder / "refs" / "main").write_text("0123456789abcdef")
    write_pool(
        suites_root, "cached",
        "name: cached\nbase: {hf: org/tiny-base}\nexperts: [{hf: org/tiny-e0}, {hf: org/tiny-e1}]\n",
    )
    pool = load_pool("cached")
    assert find_missing(pool) == []
    report = validate_pool_compatibility(pool)
    assert report.paths["org/tiny-e1"].endswith("0123456789abcdef")
    assert pool.describe()["base"]["local_path"].endswith("0123456789abcdef")


def test_custom_resolver_is_used(suites_root, tiny_pool):
    base, experts = tiny_pool
    write_pool(suites_root, "virtual", "name: virtual\nbase: {hf: org/b}\nexperts: [{hf: org/x}, {hf: org/y}]\n")
    where = {"org/b": base, "org/x": experts[0], "org/y": None}
    with pytest.raises(MissingModelsError) as e:
        validate_pool_compatibility(load_pool("virtual"), resolve=lambda m: where[m.hf])
    assert e.value.missing == ["org/y"]
    where["org/y"] = experts[2]
    assert validate_pool_compatibility(load_pool("virtual"), resolve=lambda m: where[m.hf]).n_tensors > 0


def test_compatibility_needs_placeholders_first(monkeypatch):
    monkeypatch.delenv("GLUE_DIR", raising=False)
    with pytest.raises(PlaceholderError, match="GLUE_DIR"):
        validate_pool_compatibility(load_pool("glue"))
    with pytest.raises(MissingModelsError):
        validate_pool_compatibility(load_pool("glue"), values={"GLUE_DIR": "/nonexistent/glue"})


def test_unreadable_checkpoint_is_a_compatibility_problem(suites_root, tiny_pool, tmp_path):
    base, experts = tiny_pool
    empty = tmp_path / "empty-model"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    pool = local_pool(suites_root, "tiny-empty", base, [experts[0], empty])
    with pytest.raises(PoolCompatibilityError, match=r"expert e1 .*no model\.safetensors"):
        validate_pool_compatibility(pool)
