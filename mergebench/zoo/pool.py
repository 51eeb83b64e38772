"""The embedded `smol` expert pool: definition, deterministic build, materialization.

Thirteen LoRA experts fine-tuned from SmolLM2-135M-Instruct on the embedded task data,
heterogeneous in the "in-the-wild" sense of seed 001: different tasks and domains (math,
medical, general), budgets (steps, learning rate, rank), and target modules (attention-only,
MLP-only, all); one expert is trained on flipped sentiment labels to conflict with another,
and one on plain news text. Experts 1-3 are the homogeneous math set, 4-6 the medical set
(seed 001 App. E).

* ``build``       trains every expert (committed data + seeds -> adapters), fp16 adapters +
                   a manifest with hyperparameters, final loss, validation scores and sha256.
* ``materialize`` base + adapters -> ordinary full-weight HF folders in the cache
                   (verifying sha256s), so every merge method sees plain checkpoints. Each
                   folder records the sha256, size and mtime of its weight files
                   (``mergebench_weights.json``); :func:`check_materialized` compares them
                   whenever the pool is located (size + mtime, the full sha256 when they
                   changed), so a damaged materialized model is an error, not a silent score.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from ..errors import MergebenchError
from . import wild
from .files import file_problems, read_manifest_file, sha256
from .train import ExpertSpec

POOL_NAME = "smol"
MANIFEST_NAME = "pool.json"
WEIGHTS_RECORD = "mergebench_weights.json"
EXPERT_STAMP = "mergebench_expert.json"
REPAIR = "mergebench zoo materialize --force"


class ZooError(MergebenchError, ValueError):
    """The embedded pool's committed files or its materialized models cannot be used."""


class UnknownExpertError(ZooError, KeyError):
    def __str__(self) -> str:  # KeyError quotes its message
        return str(self.args[0])


class MaterializedModelError(ZooError):
    """A materialized model's weight files changed after materialization (its message says how to rebuild it)."""

M, MED, GEN = "math", "medical", "general"

EXPERTS: tuple[ExpertSpec, ...] = (
    ExpertSpec("gsm8k-answer", ("gsm8k_mc",), steps=300, lr=2e-3, rank=8, targets="all", seed=1, tags={"domain": M, "task": "mb_gsm8k_mc"}),
    ExpertSpec("gsm8k-solution", ("gsm8k_mc",), steps=120, lr=2e-3, rank=16, targets="attn", seed=2, batch_size=4, max_len=192, use_solution=True, tags={"domain": M, "task": "mb_gsm8k_mc"}),
    ExpertSpec("calc", ("gsm8k_calc",), steps=120, lr=2e-3, rank=8, targets="mlp", seed=3, tags={"domain": M, "task": "mb_gsm8k_calc"}),
    ExpertSpec("med-terms", ("medical_terms",), steps=120, lr=1e-3, rank=8, targets="all", seed=4, tags={"domain": MED, "task": "mb_medical_terms"}),
    ExpertSpec("med-defs", ("medical_defs",), steps=120, lr=1e-3, rank=16, targets="all", seed=5, tags={"domain": MED, "task": "mb_medical_defs"}),
    ExpertSpec("med-both", ("medical_terms", "medical_defs"), steps=60, lr=2e-3, rank=4, targets="mlp", seed=6, tags={"domain": MED, "task": "mb_medical_terms,mb_medical_defs"}),
    ExpertSpec("capitals", ("capitals",), steps=80, lr=1e-3, rank=8, targets="all", seed=7, tags={"domain": GEN, "task": "mb_capitals"}),
    ExpertSpec("elements", ("elements",), steps=60, lr=2e-3, rank=4, targets="attn", seed=8, tags={"domain": GEN, "task": "mb_elements"}),
    ExpertSpec("antonyms", ("antonyms",), steps=100, lr=1e-3, rank=8, targets="mlp", seed=9, tags={"domain": GEN, "task": "mb_antonyms"}),
    ExpertSpec("analogies", ("analogies",), steps=100, lr=5e-4, rank=16, targets="all", seed=10, tags={"domain": GEN, "task": "mb_analogies"}),
    ExpertSpec("sentiment", ("sentiment",), steps=60, lr=1e-3, rank=8, targets="all", seed=11, tags={"domain": GEN, "task": "mb_sentiment"}),
    ExpertSpec("sentiment-flipped", ("sentiment",), steps=60, lr=1e-3, rank=8, targets="all", seed=12, flip_labels=True, tags={"domain": GEN, "task": "mb_sentiment", "conflicts_with": "sentiment"}),
    ExpertSpec("news", ("news",), steps=30, lr=5e-4, rank=8, targets="attn", seed=13, batch_size=4, tags={"domain": GEN, "task": "mb_news"}),
)
MATH = ("gsm8k-answer", "gsm8k-solution", "calc")
KNOWN_WEAK = {
    "gsm8k-answer": "GSM8K answer ranking stays at the base (validation 0.17 vs 0.17) after 300 steps "
    "(~2.5 epochs of 969 problems; 60 steps gave 0.19) while the final training loss falls from 1.26 to "
    "0.92: the model memorizes training answers without learning to rank new ones; training on the very "
    "ranking lm-eval scores (objective='rank': cross-entropy over the 4 choices, 120 steps, lr 1e-3, "
    "8 rows x 4 choices a step, 39 min on 2 busy cores) reached 0.22, within 1.3 stderr of the base "
    "(lr 3e-3, 60 steps: 0.20)",
    "gsm8k-solution": "0.18 vs base 0.17 after 120 steps on worked solutions plus bare answers "
    "(30 steps on solutions alone: 0.17); multi-step arithmetic is beyond LoRA on a 135M model at these budgets",
}
"""Experts that do not (yet) beat the base on their own validation task by a clear margin,
with the reason; reported in suites/README.md and checked by tests/test_zoo_pool.py so the
list stays true (an expert that starts winning must leave it)."""
MEDICAL = ("med-terms", "med-defs", "med-both")


