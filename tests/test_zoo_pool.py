"""The embedded `smol` expert pool: committed adapters, manifest, materialization."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from mergebench.zoo import pool

MANIFEST = pool.read_manifest()


def test_every_expert_is_built_and_its_files_match_the_manifest():
    assert sorted(MANIFEST["experts"]) == sorted(s.name for s in pool.EXPERTS)
    pool.verify_adapters(MANIFEST)


def test_a_tampered_adapter_is_refused(tmp_path, monkeypatch):
    fake = json.loads(json.dumps(MANIFEST))
    name = next(iter(fake["experts"]))
    fake["experts"][name]["files"]["adapter_model.safetensors"] = "0" * 64
    with pytest.raises(pool.ZooError, match=f"{name}/adapter_model.safetensors has sha256"):
        pool.verify_adapters(fake)


def test_a_materialized_folder_is_checked_against_its_weight_record(tmp_path, tiny_pool):
    """The record holds each weight file's sha256 (equal to hashlib's over the bytes), size and
    mtime; a folder materialized before records existed gets one; a changed mtime with the same
    bytes is hashed once and the record refreshed; a stale stamp means "not materialized"; an
    extra weight file is damage."""
    import hashlib
    import shutil

    folder = tmp_path / "capitals"
    shutil.copytree(tiny_pool[1][0], folder)
    stamp = {"adapter_files": MANIFEST["experts"]["capitals"]["files"]}
    (folder / pool.EXPERT_STAMP).write_text(json.dumps(stamp))
    assert pool.check_materialized("capitals", folder)  # no record yet: one is written
    weights = folder / "model.safetensors"
    rec = json.loads((folder / pool.WEIGHTS_RECORD).read_text())["files"]
    assert list(rec) == ["model.safetensors"]
    assert rec["model.safetensors"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert rec["model.safetensors"]["size"] == weights.stat().st_size
    assert pool.check_materialized("capitals", folder) and pool.check_materialized("capitals", folder, full=True)
    later = rec["model.safetensors"]["mtime_ns"] + 10**9
    os.utime(weights, ns=(later, later))
    assert pool.check_materialized("capitals", folder)
    record = json.loads((folder / pool.WEIGHTS_RECORD).read_text())
    assert record["files"]["model.safetensors"]["mtime_ns"] == later
    assert not pool.check_materialized("elements", folder)  # the stamp names another expert's adapters
    (folder / pool.EXPERT_STAMP).write_text(json.dumps({"adapter_files": {"adapter_model.safetensors": "0" * 64}}))
    assert not pool.check_materialized("capitals", folder)  # stale: the adapters changed since
    (folder / pool.EXPERT_STAMP).write_text(json.dumps(stamp))
    shutil.copy(weights, folder / "model-extra.safetensors")
    with pytest.raises(pool.MaterializedModelError, match=r"'capitals' is damaged: weight file\(s\) .*model-extra"):
        pool.check_materialized("capitals", folder)


def test_unknown_or_unbuilt_experts_are_named():
    with pytest.raises(pool.UnknownExpertError, match="no expert 'nope' in the smol pool; experts: gsm8k-answer"):
        pool.materialize(names=["nope"])
    assert str(pool.UnknownExpertError("plain text")) == "plain text"


def test_committed_adapters_stay_within_budget():
    total = sum(p.stat().st_size for p in pool.pool_dir().rglob("*") if p.is_file())
    assert total <= 100 * 2**20, f"adapters total {total / 2**20:.1f} MiB"


def test_pool_is_heterogeneous_and_has_the_homogeneous_subsets():
    specs = {s.name: s for s in pool.EXPERTS}
    assert {specs[n].tags["domain"] for n in pool.MATH} == {"math"}
    assert {specs[n].tags["domain"] for n in pool.MEDICAL} == {"medical"}
    assert {s.targets for s in pool.EXPERTS} == {"attn", "mlp", "all"}
    assert len({s.rank for s in pool.EXPERTS}) >= 3 and len({s.lr for s in pool.EXPERTS}) >= 3
    assert any(s.flip_labels for s in pool.EXPERTS)  # a deliberately conflicting expert


def test_experts_beat_the_base_on_their_own_validation_task():
    """Recorded with the same scorer as lm-eval (see test_zoo_base), headline metric per task;
    a multi-task expert must win on average over its tasks."""
    base = MANIFEST["base_validation"]
    for name, entry in MANIFEST["experts"].items():
        spec = pool.expert_spec(name)
        scores = entry["validation_acc"]
        if not scores:  # the news expert is trained on plain text (perplexity), not multiple choice
            assert spec.tasks == ("news",)
            continue
        mine = sum(scores.values()) / len(scores)
        ref = sum(base[t] for t in scores) / len(scores)
        if spec.flip_labels:
            assert mine < ref, f"{name} was trained on flipped labels and should lose on {list(scores)}"
        elif name in pool.KNOWN_WEAK:
            assert mine <= ref + 0.05, f"{name} now beats the base clearly: remove it from KNOWN_WEAK"
        else:
            assert mine > ref + 0.05, f"{name}: validation {mine:.3f} vs base {ref:.3f} on {list(scores)}"


@pytest.mark.slow
def test_materialized_expert_is_base_plus_its_lora_update(tmp_path_factory):
    cache = os.environ.get("MERGEBENCH_TEST_CACHE") or tmp_path_factory.mktemp("zoo")
    name = "elements"
    paths = pool.materialize(cache, names=[name])
    base = load_file(str(paths["base"] / "model.safetensors"))
    expert = load_file(str(paths[name] / "model.safetensors"))
    adapter = load_file(str(pool.pool_dir() / name / "adapter_model.safetensors"))
    cfg = json.loads((pool.pool_dir() / name / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    touched = set()
    for key, a in adapter.items():
        if ".lora_A." not in key:
            continue
        b = adapter[key.replace(".lora_A.", ".lora_B.")]
        target = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        ref = base[target].double() + scale * (b.double() @ a.double())
        torch.testing.assert_close(expert[target].double(), ref, rtol=1e-5, atol=1e-6)
        touched.add(target)
    assert touched and all(torch.equal(expert[k], base[k]) for k in base if k not in touched)
    # idempotent: a second call rewrites nothing
    mtime = (paths[name] / "model.safetensors").stat().st_mtime_ns
    pool.materialize(cache, names=[name])
    assert (paths[name] / "model.safetensors").stat().st_mtime_ns == mtime
