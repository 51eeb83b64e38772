"""The calibration engine (mergebench.engine.calibration) against float64 references on tiny Llamas.

Gram matrices are checked against inputs rebuilt from the model's own hidden states (one
unpadded document at a time, so padding and batching must not matter); the Fisher against
central finite differences of each document's log-likelihood.
"""

from __future__ import annotations

import pytest
import torch

from mergebench.engine.calibration import (
    CalibrationData,
    CalibrationDoc,
    CalibrationError,
    calibrate,
    calibration_cost,
    fisher_statistics,
    gram_statistics,
    tokenize,
)
from mergebench.methods.calibration import CalibrationBudget, CalibrationNeed
from mergebench.methods.spec import ParameterError
from mergebench.toy import byte_tokenizer, tiny_llama_state

DOCS = [CalibrationDoc("Question: capital of France?\nAnswer:", " Paris"), CalibrationDoc("2+2=", " 4"),
        CalibrationDoc("The quick brown fox jumps over the lazy dog.")]


def _model(seed=0, **cfg):
    from transformers import LlamaForCausalLM

    state, config = tiny_llama_state(seed, cfg or None)
    model = LlamaForCausalLM(config).double().eval()
    model.load_state_dict({k: v.double() for k, v in state.items()}, strict=False)
    return model


def _ids(tok, docs, max_tokens=64):
    return [torch.tensor([tok(d.text(True))["input_ids"][:max_tokens]]) for d in docs]


def test_tokenize_pads_right_and_truncates():
    tok = byte_tokenizer()
    batches = tokenize(tok, DOCS, labels=True, max_tokens=10, batch_size=2)
    assert [b["input_ids"].shape[0] for b in batches] == [2, 1]
    lengths = [int(m.sum()) for b in batches for m in b["attention_mask"]]
    assert lengths == [min(10, len(tok(d.text(True))["input_ids"])) for d in DOCS]
    for b in batches:  # right padding: every mask row is 1...1 0...0
        m = b["attention_mask"]
        assert torch.equal(m, m.cummin(dim=1).values)
    prompts = tokenize(tok, DOCS[:1], labels=False, max_tokens=100)[0]
    assert int(prompts["attention_mask"].sum()) == len(tok(DOCS[0].prompt)["input_ids"])
    with pytest.raises(CalibrationError, match="empty"):
        tokenize(tok, [CalibrationDoc("  ")], labels=True, max_tokens=8)


def test_gram_matches_hidden_state_reference():
    model, tok = _model(), byte_tokenizer()
    got = gram_statistics(model, tokenize(tok, DOCS, labels=True, max_tokens=64, batch_size=2))
    xs = {"q": [], "head": []}
    with torch.no_grad():
        for ids in _ids(tok, DOCS):
            out = model.model(input_ids=ids, output_hidden_states=True)
            xs["q"].append(model.model.layers[1].input_layernorm(out.hidden_states[1])[0])
            xs["head"].append(out.last_hidden_state[0])
    for key, name in (("q", "model.layers.1.self_attn.q_proj.weight"), ("head", "lm_head.weight")):
        x = torch.cat(xs[key])
        ref = x.T @ x / x.shape[0]
        assert got[name].dtype == torch.float64
        torch.testing.assert_close(got[name], ref, rtol=1e-10, atol=1e-12)
    # q, k and v read the same input: one matrix, shared
    assert got["model.layers.1.self_attn.k_proj.weight"] is got["model.layers.1.self_attn.q_proj.weight"]
    assert got["model.layers.0.mlp.up_proj.weight"] is got["model.layers.0.mlp.gate_proj.weight"]
    assert got["model.layers.0.mlp.down_proj.weight"].shape == (64, 64)
    assert not any("norm" in n or "embed" in n for n in got)


def test_fisher_matches_per_document_gradient_reference():
    """Reference: torch.autograd.grad of each document's summed cross-entropy (F.cross_entropy on
    the float64 logits), squared and averaged. (Finite differences cannot be the reference:
    Llama's RMSNorm computes in float32, and so does transformers' own LM loss.)"""
    model, tok = _model(), byte_tokenizer()
    fisher = fisher_statistics(model, tokenize(tok, DOCS, labels=True, max_tokens=32, batch_size=2))
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    ref = [torch.zeros_like(p) for p in params]
    ids_list = _ids(tok, DOCS, 32)
    for ids in ids_list:
        logits = model(input_ids=ids).logits[0, :-1]
        loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
        for r, g in zip(ref, torch.autograd.grad(-loss, params)):
            r.add_(g * g)
    for name, r in zip(names, ref):
        torch.testing.assert_close(fisher[name], r / len(ids_list), rtol=1e-9, atol=1e-15)
    assert all(p.grad is None for p in model.parameters())
    assert float(fisher["model.layers.0.mlp.down_proj.weight"].sum()) > 0


def test_fisher_names_tied_parameters_twice():
    model, tok = _model(tie_word_embeddings=True), byte_tokenizer()
    fisher = fisher_statistics(model, tokenize(tok, DOCS[:1], labels=True, max_tokens=16))
    assert fisher["lm_head.weight"] is fisher["model.embed_tokens.weight"]


