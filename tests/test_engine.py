"""The streaming merge engine: correctness against float64 references, input handling,
validation before any tensor work, atomic output, in-memory models and seeding."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mergebench.engine import (
    PROVENANCE_FILE,
    CheckpointError,
    CompatibilityError,
    ShardedWriter,
    load_merged_model,
    merge,
    resolve_model_path,
    tensor_seed,
)
from mergebench.methods import InputContract, MethodSpec, Param, ParameterError, get_method, register
from mergebench.methods import registry as _registry
from mergebench.engine.request import MergeRequest
from mergebench.toy import make_tiny_pool, tiny_llama_state, write_checkpoint

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _state(folder: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors, read with safetensors itself (independent of the engine's reader)."""
    folder = Path(folder)
    if (folder / "model.safetensors").exists():
        return load_file(folder / "model.safetensors")
    out = {}
    for f in sorted(folder.glob("model-*.safetensors")):
        out.update(load_file(f))
    return out


def _req(method="linear", experts=(), base=None, **kw) -> MergeRequest:
    return MergeRequest(method=method, experts=[str(e) for e in experts], base=str(base) if base else None, **kw)


@pytest.fixture
def temp_method():
    """Register test-only methods; unregistered afterwards so they never leak into other tests."""
    names = []

    def make(name, kernel, **kw):
        spec = register(MethodSpec(name=name, kernel=kernel, citation="test", **kw), replace=True)
        names.append(name)
        return spec

    yield make
    for n in names:
        _registry._REGISTRY.pop(n, None)


@pytest.fixture
def spy(temp_method):
    """A linear-average method that records every kernel call (and can fail on call k)."""
    calls = []
    fail_at = {"k": None}

    def kernel(base, experts, weights, params, ctx):
        calls.append((ctx.name, base))
        if fail_at["k"] is not None and len(calls) >= fail_at["k"]:
            raise RuntimeError(f"boom on {ctx.name}")
        w = weights.to(experts[0].dtype)
        return sum(wi * e for wi, e in zip(w, experts)) / w.sum()

    temp_method("t_spy", kernel, contract=InputContract(base="optional"), granularity="elementwise")
    return calls, fail_at


# -- correctness -------------------------------------------------------------------------------


def test_linear_equals_float64_weighted_average(tiny_pool, tmp_path):
    base, experts = tiny_pool
    w = [1.0, 2.0, 0.5]
    res = merge(_req(experts=experts, base=base, weights=w), tmp_path / "out", progress=False)
    out = _state(tmp_path / "out")
    inputs = [_state(e) for e in experts]
    assert set(out) == set(inputs[0])
    for name, got in out.items():
        ref = sum(wi * s[name].double() for wi, s in zip(w, inputs)) / sum(w)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-7)
    assert res.bytes_read == sum(t.numel() * 4 for s in inputs for t in s.values())  # base not read: linear ignores it
    assert res.summary().startswith(f"{len(out)} tensors, ")


def test_single_file_and_sharded_inputs_give_identical_results(tmp_path):
    _, single = make_tiny_pool(tmp_path / "single", 2)
    _, sharded = make_tiny_pool(tmp_path / "sharded", 2, max_shard_bytes=20_000)
    assert len(list(sharded[0].glob("model-*.safetensors"))) > 3
    a = merge(_req(experts=single), progress=False).state_dict
    b = merge(_req(experts=sharded), progress=False).state_dict
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_in_memory_and_sharded_on_disk_outputs_are_identical(tiny_pool, tmp_path):
    base, experts = tiny_pool
    req = _req(experts=experts, base=base, max_shard_size=30_000)
    mem = merge(req, progress=False)
    disk = merge(req, tmp_path / "out", progress=False)
    shards = sorted((tmp_path / "out").glob("model-*.safetensors"))
    assert len(shards) > 2
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    got = {}
    for f in shards:
        with safe_open(f, framework="pt") as fh:  # the hand-written headers must satisfy safetensors
            for k in fh.keys():
                assert index["weight_map"][k] == f.name
                got[k] = fh.get_tensor(k)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in got.values())
    assert got.keys() == mem.state_dict.keys()
    assert all(torch.equal(got[k], mem.state_dict[k]) for k in got)
    assert disk.bytes_written == index["metadata"]["total_size"]
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_chunked_elementwise_merge_equals_whole_tensor_merge(tiny_pool):
    base, experts = tiny_pool
    whole = merge(_req(experts=experts), progress=False).state_dict
    chunked = merge(_req(experts=experts), progress=False, chunk_bytes=1000).state_dict  # ~7 rows per chunk
    assert all(torch.equal(whole[k], chunked[k]) for k in whole)


