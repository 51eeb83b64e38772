"""The papers mergebench refers to, as data: a registry loaded from ``suites/papers/papers.yaml``.

Suites, pools and method specs name a paper by its key (``inthewild``, ``ties2023``, ...);
anything shown to a user names it by :attr:`Paper.short_title` or :meth:`Paper.cite`, never by
the maintainers' seed numbering. The seed number survives only as :attr:`Paper.seed`, for the
``results/paper/seedNNN_table*.csv`` file names and for old suite files that say ``seed: "001"``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, RootModel, ValidationError, field_validator

from mergebench.config.yamlio import ConfigError, format_validation_error, read_yaml
from mergebench.errors import MergebenchError
from mergebench.paths import CHECKOUT

__all__ = ["PAPERS", "Paper", "PaperError", "UnknownPaperError", "get_paper", "load_papers", "paper_for_seed",
           "papers_file"]

_ARXIV = r"^\d{4}\.\d{4,5}$"
_KEY = r"^[a-z][a-z0-9_]*$"


class PaperError(MergebenchError, ValueError):
    """The paper registry file is missing or invalid."""


class UnknownPaperError(MergebenchError, KeyError):
    """A paper key that is not in the registry."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Paper:
    """One paper: ``authors`` as printed (an anonymous submission says so), ``year`` None where
    the paper prints none, ``arxiv`` only where the paper or the method's citation gives it."""

    key: str
    title: str
    short_title: str
    authors: tuple[str, ...]
    year: int | None = None
    venue: str = ""
    arxiv: str = ""
    url: str = ""
    seed: str | None = None

    @property
    def authors_short(self) -> str:
        """``Wang, Ye and Yin`` style: surnames for two or three authors, ``First et al.`` beyond."""
        if len(self.authors) == 1:
            return self.authors[0]
        last = [a.split()[-1] for a in self.authors]
        if len(last) > 3:
            return f"{last[0]} et al."
        return ", ".join(last[:-1]) + " and " + last[-1]

    def cite(self) -> str:
        """One line: ``Short title (Authors, Year; arXiv:ID)``, missing parts left out."""
        parts = ", ".join([self.authors_short] + ([str(self.year)] if self.year else []))
        if self.arxiv:
            parts += f"; arXiv:{self.arxiv}"
        return f"{self.short_title} ({parts})"

    def reference_url(self) -> str:
        """The paper's URL (arXiv abstract page when it has an arXiv id); "" if none is known."""
        return self.url

    def describe(self) -> dict:
        return {"key": self.key, "title": self.title, "short_title": self.short_title,
                "authors": list(self.authors), "year": self.year, "venue": self.venue, "arxiv": self.arxiv,
                "url": self.url, "cite": self.cite()}


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: str = Field(min_length=1)
    short_title: str = Field(min_length=1)
    authors: list[str] = Field(min_length=1)
    year: int | None = Field(None, ge=1900, le=2100)
    venue: str = ""
    arxiv: str = Field("", pattern=r"^$|" + _ARXIV)
    url: str = Field("", pattern=r"^$|^https?://\S+$")
    seed: str | None = Field(None, pattern=r"^\d{3}$")

    @field_validator("authors")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        if any(not a.strip() for a in v):
            raise ValueError("an author name is empty")
        return v


class _File(RootModel[dict[str, _Entry]]):
    @field_validator("root")
    @classmethod
    def _keys(cls, v: dict[str, _Entry]) -> dict[str, _Entry]:
        bad = [k for k in v if not re.match(_KEY, k)]
        if bad:
            raise ValueError(f"paper key {bad[0]!r} must be lower_snake_case (letters, digits, _)")
        seeds = [e.seed for e in v.values() if e.seed]
        dup = sorted({s for s in seeds if seeds.count(s) > 1})
        if dup:
            raise ValueError(f"seed {dup[0]!r} is given to more than one paper")
        return v


def papers_file() -> Path:
    """``suites/papers/papers.yaml`` of the source checkout (the registry ships with the code)."""
    return CHECKOUT / "suites" / "papers" / "papers.yaml"


def load_papers(path: Path | str | None = None) -> dict[str, Paper]:
    """Read and validate a registry file; any problem is one :class:`PaperError` line naming the
    file, the paper key and the field."""
    path = Path(path) if path is not None else papers_file()
    try:
        data = read_yaml(path)
    except ConfigError as exc:
        raise PaperError(str(exc)) from None
    try:
        entries = _File.model_validate(data).root
    except ValidationError as exc:
        raise PaperError(format_validation_error(path, exc)) from None
    out = {}
    for key, e in entries.items():
        url = e.url or (f"https://arxiv.org/abs/{e.arxiv}" if e.arxiv else "")
        out[key] = Paper(key=key, title=e.title, short_title=e.short_title, authors=tuple(e.authors), year=e.year,
                         venue=e.venue, arxiv=e.arxiv, url=url, seed=e.seed)
    return out


class _Papers(Mapping):
    """``PAPERS``: the registry, read from ``suites/papers/papers.yaml`` on first use (so a broken file
    is a one-line CLI error, not an import failure)."""

    @functools.cached_property
    def _data(self) -> dict[str, Paper]:
        return load_papers()

    def __getitem__(self, key: str) -> Paper:
        return self._data[key]

    def __iter__(self):
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


PAPERS: Mapping[str, Paper] = _Papers()


def get_paper(key: str) -> Paper:
    """The registered paper ``key``; an unknown key raises :class:`UnknownPaperError` listing the known ones."""
    if key not in PAPERS:
        raise UnknownPaperError(f"unknown paper {key!r}; known papers: {', '.join(sorted(PAPERS))} ({papers_file()})")
    return PAPERS[key]


def paper_for_seed(seed: str | int) -> Paper:
    """The paper behind a maintainer seed number (``"001"``, ``1``, ``"seed001"``)."""
    num = str(seed).removeprefix("seed")
    num = num.zfill(3) if num.isdigit() else num
    for p in PAPERS.values():
        if p.seed == num:
            return p
    raise UnknownPaperError(f"no paper has seed number {seed!r}; numbered: "
                            + ", ".join(f"{p.seed} ({p.key})" for p in PAPERS.values() if p.seed))


def paper_key(value: str | None) -> str | None:
    """Pydantic check of a config file's ``paper:`` field: a registry key (ValueError otherwise,
    so the file's error names the field)."""
    if value is not None and value not in PAPERS:
        raise ValueError(f"unknown paper {value!r}; known papers: {', '.join(sorted(PAPERS))}")
    return value


def legacy_seed(data):
    """Config files that still say ``seed: "001"`` (the maintainers' numbering) load as
    ``paper: <key>``."""
    if isinstance(data, dict) and "seed" in data and "paper" not in data and isinstance(data["seed"], (str, int)):
        data = dict(data)
        seed = data.pop("seed")
        try:
            data["paper"] = paper_for_seed(seed).key
        except UnknownPaperError as exc:
            raise ValueError(str(exc)) from None
    return data


def seed_of(key: str | None) -> str | None:
    """The maintainers' seed number of paper ``key`` (None for no paper or an unnumbered one)."""
    return get_paper(key).seed if key else None
