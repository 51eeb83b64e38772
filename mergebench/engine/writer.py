"""Atomic, streaming, sharded safetensors writer.

All output shapes and dtypes are known before merging starts, so each shard's header (with
every tensor's byte offsets) is written first and tensor bytes are then appended in order,
possibly in row chunks: the writer never holds more than the chunk it is given. Everything
goes to a temporary folder next to the destination, which is renamed into place only once
complete; on any error (a failing method, a full disk, an interrupted run) the temporary
folder is removed, so there is never partial output. Operating-system errors while writing
come out as one :class:`OutputWriteError` line naming the destination.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import MergebenchError
from ..paths import file_above
from .checkpoint import DTYPE_NAMES

__all__ = ["OutputPathError", "OutputWriteError", "ShardedWriter", "check_destination"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class OutputPathError(MergebenchError, FileExistsError):
    """The output path cannot be used: a non-empty folder (without overwrite), a file, or a
    path under a file."""


class OutputWriteError(MergebenchError, OSError):
    """Writing the output failed (disk full, permissions, I/O error); nothing was left behind."""


def check_destination(dest: Path, overwrite: bool) -> None:
    """Refuse an unusable destination (checked before merging): an existing file, a path
    under a file, or an existing non-empty folder unless ``overwrite``."""
    dest = Path(dest)
    if (parent := file_above(dest)) is not None:
        raise OutputPathError(f"output path {dest} lies under {parent}, which is a file, not a folder")
    if dest.exists() and not dest.is_dir():
        raise OutputPathError(f"output path {dest} exists and is not a folder")
    if dest.is_dir() and any(dest.iterdir()) and not overwrite:
        raise OutputPathError(f"output folder {dest} exists and is not empty; pass overwrite=True (--overwrite) to replace it")


def _write_error(dest: Path, exc: OSError) -> OutputWriteError:
    what = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        msg = f"disk full while writing {dest}: {what}; nothing was left behind (free space, or choose another --out)"
    else:
        where = f" ({exc.filename})" if exc.filename else ""
        msg = f"cannot write {dest}: {what}{where}; nothing was left behind"
    err = OutputWriteError(msg)
    err.errno = exc.errno
    return err


def _os_errors(fn):
    """Turn an ``OSError`` raised by a writer method into one :class:`OutputWriteError` line."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        try:
            return fn(self, *args, **kwargs)
        except MergebenchError:
            raise
        except OSError as exc:
            raise _write_error(self.dest, exc) from exc

    return wrapper


@dataclass(frozen=True)
class _Entry:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    shard: int
    begin: int  # offsets relative to the shard's data section
    end: int