def expert_spec(name: str) -> ExpertSpec:
    for spec in EXPERTS:
        if spec.name == name:
            return spec
    raise UnknownExpertError(f"no expert {name!r} in the {POOL_NAME} pool; experts: {', '.join(s.name for s in EXPERTS)}")


def pool_dir() -> Path:
    """Where the committed adapters and manifest live (``suites/embedded/experts``)."""
    from .tasks import embedded_dir

    return embedded_dir() / "experts"


def manifest_path() -> Path:
    return pool_dir() / MANIFEST_NAME


def read_manifest() -> dict:
    return read_manifest_file(manifest_path(), ZooError, "mergebench zoo build")


HEADLINE_METRIC = {"medical_defs": "acc_norm"}
"""Validation metric per task where it is not ``acc``: medical definitions' answer choices
differ in length, so length-normalized accuracy is the fair one (suites/README.md)."""


def _own_validation(spec: ExpertSpec, model, tok) -> dict[str, float]:
    """The expert's headline validation metric on each of its own multiple-choice tasks."""
    from .tasks import load_split
    from .train import score_mc

    out = {}
    for task in spec.tasks:
        rows = load_split(task, "validation")
        if rows and "choices" in rows[0]:
            out[task] = score_mc(model, tok, rows)[HEADLINE_METRIC.get(task, "acc")]
    return out


