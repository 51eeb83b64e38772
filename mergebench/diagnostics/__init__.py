"""Why a merge fails, not only that it fails: weight, representation and activation diagnostics.

* :mod:`.weights`          task-vector norms, cosines (global / per layer / per tensor), the four
                           parameter-conflict metrics of seed 004 (eqs. 4-7); one streaming pass.
* :mod:`.representations`  hidden-state distances on a shared probe set, HiddenSim (seed 004 eq. 2),
                           Merging Difficulty Score (eq. 3).
* :mod:`.activations`      per-layer mean, variance, effective / stable / numerical rank, participation
                           ratio, mean ± std over bootstrap draws of the probes (seed 000 Table 7).
* :mod:`.stats`            merging loss (seed 004 eq. 1), one-way ANOVA by task / method, Pearson.
* :mod:`.store`            the ``diagnostics`` Parquet table (one atomic file per unit).
"""

from __future__ import annotations

import math

import numpy as np

from .activations import (
    ACTIVATION_METRICS,
    activation_diagnostics,
    activation_metrics,
    activation_rows,
    collect_hidden_states,
    tokenize_probes,
)
from .errors import DiagnosticsError
from .representations import hidden_distance_matrix, hidden_sim, merging_difficulty, representation_rows
from .stats import AnovaResult, PearsonResult, anova_by_factor, anova_oneway, correlate, merging_loss, pearson, stats_rows
from .weights import DEFAULT_ZERO_TOL, WeightDiagnostics, block_key, task_vector_norm, weight_diagnostics

__all__ = [
    "DiagnosticsError",
    "ACTIVATION_METRICS", "DEFAULT_ZERO_TOL", "AnovaResult", "PearsonResult", "WeightDiagnostics",
    "activation_diagnostics", "activation_metrics", "activation_rows", "anova_by_factor", "anova_oneway",
    "block_key", "collect_hidden_states", "correlate", "hidden_distance_matrix", "hidden_sim", "merging_difficulty",
    "merging_loss", "pearson", "representation_rows", "stats_rows", "summarize_activations", "summarize_weights",
    "diagnose", "task_vector_norm", "tokenize_probes", "weight_diagnostics",
]


def summarize_weights(wd: WeightDiagnostics, *, top: int = 3) -> list[str]:
    """Short readable lines: norms, the least compatible expert pairs, the most conflicted layers."""
    lines = [", ".join(f"|tau {n}| = {v:.4g}" for n, v in zip(wd.models, wd.norms))]
    table = wd.conflict_table()
    if table:
        worst = sorted(table, key=lambda r: (r["cosine"] if not math.isnan(r["cosine"]) else 0.0))[:top]
        for r in worst:
            lines.append(
                f"{r['model_a']} vs {r['model_b']}: cos {r['cosine']:+.3f}, sign change {r['sign_change_ratio']:.3f}, "
                f"conflicting magnitude {r['conflicting_magnitude_change_ratio']:.3f}, layers +{r['layers_positive']}"
                f"/-{r['layers_negative']}/0:{r['layers_zero']}"
            )
    return lines


def summarize_activations(diag_by_model: dict[str, dict], reference: str, *, metric: str = "effective_rank",
                          drop: float = 0.5) -> list[str]:
    """Layers where a model's ``metric`` falls below ``drop`` x the reference model's (rank collapse)."""
    ref = diag_by_model[reference]
    lines = []
    for name, diag in diag_by_model.items():
        if name == reference:
            continue
        bad = [layer for layer, m in diag.items() if layer in ref
               and np.isfinite(m[metric]["mean"]) and m[metric]["mean"] < drop * ref[layer][metric]["mean"]]
        if bad:
            lines.append(f"{name}: {metric} below {drop:g} x {reference} at hidden layer(s) {', '.join(map(str, bad))}")
    return lines or [f"no layer's {metric} falls below {drop:g} x {reference}"]