def _header(entries: Sequence[_Entry], metadata: dict[str, str]) -> bytes:
    header: dict = {"__metadata__": metadata}
    for e in entries:
        header[e.name] = {"dtype": DTYPE_NAMES[e.dtype], "shape": list(e.shape), "data_offsets": [e.begin, e.end]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data section 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw


class ShardedWriter:
    """Write the tensors ``specs = [(name, shape, dtype), ...]`` in that order.

    Use as a context manager: ``write(name, chunk)`` appends bytes of ``name`` (a whole
    tensor or consecutive row chunks); leaving the block normally checks that every tensor
    was written completely, writes the index and renames the folder into place.
    """

    def __init__(
        self,
        dest: str | os.PathLike,
        specs: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
        *,
        max_shard_size: int = 2 * 1024**3,
        overwrite: bool = False,
        metadata: dict[str, str] | None = None,
    ):
        self.dest = Path(dest).expanduser().resolve()
        self.overwrite = overwrite
        self.metadata = {"format": "pt", **(metadata or {})}
        self.entries = self._plan(specs, max_shard_size)
        self.n_shards = max((e.shard for e in self.entries), default=0) + 1
        self.bytes_written = 0
        self.tmp: Path | None = None
        self._i = -1
        self._done = 0
        self._file = None
        self._shard = -1

    @staticmethod
    def _plan(specs, max_shard_size) -> list[_Entry]:
        entries, shard, offset = [], 0, 0
        for name, shape, dtype in specs:
            nbytes = dtype.itemsize
            for d in shape:
                nbytes *= d
            if offset and offset + nbytes > max_shard_size:
                shard, offset = shard + 1, 0
            entries.append(_Entry(name, tuple(shape), dtype, shard, offset, offset + nbytes))
            offset += nbytes
        return entries

    def shard_name(self, i: int) -> str:
        return SINGLE_FILE if self.n_shards == 1 else f"model-{i + 1:05d}-of-{self.n_shards:05d}.safetensors"

    # -- lifecycle -------------------------------------------------------------------------
    @_os_errors
    def __enter__(self) -> ShardedWriter:
        check_destination(self.dest, self.overwrite)
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.dest.name}.tmp-", dir=self.dest.parent))
        umask = os.umask(0)
        os.umask(umask)
        try:
            os.chmod(self.tmp, 0o777 & ~umask)  # mkdtemp makes it private; the output should not be
        except OSError:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._commit()
        finally:
            if self._file is not None:  # only after a failure: _commit closes it
                f, self._file = self._file, None
                try:
                    f.close()  # may raise too (ENOSPC on the final flush): the cleanup must still run
                except OSError:
                    pass
            if self.tmp is not None and self.tmp.exists():
                shutil.rmtree(self.tmp, ignore_errors=True)

    # -- tensors ---------------------------------------------------------------------------
    @_os_errors
    def write(self, name: str, chunk: torch.Tensor) -> None:
        """Append ``chunk`` (the next rows of tensor ``name``, any device) to the output."""
        while self._i < 0 or self.entries[self._i].name != name:
            self._next_entry(name)
        e = self.entries[self._i]
        if chunk.dtype != e.dtype:
            raise TypeError(f"tensor {name!r}: got dtype {chunk.dtype}, planned {e.dtype}")
        data = chunk.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy()
        if self._done + len(data) > e.end - e.begin:
            raise ValueError(f"tensor {name!r}: more bytes written than its planned shape {e.shape} holds")
        self._file.write(data)
        self._done += len(data)
        self.bytes_written += len(data)

    def _next_entry(self, wanted: str | None) -> None:
        if self._i >= 0:
            self._check_complete(f"; got {wanted!r} instead" if wanted else "")
        self._i += 1
        self._done = 0
        if self._i >= len(self.entries):
            raise ValueError(f"tensor {wanted!r} is not planned next (or written twice)")
        e = self.entries[self._i]
        if e.shard != self._shard:
            self._open_shard(e.shard)

    def _open_shard(self, shard: int) -> None:
        if self._file is not None:
            self._file.close()
        self._shard = shard
        self._file = open(self.tmp / self.shard_name(shard), "wb")
        self._file.write(_header([e for e in self.entries if e.shard == shard], self.metadata))

    # -- other files -------------------------------------------------------------------------
    @_os_errors
    def write_file(self, relname: str, data: bytes | str) -> None:
        path = self.tmp / relname
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)

    @_os_errors
    def copy_file(self, src: Path, relname: str | None = None) -> None:
        shutil.copyfile(src, self.tmp / (relname or src.name))

    # -- commit ------------------------------------------------------------------------------
    @_os_errors
    def _commit(self) -> None:
        while self._i < len(self.entries) - 1:
            self._next_entry(None)
        if self._i >= 0:
            self._check_complete()
        if self._file is None:  # no tensors at all: still a valid (empty) safetensors file
            self._file = open(self.tmp / SINGLE_FILE, "wb")
            self._file.write(_header([], self.metadata))
        f, self._file = self._file, None
        f.close()
        if self.n_shards > 1:
            index = {
                "metadata": {"total_size": sum(e.end - e.begin for e in self.entries)},
                "weight_map": {e.name: self.shard_name(e.shard) for e in self.entries},
            }
            self.write_file(INDEX_FILE, json.dumps(index, indent=2))
        check_destination(self.dest, self.overwrite)
        if self.dest.is_dir() and any(self.dest.iterdir()):
            trash = self.dest.parent / f".{self.dest.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.dest, trash)
            try:
                os.replace(self.tmp, self.dest)
            except OSError:
                os.replace(trash, self.dest)  # put the old output back before reporting
                raise
            shutil.rmtree(trash, ignore_errors=True)
        else:
            if self.dest.is_dir():
                self.dest.rmdir()
            os.replace(self.tmp, self.dest)

    def _check_complete(self, why: str = "") -> None:
        e = self.entries[self._i]
        if self._done != e.end - e.begin:
            raise ValueError(f"tensor {e.name!r} was not written completely ({self._done} of {e.end - e.begin} bytes){why}")
