"""A prefix-sharing log-likelihood scorer for lm-eval: each shared computation done once.

lm-eval's ``HFLM`` scores every (context, continuation) request on its own: the 2-4 choices of a
multiple-choice question each re-run the whole question, and the output layer (49,152 words for
SmolLM2) is applied at every position although only the continuation's positions are read.

:class:`PrefixSharingLM` keeps lm-eval's request building, tokenization, metrics and aggregation
(it *is* an ``HFLM``) and replaces only the forward computation of ``loglikelihood``:

* the model inputs of all requests of a call (every task of a battery at once) form one trie:
  each distinct prefix is computed once. A document's context and the tokens its choices share
  are fed once (each continuation as ``HFLM`` feeds it: all but its last token), and so is what
  several documents share (a task's instruction or few-shot examples): those nodes run in a first
  pass, and the rest of each document, one row per subtree, reads them from the key/value cache.
  Every token attends to its ancestors only, at the position it would have alone;
* the language-model head and the log-softmax are applied once per position whose
  log-probabilities are read (one-token choices all read the context's last position);
* short subtrees are packed side by side into rows as long as the longest one, and rows are
  batched under a token budget, so there is almost no padding.

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
import inspect
import math
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm
from transformers import DynamicCache

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
    rows: int = 0  # subtrees fed (a document, or the part several share); short ones share a batch row
    tokens_fed: int = 0  # tokens through the decoder (each distinct prefix once), padding excluded
    shared_tokens: int = 0  # of which shared by several documents: computed first, read from the cache
    tokens_padded: int = 0  # padding positions run alongside them
    head_positions: int = 0  # positions the output layer was applied at
    stock_tokens: int = 0  # tokens stock HFLM would have fed for the same requests
    seconds: float = 0.0
    fallbacks: int = 0  # requests scored by HFLM's own path

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class _Forest:
    """The model inputs of one ``loglikelihood`` call as a trie: every distinct (prefix, token) is
    one node, computed once. ``docs`` counts the distinct contexts whose input runs through a node:
    nodes with ``docs >= 2`` (a task's instruction or few-shot examples, shared by its documents)
    are computed in a first pass and read by the others from the key/value cache."""

    token: list[int] = field(default_factory=list)
    parent: list[int] = field(default_factory=list)  # -1 for a first token
    pos: list[int] = field(default_factory=list)  # the position the token has in its request's input
    docs: list[int] = field(default_factory=list)
    index: dict[tuple[int, int], int] = field(default_factory=dict)

    def path(self, tokens: list[int], scope: int = -1) -> list[int]:
        """The node of every token of ``tokens`` (a model input), adding the missing ones. Inputs
        of different ``scope`` (negative numbers) share no node."""
        node, out = scope, []
        for tok in tokens:
            key = (node, tok)
            nxt = self.index.get(key)
            if nxt is None:
                nxt = self.index[key] = len(self.token)
                self.token.append(tok)
                self.parent.append(max(node, -1))
                self.pos.append(len(out))
                self.docs.append(0)
            node = nxt
            out.append(node)
        return out


@dataclass
class _Read:
    index: int  # position in the request list
    nodes: list[int]  # the nodes whose outputs predict the continuation's tokens
    cont: list[int]  # the continuation's tokens (all scored)


@dataclass
class _Row:
    """Subtrees of the forest fed side by side as one row: each token attends to its ancestors in
    its subtree and, through the cache, to the shared nodes on the path to its subtree's attach node."""

    nodes: list[int]  # forest nodes, every parent before its children
    up: list[int]  # index in ``nodes`` of each node's parent, -1 for a subtree's root
    segments: list[tuple[int, int, int]]  # (start, stop, attach): a subtree and the shared node it hangs from (-1: none)


_TOKEN_CACHES: dict[str, dict] = {}


def tokenizer_key(tokenizer) -> str:
    """A content key of a tokenizer: its vocabulary, special tokens and class (not its path)."""
    vocab = tokenizer.get_vocab()
    blob = repr((type(tokenizer).__name__, sorted(vocab.items()), tokenizer.all_special_tokens,
                 getattr(tokenizer, "add_bos_token", None), getattr(tokenizer, "add_eos_token", None)))
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


class PrefixSharingLM(HFLM):
    """``HFLM`` whose ``loglikelihood`` computes each distinct prefix of its requests once (within
    a document and across documents) and applies the output layer only where a log-probability is
    read. Construct it as ``HFLM`` (``pretrained=`` an in-memory model or a path); ``token_budget``
    caps the tokens (rows x longest row) of one forward batch and ``max_rows`` its rows.
    ``batch_size`` is lm-eval's and applies to the stock paths only: documents' subtrees are short,
    so they are packed side by side into rows as long as the longest one (almost no padding) and
    many rows share one batch."""

    def __init__(self, *args, token_budget: int = 1024, max_rows: int = 256, quiet: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.token_budget, self.max_rows = int(token_budget), int(max_rows)
        self.quiet = quiet
        self.stats = ScoringStats()
        self._token_cache = _TOKEN_CACHES.setdefault(tokenizer_key(self.tokenizer), {})
        self._share, self._verified = True, False
        config = self._model.config
        self._window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
        # the decoder's cache argument (``cache`` in transformers 5, ``past_key_values`` before): shared
        # nodes are read through it; a decoder without one gets no cross-document sharing
        params = inspect.signature(self._decoder().forward).parameters
        self._cache_arg = next((a for a in ("cache", "past_key_values") if a in params), None)

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
        kept = ScoringStats(**self.stats.as_dict())
        forest, reads, long = self._plan(requests)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(reads), desc="Running loglikelihood requests",
                   disable=disable_tqdm or self.quiet or self.rank != 0)
        with torch.inference_mode():  # as HFLM's forward passes (no autograd graph), whatever the caller set
            for index, answer in self._score(forest, reads, bar):
                results[index] = answer
            bar.close()
            verified = self._verified or not reads or self._verify(forest, reads, results)
        if not verified:
            self.stats = kept
            return self._stock(requests, disable_tqdm, override_bs)
        if long:  # rows past a sliding attention window: HFLM's own path
            for index, answer in zip(long, self._stock([requests[i] for i in long], True, override_bs), strict=True):
                results[index] = answer
        for (request_str, _, _), answer in zip(requests, results, strict=True):
            if request_str is not None:
                self.cache_hook.add_partial("loglikelihood", request_str, answer)
        self.stats.requests += len(reads)
        self.stats.seconds += time.perf_counter() - t0
        return results

    def _stock(self, requests, disable_tqdm: bool, override_bs):
        self.stats.fallbacks += len(requests)
        return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm or self.quiet, override_bs=override_bs)

    def _verify(self, forest: _Forest, reads: list[_Read], results) -> bool:
        """Compare one request, once per scorer, with the model's own forward: a model whose output
        differs from ``lm_head(decoder(x))`` (an unknown output transform), or whose layers do not
        read the cache as assumed, is then scored by the stock path. The request checked is one
        that read shared nodes from the cache, where there is one."""
        self._verified = True
        uses_cache = (r for r in reads if self._cache_arg and forest.docs[self._ancestry(forest, r.nodes[0])[0]] >= 2)
        read = next(uses_cache, reads[0])
        inp = torch.tensor([[forest.token[n] for n in self._ancestry(forest, read.nodes[-1])]], device=self.device)
        logits = self._model(input_ids=inp, use_cache=False).logits[0, -len(read.cont):]
        lp = F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype or logits.dtype)
        stock = float(lp.gather(1, torch.tensor(read.cont, device=self.device)[:, None]).sum())
        shared = results[read.index][0]
        tol = (1e-3 if self._model.dtype in (torch.float32, torch.float64) else 5e-2) * max(1.0, abs(stock))
        if abs(shared - stock) <= tol:
            return True
        warnings.warn(
            f"prefix-sharing scorer: {type(self._model).__name__} gives {shared:.6f} where its own forward gives "
            f"{stock:.6f}; scoring this model with lm-eval's stock HFLM path instead", stacklevel=3,
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

    def _plan(self, requests) -> tuple[_Forest, list[_Read], list[int]]:
        """The forest of the requests' model inputs (HFLM's left truncation applied) and what each
        request reads from it; also the requests whose positions reach past a sliding attention
        window (scored stock)."""
        forest, reads, long, ends = _Forest(), [], [], set()
        scopes: dict[tuple[int, ...], int] = {}  # without a cache, one trie per context
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
            p = len(full) - len(cont)  # the context's length: its last node predicts cont[0]
            scope = -1 if self._cache_arg else scopes.setdefault(tuple(full[:p]), -2 - len(scopes))
            path = forest.path(full[:-1], scope)
            if path[p - 1] not in ends:  # a new context: count it on the nodes it runs through
                ends.add(path[p - 1])
                for node in path[:p]:
                    forest.docs[node] += 1
            reads.append(_Read(i, path[p - 1:], list(cont)))
        return forest, reads, long

    def _rows(self, forest: _Forest) -> tuple[list[_Row], list[_Row]]:
        """(rows of the shared nodes, rows of the rest): each a subtree of the forest, the second
        kind hanging from a shared node (or from nothing). Without a usable cache nothing is shared."""
        shared = [d >= 2 and self._cache_arg is not None for d in forest.docs]
        children: list[list[int]] = [[] for _ in forest.token]
        roots_a, roots_b = [], []
        for node, up in enumerate(forest.parent):
            if up >= 0:
                children[up].append(node)
            if shared[node] and up < 0:
                roots_a.append(node)
            elif not shared[node] and (up < 0 or shared[up]):
                roots_b.append(node)

        def subtree(root: int, inside) -> _Row:
            nodes, up, stack = [], [], [(root, -1)]
            while stack:
                node, parent_at = stack.pop()
                up.append(parent_at)
                nodes.append(node)
                at = len(nodes) - 1
                stack.extend((c, at) for c in reversed(children[node]) if inside[c])
            return _Row(nodes, up, [(0, len(nodes), forest.parent[root])])

        private = [not s for s in shared]
        return [subtree(r, shared) for r in roots_a], [subtree(r, private) for r in roots_b]

    @staticmethod
    def _pack(rows: list[_Row]) -> list[_Row]:
        """Subtrees packed side by side (first fit, longest first) into rows as long as the longest
        one, so that short documents need no padding."""
        ordered = sorted(rows, key=lambda r: (-len(r.nodes), r.segments[0][2], r.nodes[0]))
        bins: list[list[_Row]] = []
        free: list[int] = []
        for row in ordered:
            m = len(row.nodes)
            fit = next((b for b, f in enumerate(free) if f >= m), None)
            if fit is None:
                bins.append([row])
                free.append(len(ordered[0].nodes) - m)
            else:
                bins[fit].append(row)
                free[fit] -= m
        packed = []
        for group in bins:
            nodes, up, segments = [], [], []
            for row in group:
                at = len(nodes)
                nodes += row.nodes
                up += [u + at if u >= 0 else -1 for u in row.up]
                segments += [(a + at, b + at, attach) for a, b, attach in row.segments]
            packed.append(_Row(nodes, up, segments))
        return packed

    def _batches(self, rows: list[_Row]) -> list[list[_Row]]:
        """Subtrees packed into rows, longest first; a batch holds at most ``max_rows`` rows and
        ``token_budget`` padded tokens."""
        ordered = sorted(self._pack(rows), key=lambda r: -len(r.nodes))
        batches, current = [], []
        for row in ordered:
            longest = len(current[0].nodes) if current else len(row.nodes)
            if current and (len(current) >= self.max_rows or longest * (len(current) + 1) > self.token_budget):
                batches.append(current)
                current = []
            current.append(row)
        if current:
            batches.append(current)
        return batches

    @staticmethod
    def _ancestry(forest: _Forest, node: int) -> list[int]:
        """``node`` and its ancestors, first token first."""
        out = []
        while node >= 0:
            out.append(node)
            node = forest.parent[node]
        return out[::-1]

    # -- computing -------------------------------------------------------------------------------
    def _score(self, forest: _Forest, reads: list[_Read], bar):
        """Run the shared nodes, then the rest reading them from the cache; apply the output layer
        once per read node; yield (request index, (log-prob, is_greedy))."""
        rows_a, rows_b = self._rows(forest)
        slot = {}  # read node -> row of ``hidden_at``
        for read in reads:
            for node in read.nodes:
                slot.setdefault(node, len(slot))
        config = self._model.config
        hidden_at = torch.empty((len(slot), config.hidden_size), dtype=self._model.dtype, device=self.device)
        kv_at = {node: i for i, node in enumerate(n for row in rows_a for n in row.nodes)}  # shared node -> cache row
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        for batch in self._batches(rows_a):
            hidden, cache = self._forward(forest, batch, None, keys, values, keep=True)
            self.stats.shared_tokens += sum(len(row.nodes) for row in batch)
            self._keep(batch, hidden, slot, hidden_at)
            r, c = self._where(batch)
            at = torch.tensor([kv_at[n] for row in batch for n in row.nodes], device=self.device)
            for layer, (k, v) in enumerate(self._cache_tensors(cache)):
                if layer == len(keys):
                    keys.append(k.new_empty((len(kv_at), k.shape[1], k.shape[-1])))
                    values.append(v.new_empty((len(kv_at), v.shape[1], v.shape[-1])))
                keys[layer][at] = k[r, :, c]
                values[layer][at] = v[r, :, c]
        for batch in self._batches(rows_b):
            hidden, _ = self._forward(forest, batch, kv_at, keys, values)
            self._keep(batch, hidden, slot, hidden_at)
        yield from self._read(reads, slot, hidden_at, bar)

    def _where(self, batch: list[_Row]) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, column) of every node of a batch, in order."""
        r = torch.tensor([i for i, row in enumerate(batch) for _ in row.nodes], device=self.device)
        c = torch.tensor([j for row in batch for j in range(len(row.nodes))], device=self.device)
        return r, c

    def _keep(self, batch: list[_Row], hidden: torch.Tensor, slot: dict, hidden_at: torch.Tensor) -> None:
        """Copy the final hidden states of a batch's read nodes into ``hidden_at``."""
        hits = [(r, j, slot[n]) for r, row in enumerate(batch) for j, n in enumerate(row.nodes) if n in slot]
        if hits:
            r, j, s = (torch.tensor(x, device=self.device) for x in zip(*hits))
            hidden_at[s] = hidden[r, j]

    def _forward(self, forest: _Forest, batch: list[_Row], kv_at: dict | None, keys, values, keep: bool = False):
        """One decoder pass over a batch of rows; rows that hang from shared nodes see them through
        a cache of their keys and values. Returns (last hidden states, the cache: kept with ``keep``)."""
        width, n = len(batch[0].nodes), len(batch)
        past: list[int] = []  # shared nodes this batch reads, as cache rows
        attach_cols: dict[int, list[int]] = {}
        if kv_at is not None:
            for row in batch:
                for _, _, attach in row.segments:
                    if attach >= 0 and attach not in attach_cols:
                        attach_cols[attach] = [kv_at[a] for a in self._ancestry(forest, attach)]
            past = sorted({c for cols in attach_cols.values() for c in cols})
            col = {c: i for i, c in enumerate(past)}
            attach_cols = {a: [col[c] for c in cols] for a, cols in attach_cols.items()}
        u = len(past)
        ids = np.full((n, width), self.tokenizer.pad_token_id or 0, dtype=np.int64)
        pos = np.zeros((n, width), dtype=np.int64)
        allowed = np.zeros((n, width, u + width), dtype=bool)
        for r, row in enumerate(batch):
            m = len(row.nodes)
            ids[r, :m] = [forest.token[x] for x in row.nodes]
            pos[r, :m] = [forest.pos[x] for x in row.nodes]
            own = allowed[r, :, u:]
            for i, up in enumerate(row.up):  # a token sees its row ancestors (parents come first)
                if up >= 0:
                    own[i] = own[up]
                own[i, i] = True
            for j in range(m, width):  # padding attends to itself only (no empty softmax rows)
                own[j, j] = True
            for start, stop, attach in row.segments:
                if attach >= 0:
                    allowed[r, start:stop, attach_cols[attach]] = True
            self.stats.rows += len(row.segments)
            self.stats.tokens_fed += m
            self.stats.tokens_padded += width - m
        dtype, device = self._model.dtype, self.device
        blocked = torch.from_numpy(~allowed)[:, None]
        mask = torch.zeros(blocked.shape, dtype=dtype).masked_fill_(blocked, torch.finfo(dtype).min)
        if keep or u:
            cache = DynamicCache()
            if u:
                at = torch.tensor(past, device=device)
                for layer, (k, v) in enumerate(zip(keys, values, strict=True)):
                    cache.update(k[at].transpose(0, 1).unsqueeze(0).expand(n, -1, -1, -1),
                                 v[at].transpose(0, 1).unsqueeze(0).expand(n, -1, -1, -1), layer)
            kwargs = {self._cache_arg: cache, "use_cache": True}
        else:
            cache, kwargs = None, {"use_cache": False}
        out = self._decoder()(input_ids=torch.from_numpy(ids).to(device), attention_mask=mask.to(device),
                              position_ids=torch.from_numpy(pos).to(device), **kwargs)
        return out.last_hidden_state, cache

    @staticmethod
    def _cache_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's (keys, values), shaped (rows, kv heads, tokens, head dim)."""
        return [(layer.keys, layer.values) for layer in cache.layers]

    def _read(self, reads: list[_Read], slot: dict, hidden_at: torch.Tensor, bar, chunk: int = 128):
        """The output layer and log-softmax once per read node (in chunks of ``chunk`` positions,
        so the logits stay small); every request's log-prob and greedy check from them."""
        device = self.device
        slots = torch.tensor([slot[n] for read in reads for n in read.nodes], device=device)
        targets = torch.tensor([t for read in reads for t in read.cont], device=device)
        picked = torch.empty(slots.shape, dtype=self.softmax_dtype or self._model.dtype, device=device)
        greedy_tok = torch.empty(len(slot), dtype=torch.long, device=device)
        order = torch.argsort(slots, stable=True)
        bounds = torch.searchsorted(slots[order], torch.arange(0, len(slot) + chunk, chunk, device=device)).tolist()
        for a, lo, hi in zip(range(0, len(slot), chunk), bounds, bounds[1:]):
            logits = self._head(hidden_at[a: a + chunk])
            logprobs = F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype or logits.dtype)
            greedy_tok[a: a + chunk] = logprobs.argmax(dim=-1)
            sel = order[lo:hi]
            picked[sel] = logprobs[slots[sel] - a, targets[sel]]
        self.stats.head_positions += len(slot)
        greedy = greedy_tok[slots] == targets
        start = 0
        for read in reads:
            stop = start + len(read.cont)
            yield read.index, (float(picked[start:stop].sum()), bool(greedy[start:stop].all()))
            start = stop
            bar.update(1)

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
