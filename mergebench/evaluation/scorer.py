"""A prefix-sharing log-likelihood scorer for lm-eval: each shared computation done once.

lm-eval's ``HFLM`` scores every (context, continuation) request on its own: the 2-4 choices of a
multiple-choice question each re-run the whole question, and the output layer (49,152 words for
SmolLM2) is applied at every position although only the continuation's positions are read.

:class:`PrefixSharingLM` keeps lm-eval's request building, tokenization, metrics and aggregation
(it *is* an ``HFLM``) and replaces only the forward computation of ``loglikelihood``:

* requests whose model input starts with the same context are packed into one row as a tree:
  the context once, then each continuation (all but its last token, as ``HFLM`` feeds them),
  each attending to the context and to itself only, with the positions it would have alone;
* the language-model head is applied only at the positions whose log-probabilities are read;
* rows are sorted by length and batched under a token budget, so padding stays small.

The numbers are those of ``HFLM`` (same inputs, same positions, same truncation of contexts
longer than the model's window) up to float rounding; ``tests/test_scorer.py`` checks every
request against stock ``HFLM``. Models whose output layer has extra steps this scorer does not
know (or seq2seq models) are scored by the stock path. ``loglikelihood_rolling`` and
``generate_until`` are ``HFLM``'s own.

Tokenizations are memoized in a cache shared by every scorer of the same tokenizer, so a run
that scores many models of one pool tokenizes each request once.
"""

from __future__ import annotations

import hashlib
import math
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

__all__ = ["PrefixSharingLM", "ScoringStats", "tokenizer_key"]

# Model types whose causal-LM output is exactly ``lm_head(decoder(x).last_hidden_state)``, optionally
# followed by a tanh soft-cap (``final_logit_softcapping``), which the scorer applies itself.
# (Granite's logits_scaling, Cohere's logit_scale and multimodal wrappers are not: they take the stock path.)
_KNOWN_HEADS = frozenset({
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo", "olmo2", "smollm3",
})


@dataclass
class ScoringStats:
    """What one scorer did: requests, documents' token counts and time, for provenance and benchmarks."""

    requests: int = 0
    rows: int = 0
    tokens_fed: int = 0  # tokens through the decoder (each shared context once), padding excluded
    tokens_padded: int = 0  # padding positions run alongside them
    head_positions: int = 0  # positions the output layer was applied at
    stock_tokens: int = 0  # tokens stock HFLM would have fed for the same requests
    seconds: float = 0.0
    fallbacks: int = 0  # requests scored by HFLM's own path

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class _Item:
    index: int  # position in the request list
    cont: list[int]  # the continuation's tokens (all scored)


@dataclass
class _Tree:
    prefix: tuple[int, ...]
    items: list[_Item] = field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self.prefix) + sum(len(it.cont) - 1 for it in self.items)


_TOKEN_CACHES: dict[str, dict] = {}


def tokenizer_key(tokenizer) -> str:
    """A content key of a tokenizer: its vocabulary, special tokens and class (not its path)."""
    vocab = tokenizer.get_vocab()
    blob = repr((type(tokenizer).__name__, sorted(vocab.items()), tokenizer.all_special_tokens,
                 getattr(tokenizer, "add_bos_token", None), getattr(tokenizer, "add_eos_token", None)))
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