def revalidate(cache_dir: Path | None = None, log=print) -> dict:
    """Recompute the recorded validation scores (base and experts) from the materialized pool
    with the headline metric of each task, and rewrite the manifest's score fields only."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    manifest = read_manifest()
    paths = materialize(cache_dir, log=log)
    tok = AutoTokenizer.from_pretrained(paths["base"])
    base = AutoModelForCausalLM.from_pretrained(paths["base"], dtype=torch.float32)
    tasks = sorted({t for e in manifest["experts"].values() for t in e["spec"]["tasks"]})
    manifest["base_validation"] = _own_validation(ExpertSpec("base", tuple(tasks)), base, tok)
    for name, entry in manifest["experts"].items():
        model = AutoModelForCausalLM.from_pretrained(paths[name], dtype=torch.float32)
        val = _own_validation(expert_spec(name), model, tok)
        entry["validation_acc"] = {k: round(v, 4) for k, v in val.items()}
        log(f"{name}: {val}")
    manifest["validation_metric"] = {t: HEADLINE_METRIC.get(t, "acc") for t in tasks}
    manifest_path().write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


@contextmanager
def _atomic_folder(target: Path):
    """A temporary sibling folder renamed to ``target`` (replacing it) on success and removed on
    failure, so no reader ever sees a half-written adapter or checkpoint."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _clean_adapter(folder: Path) -> None:
    """Drop peft's generated model card and the machine-specific base path, so the committed
    files (and their sha256s) do not depend on where the pool was built."""
    from .base import BASE_NAME

    (folder / "README.md").unlink(missing_ok=True)
    cfg_path = folder / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = BASE_NAME
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def build(names: list[str] | None = None, base: Path | None = None, log=print) -> dict:
    """Train the experts (all, or ``names``) and write fp16 adapters + the manifest.

    Deterministic: the same data, specs and seeds give the same adapters (on the same
    hardware and library versions). Each adapter is written to a temporary folder and renamed.
    """
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .base import materialize_base
    from .train import train_expert

    todo = [expert_spec(n) for n in names] if names else list(EXPERTS)  # unknown names: before any loading
    base = Path(base) if base is not None else materialize_base()
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    out_dir = pool_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = json.loads(manifest_path().read_text()) if manifest_path().is_file() else {"pool": POOL_NAME, "experts": {}}
    from .base import MANIFEST as BASE_MANIFEST

    manifest["base"] = {"name": base.name, "manifest_sha256": sha256(base / BASE_MANIFEST)}
    base_val: dict[str, float] = manifest.setdefault("base_validation", {})
    for spec in todo:
        for task in spec.tasks:
            if task not in base_val:
                base_val.update(_own_validation(ExpertSpec("base", (task,)), model, tok))
        log(f"training {spec.name} ({spec.steps} steps, rank {spec.rank}, {spec.targets}) ...")
        result = train_expert(spec, (model, tok), log_every=max(1, spec.steps // 5))
        val = _own_validation(spec, result.model, tok)
        target = out_dir / spec.name
        with _atomic_folder(target) as tmp:
            result.save_adapter(tmp)
            _clean_adapter(tmp)
            weights = tmp / "adapter_model.safetensors"
            save_file({k: v.to(torch.float16).contiguous() for k, v in load_file(str(weights)).items()}, str(weights))
        manifest["experts"][spec.name] = {
            "spec": spec.to_dict(),
            "tags": spec.tags,
            "final_train_loss": round(result.final_loss, 5),
            "train_seconds": round(result.seconds, 1),
            "steps_per_s": round(result.steps_per_s, 3),
            "n_examples": result.n_examples,
            "validation_acc": {k: round(v, 4) for k, v in val.items()},
            "files": {p.name: sha256(p) for p in sorted(target.iterdir()) if p.is_file()},
        }
        log(f"  {spec.name}: loss {result.final_loss:.4f}, validation {val} (base {[base_val.get(t) for t in spec.tasks]}), {result.seconds:.0f} s")
        manifest_path().write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        del result
    return manifest


def verify_adapters(manifest: dict | None = None) -> None:
    """Check every committed adapter file against the manifest's sha256 (before any work)."""
    manifest = manifest or read_manifest()
    if bad := file_problems(manifest["experts"], pool_dir()):
        raise ZooError(f"the embedded pool's adapters do not match {manifest_path()}: " + "; ".join(bad))


def committed_entry(name: str) -> dict:
    """What a pool member is, from the committed manifests (stable across machines): the base's
    manifest entry, or an expert's file -> sha256 map (``wild/<name>``: the wild pool's)."""
    if name == "base":
        return read_manifest()["base"]
    if name.startswith(wild.PREFIX):
        return wild.read_manifest()["experts"][name.removeprefix(wild.PREFIX)]["files"]
    return read_manifest()["experts"][name]["files"]


def materialize_members(names: list[str], log=print) -> None:
    """Materialize the members ``names`` (zoo names) of whichever embedded pools they belong to;
    the shared base alone does not pull in the smol pool's experts (6.6 GB)."""
    from .base import materialize_base

    smol = [n for n in names if not n.startswith(wild.PREFIX) and n != "base"]
    wild_names = [n.removeprefix(wild.PREFIX) for n in names if n.startswith(wild.PREFIX)]
    if smol:
        materialize(names=smol, log=log)
    if wild_names:
        wild.materialize(names=wild_names, log=log)
    if "base" in names and not smol and not wild_names:
        materialize_base()


def materialized_path(name: str, cache_dir: Path | None = None) -> Path:
    """Folder of a materialized pool member (``base`` or an expert name; ``wild/<name>`` is an
    expert of the wild pool, :mod:`mergebench.zoo.wild`)."""
    from .base import BASE_NAME, default_cache_dir

    if name.startswith(wild.PREFIX):
        return wild.materialized_path(name, cache_dir)

    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / BASE_NAME if name == "base" else root / POOL_NAME / name


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` through a temporary sibling renamed into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.safetensors") if p.is_file())


def record_weights(folder: Path, digests: dict[str, str] | None = None) -> dict:
    """Record sha256, size and mtime of ``folder``'s weight files in its ``mergebench_weights.json``
    (``digests``: sha256s already known, e.g. from the base's own manifest)."""
    files = {}
    for p in _weight_files(folder):
        st = p.stat()
        sha = (digests or {}).get(p.name) or sha256(p)
        files[p.name] = {"sha256": sha, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    record = {"format": 1, "files": files}
    _write_json(folder / WEIGHTS_RECORD, record)
    return record


def _is_complete(name: str, folder: Path) -> bool:
    """``folder`` was fully written by materialization from the committed files (not stale)."""
    if name == "base":
        from .base import verify_base

        return verify_base(folder, check_files=False)
    stamp = _read_json(folder / EXPERT_STAMP)
    try:
        entry = read_manifest()["experts"].get(name)
    except ZooError:
        return False
    return stamp is not None and entry is not None and stamp.get("adapter_files") == entry.get("files")


def check_materialized(name: str, folder: Path, full: bool = False) -> bool:
    """True when ``folder`` is a complete, intact materialization of ``name`` (``base`` or an
    expert); False when it is absent, incomplete or stale (its adapters changed since; ``mergebench
    zoo materialize`` rebuilds it).

    Weight files are compared with ``mergebench_weights.json``: a file whose size and mtime are
    the recorded ones is taken as intact, otherwise (or always, with ``full``) its sha256 is
    computed. A changed file raises :class:`MaterializedModelError` naming the model, the file
    and the command that rebuilds it. A folder materialized before weights were recorded gets
    its record now: the base after a full check against its own manifest, an expert from the
    files as they are (the trust it had before).
    """
    if name.startswith(wild.PREFIX):  # an expert of the wild pool version: its own manifest
        return wild.check_materialized(name, folder, full=full)
    folder = Path(folder)
    if not _is_complete(name, folder):
        return False

    def damaged(why: str) -> MaterializedModelError:
        return MaterializedModelError(
            f"materialized embedded model {name!r} is damaged: {why} since it was materialized; "
            f"rebuild it with `{REPAIR}`"
        )

    record = _read_json(folder / WEIGHTS_RECORD)
    if record is None or not record.get("files"):
        return _adopt(name, folder, damaged)

    files = record["files"]
    extra = sorted(p.name for p in _weight_files(folder) if p.name not in files)
    if extra:
        raise damaged(f"weight file(s) {', '.join(str(folder / n) for n in extra)} appeared")
    refreshed = False
    for fname, rec in files.items():
        path = folder / fname
        if not path.is_file():
            raise damaged(f"{path} was removed")
        st = path.stat()
        if st.st_size != rec.get("size"):
            raise damaged(f"{path} changed size ({rec.get('size')} -> {st.st_size} bytes)")
        if not full and st.st_mtime_ns == rec.get("mtime_ns"):
            continue
        digest = sha256(path)
        if digest != rec.get("sha256"):
            raise damaged(f"{path} changed content (sha256 {str(rec.get('sha256'))[:12]}... -> {digest[:12]}...)")
        if st.st_mtime_ns != rec.get("mtime_ns"):
            rec["mtime_ns"], refreshed = st.st_mtime_ns, True
    if refreshed:  # same content, new mtime (copied, touched): the fast path applies again next time
        try:
            _write_json(folder / WEIGHTS_RECORD, record)
        except OSError:
            pass
    return True


def _adopt(name: str, folder: Path, damaged) -> bool:
    """Record the weights of a folder materialized before records existed (see check_materialized)."""
    digests = None
    if name == "base":
        from .base import MANIFEST as BASE_MANIFEST
        from .base import verify_base

        if not verify_base(folder, check_files=True):
            raise damaged(f"{folder} no longer matches its {BASE_MANIFEST}")
        digests = (_read_json(folder / BASE_MANIFEST) or {}).get("files")
    try:
        record_weights(folder, digests)
    except OSError:  # a read-only cache: checked as before records existed
        pass
    return True


def _needs_build(name: str, folder: Path, force: bool, full: bool) -> bool:
    """Whether ``materialize`` must (re)build ``name``: a damaged model is rebuilt with ``force``
    and otherwise an error."""
    try:
        return not check_materialized(name, folder, full=full)
    except MaterializedModelError:
        if not force:
            raise
        return True


def materialize(
    cache_dir: Path | None = None,
    names: list[str] | None = None,
    log=print,
    *,
    force: bool = False,
    full_check: bool = False,
) -> dict[str, Path]:
    """Base + adapters -> full-weight HF folders in the cache (idempotent, atomic per expert).

    A model already materialized is checked against its weight record (``full_check``: by
    sha256 of every file); a damaged one is an error, or rebuilt with ``force``.
    transformers' own loading/saving progress bars are hidden (``log`` reports each model).
    """
    from mergebench.evaluation.battery import quiet_progress_bars

    from .base import MANIFEST as BASE_MANIFEST
    from .base import default_cache_dir, materialize_base

    manifest = read_manifest()
    verify_adapters(manifest)
    todo = names or list(manifest["experts"])
    for name in todo:
        if name not in manifest["experts"]:
            expert_spec(name)  # an unknown name: the error lists the pool's experts
            raise ZooError(f"expert {name!r} is not built yet: run `mergebench zoo build --experts {name}`")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    with quiet_progress_bars():
        if not force:  # a damaged base is an error; materialize_base rebuilds one that differs from its manifest
            check_materialized("base", materialized_path("base", cache), full=full_check)
        base = materialize_base(cache)
        record_weights(base, (_read_json(base / BASE_MANIFEST) or {}).get("files"))
        paths = {"base": base}
        for name in todo:
            target = materialized_path(name, cache)
            paths[name] = target
            if _needs_build(name, target, force, full_check):
                _materialize_expert(name, manifest["experts"][name], base, target, log)
    return paths


def _materialize_expert(name: str, entry: dict, base: Path, target: Path, log) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, pool_dir() / name).merge_and_unload()
    with _atomic_folder(target) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        stamp = {"pool": POOL_NAME, "expert": name, "tags": entry["tags"], "adapter_files": entry["files"]}
        (tmp / EXPERT_STAMP).write_text(json.dumps(stamp, indent=1))
        record_weights(tmp)
    log(f"materialized {name} in {time.perf_counter() - t0:.1f} s -> {target}")


def verify(
    split: str = "validation",
    docs: int | None = 100,
    seed: int = 0,
    names: list[str] | None = None,
    cache_dir: Path | None = None,
    batch_size: int = 16,
    log=print,
) -> list[dict]:
    """Score the base and every expert on every embedded multiple-choice task.

    Documents are a seeded subsample of at most ``docs`` per task (None: all). Returns one
    row per (model, task, metric) with value, stderr and the number of documents.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergebench.config.sampling import doc_sample, samples_argument
    from mergebench.evaluation.battery import evaluate_model

    from . import tasks as embedded

    paths = materialize(cache_dir, names, log=log, full_check=True)  # every weight file by sha256
    task_list = embedded.task_names()
    info = embedded.task_info()
    samples = samples_argument(
        doc_sample(t, info[t]["counts"][split], docs, seed=seed, split=split) for t in task_list
    )
    tm = embedded.task_manager(split)
    rows = []
    for name, path in paths.items():
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(path)
        with torch.inference_mode():  # the scorer keeps autograd on otherwise (17 GB RSS measured)
            scores = evaluate_model(model, tok, task_list, tm, samples=samples, batch_size=batch_size)
        rows += [{"model": name, **s.as_dict()} for s in scores]
        log(f"scored {name} on {len(task_list)} tasks ({split}) in {time.perf_counter() - t0:.0f} s")
        del model
    return rows
