"""The paper registry (suites/papers/papers.yaml): loading, validation, lookups, and that nothing a
user reads names a paper by the maintainers' seed number."""

import re
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from mergebench.config import papers
from mergebench.cli import app
from mergebench.errors import MergebenchError
from mergebench.methods import list_methods
from mergebench.config.pools import load_pool, pool_names
from mergebench.config.suites import list_suites, load_suite

runner = CliRunner()
SEEDS = Path(__file__).resolve().parents[2] / "shared" / "seeds"
SEED_NUMBER = re.compile(r"seed[ _]?00\d", re.IGNORECASE)


def _write(tmp_path, text: str) -> Path:
    p = tmp_path / "papers.yaml"
    p.write_text(text)
    return p


GOOD = """
ties2023:
  title: "TIES-Merging: Resolving Interference When Merging Models"
  short_title: "TIES-Merging"
  authors: ["Prateek Yadav", "Derek Tam", "Leshem Choshen", "Colin Raffel", "Mohit Bansal"]
  year: 2023
  venue: NeurIPS
  arxiv: "2306.01708"
blog:
  title: "A post"
  short_title: "post"
  authors: ["C. Goddard"]
  url: "https://example.org/post"
"""


# ------------------------------------------------------------------------------- the registry


def test_registry_loads_every_paper_with_its_fields():
    assert len(papers.PAPERS) >= 20
    for key, p in papers.PAPERS.items():
        assert p.key == key and p.title and p.short_title and p.authors
        if p.arxiv:
            assert p.reference_url() == f"https://arxiv.org/abs/{p.arxiv}"
    karcher = papers.get_paper("karcher2026")
    assert karcher.cite() == "Fisher–Rao merging paper (Wang, Ye and Yin, 2026; arXiv:2603.04972)"
    assert karcher.reference_url() == "https://arxiv.org/abs/2603.04972"
    assert papers.get_paper("ties2023").cite() == "TIES-Merging (Yadav et al., 2023; arXiv:2306.01708)"
    # no year, no arXiv id: both left out, not invented
    assert papers.get_paper("inthewild").cite() == "in-the-wild merging study (Anonymous authors)"
    assert papers.get_paper("inthewild").reference_url() == ""


@pytest.mark.skipif(not SEEDS.is_dir(), reason="seed texts not available")
def test_seed_papers_match_their_texts():
    """Title (and, where printed, arXiv id and authors) of each numbered paper is in its text's first lines."""
    numbered = [p for p in papers.PAPERS.values() if p.seed]
    assert sorted(p.seed for p in numbered) == ["000", "001", "003", "004"]
    for p in numbered:
        (path,) = SEEDS.glob(f"{p.seed}_*.txt")
        head = re.sub(r"[*\s]+", " ", path.read_text()[:3000]).lower()
        assert p.title.lower().replace("–", "-") in head.replace("–", "-"), p.key
        assert not p.arxiv or f"arxiv:{p.arxiv}" in head, p.key
        for name in p.authors:
            if name != "Anonymous authors":
                assert name.lower() in head, (p.key, name)


def test_url_is_built_from_arxiv_and_kept_when_given(tmp_path):
    got = papers.load_papers(_write(tmp_path, GOOD))
    assert got["ties2023"].url == "https://arxiv.org/abs/2306.01708"
    assert got["blog"].url == "https://example.org/post" and got["blog"].arxiv == ""
    assert got["blog"].cite() == "post (C. Goddard)"


