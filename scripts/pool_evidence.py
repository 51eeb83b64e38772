"""Print the evidence tables of suites/README.md from the results store (markdown).

    .venv/bin/python scripts/pool_evidence.py [RESULTS_DIR]

1. base vs every expert on every embedded task (test split, the inthewild embedded profile's
   seeded documents), accuracy ± lm-eval's standard error;
2. merged models by method and merge size: mean ± std over subsets of the average score,
   and per-task means, to show whether the pool discriminates merge methods.
"""

import sys

from mergebench.results import store
from mergebench.config.suites import load_suite

results = sys.argv[1] if len(sys.argv) > 1 else "results"
prof = load_suite("inthewild").profile("embedded")
metric = {t.name: t.metric for t in prof.tasks}
cond = " OR ".join(f"(task = '{t}' AND metric = '{m}')" for t, m in metric.items())
rows = store.sql(
    f"SELECT role, method, subset, n, unit_id, task, metric, value, stderr, n_docs FROM results "
    f"WHERE suite = 'inthewild' AND profile = 'embedded' AND ({cond})",
    results,
)
tasks = sorted(metric)
short = [t.removeprefix("mb_") for t in tasks]

refs = rows[rows.role != "merged"].copy()
refs["model"] = refs.apply(lambda r: "base" if r.role == "base" else r.subset[0], axis=1)
print("| model | " + " | ".join(f"{s} ({metric[t]})" for s, t in zip(short, tasks)) + " | avg |")
print("|---" * (len(tasks) + 2) + "|")
order = ["base"] + sorted(m for m in refs.model.unique() if m != "base")
for m in order:
    r = refs[refs.model == m].set_index("task")
    cells = [f"{r.loc[t, 'value']:.3f} ± {r.loc[t, 'stderr']:.3f}" if t in r.index else "-" for t in tasks]
    print(f"| {m} | " + " | ".join(cells) + f" | {r['value'].mean():.3f} |")
n_docs = int(refs.n_docs.max()) if len(refs) else 0
print(f"\n({n_docs} seeded test documents per task; stderr from lm-eval.)\n")

merged = rows[rows.role == "merged"]
per_unit = merged.groupby(["method", "n", "unit_id"])["value"].mean().reset_index()
summ = per_unit.groupby(["method", "n"])["value"].agg(["mean", "std", "count"]).reset_index()
base_avg = refs[refs.model == "base"]["value"].mean()
print(f"| method | n | subsets | avg score (mean ± std) | vs base ({base_avg:.3f}) |")
print("|---|---|---|---|---|")
for _, r in summ.iterrows():
    std = "" if r["std"] != r["std"] else f" ± {r['std']:.3f}"
    print(f"| {r['method']} | {int(r['n'])} | {int(r['count'])} | {r['mean']:.3f}{std} | {r['mean'] - base_avg:+.3f} |")
print()
pt = merged.groupby(["method", "n", "task"])["value"].mean().unstack("task")
print("| method | n | " + " | ".join(short) + " |")
print("|---" * (len(tasks) + 2) + "|")
for (meth, n), r in pt.iterrows():
    print(f"| {meth} | {int(n)} | " + " | ".join(f"{r[t]:.2f}" for t in tasks) + " |")