def test_load_merged_model_matches_model_loaded_from_disk(tiny_pool, tmp_path):
    from transformers import AutoModelForCausalLM

    base, experts = tiny_pool
    req = _req(experts=experts, base=base, weights=[0.2, 0.3, 0.5])
    model, tok = load_merged_model(merge(req, progress=False))
    merge(req, tmp_path / "out", progress=False)
    disk = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = tok("merging weights, streamed", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, disk(ids).logits)
    assert not model.training


def test_output_folder_is_a_complete_hf_checkpoint(tiny_pool, tmp_path):
    base, experts = tiny_pool
    merge(_req(experts=experts, base=base), tmp_path / "out", progress=False)
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors", PROVENANCE_FILE} <= names
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "llama"
    prov = json.loads((tmp_path / "out" / PROVENANCE_FILE).read_text())
    assert prov["method"] == "linear" and [i["role"] for i in prov["inputs"]] == ["base", "expert 0", "expert 1", "expert 2"]


def test_fingerprint_depends_on_content_not_location(tiny_pool, tmp_path):
    base, experts = tiny_pool
    shutil.copytree(experts[0], tmp_path / "copy")
    res = merge(_req(experts=[experts[0], tmp_path / "copy", experts[1]], base=base), progress=False)
    fp = [i["fingerprint"] for i in res.inputs]
    assert fp[1] == fp[2]  # same bytes, another folder
    assert len({fp[0], fp[1], fp[3]}) == 3  # same headers and shapes, different weights


# -- validation before any tensor work --------------------------------------------------------


def _variant(tmp_path, name, *, edit=None, config=None, seed=1, **write_kw) -> Path:
    state, cfg = tiny_llama_state(seed, config)
    if edit:
        edit(state)
    return write_checkpoint(tmp_path / name, state, cfg, tokenizer=False, **write_kw)


def _grow(state):
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(65, 32)


def _drop(state):
    del state["model.layers.0.self_attn.k_proj.weight"]


@pytest.mark.parametrize(
    "edit, config, expect",
    [
        (_grow, None, r"shape(.|\n)*model\.layers\.1\.mlp\.up_proj\.weight: expert 1 \(.*bad/model\.safetensors\) has shape \(65, 32\)"),
        (_drop, None, r"expert 1 \(.*bad\) lacks 1 tensor\(s\) .*model\.layers\.0\.self_attn\.k_proj\.weight"),
        (None, {"vocab_size": 300}, r"vocabulary sizes differ \(expert 0 260, expert 1 300\).*vocab_policy='truncate'"),
    ],
    ids=["shape", "missing", "vocab"],
)
def test_incompatible_inputs_fail_before_any_merging(tiny_pool, tmp_path, spy, edit, config, expect):
    calls, _ = spy
    bad = _variant(tmp_path, "bad", edit=edit, config=config)
    with pytest.raises(CompatibilityError, match=expect):
        merge(_req("t_spy", experts=[tiny_pool[1][0], bad]), tmp_path / "out", progress=False)
    assert calls == [] and not (tmp_path / "out").exists()


def test_different_architecture_is_named(tiny_pool, tmp_path, spy):
    calls, _ = spy
    bad = _variant(tmp_path, "bad")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "mistral"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CompatibilityError, match=r"expert 0 \(.*bad\) has model_type='mistral', base \(.*\) has 'llama'"):
        merge(_req("t_spy", experts=[bad], base=tiny_pool[0]), progress=False)
    assert calls == []


def test_many_differences_are_counted_and_the_first_listed(tiny_pool, tmp_path):
    def grow_all(state):
        for k in list(state):
            if k.endswith(("up_proj.weight", "down_proj.weight", "gate_proj.weight")):
                state[k] = torch.zeros(3, 3)

    bad = _variant(tmp_path, "bad", edit=grow_all, max_shard_bytes=20_000)
    with pytest.raises(CompatibilityError, match=r"tensors differ in shape \(6\):(.|\n)*model-0000\d-of-0000\d\.safetensors(.|\n)*and 1 more"):
        merge(_req(experts=[tiny_pool[1][0], bad]), progress=False)


def test_parameters_are_checked_before_any_file_is_opened(temp_method):
    temp_method("t_needs_base", lambda b, e, w, p, c: b, contract=InputContract(base="required"), params=(Param("lam", "float", 1.0, ge=0),))
    nowhere = ["/nonexistent/a", "/nonexistent/b"]
    with pytest.raises(ParameterError, match="needs a base"):
        merge(_req("t_needs_base", experts=nowhere), progress=False)
    with pytest.raises(ParameterError, match="no parameter 'lamda'; valid: lam"):
        merge(_req("t_needs_base", experts=nowhere, base="/nonexistent/c", params={"lamda": 1}), progress=False)
    with pytest.raises(ParameterError, match="must be in"):
        merge(_req("t_needs_base", experts=nowhere, base="/nonexistent/c", params={"lam": -1}), progress=False)
    with pytest.raises(ParameterError, match="3 weights given for 2 experts"):
        merge(_req("linear", experts=nowhere, weights=[1, 2, 3]), progress=False)
    with pytest.raises(ParameterError, match="no auxiliary input 'fisher'"):
        merge(_req("linear", experts=nowhere, aux={"fisher": nowhere}), progress=False)