@pytest.mark.parametrize(
    "old, new, field",
    [
        ('  year: 2023\n', '  year: twenty\n', "ties2023.year"),
        ('  arxiv: "2306.01708"\n', '  arxiv: "2306.1"\n', "ties2023.arxiv"),
        ('  short_title: "TIES-Merging"\n', "", "ties2023.short_title"),
        ('  authors: ["C. Goddard"]\n', "  authors: []\n", "blog.authors"),
        ('  url: "https://example.org/post"\n', '  url: "example.org"\n', "blog.url"),
        ("  venue: NeurIPS\n", "  venue: NeurIPS\n  pages: 3\n", "ties2023.pages"),
        ("blog:\n", "Blog Post:\n", "Blog Post"),
    ],
)
def test_bad_registry_file_is_one_line_naming_the_field(tmp_path, old, new, field):
    assert GOOD.count(old) == 1
    path = _write(tmp_path, GOOD.replace(old, new))
    with pytest.raises(papers.PaperError) as e:
        papers.load_papers(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and field in msg
    assert isinstance(e.value, MergebenchError)


def test_unreadable_registry_file_is_a_paper_error(tmp_path):
    with pytest.raises(papers.PaperError, match="file not found"):
        papers.load_papers(tmp_path / "missing.yaml")
    with pytest.raises(papers.PaperError, match="not valid YAML"):
        papers.load_papers(_write(tmp_path, "a: [1,\n"))


def test_unknown_key_names_it_and_lists_the_known_ones():
    with pytest.raises(papers.UnknownPaperError) as e:
        papers.get_paper("tiess")
    msg = str(e.value)
    assert isinstance(e.value, MergebenchError)
    assert "'tiess'" in msg and "ties2023" in msg and "inthewild" in msg and "\n" not in msg
    with pytest.raises(papers.UnknownPaperError, match="no paper has seed number '009'"):
        papers.paper_for_seed("009")
    assert papers.paper_for_seed("seed001").key == papers.paper_for_seed(1).key == "inthewild"


# ------------------------------------------------------------------------ suites, pools, methods


def test_every_suite_and_pool_names_a_known_paper():
    suites = list_suites()
    assert {s.name: s.paper for s in suites} == {
        "glue": "glue_collapse", "homogeneous": "inthewild", "inthewild": "inthewild", "openllm": "karcher2026"}
    for s in suites:
        short = papers.get_paper(s.paper).short_title
        assert short in s.title, s.name
        for m, d in s.methods.items():
            assert not SEED_NUMBER.search(d.source), (s.name, m)
        assert not SEED_NUMBER.search(s.title + s.reference)
    for name in pool_names():
        pool = load_pool(name)
        assert pool.paper is None or pool.paper in papers.PAPERS
        assert not SEED_NUMBER.search(pool.title + pool.reference), name


def _suite_file(tmp_path, line: str) -> Path:
    text = Path(load_suite("glue").file).read_text().replace("paper: glue_collapse", line)
    p = tmp_path / "glue.yaml"
    p.write_text(text)
    return p


def test_old_suite_files_saying_seed_still_load(tmp_path):
    suite = load_suite(str(_suite_file(tmp_path, 'seed: "004"')))
    assert suite.paper == "glue_collapse" and suite.seed == "004"
    assert suite.id == load_suite("glue").id  # same name and version: same cache keys


@pytest.mark.parametrize("line, why", [("paper: glue_colapse", "unknown paper 'glue_colapse'"),
                                       ('seed: "009"', "no paper has seed number '009'")])
def test_suite_with_unknown_paper_is_one_line_naming_the_file(tmp_path, line, why):
    path = _suite_file(tmp_path, line)
    with pytest.raises(MergebenchError) as e:
        load_suite(str(path))
    msg = str(e.value)
    assert str(path) in msg and why in msg and "\n" not in msg


def test_every_builtin_method_names_a_known_paper():
    builtins = [s for s in list_methods() if s.source.startswith("mergebench.baselines.")]
    assert len(builtins) >= 20
    for s in builtins:
        assert s.paper in papers.PAPERS, s.name
        assert all(k in papers.PAPERS for k in s.related_papers), s.name
        assert not SEED_NUMBER.search(s.citation), s.name
        d = s.describe()
        assert d["paper"]["title"] == papers.get_paper(s.paper).title
        assert d["url"] == papers.get_paper(s.paper).reference_url()


def test_unknown_method_paper_key_is_refused():
    from mergebench.methods import MethodSpec

    with pytest.raises(papers.UnknownPaperError, match="'nope'"):
        MethodSpec(name="x", kernel=lambda *a: None, paper="nope")
    spec = MethodSpec(name="x", kernel=lambda *a: None, citation="free text", reference_url="https://example.org")
    assert spec.describe()["paper"] is None and spec.url() == "https://example.org"


# ----------------------------------------------------------------------------------- the CLI


def test_methods_ties_shows_title_authors_year_and_url():
    r = runner.invoke(app, ["methods", "ties"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "paper: TIES-Merging: Resolving Interference When Merging Models" in r.output
    assert "authors: Prateek Yadav, Derek Tam, Leshem Choshen, Colin Raffel, Mohit Bansal" in r.output
    assert "year: 2023; NeurIPS" in r.output
    assert "url: https://arxiv.org/abs/2306.01708" in r.output


def test_suites_output_names_papers_by_short_title():
    r = runner.invoke(app, ["suites"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert not SEED_NUMBER.search(r.output)
    flat = " ".join(re.sub(r"[│┃]", " ", r.output).split())  # a folded cell may split a title over two lines
    assert "merging-collapse study" in flat and "in-the-wild merging" in flat
    assert flat.count("merging-collapse study") == 1  # once per suite, on its first profile's row


def _commands(group: typer.Typer, prefix=()):
    for cmd in group.registered_commands:
        yield (*prefix, cmd.name or cmd.callback.__name__.replace("_", "-"))
    for sub in group.registered_groups:
        yield (*prefix, sub.name)
        yield from _commands(sub.typer_instance, (*prefix, sub.name))


def test_no_user_facing_output_names_a_seed_number():
    outputs = {"--help": runner.invoke(app, ["--help"], env={"COLUMNS": "200"})}
    commands = list(_commands(app))
    assert ("methods",) in commands and ("stats",) in commands
    for cmd in commands:
        outputs[" ".join(cmd)] = runner.invoke(app, [*cmd, "--help"], env={"COLUMNS": "200"})
    for cmd in (["suites"], ["methods"], ["pools"], ["suites", "--json"], ["methods", "--json"]):
        outputs[" ".join(cmd) + " (run)"] = runner.invoke(app, cmd, env={"COLUMNS": "200"})
    for name, r in outputs.items():
        assert r.exit_code == 0, (name, r.output)
        assert not SEED_NUMBER.search(r.output), (name, SEED_NUMBER.search(r.output).group())
