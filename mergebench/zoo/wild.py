"""The embedded ``wild`` pool: SmolLM2-135M-Instruct experts in the in-the-wild regime.

A second version of the embedded pool (the ``smol`` pool stays as it was), built to resemble
the public fine-tunes of the in-the-wild merging study (§3.2-3.3): most experts are trained
on data the embedded battery does not score (bilingual dictionaries, fortune files, manual-page
descriptions, ISO code lists; :mod:`mergebench.zoo.wild_data`), only four of twelve on the
train split of a scored task, with budgets that differ by two orders of magnitude.  Six experts
are *far* from the base -- full-parameter fine-tunes of some modules, or rank-32 LoRA at a
high learning rate -- so that the Karcher mean (Fisher–Rao merging paper, arXiv:2603.04972)
and the linear mean of them differ measurably, which they cannot for small, nearly orthogonal
LoRA updates.

* :func:`build`       trains every expert (committed data + seeds) and writes ``suites/wild/experts``:
                      LoRA adapters in float16, full-module deltas (theta - theta_base) in bfloat16,
                      and ``pool.json`` (specs, losses, times, sha256 of every file).
* :func:`materialize` base + adapter / delta -> full-weight HF folders in ``<cache>/wild/<name>``.
* :func:`verify`      base vs every expert on every embedded task (value and stderr).
* :func:`distances`   task-vector norms and the Karcher-vs-linear gap, with mergebench's own methods.

``python -m mergebench.zoo.wild build|materialize|verify|distances`` runs them.  Training uses
one CPU thread (``torch.set_num_threads(1)``): the same thread count makes a rebuild on the
same CPU byte-identical; on another CPU the kernels sum in another order, and a rebuild agrees within
float rounding (per-tensor relative error <= 3e-4, checked by the slow test in
``tests/test_zoo_wild.py``).

Measured (2026-12-01, one thread, 2 shared AMD EPYC cores at load average 4-7): 2,620 s of
training in all (per expert in ``pool.json``), 45 min wall for the whole build; materializing
the 12 experts ~4 min; scoring base + 12 on the inthewild embedded protocol (test split, 60
documents per task) 3-6 min per model.  Results of that run: ``suites/wild/verify_test60.json``
(6 of 12 experts above the base average, one of them by a single document) and
``suites/wild/distances.json`` (task-vector norms 0.13-76.1, ratio 582; Karcher vs linear
2.3 % for the six far experts, 1.7-2.3 % for their 15 four-subsets).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from ..errors import MergebenchError
from .files import file_problems, read_manifest_file, sha256
from .wild_train import WildSpec

POOL_NAME = "wild"
PREFIX = "wild/"
MANIFEST_NAME = "pool.json"
STAMP = "mergebench_expert.json"
WEIGHTS_RECORD = "mergebench_weights.json"
DELTA_FILE = "delta.safetensors"
DELTA_CONFIG = "delta_config.json"
BUILD_THREADS = 1

__all__ = ["EXPERTS", "FAR", "POOL_NAME", "WildPoolError", "build", "check_materialized", "distances",
           "expert_spec", "karcher_gap", "materialize", "materialized_path", "pool_dir", "read_manifest", "verify"]


class WildPoolError(MergebenchError, ValueError):
    """The wild pool's committed files or its materialized models cannot be used."""


ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def _t(domain: str, scored: bool, far: bool, **extra) -> dict:
    """Pool tags: ``task`` (the lm-eval task trained on; only experts that saw a scored task's
    train split carry it, as in the smol pool), ``data`` (the wild source otherwise),
    ``scored_train`` and ``far`` (full-module or large-rank LoRA updates)."""
    return {"domain": domain, "scored_train": scored, "far": far, **extra}