def diagnose(
    base: str,
    experts: dict[str, str],
    *,
    merged: str | None = None,
    merged_name: str = "merged",
    probes: list[str] | None = None,
    tasks: dict[str, str] | None = None,
    kinds: tuple[str, ...] = ("weights", "representations", "activations"),
    layer: int = -1,
    activation_layers: list[int] | None = None,
    n_boot: int = 20,
    seed: int = 0,
    device: str = "cpu",
    max_length: int = 256,
    pooling: str = "tokens",
    normalize: str = "dim",
    results_dir=None,
    run_id: str | None = None,
    pool: str = "adhoc",
    base_model: str | None = None,
    method: str | None = None,
    method_version: str | None = None,
    params: dict | None = None,
    log=print,
) -> dict:
    """Everything ``mergebench diagnose`` does, given checkpoint paths: compute, store, summarize.

    ``probes`` are the shared probe texts (seed 004: k = 5 documents per task), needed for the
    representation and activation kinds; ``tasks`` maps expert name -> task (MDS per task).
    Models are loaded one at a time (weights stream; each model is freed after its forward
    passes). With ``results_dir`` every kind is one unit of the ``diagnostics`` table; a unit
    already stored is recomputed but not rewritten. Returns {'weights': WeightDiagnostics,
    'distances': (names, D), 'activations': {model: per-layer dict}, 'summary': [lines], 'units': [...]}.
    """
    import torch

    from ..engine.checkpoint import open_checkpoint
    from mergebench.results.store import new_run_id
    from .store import DiagUnit, write_diagnostics

    unknown = set(kinds) - {"weights", "representations", "activations"}
    if unknown:
        raise DiagnosticsError(f"unknown diagnostic kind(s) {sorted(unknown)}")
    if not kinds:
        raise DiagnosticsError("--kinds names no diagnostic kind: give some of weights,representations,activations")
    if "representations" in kinds and len(experts) < 2:
        raise DiagnosticsError(f"representation diagnostics compare experts: give at least two (got {', '.join(experts)})")
    if {"representations", "activations"} & set(kinds):  # the layers asked for, before any model is loaded
        from transformers import AutoConfig

        n_states = AutoConfig.from_pretrained(base).num_hidden_layers + 1  # embeddings + one per block
        for bad in [layer, *(activation_layers or [])]:
            if not -n_states <= bad < n_states:
                raise DiagnosticsError(f"layer {bad} is out of range: {base} returns {n_states} hidden states "
                                 f"(layers {-n_states}..{n_states - 1})")
    run_id = run_id or new_run_id()
    models = {"base": base, **experts, **({merged_name: merged} if merged is not None else {})}
    if "base" in experts:
        raise DiagnosticsError("an expert may not be called 'base'")
    fps = {}
    for name, path in models.items():
        ck = open_checkpoint(path, name)
        fps[name] = ck.fingerprint
        ck.close()
    subset = list(experts)
    common = dict(pool=pool, subset=subset, base_model=base_model or str(base), method=method,
                  method_version=method_version, params=params or {}, seed=seed, fingerprints=fps)
    out: dict = {"summary": [], "units": []}

    def store(kind, rows, settings):
        if results_dir is None or not rows:
            return
        res = write_diagnostics(DiagUnit(kind, settings=settings, **common), rows, run_id=run_id,
                                results_dir=results_dir)
        out["units"].append(res)

    if "weights" in kinds:
        log("weights: streaming task vectors ...")
        wd = weight_diagnostics(base, experts, merged, merged_name=merged_name, device=device)
        out["weights"] = wd
        out["summary"] += summarize_weights(wd)
        store("weights", wd.rows(), {"zero_tol": wd.zero_tol})

    if {"representations", "activations"} & set(kinds):
        if not probes:
            raise DiagnosticsError("representation / activation diagnostics need probe texts")
        import hashlib

        from transformers import AutoModelForCausalLM, AutoTokenizer

        probe_hash = hashlib.sha256("\x00".join(probes).encode()).hexdigest()[:16]
        tok = AutoTokenizer.from_pretrained(base)
        enc = tokenize_probes(tok, probes, max_length=max_length)
        want = sorted(set((activation_layers or []) + [layer])) if activation_layers is not None else None
        rep_states, acts, doc = {}, {}, None
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
        for name, path in models.items():
            log(f"hidden states: {name}")
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
            hs, doc = collect_hidden_states(model, enc["input_ids"], enc["attention_mask"], layers=want)
            rep_key = layer % (model.config.num_hidden_layers + 1)  # hidden_states = embeddings + one per block
            del model
            rep_states[name] = hs[rep_key]
            if "activations" in kinds:
                acts[name] = activation_diagnostics(hs, doc, n_boot=n_boot, seed=seed)
        if "representations" in kinds:
            names, D = hidden_distance_matrix({n: rep_states[n] for n in subset}, doc, pooling=pooling,
                                              normalize=normalize)
            rows = representation_rows(names, D, layer=f"hidden.{rep_key}", tasks=tasks)
            others = [n for n in models if n not in subset]
            if others:  # distances of base / merged to each expert (not part of eq. 2's group)
                allnames, DA = hidden_distance_matrix(rep_states, doc, pooling=pooling, normalize=normalize)
                for o in others:
                    for e in subset:
                        rows.append({"kind": "representations", "metric": "hidden_distance", "model": o,
                                     "model_b": e, "layer": f"hidden.{rep_key}", "scope": "layer",
                                     "value": float(DA[allnames.index(o), allnames.index(e)])})
            out["distances"] = (names, D)
            S = hidden_sim(D)
            mds = merging_difficulty(S)
            worst = int(np.nanargmax(np.where(np.isfinite(mds), mds, np.nan))) if np.isfinite(mds).any() else None
            if worst is not None:
                out["summary"].append(f"hardest to merge (highest MDS, seed 004 eq. 3): {names[worst]} "
                                      f"(MDS {mds[worst]:.3g})")
            store("representations", rows, {"layer": layer, "pooling": pooling, "normalize": normalize,
                                             "probes": probe_hash, "max_length": max_length})
        if "activations" in kinds:
            out["activations"] = acts
            rows = [r for name, d in acts.items() for r in activation_rows(name, d)]
            out["summary"] += summarize_activations(acts, "base")
            store("activations", rows, {"layers": want, "n_boot": n_boot, "probes": probe_hash,
                                        "max_length": max_length})
    return out
