"""How long units take: rates measured on the machine at hand, refined as a run goes.

A unit costs a merge (merged units) plus scoring its documents. Both rates are read from the
provenance of units already stored for the same pool: first those measured on this CPU model
with the same thread count and scorer, then any of the same device kind and scorer; only without
any such unit are they assumed (the figures of the embedded 135M pool on 2 AMD EPYC cores).
During a run, :class:`Pace` replaces them with what the run's own units measured, so the ETA of
``mergebench eval`` (and of ``sweep``) converges on this machine's real speed after one unit.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from mergebench.results import store

__all__ = ["ASSUMED_CALIBRATION_SECONDS", "ASSUMED_SECONDS_PER_DOC", "ASSUMED_SECONDS_PER_MERGE", "ASSUMED_SECONDS_PER_UNIT", "Pace", "Rates",
           "calibration_seconds", "format_duration", "measured_rates"]

# Measured: `mergebench eval --method karcher --suite inthewild` on 2 idle AMD EPYC cores, 2 threads,
# prefix-sharing scorer (SmolLM2-135M, 540 documents per unit).
ASSUMED_SECONDS_PER_DOC = 0.065
ASSUMED_SECONDS_PER_MERGE = 2.7
ASSUMED_SECONDS_PER_UNIT = 1.0  # loading or materializing the model, its task-vector norm, writing rows
# Calibration of a data-dependent method no stored unit has timed yet, per document pass (validation
# documents of the embedded tasks, SmolLM2-135M, 2 AMD EPYC threads, measured 2026-12-01 on glue
# embedded): a Gram forward pass (RegMean) 0.16-0.27 s, a Fisher forward + backward pass (one
# document at a time) ~1.05 s, a model-step forward + backward per sampled prompt (AdaMerging,
# 16 prompts per task and epoch) 0.18-0.22 s for a pair, 0.37 s for 9 experts.
ASSUMED_CALIBRATION_SECONDS = {"gram": 0.2, "fisher": 1.05, "model_step": 0.25}


@dataclass(frozen=True)
class Rates:
    seconds_per_doc: float
    seconds_per_merge: float
    basis: str
    units_measured: int = 0
    peak_rss_bytes: int | None = None
    seconds_per_unit: float = ASSUMED_SECONDS_PER_UNIT  # what a unit costs beyond its merge and scoring
    # merge seconds per merged expert, by method (None: every data-free method): merges grow with n and differ
    # by method (TIES' top-k at n = 8 takes 3x Karcher's streaming mean)
    merge_per_expert: dict[str | None, float] = field(default_factory=dict)

    def merge_seconds(self, method: str | None = None, n: int | None = None) -> float:
        """Expected seconds of one merge of ``n`` experts with ``method``."""
        rate = self.merge_per_expert.get(method, self.merge_per_expert.get(None))
        return rate * n if rate is not None and n else self.seconds_per_merge

    def timed(self, method: str | None) -> bool:
        """Whether stored units measured ``method``'s own merges (their time includes calibration)."""
        return method in self.merge_per_expert


def calibration_seconds(passes: dict[str, int]) -> float:
    """Assumed seconds of calibration document passes by kind (``calibration_cost(...)["passes"]``)."""
    return sum(n * ASSUMED_CALIBRATION_SECONDS.get(kind, 0.0) for kind, n in passes.items())


def _device_kind(device: str | None) -> str:
    return "cuda" if (device or "cpu").startswith("cuda") else "cpu"


_QUERY = """
    WITH per_task AS (SELECT unit_id, any_value(pool) AS pool, any_value(role) AS role, any_value(method) AS method,
                             any_value(n) AS n, task, max(n_docs) AS n_docs FROM results GROUP BY unit_id, task),
         units AS (SELECT unit_id, any_value(pool) AS pool, any_value(role) AS role, any_value(method) AS method,
                          any_value(n) AS n, sum(n_docs) AS docs FROM per_task GROUP BY unit_id)
    SELECT u.unit_id, u.role, u.method, u.n, u.docs, any_value(p.merge_wall_s) AS merge_s, any_value(p.eval_wall_s) AS eval_s,
           any_value(p.unit_wall_s) AS unit_s,
           any_value(p.merge_peak_rss_bytes) AS rss, any_value(p.device) AS device,
           any_value(p.cpu_model) AS cpu_model, any_value(p.threads) AS threads, any_value(p.scorer) AS scorer,
           coalesce(bool_or(p.extra_json LIKE '%"calibration_s"%'), false) AS calibrated
    FROM units u JOIN provenance p ON p.unit_id = u.unit_id
    WHERE u.pool = ? AND p.eval_wall_s IS NOT NULL AND u.docs > 0
    GROUP BY u.unit_id, u.role, u.method, u.n, u.docs"""