class PrefixSharingLM(HFLM):
    """``HFLM`` whose ``loglikelihood`` runs each shared context once and applies the output layer
    only where a log-probability is read. Construct it as ``HFLM`` (``pretrained=`` an in-memory
    model or a path); ``token_budget`` caps the tokens (rows x longest row) of one forward batch
    and ``max_rows`` its rows. ``batch_size`` is lm-eval's and applies to the stock paths only:
    shared rows are short (one document), so many more of them fit in one efficient batch."""

    def __init__(self, *args, token_budget: int = 1024, max_rows: int = 256, quiet: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.token_budget, self.max_rows = int(token_budget), int(max_rows)
        self.quiet = quiet
        self.stats = ScoringStats()
        self._token_cache = _TOKEN_CACHES.setdefault(tokenizer_key(self.tokenizer), {})
        self._share, self._verified = True, False
        config = self._model.config
        self._window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None

    # -- lm-eval hooks ---------------------------------------------------------------------------
    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        if kwargs:
            return super().tok_encode(string, add_special_tokens, left_truncate_len, **kwargs)
        key = (string, add_special_tokens, left_truncate_len, self.add_bos_token)
        hit = self._token_cache.get(key)
        if hit is None:
            hit = self._token_cache[key] = tuple(super().tok_encode(string, add_special_tokens, left_truncate_len))
        return list(hit)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or self.quiet)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or self.quiet)

    def generate_until(self, requests, disable_tqdm: bool = False):
        return super().generate_until(requests, disable_tqdm=disable_tqdm or self.quiet)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        if not self._can_share():
            return self._stock(requests, disable_tqdm, override_bs)
        t0 = time.perf_counter()
        trees, long = self._trees(requests)
        if trees and not self._verified and not self._verify(trees[0]):
            return self._stock(requests, disable_tqdm, override_bs)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests) - len(long), desc="Running loglikelihood requests",
                   disable=disable_tqdm or self.quiet or self.rank != 0)
        for batch in self._batches(trees):
            for index, answer in self._score_batch(batch):
                results[index] = answer
            bar.update(sum(len(t.items) for t in batch))
        bar.close()
        if long:  # rows past a sliding attention window: HFLM's own path
            for index, answer in zip(long, self._stock([requests[i] for i in long], True, override_bs), strict=True):
                results[index] = answer
        for (request_str, _, _), answer in zip(requests, results, strict=True):
            if request_str is not None:
                self.cache_hook.add_partial("loglikelihood", request_str, answer)
        self.stats.requests += len(requests) - len(long)
        self.stats.seconds += time.perf_counter() - t0
        return results

    def _stock(self, requests, disable_tqdm: bool, override_bs):
        self.stats.fallbacks += len(requests)
        return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm or self.quiet, override_bs=override_bs)

    def _verify(self, tree: _Tree) -> bool:
        """Score one request both ways once per scorer: a model whose forward differs from
        ``lm_head(decoder(x))`` (an unknown output transform) is then scored by the stock path."""
        self._verified = True
        item = tree.items[0]
        kept = ScoringStats(**self.stats.as_dict())
        (_, (shared, _)), = self._score_batch([_Tree(tree.prefix, [item])])
        self.stats = kept
        inp = torch.tensor([list(tree.prefix) + item.cont[:-1]], device=self.device)
        logits = self._model(input_ids=inp, use_cache=False).logits[0, -len(item.cont):]
        lp = F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype or logits.dtype)
        stock = float(lp.gather(1, torch.tensor(item.cont, device=self.device)[:, None]).sum())
        tol = (1e-3 if self._model.dtype in (torch.float32, torch.float64) else 5e-2) * max(1.0, abs(stock))
        if abs(shared - stock) <= tol:
            return True
        warnings.warn(
            f"prefix-sharing scorer: {type(self._model).__name__} gives {shared:.6f} where its own forward gives "
            f"{stock:.6f}; scoring this model with lm-eval's stock HFLM path instead", stacklevel=2,
        )
        self._share = False
        return False

    # -- planning --------------------------------------------------------------------------------
    def _can_share(self) -> bool:
        config = self._model.config
        return (
            self._share
            and self.backend == "causal"
            and getattr(config, "model_type", None) in _KNOWN_HEADS
            and self._model.get_output_embeddings() is not None
        )

    def _trees(self, requests) -> tuple[list[_Tree], list[int]]:
        """Group requests by the prefix of their model input (HFLM's left truncation applied);
        also the requests whose positions reach past a sliding attention window (scored stock)."""
        trees: dict[tuple[int, ...], _Tree] = {}
        long = []
        window = self.max_length
        for i, (_, ctx, cont) in enumerate(requests):
            if not ctx or not cont or len(cont) > window:
                raise ValueError(f"request {i}: empty context/continuation or continuation longer than {window} tokens")
            full = list(ctx) + list(cont)
            if len(full) > window + 1:  # HFLM keeps the last window + 1 tokens and feeds all but the last
                full = full[-(window + 1):]
            if self._window and len(full) - 1 > self._window:
                long.append(i)
                continue
            self.stats.stock_tokens += len(full) - 1
            prefix = tuple(full[: len(full) - len(cont)])
            trees.setdefault(prefix, _Tree(prefix)).items.append(_Item(i, list(cont)))
        return list(trees.values()), long

    def _batches(self, trees: list[_Tree]) -> list[list[_Tree]]:
        """Longest first; a batch holds at most ``max_rows`` rows and ``token_budget`` padded tokens."""
        ordered = sorted(trees, key=lambda t: (-t.length, t.prefix))
        max_rows = self.max_rows
        batches, current = [], []
        for tree in ordered:
            longest = current[0].length if current else tree.length
            if current and (len(current) >= max_rows or longest * (len(current) + 1) > self.token_budget):
                batches.append(current)
                current = []
            current.append(tree)
        if current:
            batches.append(current)
        return batches

    # -- computing -------------------------------------------------------------------------------
    def _score_batch(self, batch: list[_Tree]):
        """One forward pass over a batch of trees; yields (request index, (log-prob, is_greedy))."""
        width = batch[0].length
        n = len(batch)
        ids = torch.full((n, width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        pos = torch.zeros((n, width), dtype=torch.long)
        allowed = torch.zeros((n, width, width), dtype=torch.bool)
        reads = []  # (row, positions whose outputs predict cont, cont tokens, request index)
        for r, tree in enumerate(batch):
            p = len(tree.prefix)
            ids[r, :p] = torch.tensor(tree.prefix)
            pos[r, :p] = torch.arange(p)
            allowed[r, :p, :p] = torch.ones(p, p, dtype=torch.bool).tril_()
            at = p
            for it in tree.items:
                k = len(it.cont) - 1  # fed tokens of this continuation
                if k:
                    ids[r, at: at + k] = torch.tensor(it.cont[:-1])
                    pos[r, at: at + k] = torch.arange(p, p + k)
                    allowed[r, at: at + k, :p] = True
                    allowed[r, at: at + k, at: at + k] = torch.ones(k, k, dtype=torch.bool).tril_()
                reads.append((r, [p - 1, *range(at, at + k)], it.cont, it.index))
                at += k
            for j in range(at, width):  # padding attends to itself only (no empty softmax rows)
                allowed[r, j, j] = True
            self.stats.tokens_fed += at
            self.stats.tokens_padded += width - at
        self.stats.rows += n
        dtype = self._model.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]
        device = self.device
        hidden = self._decoder()(
            input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device), use_cache=False,
        ).last_hidden_state
        rows = torch.tensor([r for r, at, _, _ in reads for _ in at], device=device)
        cols = torch.tensor([c for _, at, _, _ in reads for c in at], device=device)
        logits = self._head(hidden[rows, cols])
        self.stats.head_positions += int(rows.numel())
        logprobs = F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype or logits.dtype)
        targets = torch.tensor([t for _, _, cont, _ in reads for t in cont], device=device)
        picked = logprobs.gather(1, targets[:, None])[:, 0]
        greedy = logprobs.argmax(dim=-1) == targets
        start = 0
        for _, at, cont, index in reads:
            stop = start + len(cont)
            yield index, (float(picked[start:stop].sum()), bool(greedy[start:stop].all()))
            start = stop

    def _decoder(self):
        return self._model.get_decoder()

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self._model.get_output_embeddings()(hidden)
        cap = getattr(self._model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits


def floor_seconds(unique_tokens: int, n_params: int, gflops: float) -> float:
    """The compute floor of scoring ``unique_tokens`` with a model of ``n_params`` parameters on a
    machine doing ``gflops`` fp32 GFLOP/s: 2 FLOPs per parameter per token."""
    return unique_tokens * 2 * n_params / (gflops * 1e9) if gflops > 0 else math.inf


def measure_matmul_gflops(n: int = 1024, repeats: int = 5, dtype=torch.float32, device: str = "cpu") -> float:
    """This machine's sustained matmul throughput (best of ``repeats`` n x n x n products)."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    best = math.inf
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9
