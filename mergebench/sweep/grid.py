"""Hyperparameter grids: ``--grid key=v1,v2,...`` -> one list of parameter points per method.

A grid key applies only to the methods that have a parameter of that name (``lambda`` sweeps
task arithmetic and TIES but leaves linear averaging alone); a key that fits none of the swept
methods is an error, because a typo would otherwise silently sweep nothing. Values stay strings
here: each method's :class:`~mergebench.methods.Param` converts and range-checks them (see
:mod:`mergebench.sweep.plan`, which validates every point before any work).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

from ..methods import MethodSpec, ParameterError
from mergebench.config.sampling import seeded_permutation

__all__ = ["Grid", "Point", "expand_grid", "parse_grid", "split_values", "trial_points"]

Grid = dict[str, list[str]]
"""Parameter name -> the values to try, in the order given."""
Point = dict[str, str]
"""One setting of a method's swept parameters (name -> value as given)."""


def split_values(text: str) -> list[str]:
    """Split ``v1,v2,...`` on commas outside brackets, so a list-valued parameter can be swept:
    ``t_attention=[0,0.5,1],[1,0.5,0]`` gives two values."""
    out, depth, cur = [], 0, []
    for ch in text:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur).strip())
    return out


def parse_grid(items: Sequence[str] | None) -> Grid:
    """``["lambda=0.5,1.0", "density=0.2,0.5"]`` -> ``{"lambda": ["0.5", "1.0"], ...}``.

    Raises :class:`ParameterError` for a malformed item, an empty value or a key given twice.
    """
    grid: Grid = {}
    for item in items or []:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ParameterError(f"--grid expects key=v1,v2,..., got {item!r}")
        if key.isupper():
            raise ParameterError(f"--grid {key}: UPPER_CASE keys are pool placeholders; give them with --set")
        if key in grid:
            raise ParameterError(f"--grid key {key!r} is given twice; list all its values in one --grid")
        vals = split_values(values)
        if not all(vals):
            raise ParameterError(f"--grid {key}: empty value in {values!r}")
        if len(set(vals)) != len(vals):
            raise ParameterError(f"--grid {key}: a value is listed twice in {values!r}")
        grid[key] = vals
    return grid


def expand_grid(specs: Sequence[MethodSpec], grid: Mapping[str, Sequence[str]]) -> dict[str, list[Point]]:
    """Per method, the cross product of the grid keys it has (keys and values in the order given).

    A method that has none of the keys gets one point, ``{}`` (its suite/default settings).
    Raises :class:`ParameterError` naming every key that is a parameter of none of the methods.
    """
    unused = [k for k in grid if not any(k in s.param_names for s in specs)]
    if unused:
        have = "; ".join(f"{s.name}: {', '.join(s.param_names) or '(no parameters)'}" for s in specs)
        raise ParameterError(
            f"--grid key(s) {', '.join(map(repr, unused))} fit none of the methods "
            f"{', '.join(s.name for s in specs)} (a grid key applies only to methods that have that parameter; "
            f"their parameters: {have})"
        )
    out: dict[str, list[Point]] = {}
    for spec in specs:
        keys = [k for k in grid if k in spec.param_names]
        out[spec.name] = [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]
    return out


def trial_points(points: Sequence[Point], trials: int, *, method: str, seed: int = 0) -> list[Point]:
    """The points tuning evaluates under a budget of ``trials``: all of them when the grid is not
    larger, else a seeded random subset (the same on every machine and every run), kept in grid order."""
    if trials < 1:
        raise ParameterError(f"--trials must be >= 1, got {trials}")
    if len(points) <= trials:
        return list(points)
    chosen = sorted(seeded_permutation(len(points), "tune", method, seed)[:trials])
    return [points[i] for i in chosen]
