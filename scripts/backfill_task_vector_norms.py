"""Add ``task_vector_norm`` to the provenance of stored units evaluated before mergebench measured it.

For every (suite, profile, pool, method, params, seed) configuration in the store, the plan is
rebuilt (same unit ids), and each stored unit lacking the norm gets it: references read their
checkpoint, merges are recomputed in memory. Nothing is re-evaluated.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/python scripts/backfill_task_vector_norms.py [--results results]
"""

from __future__ import annotations

import argparse
import json

from mergebench import report
from mergebench.evaluation import runner
from mergebench.results import store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=str(store.DEFAULT_RESULTS_DIR))
    args = ap.parse_args()
    configs = store.sql("""
        SELECT DISTINCT suite, profile, pool, method, params_json, seed FROM results WHERE role = 'merged'
        UNION
        SELECT DISTINCT suite, profile, pool, NULL, NULL, NULL FROM results WHERE role <> 'merged'
        ORDER BY ALL""", args.results)
    with_merges = set(zip(configs.dropna(subset=["method"])["suite"], configs.dropna(subset=["method"])["profile"]))
    total, seen = 0, set()
    for c in configs.itertuples():
        if c.method is None or c.method != c.method:  # reference-only configuration
            if (c.suite, c.profile) in with_merges:
                continue  # the merged configurations' plans hold these references
            method, params, seed = "linear", {}, None
        else:
            config = report.config_params(c.params_json)  # per-expert lists expanded to n -> as given
            method, params, seed = c.method, json.loads(config), int(c.seed)
            key = (c.suite, c.profile, c.pool, method, config, seed)
            if key in seen:
                continue  # the same configuration at another merge size: its plan covered it
            seen.add(key)
        print(f"== {c.suite}:{c.profile} pool {c.pool}, {method} {params}")
        plan = runner.plan_eval(method, c.suite, pool=c.pool, profile=c.profile, params=params, seed=seed)
        total += runner.backfill_task_vector_norms(plan, args.results)
    print(f"{total} units updated")


if __name__ == "__main__":
    main()
