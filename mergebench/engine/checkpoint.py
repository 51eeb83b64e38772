"""Open model checkpoints by their headers and read single tensors (or row ranges) on demand.

Opening a checkpoint reads ``config.json`` and the safetensors headers only, so every check
can run before any weight is touched. A tensor is then read with a positional ``readinto`` of
exactly its byte range into a fresh buffer: nothing maps whole files, so the process holds
only the tensors being merged (page cache is the kernel's, not our resident memory), and peak
memory does not grow with model size.

Pickle checkpoints (``pytorch_model*.bin``) can run code when loaded; they are refused unless
``allow_pickle=True``, and then loaded with ``torch.load(weights_only=True, mmap=True)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import MergebenchError

__all__ = ["Checkpoint", "CheckpointError", "TensorInfo", "open_checkpoint", "resolve_model_path"]

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}

_HUB_ID = re.compile(r"^[\w.\-]+/[\w.\-]+(@[\w.\-/]+)?$")
_MAX_HEADER = 100 * 1024**2
_FINGERPRINT_BLOCKS = 16
_FINGERPRINT_BLOCK = 4096


class CheckpointError(MergebenchError, ValueError):
    """A checkpoint cannot be found, is not in a supported format, or is malformed."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file and absolute byte range (``start``/``end`` are None for pickle)."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int | None = None
    end: int | None = None

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n

    @property
    def rows(self) -> int:
        """Length of the first dimension (1 for a scalar): the unit of partial reads."""
        return self.shape[0] if self.shape else 1


def resolve_model_path(spec: str | os.PathLike) -> Path:
    """A local folder/file, or a hub id (``org/name[@revision]``) found in the local HF cache.

    mergebench never downloads: a hub id missing from the cache is an error that says so.
    """
    path = Path(spec).expanduser()
    if path.exists():
        return path.resolve()
    text = str(spec)
    if not _HUB_ID.match(text) or text.startswith((".", "/", "~")):
        raise CheckpointError(f"model path {text!r} does not exist")
    repo_id, _, revision = text.partition("@")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision or None, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError) as exc:
        raise CheckpointError(
            f"{text!r} is not a local folder and is not in the local Hugging Face cache "
            f"({constants.HF_HUB_CACHE}); mergebench reads the cache only and never downloads: "
            f"fetch it first (e.g. `hf download {repo_id}`) or pass a folder path"
        ) from exc


def _read_header(path: Path) -> tuple[bytes, dict]:
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) != 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        n = int.from_bytes(raw_len, "little")
        size = os.fstat(f.fileno()).st_size
        if n > min(_MAX_HEADER, size - 8):
            raise CheckpointError(f"{path}: not a safetensors file (header length {n} is invalid)")
        raw = f.read(n)
    try:
        return raw, json.loads(raw)
    except ValueError as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from None


def _short(text: str, width: int = 160) -> str:
    return text if len(text) <= width else text[: width - 1].rstrip() + "…"


def _read_json(path: Path, what: str) -> dict:
    """A JSON object from ``path``; a malformed file is a one-line CheckpointError naming it."""
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt {what} ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: corrupt {what} (expected a JSON object, got {type(data).__name__})")
    return data


def _sampled_blocks(f, start: int, end: int) -> bytes:
    """A few evenly spaced 4 KiB blocks of [start, end): enough to tell fine-tunes apart, cheap."""
    span = end - start
    if span <= _FINGERPRINT_BLOCKS * _FINGERPRINT_BLOCK:
        f.seek(start)
        return f.read(span)
    step = (span - _FINGERPRINT_BLOCK) // (_FINGERPRINT_BLOCKS - 1)
    out = bytearray()
    for i in range(_FINGERPRINT_BLOCKS):
        f.seek(start + i * step)
        out += f.read(_FINGERPRINT_BLOCK)
    return bytes(out)


