"""Options shared by the benchmarks (run: ``.venv/bin/pytest benchmarks/ --benchmark-only``).

Every option also reads an environment variable, so a CI job can pick the subset without
touching the command line. Defaults are the *quick* subset (a few minutes on 2 cores).
"""

from __future__ import annotations

import os

import pytest

QUICK_SHAPES = "4096x4096"
ALL_SHAPES = "4096x4096,4096x14336,32000x4096"
QUICK_EXPERTS = "2,5"
ALL_EXPERTS = "2,5,12"
E2E_METHODS = "ties,dare_ties,karcher,model_stock,multislerp"

_OPTIONS = [
    # (flag, env var, default, help)
    ("--device", "MERGEBENCH_BENCH_DEVICE", "cpu", "cpu or cuda"),
    ("--shapes", "MERGEBENCH_BENCH_SHAPES", QUICK_SHAPES, f"comma-separated RxC shapes, or 'all' ({ALL_SHAPES})"),
    ("--experts", "MERGEBENCH_BENCH_EXPERTS", QUICK_EXPERTS, f"comma-separated expert counts or 'all' ({ALL_EXPERTS})"),
    ("--methods", "MERGEBENCH_BENCH_METHODS", "all", "comma-separated method names for the kernel benchmark, or 'all'"),
    ("--svd-experts", "MERGEBENCH_BENCH_SVD_EXPERTS", "2",
     "expert counts for SVD (matrix) methods, or 'same' to use --experts (each SVD of 4096^2 takes ~10-20 s)"),
    ("--threads", "MERGEBENCH_BENCH_THREADS", "1", "torch CPU threads for kernels (SVD methods always use 1)"),
    ("--rounds", "MERGEBENCH_BENCH_ROUNDS", "3", "timed rounds per kernel case"),
    ("--e2e-methods", "MERGEBENCH_E2E_METHODS", E2E_METHODS, "methods for the end-to-end comparison with mergekit"),
    ("--e2e-size", "MERGEBENCH_E2E_SIZE", "120m", "synthetic model size for end-to-end runs: tiny (~4M), 30m, 120m"),
    ("--e2e-experts", "MERGEBENCH_E2E_EXPERTS", "4", "number of experts in the end-to-end runs"),
    ("--e2e-threads", "MERGEBENCH_E2E_THREADS", "1", "torch threads given to each tool in the end-to-end runs"),
    ("--e2e-dir", "MERGEBENCH_E2E_DIR", "", "folder keeping the synthetic checkpoints between runs (default: temp)"),
    ("--skip-mergekit", "MERGEBENCH_SKIP_MERGEKIT", "0", "1: time mergebench only (no comparison)"),
    ("--scorer-dtype", "MERGEBENCH_SCORER_DTYPE", "float32", "dtype of the model in the scorer benchmark (float32, bfloat16)"),
]


def pytest_addoption(parser):
    group = parser.getgroup("mergebench benchmarks")
    for flag, env, default, help_ in _OPTIONS:
        group.addoption(flag, default=os.environ.get(env, default), help=f"{help_} [env {env}; default {default}]")


def option(config, flag: str) -> str:
    return str(config.getoption(flag.lstrip("-").replace("-", "_")))


def parse_shapes(text: str) -> list[tuple[int, int]]:
    text = ALL_SHAPES if text == "all" else text
    out = []
    for item in text.split(","):
        r, _, c = item.strip().lower().partition("x")
        out.append((int(r), int(c)))
    return out


def parse_ints(text: str, all_value: str) -> list[int]:
    return [int(x) for x in (all_value if text == "all" else text).split(",") if x.strip()]


@pytest.fixture(scope="session")
def device(pytestconfig) -> str:
    dev = option(pytestconfig, "--device")
    if dev.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            pytest.skip("--device cuda given but CUDA is not available")
    return dev


def pytest_collect_file(file_path, parent):
    """Collect ``bench_*.py`` (pytest's default pattern is ``test_*.py``)."""
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        if parent.session.isinitpath(file_path):
            return None  # named on the command line: pytest's python plugin collects it already
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def kernel_cases(config) -> list:
    """(method, shape, n) cases for ``bench_kernels``: every registered method (or --methods)
    on every shape and expert count its input contract allows; ``matrix`` (SVD) methods only
    on one square shape."""
    from mergebench import get_method, list_methods

    shapes = parse_shapes(option(config, "--shapes"))
    counts = parse_ints(option(config, "--experts"), ALL_EXPERTS)
    wanted = option(config, "--methods")
    specs = list_methods() if wanted == "all" else [get_method(m.strip()) for m in wanted.split(",") if m.strip()]
    square = [s for s in shapes if s[0] == s[1]]
    svd_shape = square[0] if square else min(shapes, key=lambda s: s[0] * s[1])
    cases = []
    svd_opt = option(config, "--svd-experts")
    svd_counts = counts if svd_opt == "same" else parse_ints(svd_opt, ALL_EXPERTS)
    for spec in specs:
        c = spec.contract
        wanted_n = svd_counts if spec.granularity == "matrix" else counts
        ok = [n for n in wanted_n if n >= c.min_experts and (c.max_experts is None or n <= c.max_experts)]
        if not ok and c.max_experts is not None:
            ok = [c.max_experts]  # e.g. two-model SLERP: benchmark its only valid count
        for shape in shapes:
            if spec.granularity == "matrix" and shape != svd_shape:
                continue
            for n in ok:
                cases.append(pytest.param((spec.name, shape, n), id=f"{spec.name}-{shape[0]}x{shape[1]}-N{n}"))
    # shape-major, then expert count: consecutive cases reuse the same (large) random inputs
    order = {s: i for i, s in enumerate(shapes)}
    return sorted(cases, key=lambda c: (order[c.values[0][1]], c.values[0][2]))