def test_per_expert_params_are_merged_and_validated(tiny_pool, temp_method):
    seen = []

    def kernel(base, experts, weights, params, ctx):
        seen.append(params["density"])
        return experts[0].clone()

    temp_method("t_density", kernel, params=(Param("density", "float", 1.0, gt=0, le=1, per_expert=True),), contract=InputContract(base="unused"))
    _, experts = tiny_pool
    merge(_req("t_density", experts=experts, per_expert_params={"density": [0.1, 0.5, 1.0]}), progress=False)
    assert set(seen) == {(0.1, 0.5, 1.0)}
    with pytest.raises(ParameterError, match="2 per-expert values for 3 experts"):
        merge(_req("t_density", experts=experts, per_expert_params={"density": [0.1, 0.5]}), progress=False)
    with pytest.raises(ParameterError, match="both in params and in per_expert_params"):
        merge(_req("t_density", experts=experts, params={"density": 0.3}, per_expert_params={"density": [0.1, 0.5, 1]}), progress=False)


def test_missing_path_and_missing_hub_id_are_clear(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache"):
        resolve_model_path("someorg/not-downloaded")
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_model_path(str(tmp_path / "nope"))


def test_hub_id_resolves_from_the_local_cache(tiny_pool, tmp_path, monkeypatch):
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someorg--tiny"
    shutil.copytree(tiny_pool[1][0], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_model_path("someorg/tiny") == repo / "snapshots" / commit
    a = merge(_req(experts=["someorg/tiny"]), progress=False).state_dict
    assert all(torch.equal(a[k], v) for k, v in _state(tiny_pool[1][0]).items())


def test_pickle_checkpoints_are_refused_unless_allowed(tiny_pool, tmp_path, spy):
    calls, _ = spy
    src = tiny_pool[1][1]
    pkl = tmp_path / "pkl"
    pkl.mkdir()
    shutil.copy(src / "config.json", pkl)
    torch.save(_state(src), pkl / "pytorch_model.bin")
    experts = [tiny_pool[1][0], pkl]
    with pytest.raises(CheckpointError, match=r"pickle.*allow_pickle=True"):
        merge(_req("t_spy", experts=experts), progress=False)
    assert calls == []
    got = merge(_req(experts=experts, allow_pickle=True), progress=False).state_dict
    ref = merge(_req(experts=[tiny_pool[1][0], src]), progress=False).state_dict
    assert all(torch.equal(got[k], ref[k]) for k in ref)


# -- output handling ---------------------------------------------------------------------------


def test_failure_midway_leaves_no_partial_output(tiny_pool, tmp_path, spy):
    calls, fail_at = spy
    fail_at["k"] = 7
    with pytest.raises(RuntimeError, match="boom") as info:
        merge(_req("t_spy", experts=tiny_pool[1], max_shard_size=20_000), tmp_path / "out", progress=False)
    assert len(calls) == 7
    assert any("while merging tensor" in n for n in getattr(info.value, "__notes__", []))
    assert list(tmp_path.iterdir()) == []  # neither the destination nor a temporary folder


def test_existing_destination_is_refused_unless_overwrite(tiny_pool, tmp_path, spy):
    calls, _ = spy
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        merge(_req("t_spy", experts=tiny_pool[1]), out, progress=False)
    assert calls == [] and (out / "old.txt").exists()
    merge(_req("t_spy", experts=tiny_pool[1]), out, progress=False, overwrite=True)
    assert not (out / "old.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    (tmp_path / "empty").mkdir()  # an existing empty folder is fine
    merge(_req("t_spy", experts=tiny_pool[1]), tmp_path / "empty", progress=False)


def test_writer_rejects_out_of_order_and_incomplete_tensors(tmp_path):
    specs = [("a", (2, 3), torch.float32), ("b", (4,), torch.bfloat16)]
    with pytest.raises(ValueError, match="'a' was not written completely"):
        with ShardedWriter(tmp_path / "o", specs) as w:
            w.write("a", torch.zeros(1, 3))
            w.write("b", torch.zeros(4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="'b' was not written completely"):
        with ShardedWriter(tmp_path / "o", specs) as w:
            w.write("a", torch.zeros(2, 3))
    assert list(tmp_path.iterdir()) == []
    with ShardedWriter(tmp_path / "o", specs, max_shard_size=1) as w:  # one tensor per shard
        w.write("a", torch.arange(3.0).expand(1, 3))  # non-contiguous chunks are fine
        w.write("a", torch.ones(1, 3))
        w.write("b", torch.full((4,), 2.5, dtype=torch.bfloat16))
    got = _state(tmp_path / "o")
    assert torch.equal(got["a"], torch.tensor([[0.0, 1, 2], [1, 1, 1]]))
    assert got["b"].dtype == torch.bfloat16 and torch.equal(got["b"], torch.full((4,), 2.5, dtype=torch.bfloat16))


def test_bfloat16_output_dtype(tiny_pool, tmp_path):
    _, experts = tiny_pool
    ref = merge(_req(experts=experts), progress=False).state_dict
    merge(_req(experts=experts, out_dtype="bfloat16"), tmp_path / "out", progress=False)
    got = _state(tmp_path / "out")
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    assert all(torch.equal(got[k], ref[k].to(torch.bfloat16)) for k in ref)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


def test_output_dtype_defaults_to_the_inputs_and_float_precisions_may_mix(tmp_path):
    base, experts = make_tiny_pool(tmp_path / "bf16", 2, dtype=torch.bfloat16)
    e32 = _variant(tmp_path, "f32", seed=5)
    res = merge(_req(experts=[experts[0], e32], base=base), progress=False)
    assert res.out_dtype == "bfloat16" and all(t.dtype == torch.bfloat16 for t in res.state_dict.values())
    a, b = _state(experts[0]), _state(e32)
    for k, t in res.state_dict.items():
        ref = (a[k].double() + b[k].double()) / 2
        torch.testing.assert_close(t.double(), ref, rtol=8e-3, atol=1e-6)  # bf16 rounding of the result


# -- vocabulary and tied embeddings -------------------------------------------------------------


@pytest.fixture
def vocab_pool(tmp_path):
    """A base with 260 tokens, experts with 250 and 270 (a shared prefix of the vocabulary)."""
    return [_variant(tmp_path, n, config={"vocab_size": v}, seed=s) for n, v, s in (("base", 260, 1), ("small", 250, 2), ("big", 270, 3))]


def test_vocab_policy_truncate_cuts_all_to_the_smallest(vocab_pool):
    base, small, big = vocab_pool
    res = merge(_req(experts=[small, big], base=base, vocab_policy="truncate"), progress=False)
    s, b = _state(small), _state(big)
    for name in (EMBED, HEAD):
        assert res.state_dict[name].shape == (250, 32)
        torch.testing.assert_close(res.state_dict[name].double(), (s[name].double() + b[name][:250].double()) / 2)
    assert res.config["vocab_size"] == 250


def test_vocab_policy_base_pads_with_base_rows_and_cuts_to_base(vocab_pool, spy):
    base, small, big = vocab_pool
    res = merge(_req("t_spy", experts=[small, big], base=base, vocab_policy="base"), progress=False)
    s, b, r = _state(small), _state(big), _state(base)
    for name in (EMBED, HEAD):
        padded = torch.cat([s[name], r[name][250:]]).double()
        torch.testing.assert_close(res.state_dict[name].double(), (padded + b[name][:260].double()) / 2)
    assert res.config["vocab_size"] == 260
    with pytest.raises(CompatibilityError, match="needs a base model"):
        merge(_req("t_spy", experts=[small, big], vocab_policy="base"), progress=False)


def test_tied_embeddings_stand_in_for_a_missing_lm_head(tmp_path):
    tied = _variant(tmp_path, "tied", config={"tie_word_embeddings": True}, edit=lambda s: s.pop(HEAD), seed=1)
    untied = _variant(tmp_path, "untied", seed=2)
    res = merge(_req(experts=[tied, untied]), progress=False)
    t, u = _state(tied), _state(untied)
    assert HEAD not in t
    torch.testing.assert_close(res.state_dict[HEAD].double(), (t[EMBED].double() + u[HEAD].double()) / 2)
    assert res.config["tie_word_embeddings"] is False
    model, _ = load_merged_model(res, tokenizer=False)
    assert torch.equal(model.lm_head.weight, res.state_dict[HEAD])


def test_all_tied_models_load_with_their_head_tied(tmp_path):
    experts = [_variant(tmp_path, f"t{i}", config={"tie_word_embeddings": True}, edit=lambda s: s.pop(HEAD), seed=i) for i in (1, 2)]
    res = merge(_req(experts=experts), progress=False)
    assert HEAD not in res.state_dict
    model, _ = load_merged_model(res, tokenizer=False)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight, res.state_dict[EMBED])


# -- what the kernel sees ----------------------------------------------------------------------


def test_base_required_method_gets_the_base_and_unused_base_gets_none(tiny_pool, temp_method, spy):
    calls, _ = spy
    base, experts = tiny_pool

    def ta(b, e, w, p, ctx):
        return b + p["lam"] * sum(wi * (x - b) for wi, x in zip(w.to(b.dtype), e))

    temp_method("t_ta", ta, params=(Param("lam", "float", 1.0),), contract=InputContract(base="required"))
    res = merge(_req("t_ta", experts=experts, base=base, params={"lam": 0.7}, weights=[0.5, 0.3, 0.2]), progress=False)
    r, es = _state(base), [_state(e) for e in experts]
    for k, got in res.state_dict.items():
        ref = r[k].double() + 0.7 * sum(w * (e[k].double() - r[k].double()) for w, e in zip([0.5, 0.3, 0.2], es))
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)

    seen = []
    temp_method("t_unused", lambda b, e, w, p, c: seen.append(b) or e[0].clone(), contract=InputContract(base="unused"))
    merge(_req("t_unused", experts=experts, base=base), progress=False)
    assert seen and all(b is None for b in seen)
    merge(_req("t_spy", experts=experts, base=base), progress=False)
    assert all(b is not None for _, b in calls)


def test_context_names_layers_and_kinds(tiny_pool, temp_method):
    seen = {}

    def kernel(base, experts, weights, params, ctx):
        seen[ctx.name] = ctx
        return experts[0].clone()

    temp_method("t_ctx", kernel, contract=InputContract(base="unused"))
    merge(_req("t_ctx", experts=tiny_pool[1]), progress=False)
    c = seen["model.layers.1.self_attn.q_proj.weight"]
    assert (c.layer, c.num_layers, c.kind.value, c.generator) == (1, 2, "attention", None)
    assert seen[EMBED].layer is None and seen[EMBED].kind.value == "embedding"
    assert seen["model.layers.0.mlp.up_proj.weight"].kind.value == "mlp"


def test_prepass_statistics_cover_the_whole_model(tiny_pool, temp_method):
    def prepass(base, experts, params, ctx):
        return {"norm": float(experts[0].double().norm())}

    snapshots = []

    def kernel(base, experts, weights, params, ctx):
        snapshots.append(dict(ctx.model_stats))
        return experts[0].clone()

    temp_method("t_pre", kernel, prepass=prepass, contract=InputContract(base="unused"))
    merge(_req("t_pre", experts=tiny_pool[1]), progress=False)
    first = _state(tiny_pool[1][0])
    assert snapshots[0].keys() == first.keys()  # all statistics exist before the first kernel call
    for k, t in first.items():
        assert snapshots[0][k]["norm"] == pytest.approx(float(t.double().norm()), rel=1e-6)


def test_aux_tensors_arrive_by_name(tiny_pool, tmp_path, temp_method):
    _, experts = tiny_pool
    fishers = []
    for i, e in enumerate(experts):
        st = {k: v.abs() + i for k, v in _state(e).items() if "layers.0" in k}  # partial: only layer 0
        fishers.append(write_checkpoint(tmp_path / f"f{i}", st, {"model_type": "llama"}, tokenizer=False))

    def fisher_avg(base, experts, weights, params, ctx):
        f = ctx.aux.get("fisher")
        if f is None:
            return sum(experts) / len(experts)
        return sum(fi * e for fi, e in zip(f, experts)) / sum(f)

    temp_method("t_fisher", fisher_avg, aux_inputs=("fisher",), contract=InputContract(base="unused"))
    res = merge(_req("t_fisher", experts=experts, aux={"fisher": [str(f) for f in fishers]}), progress=False)
    es, fs = [_state(e) for e in experts], [_state(f) for f in fishers]
    for k, got in res.state_dict.items():
        if "layers.0" in k:
            ref = sum(f[k].double() * e[k].double() for f, e in zip(fs, es)) / sum(f[k].double() for f in fs)
        else:
            ref = sum(e[k].double() for e in es) / 3
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.fixture
def noise_method(temp_method):
    def kernel(base, experts, weights, params, ctx):
        mean = sum(experts) / len(experts)
        return mean + torch.randn(mean.shape, generator=ctx.generator, dtype=mean.dtype)

    return temp_method("t_noise", kernel, stochastic=True, contract=InputContract(base="unused"), granularity="elementwise")


def test_stochastic_methods_are_seeded_per_tensor_name(tiny_pool, tmp_path, noise_method):
    _, experts = tiny_pool
    a = merge(_req("t_noise", experts=experts, seed=3), progress=False).state_dict
    b = merge(_req("t_noise", experts=experts, seed=3), progress=False, chunk_bytes=100).state_dict  # never split
    c = merge(_req("t_noise", experts=experts, seed=4), progress=False).state_dict
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(torch.equal(a[k], c[k]) for k in a)
    es = [_state(e) for e in experts]
    for k, got in a.items():  # the noise is exactly a fresh generator seeded from (seed, name)
        g = torch.Generator().manual_seed(tensor_seed(k, 3))
        mean = sum(e[k] for e in es) / 3
        assert torch.equal(got, mean + torch.randn(mean.shape, generator=g))


def test_stochastic_result_does_not_depend_on_visit_order(tiny_pool, tmp_path, noise_method):
    """Inputs whose shards hold the tensors in reverse order are visited in reverse order."""
    _, experts = tiny_pool
    reversed_ = []
    for i, e in enumerate(experts):
        st = _state(e)
        st = dict(reversed(list(st.items())))
        cfg = json.loads((e / "config.json").read_text())
        reversed_.append(write_checkpoint(tmp_path / f"r{i}", st, cfg, tokenizer=False, max_shard_bytes=40_000))
    a = merge(_req("t_noise", experts=experts, seed=9), progress=False).state_dict
    b = merge(_req("t_noise", experts=reversed_, seed=9), progress=False).state_dict
    assert list(a) != list(b)  # really visited in a different order
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_kernel_returning_a_wrong_shape_is_named(tiny_pool, temp_method):
    from mergebench.engine import MergeError

    temp_method("t_bad", lambda b, e, w, p, c: e[0].reshape(-1), contract=InputContract(base="unused"))
    with pytest.raises(MergeError, match=r"method 't_bad' returned \(\d+,\) for tensor '[\w.]+'; expected shape \(\d+, \d+\)"):
        merge(_req("t_bad", experts=tiny_pool[1]), progress=False)


def test_progress_bar_reports_throughput(tiny_pool, capsys):
    merge(_req(experts=tiny_pool[1]), progress=True)
    err = capsys.readouterr()
    assert "GB/s" in err.out + err.err


def test_non_floating_tensors_are_copied_from_the_reference_and_must_match_dtype(tmp_path, spy):
    calls, _ = spy
    ids = "model.extra_ids"
    experts = [_variant(tmp_path, f"e{i}", seed=i, edit=lambda s, i=i: s.update({ids: torch.arange(5) + 10 * i})) for i in range(2)]
    res = merge(_req("t_spy", experts=experts), progress=False)
    assert torch.equal(res.state_dict[ids], torch.arange(5)) and ids not in [n for n, _ in calls]
    bad = _variant(tmp_path, "bad", edit=lambda s: s.update({ids: torch.arange(5.0)}))
    calls.clear()
    with pytest.raises(CompatibilityError, match=r"differ in dtype(.|\n)*model\.extra_ids: expert 1 \(.*bad.*\) has dtype torch\.float32"):
        merge(_req("t_spy", experts=[experts[0], bad]), progress=False)
    assert calls == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_merge_matches_cpu_and_seeds_on_device(tiny_pool, noise_method):
    _, experts = tiny_pool
    cpu = merge(_req(experts=experts), progress=False).state_dict
    gpu = merge(_req(experts=experts, device="cuda"), progress=False).state_dict
    assert all(t.device.type == "cpu" for t in gpu.values())
    for k in cpu:
        torch.testing.assert_close(gpu[k], cpu[k], rtol=1e-6, atol=1e-7)
    a = merge(_req("t_noise", experts=experts, device="cuda", seed=2), progress=False).state_dict
    b = merge(_req("t_noise", experts=experts, device="cuda", seed=2), progress=False).state_dict
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- robustness: weights, devices, non-finite values, disk errors -------------------------------

from mergebench.engine import (  # noqa: E402
    DeviceError,
    NonFiniteInputError,
    NonFiniteOutputError,
    OutputPathError,
    OutputWriteError,
    all_finite,
    resolve_device,
)

from _faults import fill_disk  # noqa: E402

NAN_TENSOR = "model.layers.1.mlp.up_proj.weight"


@pytest.mark.parametrize(
    "method, weights, params, fragment",
    [
        ("linear", [float("nan"), 1.0], {}, "weight 0 is nan"),
        ("linear", [1.0, float("inf")], {}, "weight 1 is inf"),
        ("linear", [1.0, -1.0], {}, "sums to zero"),
        ("task_arithmetic", [1.0, -1.0], {"normalize": True}, "normalize=true"),
        ("multislerp", [0.5, -0.5], {}, "normalize_weights=true"),
        ("karcher", [1.0, -1.0], {}, "must be nonnegative"),
        ("karcher", [0.0, 0.0], {}, "sums to zero"),
        ("tsv_merge", [1.0, -1.0], {"fallback_mean": True}, "fallback_mean=true"),
    ],
)
def test_bad_weights_fail_before_any_file_is_opened(method, weights, params, fragment):
    nowhere = ["/nonexistent/a", "/nonexistent/b"]
    base = "/nonexistent/base" if method in ("task_arithmetic", "tsv_merge") else None
    with pytest.raises(ParameterError, match=fragment) as info:
        merge(_req(method, experts=nowhere, base=base, weights=weights, params=params), progress=False)
    assert "'weights'" in str(info.value)


def test_zero_sum_weights_are_fine_where_nothing_divides_by_them(tiny_pool):
    """Task arithmetic without normalize takes 1 * tau_0 - 1 * tau_1: a legitimate request."""
    base, experts = tiny_pool
    out = merge(_req("task_arithmetic", experts=experts[:2], base=base, weights=[1.0, -1.0]), progress=False).state_dict
    b, e0, e1 = _state(base), _state(experts[0]), _state(experts[1])
    k = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(out[k].double(), b[k].double() + e0[k].double() - e1[k].double(), atol=1e-6, rtol=0)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(" CPU ") == torch.device("cpu")
    for bad in ("tpu", "gpu", "cuda:x", ""):
        with pytest.raises(DeviceError, match=r"unknown device .*: use cpu, cuda, cuda:N or mps"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        msg = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        with pytest.raises(DeviceError, match=f"--device cuda: {msg}"):
            resolve_device("cuda")
        with pytest.raises(DeviceError, match="--device cuda:1"):
            merge(_req(experts=["/nonexistent/a"], device="cuda:1"), progress=False)  # before any file


def test_all_finite_matches_isfinite():
    x = torch.randn(50, 7)
    assert all_finite(x) and all_finite(torch.zeros(0)) and all_finite(torch.arange(5))
    big = torch.tensor([3e38, -3e38, 3e38])  # a sum would overflow; min/max cannot
    assert all_finite(big)
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[31, 2] = bad
        assert not all_finite(y) and not all_finite(y.to(torch.bfloat16)) and not all_finite(y.T)


@pytest.fixture(scope="module")
def nan_pool(tmp_path_factory):
    """Base + 2 experts; expert 1 has one NaN in row 40 of NAN_TENSOR, written in 2 shards."""
    root = tmp_path_factory.mktemp("nan_pool")
    base, experts = make_tiny_pool(root, 2)
    state = _state(experts[1])
    state[NAN_TENSOR][40, 3] = float("nan")
    _, cfg = tiny_llama_state(0)
    bad = write_checkpoint(root / "nan_expert", state, cfg, max_shard_bytes=40_000, tokenizer=False)
    return base, experts[0], bad


@pytest.mark.parametrize("chunk_bytes", [None, 4096])  # whole tensors, or row chunks (rows 40.. in a later chunk)
def test_nonfinite_input_names_checkpoint_file_and_tensor(nan_pool, chunk_bytes):
    base, good, bad = nan_pool
    kw = {"chunk_bytes": chunk_bytes} if chunk_bytes else {}
    shard = next(f.name for f in sorted(bad.glob("model-*.safetensors")) if NAN_TENSOR in load_file(f))
    with pytest.raises(NonFiniteInputError) as info:
        merge(_req("linear", experts=[good, bad]), progress=False, **kw)
    msg = str(info.value)
    assert "\n" not in msg and f"expert 1 ({bad / shard})" in msg and repr(NAN_TENSOR) in msg
    assert "1 NaN and 0 inf value(s), the first at index (40, 3)" in msg and "--allow-nonfinite" in msg


def test_nonfinite_inputs_are_caught_by_the_prepass_and_checked_once(nan_pool, monkeypatch):
    """Methods with a prepass read every tensor twice: the first read already stops the merge,
    and a tensor the prepass checked is not checked again."""
    import importlib

    merge_module = importlib.import_module("mergebench.engine.merge")  # the package exports a function of that name
    base, good, bad = nan_pool
    seen = []

    def counting(t):
        seen.append(t.shape)
        return all_finite(t)

    monkeypatch.setattr(merge_module, "all_finite", counting)
    with pytest.raises(NonFiniteInputError, match=r"expert 1 \(.*nan_expert"):
        merge(_req("layer_adaptive_slerp", experts=[good, bad]), progress=False)
    seen.clear()
    result = merge(_req("layer_adaptive_slerp", experts=[good, base]), progress=False)
    floating = sum(1 for t in result.state_dict.values() if t.is_floating_point())
    assert len(seen) == 3 * floating  # 2 inputs in the prepass + 1 output per tensor, no second input check
    assert result.timings["check_s"] >= 0


@pytest.mark.parametrize("method", ["linear", "karcher", "ties", "multislerp", "arcee_fusion", "tsv_merge"])
def test_allow_nonfinite_keeps_them_nonfinite(nan_pool, method):
    """allow_nonfinite passes NaN through, and no method turns it into finite values (karcher
    used to return zeros). SVD methods that cannot take NaN fail with one clear line."""
    base, good, bad = nan_pool
    experts = [bad] if method == "arcee_fusion" else [good, bad]
    req = _req(method, experts=experts, base=base, allow_nonfinite=True)
    if method == "tsv_merge":
        with pytest.raises(NonFiniteInputError, match=f"cannot merge tensor '{NAN_TENSOR}', whose inputs hold NaN/inf"):
            merge(req, progress=False)
        return
    result = merge(req, progress=False)
    out = result.state_dict
    assert not torch.isfinite(out[NAN_TENSOR]).all()
    assert all(torch.isfinite(t).all() for k, t in out.items() if k != NAN_TENSOR and t.is_floating_point())
    assert any(NAN_TENSOR in n and "allow_nonfinite" in n for n in result.notes)


def test_methods_without_the_property_get_every_input_scanned(nan_pool, temp_method):
    """A kernel that hides NaN (and does not declare nonfinite_propagates) cannot hide it from
    the engine: its inputs are scanned as they are read."""
    base, good, bad = nan_pool
    kernel = lambda b, e, w, p, c: torch.stack([x.nan_to_num() for x in e]).mean(0)  # noqa: E731
    temp_method("t_hider", kernel, contract=InputContract(base="unused"))
    with pytest.raises(NonFiniteInputError, match=rf"expert 1 \(.*nan_expert.*{NAN_TENSOR}"):
        merge(_req("t_hider", experts=[good, bad]), progress=False)
    assert "nonfinite_propagates" in get_method("linear").properties  # built-ins are checked through the output


def test_nonfinite_output_from_finite_inputs_names_method_and_tensor(tiny_pool, temp_method):
    def kernel(base, experts, weights, params, ctx):
        out = experts[0].clone()
        if ctx.name == NAN_TENSOR:
            out[0, 0] = float("nan")
        return out

    temp_method("t_nan_maker", kernel, contract=InputContract(base="unused"))
    with pytest.raises(NonFiniteOutputError) as info:
        merge(_req("t_nan_maker", experts=tiny_pool[1]), progress=False)
    assert str(info.value) == (
        f"method 't_nan_maker' produced 1 NaN and 0 inf value(s), the first at index (0, 0) for tensor "
        f"'{NAN_TENSOR}' from finite inputs"
    )
    assert isinstance(info.value, ValueError) and isinstance(info.value, RuntimeError)


@pytest.mark.parametrize("budget", [0, 10_000, 10**9])  # the header, a later tensor, only the final flush
def test_disk_full_cleans_up_and_is_one_line(tiny_pool, tmp_path, monkeypatch, budget):
    fill_disk(monkeypatch, budget)
    out = tmp_path / "out"
    with pytest.raises(OutputWriteError) as info:
        merge(_req(experts=tiny_pool[1]), out, progress=False)
    msg = str(info.value)
    assert msg.startswith(f"disk full while writing {out}: No space left on device") and "\n" not in msg
    assert info.value.errno == 28 and isinstance(info.value, OSError)
    assert list(tmp_path.iterdir()) == []  # neither the destination nor the temporary folder


def test_overwrite_keeps_the_old_output_when_the_new_one_fails(tiny_pool, tmp_path, monkeypatch):
    out = tmp_path / "out"
    merge(_req(experts=tiny_pool[1]), out, progress=False)
    before = _state(out)
    fill_disk(monkeypatch, 10_000)
    with pytest.raises(OutputWriteError):
        merge(_req(experts=tiny_pool[1][:2]), out, progress=False, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    after = _state(out)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)


def test_output_under_a_file_is_refused_before_merging(tiny_pool, tmp_path, spy):
    calls, _ = spy
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputPathError, match=r"lies under .*/f, which is a file, not a folder"):
        merge(_req("t_spy", experts=tiny_pool[1]), tmp_path / "f" / "a" / "out", progress=False)
    with pytest.raises(OutputPathError, match="exists and is not a folder"):
        merge(_req("t_spy", experts=tiny_pool[1]), tmp_path / "f", progress=False)
    assert calls == [] and sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_unreadable_or_corrupt_inputs_are_checkpoint_errors(tiny_pool, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_pool[1][0], bad)
    (bad / "config.json").write_text("[1, 2")
    with pytest.raises(CheckpointError, match=r"bad/config.json: corrupt config.json"):
        merge(_req(experts=[bad]), progress=False)
    (bad / "config.json").unlink()
    (bad / "model.safetensors").unlink()
    (bad / "model.safetensors").mkdir()  # a folder where the file should be
    with pytest.raises(CheckpointError, match="expert 0: cannot read .*model.safetensors"):
        merge(_req(experts=[bad]), progress=False)