EXPERTS: tuple[WildSpec, ...] = (
    # --- trained on the train split of a scored task (4 of 13, under a third)
    WildSpec("antonyms-lora", ("task:antonyms",), rank=8, modules=ALL, steps=60, lr=1e-3, seed=101,
             tags=_t("general", True, False, task="mb_antonyms")),
    WildSpec("capitals-tiny", ("task:capitals",), rank=2, modules=ATTN, steps=8, lr=1e-4, seed=102,
             tags=_t("general", True, False, task="mb_capitals")),
    WildSpec("medical-full", ("task:medical_terms",), mode="full", modules=("up_proj",), layers=(0, 5),
             steps=50, lr=1.5e-3, seed=103, batch_size=4, tags=_t("medical", True, True, task="mb_medical_terms")),
    WildSpec("analogies-lora", ("task:analogies",), rank=4, modules=MLP, steps=24, lr=1e-3, seed=104, batch_size=4,
             tags=_t("general", True, False, task="mb_analogies")),
    # --- trained on packaged data the battery does not score
    WildSpec("french-dict", ("wild:freedict-eng-fra",), rank=8, modules=ALL, steps=40, lr=1.5e-3, seed=105,
             batch_size=4, tags=_t("translation", False, False, data="freedict-eng-fra")),
    WildSpec("german-dict-full", ("wild:freedict-eng-deu",), mode="full", modules=("v_proj", "o_proj"),
             layers=(0, 14), steps=60, lr=1.5e-3, seed=106, batch_size=4,
             tags=_t("translation", False, True, data="freedict-eng-deu")),
    WildSpec("fortunes-full", ("wild:fortunes-fortunes", "wild:fortunes-riddles"), mode="full",
             modules=("down_proj",), layers=(12, 19), steps=60, lr=1.5e-3, seed=107, batch_size=4,
             tags=_t("quotes", False, True, data="fortunes-fortunes,fortunes-riddles")),
    WildSpec("literature-lora32", ("wild:fortunes-literature",), rank=32, modules=ATTN, steps=60, lr=3e-3,
             seed=108, batch_size=4, tags=_t("quotes", False, True, data="fortunes-literature")),
    WildSpec("riddles-small", ("wild:fortunes-riddles",), rank=4, modules=MLP, steps=16, lr=5e-4, seed=109,
             batch_size=4, tags=_t("quotes", False, False, data="fortunes-riddles")),
    WildSpec("manpages-full", ("wild:manpages",), mode="full", modules=("q_proj", "k_proj"), layers=(15, 29),
             steps=60, lr=1.5e-3, seed=110, batch_size=4, tags=_t("software", False, True, data="manpages")),
    WildSpec("iso-lora32", ("wild:iso-codes",), rank=32, modules=MLP, steps=60, lr=3e-3, seed=111, batch_size=4,
             tags=_t("codes", False, True, data="iso-codes")),
    WildSpec("manpages-lora", ("wild:manpages",), rank=8, modules=ATTN, steps=24, lr=1e-3, seed=112, batch_size=4,
             tags=_t("software", False, False, data="manpages")),
    # added after the first measurement (6 of 12 beat the base): a 13th, off-battery expert
    WildSpec("iso-attn", ("wild:iso-codes",), rank=16, modules=ATTN, steps=40, lr=2e-3, seed=113, batch_size=4,
             tags=_t("codes", False, False, data="iso-codes")),
)
FAR = tuple(s.name for s in EXPERTS if s.tags["far"])


def expert_spec(name: str) -> WildSpec:
    name = name.removeprefix(PREFIX)
    for spec in EXPERTS:
        if spec.name == name:
            return spec
    raise WildPoolError(f"no expert {name!r} in the {POOL_NAME} pool; experts: {', '.join(s.name for s in EXPERTS)}")


def pool_dir() -> Path:
    """``suites/wild/experts`` (next to :func:`mergebench.zoo.wild_data.data_dir`)."""
    from .wild_data import data_dir

    return data_dir().parent / "experts"


def manifest_path() -> Path:
    return pool_dir() / MANIFEST_NAME


def read_manifest() -> dict:
    return read_manifest_file(manifest_path(), WildPoolError, "mergebench zoo build --pool wild")


@contextmanager
def _atomic_folder(target: Path):
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would make a committed or shared folder private
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- build


