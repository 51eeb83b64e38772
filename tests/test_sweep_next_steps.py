"""`mergebench sweep` ends, like `mergebench eval`, by saying where the rows went and what to run next."""

from __future__ import annotations

from typer.testing import CliRunner

from mergebench.results import store
from test_sweep import write_small_suite


def test_sweep_says_where_the_rows_went_and_what_to_run_next(tiny_suites, tmp_path):
    from mergebench.cli import app

    suite = write_small_suite(tiny_suites)
    results = tmp_path / "rows"
    res = CliRunner().invoke(app, ["sweep", "--suite", suite, "--methods", "linear", "--results", str(results),
                                   "--no-progress"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert f"rows stored in {results}/ (Parquet)" in text
    for hint in (f"mergebench report --suite {suite} --results {results}",  # each hint runs as printed
                 f"mergebench compare A B --suite {suite} --results {results}", f"mergebench leaderboard --results {results}"):
        assert hint in text, hint
    assert text.rindex("mergebench leaderboard") > text.index("mean score")  # the last thing printed
    assert len(store.sql("SELECT * FROM results WHERE role = 'merged'", results)) > 0  # the rows really are there
    dry = CliRunner().invoke(app, ["sweep", "--suite", suite, "--methods", "linear", "--results", str(tmp_path / "dry"),
                                   "--dry-run"])
    assert dry.exit_code == 0 and "rows stored" not in dry.output  # a dry run stores nothing and says nothing of it
