"""The command group itself: the Typer app, the one place errors become one line, the consoles, and
the small parsing helpers every command group shares."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from mergebench.errors import MergebenchError

DEBUG_ENV = "MERGEBENCH_DEBUG"
USER_INPUT_MODELS = ("MergeRequest",)  # pydantic models built from command-line flags


def user_error_message(exc: BaseException) -> str | None:
    """The one-line report of an error the user caused, or None for a bug."""
    from pydantic import ValidationError

    if isinstance(exc, MergebenchError):
        msg = exc.args[0] if isinstance(exc, KeyError) and len(exc.args) == 1 else str(exc)
    elif isinstance(exc, ValidationError) and exc.title in USER_INPUT_MODELS:
        from mergebench.config.pools import validation_summary

        msg = validation_summary(exc)
    else:
        return None
    notes = getattr(exc, "__notes__", None)  # e.g. which tensor a merge was on
    return (str(msg) or type(exc).__name__) + (f" ({'; '.join(notes)})" if notes else "")


class Commands(TyperGroup):
    """The command group: a :class:`MergebenchError` raised by any command (zoo's too) is printed
    as ``error: ...`` and exits with code 2 (or the error's ``exit_code``); any other exception is
    a bug and surfaces with its traceback. ``mergebench --debug`` (or MERGEBENCH_DEBUG=1) shows
    the traceback of a MergebenchError too."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except Exception as exc:
            msg = user_error_message(exc)
            if msg is None or ctx.params.get("debug") or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
                raise
            console.print(f"[bold red]error:[/] {escape(msg)}", highlight=False, soft_wrap=True)
            raise typer.Exit(getattr(exc, "exit_code", 2)) from None


app = typer.Typer(
    cls=Commands,
    add_completion=False,
    no_args_is_help=True,
    help="mergebench: merge LLM weights with pluggable methods and score them on standard suites.",
    pretty_exceptions_enable=False,
)


# In a terminal rich uses its width; into a log or CI (no terminal: rich would assume 80 columns and
# fold every table and progress line) 120 columns, unless $COLUMNS says otherwise.
LOG_WIDTH = None if os.environ.get("COLUMNS") else 120


console = Console(stderr=True, width=None if sys.stderr.isatty() else LOG_WIDTH)


out = Console(width=None if sys.stdout.isatty() else LOG_WIDTH)


@app.callback()
def _offline(
    debug: Annotated[bool, typer.Option("--debug", help=f"show the traceback of every error (or set {DEBUG_ENV}=1)")] = False,
) -> None:
    """mergebench never downloads: hub models and datasets come from the local caches only, and
    a cache miss fails at once instead of retrying against an unreachable hub. (``--debug`` is
    read by the command group, :class:`Commands`.)"""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


class UsageError(MergebenchError):
    """A user mistake on the command line, reported as one line (exit code 2 unless given)."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def fail(msg: str, code: int = 2) -> NoReturn:
    raise UsageError(msg, code)


def parse_sets(items: list[str] | None) -> dict[str, str]:
    """``["k=v", ...]`` -> dict; values stay strings (the method's Param coerces them)."""
    params: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set expects key=value, got {item!r}")
        params[key.strip()] = value.strip()
    return params


def split_list(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def check_output(option: str, path: Path | None, *, folder: bool = False) -> None:
    """``option``'s ``path`` can be written as a file (or, with ``folder``, a folder): it is not the
    other kind of thing and lies under no file (it need not exist yet); else a one-line error."""
    if path is None:
        return
    if path.exists() and path.is_dir() != folder:
        fail(f"{option} {path} is a {'file' if folder else 'folder'}, not a {'folder' if folder else 'file'}")
    from mergebench.paths import file_above

    if (anc := file_above(path)) is not None:
        fail(f"{option} {path} lies under {anc}, which is a file, not a folder")


def shorten(text: str, width: int = 70) -> str:
    return text if len(text) <= width else text[: width - 1].rstrip() + "…"


def checked_device(device: str) -> str:
    """``--device`` as torch spells it, if this machine has it (else a one-line DeviceError)."""
    from mergebench.engine import resolve_device

    return str(resolve_device(device))


def print_warning(message: str) -> None:
    """One ``warning: ...`` line on stderr (store warnings name the file they are about)."""
    console.print(f"warning: {message}", highlight=False, markup=False, soft_wrap=True)


def main() -> None:  # pragma: no cover - console entry (the same as the `mergebench` script, `app`)
    app()