def measured_rates(results_dirs: Iterable[str | os.PathLike], pool: str, device: str = "cpu", *,
                   scorer: str = "shared", threads: int | None = None) -> Rates:
    """Timing rates of ``pool`` on ``device``'s kind from the stores' provenance (else assumed):
    units of this CPU model and thread count first, then any of the device kind; always of
    ``scorer`` (units stored before the scorer was recorded count as lm-eval's stock ``hflm``)."""
    import pandas as pd

    frames = []
    for d in results_dirs:
        if not (Path(d) / "provenance").is_dir():
            continue
        with store.connect(d, include_paper=False) as con, warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=Warning)
            frames.append(con.execute(_QUERY, [pool]).df())
    d = pd.concat(frames, ignore_index=True).drop_duplicates("unit_id") if frames else pd.DataFrame()
    kind = _device_kind(device)
    if len(d):
        d = d[(d["device"].fillna("cpu").map(_device_kind) == kind) & (d["scorer"].fillna("hflm") == scorer)]
    basis = f"{len(d)} stored unit(s) of pool {pool!r} on {kind}, {scorer} scorer"
    if len(d) and kind == "cpu":
        here = store.collect_environment("cpu")["cpu_model"]
        same = d[(d["cpu_model"] == here) & (d["threads"] == (threads or _torch_threads()))]
        if len(same):
            d, basis = same, f"{len(same)} stored unit(s) of pool {pool!r} on this CPU ({here}), " \
                             f"{threads or _torch_threads()} thread(s), {scorer} scorer"
    if d.empty:
        return Rates(ASSUMED_SECONDS_PER_DOC, ASSUMED_SECONDS_PER_MERGE,
                     f"assumed: embedded 135M pool on 2 AMD EPYC cores; no stored timings of pool {pool!r} on {kind} "
                     f"with the {scorer} scorer")
    merged = d[(d["role"] == "merged") & d["merge_s"].notna() & (d["n"] > 0)]
    merges = merged["merge_s"][~merged["calibrated"].astype(bool)]
    per_expert = merged["merge_s"] / merged["n"]
    # the rate of a method with no stored merges: data-free merges only (a data-dependent merge's
    # time includes its calibration, 20-100x a data-free one; untimed calibration is estimated apart)
    free = per_expert[~merged["calibrated"].astype(bool)]
    rates = {None: float(free.median())} if len(free) else {}
    rates.update({m: float(v) for m, v in per_expert.groupby(merged["method"]).median().items()})
    rss = d["rss"].dropna()
    overhead = (d["unit_s"] - d["eval_s"] - d["merge_s"].fillna(0.0)).dropna()
    return Rates(
        seconds_per_doc=float(d["eval_s"].sum() / d["docs"].sum()),
        seconds_per_merge=float(merges.median()) if len(merges) else ASSUMED_SECONDS_PER_MERGE,
        basis="measured from " + basis + ("" if len(merges) else " (merge time assumed)"),
        units_measured=len(d),
        peak_rss_bytes=int(rss.max()) if len(rss) else None,
        seconds_per_unit=float(overhead.clip(lower=0).median()) if len(overhead) else ASSUMED_SECONDS_PER_UNIT,
        merge_per_expert=rates,
    )


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


@dataclass
class Pace:
    """Seconds per document, per merge and per unit for ETAs: ``prior`` until this run has
    measured its own (then the run's own means; merges per merged expert, by method)."""

    prior: Rates
    docs: int = 0
    eval_seconds: float = 0.0
    merges: list[tuple[str | None, int, float]] = field(default_factory=list)  # (method, n, seconds)
    overheads: list[float] = field(default_factory=list)

    def observe(self, docs: int, eval_seconds: float, unit_seconds: float, merge_seconds: float | None = None,
                method: str | None = None, n: int | None = None) -> None:
        self.docs += docs
        self.eval_seconds += eval_seconds
        if merge_seconds is not None:
            self.merges.append((method, n or 1, merge_seconds))
        self.overheads.append(max(0.0, unit_seconds - eval_seconds - (merge_seconds or 0.0)))

    @property
    def seconds_per_doc(self) -> float:
        return self.eval_seconds / self.docs if self.docs else self.prior.seconds_per_doc

    def merge_seconds(self, method: str | None = None, n: int | None = None) -> float:
        own = [s / k for m, k, s in self.merges if m == method] or [s / k for _, k, s in self.merges]
        if own and n:
            return sum(own) / len(own) * n
        return self.prior.merge_seconds(method, n)

    def timed(self, method: str | None) -> bool:
        """Whether this run or the stored units measured ``method``'s merges."""
        return any(m == method for m, _, _ in self.merges) or self.prior.timed(method)

    @property
    def seconds_per_unit(self) -> float:
        return sum(self.overheads) / len(self.overheads) if self.overheads else self.prior.seconds_per_unit

    def unit_seconds(self, docs: int, merged: bool, method: str | None = None, n: int | None = None) -> float:
        return docs * self.seconds_per_doc + (self.merge_seconds(method, n) if merged else 0.0) + self.seconds_per_unit


def format_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
