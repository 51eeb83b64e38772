"""Content checks of the committed and materialized pool files, shared by both embedded pools."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

__all__ = ["file_problems", "read_manifest_file", "sha256"]


def sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks (weights files are hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_problems(experts: Mapping[str, Mapping], folder: Path) -> list[str]:
    """One line per file of a manifest's ``experts`` (name -> {"files": {file: sha256}}) that is
    missing under ``folder/<name>/`` or whose content differs; empty when every file matches."""
    bad = []
    for name, entry in experts.items():
        for fname, sha in entry["files"].items():
            path = folder / name / fname
            if not path.is_file():
                bad.append(f"{path} is missing")
            elif (got := sha256(path)) != sha:
                bad.append(f"{path} has sha256 {got[:12]}..., the manifest says {sha[:12]}...")
    return bad


def read_manifest_file(path: Path, error: type[Exception], build_hint: str) -> dict:
    """A pool manifest's JSON; a missing or unreadable one is ``error`` naming the file and the fix."""
    if not path.is_file():
        raise error(f"{path} is missing: build the pool with `{build_hint}`")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise error(f"{path} is not valid JSON ({exc}); restore it from the repository") from None