class Checkpoint:
    """One model opened by its headers. ``label`` names it in messages (e.g. ``expert 1``).

    ``read`` returns a fresh tensor (owned by the caller) with the checkpoint's dtype.
    ``bytes_read`` counts the weight bytes read so far (for throughput reporting).
    """

    def __init__(self, label: str, source: str, path: Path, config: dict | None, tensors: dict[str, TensorInfo], fingerprint: str):
        self.label = label
        self.source = source
        self.path = path
        self.config = config
        self.tensors = tensors
        self.fingerprint = fingerprint
        self.bytes_read = 0
        self._handles: dict[Path, object] = {}

    def __repr__(self) -> str:
        return f"Checkpoint({self.label}: {self.path}, {len(self.tensors)} tensors)"

    def describe(self, name: str | None = None) -> str:
        """``expert 1 (/path/model-00002-of-00003.safetensors)``: the file holding ``name``."""
        where = self.tensors[name].file if name is not None and name in self.tensors else self.path
        return f"{self.label} ({where})"

    @property
    def is_folder(self) -> bool:
        return self.path.is_dir()

    def main_dtype(self) -> torch.dtype | None:
        """The floating dtype holding the most bytes (the checkpoint's storage precision)."""
        sizes: dict[torch.dtype, int] = {}
        for t in self.tensors.values():
            if t.dtype.is_floating_point:
                sizes[t.dtype] = sizes.get(t.dtype, 0) + t.nbytes
        return max(sizes, key=sizes.get) if sizes else None

    def read(self, name: str, row_start: int = 0, row_stop: int | None = None) -> torch.Tensor:
        """Rows ``[row_start, row_stop)`` of tensor ``name`` (the whole tensor by default)."""
        info = self.tensors[name]
        row_stop = info.rows if row_stop is None else row_stop
        if not info.shape:
            shape: tuple[int, ...] = ()
        else:
            shape = (row_stop - row_start, *info.shape[1:])
        out = torch.empty(shape, dtype=info.dtype)
        self.read_into(name, out, row_start)
        return out

    def read_into(self, name: str, out: torch.Tensor, row_start: int = 0) -> None:
        """Fill ``out`` (contiguous, this tensor's dtype) with rows starting at ``row_start``."""
        info = self.tensors[name]
        nbytes = out.numel() * out.element_size()
        if nbytes == 0:
            return
        row_bytes = info.nbytes // info.rows if info.rows else 0
        offset = info.start + row_start * row_bytes
        if offset + nbytes > info.end:
            raise CheckpointError(f"{self.describe(name)}: read of {name!r} past the tensor's end")
        view = memoryview(out.view(-1).view(torch.uint8).numpy())
        try:
            f = self._handle(info.file)
            f.seek(offset)
            done = 0
            while done < nbytes:
                got = f.readinto(view[done:])
                if not got:
                    raise CheckpointError(f"{self.describe(name)}: file ends inside tensor {name!r}")
                done += got
        except OSError as exc:
            raise CheckpointError(f"{self.describe(name)}: cannot read tensor {name!r}: {exc.strerror or exc}") from None
        self.bytes_read += nbytes

    def _handle(self, file: Path):
        f = self._handles.get(file)
        if f is None:
            f = self._handles[file] = open(file, "rb", buffering=0)
        return f

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()


class PickleCheckpoint(Checkpoint):
    """A ``pytorch_model*.bin`` checkpoint, loaded (memory-mapped where possible) with weights_only."""

    def __init__(self, *args, state: dict[str, torch.Tensor]):
        super().__init__(*args)
        self._state = state

    def read(self, name: str, row_start: int = 0, row_stop: int | None = None) -> torch.Tensor:
        t = self._state[name]
        part = t[row_start:row_stop] if t.ndim else t
        self.bytes_read += part.numel() * part.element_size()
        return part.clone()

    def read_into(self, name: str, out: torch.Tensor, row_start: int = 0) -> None:
        t = self._state[name]
        out.copy_(t[row_start : row_start + len(out)] if t.ndim else t)
        self.bytes_read += out.numel() * out.element_size()

    def close(self) -> None:
        self._state = {}