def test_calibrate_refuses_bad_data_before_loading_a_model(tmp_path):
    need = CalibrationNeed(statistics=("gram",))
    missing = tmp_path / "nowhere"
    with pytest.raises(CalibrationError, match="needs calibration data"):
        calibrate(need, {}, base=None, experts=[missing], data=None)
    data = CalibrationData.from_texts([["a b c"]])
    with pytest.raises(CalibrationError, match="1 group"):
        calibrate(need, {}, base=None, experts=[missing, missing], data=data)
    with pytest.raises(CalibrationError, match="no document"):
        calibrate(need, {}, base=None, experts=[missing], data=CalibrationData.from_texts([[]]))
    step = CalibrationNeed(model_step=lambda problem, params, log: {})
    with pytest.raises(CalibrationError, match="needs a base"):
        calibrate(step, {}, base=None, experts=[missing], data=data)


def test_need_declaration_is_validated():
    with pytest.raises(ParameterError, match="unknown statistic"):
        CalibrationNeed(statistics=("hessian",))
    with pytest.raises(ParameterError, match="at least one"):
        CalibrationNeed()
    with pytest.raises(ParameterError, match="documents must be a positive integer"):
        CalibrationBudget(documents=0)
    with pytest.raises(ParameterError, match="collides"):
        CalibrationNeed(model_step=lambda *a: {}, output="fisher")
    need = CalibrationNeed(statistics=("fisher",), budget=CalibrationBudget(documents=8),
                           budget_params={"documents": "n"})
    assert need.resolve_budget({"n": 3}).documents == 3 and need.resolve_budget({}).documents == 8
    assert need.needs_backward and need.aux_keys == ("fisher",)
    cost = calibration_cost(need, {"n": 3}, n_experts=2)
    assert cost == {"documents": 6, "max_tokens": 256, "forward_docs": 6, "backward_docs": 6,
                    "passes": {"gram": 0, "fisher": 6, "model_step": 0}, "models_loaded": 2}
    step = CalibrationNeed(statistics=("gram",), model_step=lambda *a: {}, budget=CalibrationBudget(documents=8))
    cost = calibration_cost(step, {"epochs": 5, "samples_per_epoch": 3}, n_experts=2, documents=[8, 2])
    assert cost["passes"] == {"gram": 10, "fisher": 0, "model_step": 5 * (3 + 2)}
    assert (cost["forward_docs"], cost["backward_docs"]) == (10 + 25, 25)


def test_calibrate_on_tiny_pool_one_expert_at_a_time(tmp_path):
    from mergebench.toy import make_tiny_pool

    base, experts = make_tiny_pool(tmp_path, n_experts=2)
    data = CalibrationData.from_texts([[("Q: one?", " A"), ("Q: two?", " B")], [("Q: three?", " C")]])
    cal = calibrate(CalibrationNeed(statistics=("gram", "fisher")), {}, base=base, experts=experts, data=data)
    entry = cal.aux["model.layers.0.self_attn.o_proj.weight"]
    assert [g.shape for g in entry["gram"]] == [(32, 32), (32, 32)]
    assert [f.shape for f in entry["fisher"]] == [(32, 32), (32, 32)]
    assert "gram" not in cal.aux["model.norm.weight"] and "fisher" in cal.aux["model.norm.weight"]
    assert cal.record["documents"] == [2, 1] and cal.record["data_hash"] == data.content_hash()
    assert cal.record["tokens"][0] > cal.record["tokens"][1] > 0
    # the two experts differ, so do their statistics
    assert not torch.equal(entry["fisher"][0], entry["fisher"][1])


def test_calibration_texts_from_a_jsonl_file(tmp_path):
    path = tmp_path / "texts.jsonl"
    path.write_text('{"prompt": "Q: a?", "answer": " A", "expert": 0}\n\n{"text": "shared text"}\n'
                    '{"prompt": "Q: b?", "expert": 1}\n')
    data = CalibrationData.from_jsonl(path, n_experts=2)
    assert data.groups == ((CalibrationDoc("Q: a?", " A"), CalibrationDoc("shared text")),
                           (CalibrationDoc("shared text"), CalibrationDoc("Q: b?")))
    assert data.source == {"kind": "file", "path": str(path)}
    for bad in ('{"prompt": "x", "expert": 5}', '{"prompt": "x", "expert": -1}', '{"answer": "y"}', "not json"):
        path.write_text(bad + "\n")
        with pytest.raises(CalibrationError, match="line 1"):
            CalibrationData.from_jsonl(path, n_experts=2)
    with pytest.raises(CalibrationError, match="missing.jsonl"):
        CalibrationData.from_jsonl(tmp_path / "missing.jsonl", n_experts=1)


@pytest.mark.parametrize("tied", [False, True])
def test_model_problem_forward_at_positions_matches_full_logits(tmp_path, tied):
    from mergebench.engine.calibration import model_problem
    from mergebench.toy import write_checkpoint

    state, cfg = tiny_llama_state(0, {"tie_word_embeddings": tied})
    if tied:
        state.pop("lm_head.weight", None)
    base = write_checkpoint(tmp_path / "base", state, cfg)
    batch = tokenize(byte_tokenizer(), DOCS, labels=True, max_tokens=40, batch_size=3)[0]
    problem = model_problem(base, [base], [batch], torch.device("cpu"), torch.float64, 0)
    params = {n: t + 0.01 for n, t in problem.base.items()}  # not the model's own weights
    ids, mask = batch["input_ids"], batch["attention_mask"]
    last = mask.sum(1) - 1
    full = problem.forward(params, ids, mask)
    picked = problem.forward(params, ids, mask, positions=last)
    torch.testing.assert_close(picked, full[torch.arange(3), last], rtol=1e-10, atol=1e-10)