def pytest_generate_tests(metafunc):
    if "kernel_case" in metafunc.fixturenames:
        metafunc.parametrize("kernel_case", kernel_cases(metafunc.config))
    if "e2e_method" in metafunc.fixturenames:
        names = [m.strip() for m in option(metafunc.config, "--e2e-methods").split(",") if m.strip()]
        metafunc.parametrize("e2e_method", names)


_RESULTS = pytest.StashKey[dict]()


@pytest.fixture(scope="session")
def bench_results(pytestconfig) -> dict:
    """Numbers collected for the end-of-run summary (copy bandwidth, kernel GB/s, e2e ratios)."""
    return pytestconfig.stash.setdefault(_RESULTS, {})


def pytest_terminal_summary(terminalreporter, config):
    res = config.stash.get(_RESULTS, None)
    if not res:
        return
    tr = terminalreporter
    tr.section("mergebench benchmark summary")
    copy = res.get("copy", {})
    for dev, gbps in copy.items():
        tr.write_line(f"copy bandwidth ({dev}, read side): {gbps:.1f} GB/s")
    if res.get("kernels"):
        tr.write_line(f"{'method':<22}{'shape':>12}{'N':>4}{'thr':>4}{'seconds':>10}{'GB/s in':>10}{'copy/x':>8}")
        for r in res["kernels"]:
            ref = copy.get(r["device"])
            ratio = f"{ref / r['gbps']:.1f}" if ref else "-"
            tr.write_line(
                f"{r['method']:<22}{r['shape']:>12}{r['n']:>4}{r['threads']:>4}{r['seconds']:>10.4f}{r['gbps']:>10.2f}{ratio:>8}"
            )
    if res.get("scorer"):
        rows = {r["scorer"]: r for r in res["scorer"]}
        tr.write_line(f"{'scorer':<8}{'device':>7}{'dtype':>10}{'thr':>4}{'seconds':>9}{'docs/s':>8}{'req/s':>8}"
                      f"{'x stock':>8}{'floor s':>9}{'x floor':>8}")
        stock = rows.get("hflm", {}).get("seconds")
        floor = rows.get("shared", {}).get("floor_s")
        for r in res["scorer"]:
            tr.write_line(
                f"{r['scorer']:<8}{r['device']:>7}{r['dtype']:>10}{r['threads']:>4}{r['seconds']:>9.1f}"
                f"{r['docs_per_s']:>8.1f}{r['requests_per_s']:>8.1f}"
                + (f"{stock / r['seconds']:>8.2f}" if stock else f"{'-':>8}")
                + (f"{floor:>9.1f}{r['seconds'] / floor:>8.2f}" if floor else f"{'-':>9}{'-':>8}")
            )
        tr.write_line(f"floor: unique tokens x 2 x parameters at {res['scorer'][0]['gflops']:.0f} GFLOP/s (matmul, measured)")
    if res.get("e2e"):
        tr.write_line(
            f"{'method':<14}{'mb wall s':>10}{'mk wall s':>10}{'speedup':>9}{'mb merge s':>11}{'mk merge s':>11}"
            f"{'speedup':>9}{'mb RSS MB':>10}{'mk RSS MB':>10}{'RSS ratio':>10}{'max|diff|':>11}"
        )
        for r in res["e2e"]:
            mk_t, mk_r = r.get("mergekit_wall"), r.get("mergekit_rss_mb")
            mk_m = r.get("mergekit_merge")
            tr.write_line(
                f"{r['method']:<14}{r['mergebench_wall']:>10.1f}"
                + (f"{mk_t:>10.1f}{mk_t / r['mergebench_wall']:>9.1f}" if mk_t else f"{'-':>10}{'-':>9}")
                + f"{r['mergebench_merge']:>11.1f}"
                + (f"{mk_m:>11.1f}{mk_m / r['mergebench_merge']:>9.1f}" if mk_m else f"{'-':>11}{'-':>9}")
                + f"{r['mergebench_rss_mb']:>10.0f}"
                + (f"{mk_r:>10.0f}{r['mergebench_rss_mb'] / mk_r:>10.2f}" if mk_r else f"{'-':>10}{'-':>10}")
                + (f"{r['max_abs_diff']:>11.2e}" if "max_abs_diff" in r else f"{'-':>11}")
            )