def _weight_files(folder: Path) -> tuple[str, list[Path], dict[str, str] | None]:
    """(kind, files, weight_map) for an HF folder; kind is 'safetensors' or 'pickle'."""
    for kind, single, index in (
        ("safetensors", "model.safetensors", "model.safetensors.index.json"),
        ("pickle", "pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
        if (folder / index).is_file():
            weight_map = _read_json(folder / index, "shard index").get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{folder / index}: corrupt shard index (no 'weight_map' mapping)")
            files = sorted({folder / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{folder / index} names shard(s) that do not exist: {', '.join(missing[:5])}")
            return kind, files, weight_map
        if (folder / single).is_file():
            return kind, [folder / single], None
    loose = sorted(folder.glob("*.safetensors"))
    if loose:
        return "safetensors", loose, None
    raise CheckpointError(
        f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin found"
    )


def open_checkpoint(spec: str | os.PathLike, label: str, *, allow_pickle: bool = False) -> Checkpoint:
    """Resolve ``spec`` and read its config and tensor headers (no weights).

    Every failure (missing, unreadable, malformed) is a one-line :class:`CheckpointError`
    naming ``label`` and the file."""
    try:
        return _open_checkpoint(spec, label, allow_pickle)
    except OSError as exc:  # permissions, I/O errors, a folder where a file should be, ...
        where = exc.filename or spec
        raise CheckpointError(f"{label}: cannot read {where}: {exc.strerror or exc}") from None


def _open_checkpoint(spec: str | os.PathLike, label: str, allow_pickle: bool) -> Checkpoint:
    path = resolve_model_path(spec)
    config = None
    if path.is_dir():
        kind, files, weight_map = _weight_files(path)
        if (path / "config.json").is_file():
            config = _read_json(path / "config.json", "config.json")
    elif path.suffix == ".safetensors":
        kind, files, weight_map = "safetensors", [path], None
    elif path.suffix in (".bin", ".pt", ".pth"):
        kind, files, weight_map = "pickle", [path], None
    else:
        raise CheckpointError(f"{label}: {path} is neither a model folder nor a .safetensors file")

    digest = hashlib.sha256()
    if config is not None:
        digest.update(json.dumps(config, sort_keys=True).encode())
    if kind == "pickle":
        if not allow_pickle:
            raise CheckpointError(
                f"{label}: {path} holds pickle checkpoints ({', '.join(f.name for f in files[:3])}); loading pickle "
                "can execute arbitrary code, so mergebench refuses it. Convert it to safetensors, or pass "
                "allow_pickle=True (--allow-pickle) to load it with torch.load(weights_only=True)"
            )
        return _open_pickle(label, str(spec), path, config, files, digest)

    tensors: dict[str, TensorInfo] = {}
    for file in files:
        raw, header = _read_header(file)
        data_start = 8 + len(raw)
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}:".encode() + raw)
        with open(file, "rb") as f:
            digest.update(_sampled_blocks(f, data_start, size))
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            if weight_map is not None and weight_map.get(name) != file.name:
                continue  # a tensor listed under another shard in the index is not ours here
            if name in tensors:
                raise CheckpointError(f"{label}: tensor {name!r} appears in both {tensors[name].file} and {file}")
            try:
                dtype = SAFETENSORS_DTYPES[meta["dtype"]]
            except KeyError:
                raise CheckpointError(f"{label}: {file}: tensor {name!r} has unsupported dtype {meta['dtype']!r}") from None
            begin, end = meta["data_offsets"]
            info = TensorInfo(name, file, dtype, tuple(meta["shape"]), data_start + begin, data_start + end)
            if info.end > size:
                raise CheckpointError(
                    f"{label}: {file}: tensor {name!r} ends at byte {info.end}, past the end of the file "
                    f"({size} bytes): the file is truncated"
                )
            if info.end - info.start != info.nbytes:
                raise CheckpointError(f"{label}: {file}: tensor {name!r} has inconsistent data_offsets")
            tensors[name] = info
    if weight_map is not None:
        lost = sorted(set(weight_map) - set(tensors))
        if lost:
            raise CheckpointError(f"{label}: the index of {path} lists tensors absent from their shard: {', '.join(lost[:5])}")
    return Checkpoint(label, str(spec), path, config, tensors, digest.hexdigest())


def _open_pickle(label, source, path, config, files, digest) -> PickleCheckpoint:
    state: dict[str, torch.Tensor] = {}
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        try:
            try:
                part = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
                part = torch.load(file, map_location="cpu", weights_only=True)
        except OSError:
            raise
        except Exception as exc:  # corrupt or truncated archives, refused pickled objects
            why = _short((str(exc).splitlines() or [type(exc).__name__])[0])
            raise CheckpointError(f"{label}: {file}: cannot load this pickle checkpoint ({why})") from None
        if not isinstance(part, dict):
            raise CheckpointError(f"{label}: {file}: a pickle checkpoint must hold a state dict, got {type(part).__name__}")
        size = file.stat().st_size
        with open(file, "rb") as f:
            digest.update(f"{file.name}:{size}:".encode() + _sampled_blocks(f, 0, size))
        for name, t in part.items():
            if not isinstance(t, torch.Tensor):
                continue
            state[name] = t
            tensors[name] = TensorInfo(name, file, t.dtype, tuple(t.shape))
    return PickleCheckpoint(label, source, path, config, tensors, digest.hexdigest(), state=state)
