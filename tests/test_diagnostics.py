"""Collapse diagnostics: weight metrics, activation ranks, HiddenSim/MDS, statistics, store table.

References are written here in float64 numpy straight from the papers' formulas (seed 004
eqs. 1-7, seed 000 Table 7 quantities), never by calling the code under test.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from scipy import stats as st

from mergebench.diagnostics import (
    activation_diagnostics,
    activation_metrics,
    anova_by_factor,
    collect_hidden_states,
    hidden_distance_matrix,
    hidden_sim,
    merging_difficulty,
    merging_loss,
    pearson,
    representation_rows,
    weight_diagnostics,
)
from mergebench.diagnostics.store import DiagUnit, has_diagnostics, read_diagnostics, write_diagnostics

torch.set_num_threads(1)


# ------------------------------------------------------------------------------ references


def _flat64(state, names):
    return np.concatenate([state[n].to(torch.float64).reshape(-1).numpy() for n in names])


def _ref_pair(ti, tj, thi, thj):
    """Seed 004 eqs. 4-6 on flat float64 vectors (theta_i - theta_j taken from the weights themselves)."""
    den = np.abs(ti).sum() + np.abs(tj).sum()
    differs = np.sign(ti) != np.sign(tj)
    return (np.abs(thi - thj).sum() / den, differs.mean(), np.abs(thi - thj)[differs].sum() / den)


def _cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _state(seed, shapes, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()}


SHAPES = {
    "model.embed_tokens.weight": (10, 4),
    "model.layers.0.self_attn.q_proj.weight": (4, 4),
    "model.layers.0.input_layernorm.weight": (4,),
    "model.layers.1.mlp.up_proj.weight": (6, 4),
    "model.norm.weight": (4,),
}


# ------------------------------------------------------------------------------ weights: known cases


def test_identical_experts_cosine_one_no_conflict():
    base = _state(0, SHAPES)
    tau = _state(1, SHAPES, 0.1)
    expert = {k: base[k] + tau[k] for k in base}
    wd = weight_diagnostics(base, {"a": expert, "b": {k: v.clone() for k, v in expert.items()}})
    assert wd.cosine[0, 1] == pytest.approx(1.0, abs=1e-12)
    assert wd.sign_change_ratio[0, 1] == 0.0
    assert wd.magnitude_change_ratio[0, 1] == 0.0
    assert wd.conflicting_magnitude_change_ratio[0, 1] == 0.0
    avg, count = wd.average_cosine()
    assert avg[0, 1] == pytest.approx(1.0, abs=1e-12) and count[0, 1] == len(SHAPES)
    counts = wd.layer_sign_counts("block")
    n_blocks = 4  # embed, layers.0, layers.1, model.norm
    assert counts["positive"][0, 1] == n_blocks and counts["negative"][0, 1] == 0 and counts["zero"][0, 1] == 0


def test_orthogonal_and_opposite_task_vectors():
    n = 64
    base = {"w": torch.zeros(n, dtype=torch.float64)}
    t1 = torch.ones(n, dtype=torch.float64)
    t2 = torch.tensor([1.0, -1.0] * (n // 2), dtype=torch.float64)  # orthogonal to t1, opposite sign on half
    wd = weight_diagnostics(base, {"a": {"w": t1}, "b": {"w": t2}, "c": {"w": -2 * t1}})
    assert wd.cosine[0, 1] == pytest.approx(0.0, abs=1e-15)
    assert wd.cosine[0, 2] == pytest.approx(-1.0, abs=1e-15)
    assert wd.sign_change_ratio[0, 1] == pytest.approx(0.5)
    assert wd.sign_change_ratio[0, 2] == 1.0
    # eq. 4 for tau and -2 tau: ||3 tau||_1 / (||tau||_1 + ||2 tau||_1) = 1; eq. 6 the same (all signs differ)
    assert wd.magnitude_change_ratio[0, 2] == pytest.approx(1.0)
    assert wd.conflicting_magnitude_change_ratio[0, 2] == pytest.approx(1.0)
    # a vs b: |t1 - t2| is 2 on the half where signs differ, 0 elsewhere -> both ratios = n / (2n) = 0.5
    assert wd.magnitude_change_ratio[0, 1] == pytest.approx(0.5)
    assert wd.conflicting_magnitude_change_ratio[0, 1] == pytest.approx(0.5)
    counts = wd.layer_sign_counts("tensor")
    assert (counts["zero"][0, 1], counts["negative"][0, 2], counts["positive"][1, 1]) == (1, 1, 1)


def test_untouched_tensor_counts_as_zero_cosine_layer():
    base = _state(0, SHAPES)
    a = {k: v + 0.1 for k, v in base.items()}
    b = {k: v + 0.2 for k, v in base.items()}
    a["model.norm.weight"] = base["model.norm.weight"].clone()  # not fine-tuned in a
    wd = weight_diagnostics(base, {"a": a, "b": b})
    counts = wd.layer_sign_counts("tensor")
    assert counts["zero"][0, 1] == 1 and counts["positive"][0, 1] == len(SHAPES) - 1
    avg, count = wd.average_cosine()
    assert count[0, 1] == len(SHAPES) - 1 and avg[0, 1] == pytest.approx(1.0)
    # eq. 5 uses the three-valued sign: an entry left at 0 by a and moved by b is a sign change
    total = sum(math.prod(s) for s in SHAPES.values())
    assert wd.sign_change_ratio[0, 1] == pytest.approx(4 / total)


def test_bad_shape_is_named():
    base = _state(0, SHAPES)
    other = dict(base)
    other["model.layers.1.mlp.up_proj.weight"] = torch.zeros(5, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=re.escape("model.layers.1.mlp.up_proj.weight")):
        weight_diagnostics(base, {"a": other})


# ------------------------------------------------------------------------------ weights: streaming


@pytest.fixture(scope="module")
def tiny_pool(tmp_path_factory):
    from mergebench.toy import make_tiny_pool

    root = tmp_path_factory.mktemp("pool")
    # sharded + bfloat16 on disk: the reader must cross shard boundaries and upcast
    return make_tiny_pool(root, 3, max_shard_bytes=20_000, dtype=torch.bfloat16, tokenizer=False)


def test_streaming_matches_loaded_state_dicts(tiny_pool):
    from safetensors.torch import load_file

    base_dir, expert_dirs = tiny_pool

    def load(d):
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    base = load(base_dir)
    exps = [load(d) for d in expert_dirs]
    names = sorted(base)
    merged_dir = expert_dirs[0]  # any checkpoint works as "merged"; its norm equals expert 0's
    # a tiny chunk forces many row chunks per tensor
    wd = weight_diagnostics(base_dir, {f"e{i}": d for i, d in enumerate(expert_dirs)}, merged=merged_dir,
                            chunk_bytes=3000)
    assert wd.n_params == sum(base[n].numel() for n in names)
    b = _flat64(base, names)
    th = [_flat64(e, names) for e in exps]
    tau = [t - b for t in th]
    for k in range(3):
        assert wd.norms[k] == pytest.approx(np.linalg.norm(tau[k]), rel=1e-12)
    assert wd.norms[3] == pytest.approx(np.linalg.norm(tau[0]), rel=1e-12)
    for i in range(3):
        for j in range(i + 1, 3):
            m4, m5, m6 = _ref_pair(tau[i], tau[j], th[i], th[j])
            assert wd.magnitude_change_ratio[i, j] == pytest.approx(m4, rel=1e-10)
            assert wd.sign_change_ratio[i, j] == pytest.approx(m5, rel=1e-12)
            assert wd.conflicting_magnitude_change_ratio[i, j] == pytest.approx(m6, rel=1e-10)
            assert wd.cosine[i, j] == pytest.approx(_cos(tau[i], tau[j]), rel=1e-9, abs=1e-12)
            # eq. 7: unweighted mean over tensors of the per-tensor cosine
            per = [_cos(_flat64(exps[i], [n]) - _flat64(base, [n]), _flat64(exps[j], [n]) - _flat64(base, [n]))
                   for n in names]
            avg, count = wd.average_cosine()
            assert avg[i, j] == pytest.approx(np.mean(per), rel=1e-9, abs=1e-12) and count[i, j] == len(names)
    # per-block cosines and sign counts from an independent grouping
    blocks: dict[str, list[str]] = {}
    for n in names:
        m = re.search(r"layers\.(\d+)\.", n)
        blocks.setdefault(f"layers.{m.group(1)}" if m else n.removesuffix(".weight"), []).append(n)
    got = wd.layer_cosines("block")
    assert set(got) == set(blocks)
    pos = 0
    for key, members in blocks.items():
        c = _cos(_flat64(exps[0], members) - _flat64(base, members), _flat64(exps[1], members) - _flat64(base, members))
        assert got[key][0, 1] == pytest.approx(c, rel=1e-9, abs=1e-12)
        pos += c > wd.zero_tol
    assert wd.layer_sign_counts("block")["positive"][0, 1] == pos


def test_streaming_reads_bounded_row_chunks(tiny_pool, monkeypatch):
    from mergebench.engine.checkpoint import Checkpoint

    base_dir, expert_dirs = tiny_pool
    biggest = []
    orig = Checkpoint.read

    def spy(self, name, row_start=0, row_stop=None):
        out = orig(self, name, row_start, row_stop)
        biggest.append(out.numel())
        return out

    monkeypatch.setattr(Checkpoint, "read", spy)
    chunk = 4096
    wd = weight_diagnostics(base_dir, {f"e{i}": d for i, d in enumerate(expert_dirs)}, chunk_bytes=chunk)
    per_model = chunk // (8 * (2 * 3 + 3))  # float64 elements per model per chunk (documented budget)
    assert biggest and max(biggest) <= max(per_model, 64)  # never more than a chunk (or one 64-wide row)
    assert max(biggest) < 260 * 32  # in particular never the whole embedding
    assert wd.n_params > 10 * max(biggest)


def test_streaming_chunk_size_does_not_matter(tiny_pool):
    base_dir, expert_dirs = tiny_pool
    exps = {f"e{i}": d for i, d in enumerate(expert_dirs)}
    a = weight_diagnostics(base_dir, exps, chunk_bytes=1000)
    b = weight_diagnostics(base_dir, exps, chunk_bytes=1 << 24)
    np.testing.assert_allclose(a.gram, b.gram, rtol=1e-12)
    np.testing.assert_array_equal(a.sign_diff, b.sign_diff)
    np.testing.assert_allclose(a.conflict_l1, b.conflict_l1, rtol=1e-12)


# ------------------------------------------------------------------------------ activations


def _ref_activation(x):
    """Seed 000 Table 7 quantities from the covariance eigenvalues (numpy, independent path)."""
    x = np.asarray(x, dtype=np.float64)
    lam = np.clip(np.linalg.eigvalsh(np.cov(x, rowvar=False)), 0, None)
    p = lam / lam.sum()
    p = p[p > 0]
    return {
        "mean": x.mean(), "variance": x.var(axis=0, ddof=1).mean(),
        "effective_rank": math.exp(-(p * np.log(p)).sum()), "stable_rank": lam.sum() / lam.max(),
        "participation_ratio": lam.sum() ** 2 / (lam**2).sum(),
        "numerical_rank": np.linalg.matrix_rank(x - x.mean(0)),
    }


def test_rank_one_activations():
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(200, 1, generator=g, dtype=torch.float64), torch.randn(1, 24, generator=g, dtype=torch.float64)
    m = activation_metrics(u @ v)
    for k in ("effective_rank", "numerical_rank", "stable_rank", "participation_ratio"):
        assert m[k] == pytest.approx(1.0, abs=1e-9), k


def test_isotropic_gaussian_is_near_full_rank():
    d = 16
    x = torch.randn(4000, d, generator=torch.Generator().manual_seed(1))
    m = activation_metrics(x)
    assert m["effective_rank"] > 0.97 * d and m["participation_ratio"] > 0.9 * d
    assert m["numerical_rank"] == d and m["variance"] == pytest.approx(1.0, abs=0.05)


def test_activation_metrics_match_numpy_reference():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(300, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 12, generator=g, dtype=torch.float64)
    x = x + 3.0  # a nonzero mean that centring must remove
    got, ref = activation_metrics(x), _ref_activation(x.numpy())
    for k, v in ref.items():
        assert got[k] == pytest.approx(v, rel=1e-9), k


def test_bootstrap_is_seeded_and_zero_spread_on_identical_docs():
    g = torch.Generator().manual_seed(3)
    doc = torch.randn(7, 8, generator=g)
    h = doc.repeat(5, 1)  # five identical documents: every draw is the same matrix up to row order
    idx = torch.arange(5).repeat_interleave(7)
    out = activation_diagnostics({0: h}, idx, n_boot=6, seed=0)[0]
    for k, v in out.items():
        assert v["std"] == pytest.approx(0.0, abs=1e-9), k
        assert v["mean"] == pytest.approx(v["value"], rel=1e-9, abs=1e-12), k
    h2 = torch.randn(35, 8, generator=g)
    a = activation_diagnostics({0: h2}, idx, n_boot=6, seed=5)
    b = activation_diagnostics({0: h2}, idx, n_boot=6, seed=5)
    assert a == b and a[0]["effective_rank"]["std"] > 0


def test_collect_hidden_states_drops_padding(tiny_pool):
    from transformers import AutoModelForCausalLM

    base_dir, _ = tiny_pool
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    ids = torch.randint(0, 256, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    hs, doc = collect_hidden_states(model, ids, mask, layers=[-1, 0], batch_size=2)
    assert set(hs) == {0, 2} and hs[2].shape == (9 + 5 + 9, 32)
    assert doc.tolist() == [0] * 9 + [1] * 5 + [2] * 9
    with torch.no_grad():  # the padded document alone, unpadded, gives the same states (causal, right pad)
        alone = model(input_ids=ids[1:2, :5], output_hidden_states=True).hidden_states[-1][0]
    torch.testing.assert_close(hs[2][doc == 1], alone, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------ representations


def test_hidden_sim_and_mds_known_values():
    D = np.array([[0.0, 1.0, 2.0], [1.0, 0.0, 3.0], [2.0, 3.0, 0.0]])
    S = hidden_sim(D)  # eq. 2: (max - d) / (max - min) with min 1, max 3
    np.testing.assert_allclose(S, [[1, 1, 0.5], [1, 1, 0], [0.5, 0, 1]])
    np.testing.assert_allclose(merging_difficulty(S), [1 / 0.75, 2.0, 4.0])  # eq. 3
    assert np.isnan(hidden_sim(np.array([[0, 2.0], [2.0, 0]]))[0, 1])  # two models: eq. 2 is 0/0


def test_hidden_distance_matrix_matches_reference():
    g = torch.Generator().manual_seed(4)
    doc = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    states = {n: torch.randn(9, 6, generator=g) for n in "abc"}
    states["a2"] = states["a"].clone()
    names, D = hidden_distance_matrix(states, doc)
    ia, ia2, ib = names.index("a"), names.index("a2"), names.index("b")
    assert D[ia, ia2] == 0.0
    A, B = states["a"].double().numpy(), states["b"].double().numpy()
    tok = np.linalg.norm(A - B, axis=1) / math.sqrt(6)
    ref = np.mean([tok[doc.numpy() == k].mean() for k in range(3)])  # per document, then over documents
    assert D[ia, ib] == pytest.approx(ref, rel=1e-12)
    _, Dm = hidden_distance_matrix(states, doc, pooling="mean", normalize="none")
    pooled = [np.linalg.norm(A[doc.numpy() == k].mean(0) - B[doc.numpy() == k].mean(0)) for k in range(3)]
    assert Dm[ia, ib] == pytest.approx(np.mean(pooled), rel=1e-12)
    _, Dl = hidden_distance_matrix(states, doc, pooling="last", normalize="none")
    assert Dl[ia, ib] == pytest.approx(np.mean([np.linalg.norm(A[i] - B[i]) for i in (2, 4, 8)]), rel=1e-12)
    rows = representation_rows(names, D, tasks={"a": "task_a"})
    mds = [r for r in rows if r["metric"] == "mds" and r["model"] == "a"]
    assert mds[0]["task"] == "task_a"


# ------------------------------------------------------------------------------ statistics


def test_merging_loss_matches_seed004_table2():
    # Qwen2.5-3B, LA: MRPC 89.5 -> 75.5 printed (-15.6); WNLI 73.2 -> 38.0 printed (-48.1)
    np.testing.assert_allclose(np.round(merging_loss([75.5, 38.0], [89.5, 73.2]), 1), [-15.6, -48.1])


def test_anova_finds_planted_task_effect_only():
    rng = np.random.default_rng(0)
    tasks, methods = [f"t{i}" for i in range(6)], [f"m{j}" for j in range(5)]
    effect = {t: -40.0 * (i % 3) for i, t in enumerate(tasks)}  # task-level collapse
    rows = [(t, m, effect[t] + rng.normal(0, 3.0)) for t in tasks for m in methods for _ in range(2)]
    data = {"task": [r[0] for r in rows], "method": [r[1] for r in rows], "merging_loss": [r[2] for r in rows]}
    res = anova_by_factor(data)
    assert res["task"].p < 0.01 and res["method"].p > 0.05
    # F by hand: between-group over within-group mean squares
    y = np.array(data["merging_loss"])
    g = np.array(data["task"])
    groups = [y[g == t] for t in tasks]
    ssb = sum(len(x) * (x.mean() - y.mean()) ** 2 for x in groups)
    ssw = sum(((x - x.mean()) ** 2).sum() for x in groups)
    f = (ssb / (len(groups) - 1)) / (ssw / (len(y) - len(groups)))
    assert res["task"].f == pytest.approx(f, rel=1e-10)
    assert res["task"].p == pytest.approx(st.f.sf(f, len(groups) - 1, len(y) - len(groups)), rel=1e-8)
    assert (res["task"].df_between, res["task"].df_within) == (5, 54)


def test_pearson_against_formula_and_scipy():
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    y = np.array([2.1, 3.9, 6.2, 7.8, 10.1, 12.2])
    res = pearson(x, y)
    xc, yc = x - x.mean(), y - y.mean()
    r = (xc @ yc) / math.sqrt((xc @ xc) * (yc @ yc))
    t = r * math.sqrt((len(x) - 2) / (1 - r * r))
    assert res.r == pytest.approx(r, rel=1e-12)
    assert res.p == pytest.approx(2 * st.t.sf(abs(t), len(x) - 2), rel=1e-6)
    assert res.p == pytest.approx(st.pearsonr(x, y).pvalue, rel=1e-12)
    assert pearson([1, 2, 3, np.nan], [3, 2, 1, 5]).r == pytest.approx(-1.0) and pearson([1, 2, 3], [3, 2, 1]).n == 3


# ------------------------------------------------------------------------------ store


def test_diagnostics_store_roundtrip(tmp_path):
    names = ["a", "b", "c"]
    D = np.array([[0.0, 1.0, 2.0], [1.0, 0.0, 3.0], [2.0, 3.0, 0.0]])
    rows = representation_rows(names, D, tasks={"a": "ta", "b": "tb", "c": "tc"})
    unit = DiagUnit("representations", "toy", names, settings={"layer": -1, "pooling": "tokens"})
    w = write_diagnostics(unit, rows, run_id="r1", results_dir=tmp_path)
    assert w.written and has_diagnostics(unit, tmp_path)
    assert not write_diagnostics(unit, rows, run_id="r2", results_dir=tmp_path).written
    df = read_diagnostics(tmp_path)
    assert len(df) == len(rows) and set(df["run_id"]) == {"r1"}
    mds = df[df.metric == "mds"].set_index("model")
    assert mds.loc["c", "task"] == "tc" and mds.loc["c", "value"] == pytest.approx(4.0)
    assert not list(tmp_path.rglob(".*.tmp"))
    other = DiagUnit("representations", "toy", names, settings={"layer": 3})
    assert other.unit_id != unit.unit_id
    with pytest.raises(ValueError, match="kind"):
        write_diagnostics(DiagUnit("weights", "toy", names), rows, run_id="r1", results_dir=tmp_path)
    with pytest.raises(ValueError, match="repeat"):
        write_diagnostics(other, rows + rows[:1], run_id="r1", results_dir=tmp_path)


def test_weight_rows_store(tiny_pool, tmp_path):
    base_dir, expert_dirs = tiny_pool
    wd = weight_diagnostics(base_dir, {f"e{i}": d for i, d in enumerate(expert_dirs)})
    unit = DiagUnit("weights", "toy", list(wd.experts))
    write_diagnostics(unit, wd.rows(per_tensor=True), run_id="r1", results_dir=tmp_path)
    df = read_diagnostics(tmp_path, kind="weights")
    sc = df[(df.metric == "sign_change_ratio") & (df.model == "e0") & (df.model_b == "e1")]
    assert len(sc) == 1 and sc.value.iloc[0] == pytest.approx(wd.sign_change_ratio[0, 1])


def test_diagnose_end_to_end_on_tiny_pool(tmp_path):
    from mergebench.diagnostics import diagnose
    from mergebench.toy import make_tiny_pool

    base, exps = make_tiny_pool(tmp_path / "pool", 3)
    experts = {f"e{i}": str(p) for i, p in enumerate(exps)}
    probes = ["hello world", "the cat sat on the mat", "abc def ghi", "zzz top"]
    kw = dict(merged=str(exps[1]), probes=probes, tasks={"e0": "t0"}, n_boot=3, results_dir=tmp_path / "res",
              pool="toy", activation_layers=[0, -1], log=lambda m: None)
    out = diagnose(str(base), experts, **kw)
    assert [u.written for u in out["units"]] == [True, True, True]
    df = read_diagnostics(tmp_path / "res")
    assert set(df.kind) == {"weights", "representations", "activations"}
    # the merged model is a copy of expert e1: zero hidden distance to it, cosine 1 with it
    hd = df[(df.metric == "hidden_distance") & (df.model == "merged") & (df.model_b == "e1")]
    assert hd.value.iloc[0] == pytest.approx(0.0, abs=1e-12)
    assert out["weights"].cosine[1, 3] == pytest.approx(1.0)
    assert set(df[df.kind == "activations"].layer) == {"hidden.0", "hidden.2"}
    again = diagnose(str(base), experts, **kw)  # same content: nothing rewritten
    assert [u.written for u in again["units"]] == [False, False, False]


def test_diagnose_command_on_a_pool_stores_weight_diagnostics(tiny_suites, tmp_path):
    from typer.testing import CliRunner

    from mergebench.results import store
    from mergebench.cli import app

    results = tmp_path / "results"
    args = ["diagnose", "--pool", "tiny", "--kinds", "weights", "--method", "linear", "--results", str(results)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    n = store.sql("SELECT count(*) AS n FROM diagnostics", results)["n"].item()
    assert n > 0
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "0 diagnostic unit(s) written" in again.output
    assert store.sql("SELECT count(*) AS n FROM diagnostics", results)["n"].item() == n