def _save_expert(spec: WildSpec, trained, base_model, folder: Path) -> None:
    """LoRA: peft adapter in float16 (no model card, no machine path); full: bf16 delta + config."""
    import torch
    from safetensors.torch import load_file, save_file

    from .base import BASE_NAME
    from .wild_train import full_delta

    if spec.mode == "lora":
        trained.model.save_pretrained(folder, safe_serialization=True)
        (folder / "README.md").unlink(missing_ok=True)
        cfg = json.loads((folder / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = BASE_NAME
        cfg["target_modules"] = sorted(cfg["target_modules"])  # peft keeps a set: its order follows PYTHONHASHSEED
        (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        w = folder / "adapter_model.safetensors"
        save_file({k: v.to(torch.float16).contiguous() for k, v in load_file(str(w)).items()}, str(w))
    else:
        delta = full_delta(spec, trained.model, base_model)
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in sorted(delta.items())}, str(folder / DELTA_FILE))
        cfg = {"base_model_name_or_path": BASE_NAME, "kind": "full-module delta (theta - theta_base)",
               "dtype": "bfloat16", "tensors": len(delta), "numel": sum(v.numel() for v in delta.values())}
        (folder / DELTA_CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def build(names: list[str] | None = None, base: Path | None = None, log=print) -> dict:
    """Train the experts (all, or ``names``) and write their files + ``pool.json`` (one thread)."""
    import platform

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .base import MANIFEST as BASE_MANIFEST
    from .base import materialize_base
    from .wild_train import train

    todo = [expert_spec(n) for n in names] if names else list(EXPERTS)
    torch.set_num_threads(BUILD_THREADS)
    base = Path(base) if base is not None else materialize_base()
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    pool_dir().mkdir(parents=True, exist_ok=True)
    manifest = json.loads(manifest_path().read_text()) if manifest_path().is_file() else {"pool": POOL_NAME, "experts": {}}
    manifest["base"] = {"name": base.name, "manifest_sha256": sha256(base / BASE_MANIFEST)}
    manifest["built_with"] = {"threads": BUILD_THREADS, "torch": torch.__version__, "machine": platform.machine(),
                              "processor": platform.processor() or platform.machine()}
    t_all = time.perf_counter()
    for spec in todo:
        log(f"training {spec.name} ({spec.mode}, {spec.steps} steps, lr {spec.lr}) ...")
        trained = train(spec, model, tok, log=log)
        target = pool_dir() / spec.name
        with _atomic_folder(target) as tmp:
            _save_expert(spec, trained, model, tmp)
        manifest["experts"][spec.name] = {
            "zoo": PREFIX + spec.name,
            "spec": spec.to_dict(),
            "tags": {**spec.tags, "mode": spec.mode},
            "final_train_loss": round(trained.final_loss, 5),
            "first_train_loss": round(trained.losses[0], 5),
            "train_seconds": round(trained.seconds, 1),
            "steps_per_s": round(len(trained.losses) / trained.seconds, 3),
            "n_examples": trained.n_examples,
            "n_tokens": trained.n_tokens,
            "files": {p.name: sha256(p) for p in sorted(target.iterdir()) if p.is_file()},
        }
        _write_json(manifest_path(), manifest)
        log(f"  {spec.name}: loss {trained.losses[0]:.3f} -> {trained.final_loss:.3f} in {trained.seconds:.0f} s")
        del trained
    if not names:
        manifest["build_seconds"] = round(time.perf_counter() - t_all, 1)
        _write_json(manifest_path(), manifest)
    return manifest


def verify_files(manifest: dict | None = None) -> None:
    """Every committed expert file against the manifest's sha256 (before any work)."""
    manifest = manifest or read_manifest()
    if bad := file_problems(manifest["experts"], pool_dir()):
        raise WildPoolError(f"the wild pool's files do not match {manifest_path()}: " + "; ".join(bad))


# --------------------------------------------------------------------------- materialize


def materialized_path(name: str, cache_dir: Path | None = None) -> Path:
    """Folder of a materialized member: ``base``, or an expert (``wild/<name>`` or ``<name>``)."""
    from .base import BASE_NAME, default_cache_dir

    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / BASE_NAME if name == "base" else root / POOL_NAME / name.removeprefix(PREFIX)


def check_materialized(name: str, folder: Path, full: bool = False) -> bool:
    """True when ``folder`` was materialized from the committed files of ``name`` and its weight
    files still have the recorded size (and sha256, with ``full``); False when absent or stale.
    A weight file that changed since raises :class:`WildPoolError` naming it."""
    folder = Path(folder)
    if name == "base":
        from .base import verify_base

        return verify_base(folder, check_files=full)
    try:
        stamp = json.loads((folder / STAMP).read_text())
        record = json.loads((folder / WEIGHTS_RECORD).read_text())
    except (OSError, ValueError):
        return False
    try:
        entry = read_manifest()["experts"].get(name.removeprefix(PREFIX))
    except WildPoolError:
        return False
    if entry is None or stamp.get("files") != entry.get("files"):
        return False
    for fname, rec in record.get("files", {}).items():
        p = folder / fname
        if not p.is_file() or p.stat().st_size != rec.get("size") or (full and sha256(p) != rec.get("sha256")):
            raise WildPoolError(f"materialized wild expert {name!r}: {p} changed since it was materialized; "
                                f"rebuild it with `python -m mergebench.zoo.wild materialize --force`")
    return True


def _record_weights(folder: Path) -> None:
    """sha256, size and mtime of the folder's weight files, in the smol pool's record format."""
    files = {}
    for p in sorted(folder.glob("*.safetensors")):
        st = p.stat()
        files[p.name] = {"sha256": sha256(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    _write_json(folder / WEIGHTS_RECORD, {"format": 1, "files": files})


def _materialize_expert(name: str, entry: dict, base: Path, target: Path) -> None:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    src = pool_dir() / name
    if entry["spec"]["mode"] == "lora":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, src).merge_and_unload()
    else:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for k, d in load_file(str(src / DELTA_FILE)).items():
                if k not in params or params[k].shape != d.shape:
                    raise WildPoolError(f"{src / DELTA_FILE}: tensor {k} does not match the base")
                params[k].add_(d.to(torch.float32))
    with _atomic_folder(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / STAMP).write_text(json.dumps({"pool": POOL_NAME, "expert": name, "tags": entry["tags"],
                                             "files": entry["files"]}, indent=1))
        _record_weights(tmp)


def materialize(cache_dir: Path | None = None, names: list[str] | None = None, log=print, *,
                force: bool = False) -> dict[str, Path]:
    """Base + committed files -> full-weight HF folders (idempotent, atomic per expert)."""
    from .base import materialize_base

    manifest = read_manifest()
    verify_files(manifest)
    todo = [n.removeprefix(PREFIX) for n in names] if names else list(manifest["experts"])
    for n in todo:
        if n not in manifest["experts"]:
            expert_spec(n)
            raise WildPoolError(f"wild expert {n!r} is not built yet: run `python -m mergebench.zoo.wild build --experts {n}`")
    from .base import default_cache_dir

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    paths = {"base": materialize_base(cache)}
    for n in todo:
        target = materialized_path(n, cache)
        paths[n] = target
        try:
            ok = check_materialized(n, target)
        except WildPoolError:
            if not force:
                raise
            ok = False
        if not ok:
            t0 = time.perf_counter()
            _materialize_expert(n, manifest["experts"][n], paths["base"], target)
            log(f"materialized {n} in {time.perf_counter() - t0:.1f} s -> {target}")
    return paths


# --------------------------------------------------------------------------- measurements


def _state(path: Path):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def distances(paths: dict[str, Path]) -> dict[str, dict]:
    """Per expert: ||theta - theta_base|| over every tensor, the largest and median per-tensor
    ||delta|| / ||theta_base|| among the tensors it changes, and how many it changes."""
    base = _state(paths["base"])
    out = {}
    for name, p in paths.items():
        if name == "base":
            continue
        sq, rel = 0.0, []
        for k, v in _state(p).items():
            d = (v.double() - base[k].double())
            n = float(d.norm())
            if n > 0:
                sq += n * n
                rel.append(n / float(base[k].double().norm()))
        rel.sort()
        out[name] = {"norm": math.sqrt(sq), "tensors_changed": len(rel),
                     "rel_max": rel[-1] if rel else 0.0, "rel_median": rel[len(rel) // 2] if rel else 0.0}
    return out


def _changed(path: Path, base: dict) -> dict:
    """The tensors of a checkpoint that differ from the base (the others are the base's)."""
    import torch

    return {k: v for k, v in _state(path).items() if not torch.equal(v, base[k])}


def karcher_gap(paths: dict[str, Path], names: list[str], *, subsets: list[list[str]] | None = None) -> dict:
    """||theta_K - theta_L|| / ||theta_L - theta_base|| of the Karcher and linear merges of
    ``names`` (equal weights), computed per tensor with mergebench's registered ``karcher``
    and ``linear`` methods at their default parameters.  A tensor no member changed is the base's
    in both merges and adds nothing to either norm, so it is skipped.  With ``subsets``
    (lists of ``names``), one result per subset as well (``"subsets"``)."""
    import torch

    from mergebench.methods import TensorContext, get_method

    kar, lin = get_method("karcher"), get_method("linear")
    base = _state(paths["base"])
    changed = {n: _changed(paths[n], base) for n in names}

    def gap(group: list[str]) -> dict:
        pk, pl = kar.validate_params({}, len(group)), lin.validate_params({}, len(group))
        weights = torch.ones(len(group), dtype=torch.float64)
        diff = tv = 0.0
        for k in sorted({k for n in group for k in changed[n]}):
            b = base[k]
            ex = [changed[n].get(k, b) for n in group]
            ctx = TensorContext(name=k)
            mk = kar(b, ex, weights, pk, ctx).double()
            ml = lin(b, ex, weights, pl, ctx).double()
            diff += float((mk - ml).norm()) ** 2
            tv += float((ml - b.double()).norm()) ** 2
        return {"members": list(group), "n": len(group), "gap": math.sqrt(diff / tv) if tv > 0 else 0.0,
                "karcher_minus_linear": math.sqrt(diff), "linear_task_vector": math.sqrt(tv)}

    out = gap(list(names))
    if subsets:
        out["subsets"] = [gap(list(g)) for g in subsets]
    return out


EMBEDDED_METRIC = {"mb_medical_defs": "acc_norm"}
"""The inthewild embedded profile's metric per task where it is not ``acc``."""


def verify(split: str = "validation", docs: int | None = 100, seed: int = 0, names: list[str] | None = None,
           cache_dir: Path | None = None, batch_size: int = 16, log=print) -> list[dict]:
    """Score the base and every expert on every embedded multiple-choice task (seeded documents,
    the same for every model); one row per (model, task, metric) with value, stderr, n_docs."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergebench.config.sampling import doc_sample, samples_argument
    from mergebench.evaluation.battery import Battery

    from . import tasks as embedded

    paths = materialize(cache_dir, names, log=log)
    task_list = embedded.task_names()
    info = embedded.task_info()
    samples = samples_argument(doc_sample(t, info[t]["counts"][split], docs, seed=seed, split=split) for t in task_list)
    battery = Battery(task_list, embedded.task_manager(split), samples=samples)
    rows = []
    for name, path in paths.items():
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(path)
        with torch.inference_mode():  # Battery.score keeps autograd on: 17 GB RSS measured without this
            scores, _ = battery.score(model, tok, batch_size=batch_size, quiet=True)
        rows += [{"model": name, **s.as_dict()} for s in scores]
        log(f"scored {name} on {len(task_list)} tasks ({split}) in {time.perf_counter() - t0:.0f} s")
        del model
    return rows


def battery_average(rows: list[dict]) -> dict[str, dict[str, float]]:
    """model -> {avg, stderr}: the mean over tasks of the embedded profile's metric, with the
    stderr of that mean from the per-task stderrs (tasks independent)."""
    by: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r["metric"] == EMBEDDED_METRIC.get(r["task"], "acc"):
            by.setdefault(r["model"], []).append((r["value"], r["stderr"]))
    return {m: {"avg": sum(v for v, _ in xs) / len(xs),
                "stderr": math.sqrt(sum(e * e for _, e in xs)) / len(xs), "tasks": len(xs)} for m, xs in by.items()}


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mergebench.zoo.wild", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="train the experts (one thread)")
    b.add_argument("--experts", default=None)
    m = sub.add_parser("materialize", help="full-weight folders in the cache")
    m.add_argument("--force", action="store_true")
    v = sub.add_parser("verify", help="base vs every expert on every embedded task")
    v.add_argument("--split", default="validation")
    v.add_argument("--docs", type=int, default=100)
    v.add_argument("--json", type=Path, default=None)
    d = sub.add_parser("distances", help="task-vector norms and the Karcher-vs-linear gap")
    d.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    names = args.experts.split(",") if getattr(args, "experts", None) else None
    if args.cmd == "build":
        build(names)
    elif args.cmd == "materialize":
        for n, p in materialize(force=args.force).items():
            print(f"{n}\t{p}")
    elif args.cmd == "verify":
        rows = verify(args.split, args.docs or None)
        avg = battery_average(rows)
        for mname, a in avg.items():
            print(f"{mname}\t{a['avg']:.4f} ± {a['stderr']:.4f}")
        if args.json:
            _write_json(args.json, {"rows": rows, "average": avg})
    else:
        paths = materialize()
        out = {"distances": distances(paths)}
        norms = {k: v["norm"] for k, v in out["distances"].items()}
        out["norm_ratio_max_min"] = max(norms.values()) / min(norms.values())
        import itertools

        fours = [list(c) for c in itertools.combinations(FAR, 4)]
        out["karcher_gap"] = karcher_gap(paths, list(FAR), subsets=fours)
        print(json.dumps(out, indent=1))
        if args.json:
            _write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
