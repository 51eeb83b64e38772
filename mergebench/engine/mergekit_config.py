"""Read a mergekit-style merge YAML into a :class:`~mergebench.engine.request.MergeRequest`.

Supported subset of mergekit's configuration (0.1.5)::

    merge_method: ties              # mergekit name (mapped) or any mergebench method name
    base_model: path/or/hub-id
    models:
      - model: path/or/hub-id
        parameters: {weight: 1.0, density: 0.5}
    parameters: {normalize: true}   # global; per-model values take precedence
    dtype: bfloat16
    out_dtype: float16
    tokenizer_source: base          # only "base" (or absent)

The YAML selects mergebench's methods, so parameters keep mergebench's (paper) meaning where
mergekit differs: e.g. ``rescale: true`` on DARE/DELLA means the paper's 1/p rescaling, not
mergekit's L1-norm rescale (write ``rescale: l1`` for that). See
``docs/mergekit-differences.md`` (README) for every known difference.

Not supported (each is a clear error naming the file and key): ``slices``/``modules``,
per-layer gradients for scalar parameters, conditional (``filter:``) parameters, LoRA
(``model+lora``) and ``@revision`` references, ``tokenizer:`` blocks,
``tokenizer_source`` other than ``base``, ``chat_template``.

Relative model paths are resolved against the YAML file's folder when such a folder exists
there; anything else is passed on unchanged (a hub id, or a path relative to the current
directory, as mergekit reads it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mergebench.errors import MergebenchError
from mergebench.methods import ParameterError, get_method, list_methods
from mergebench.methods.spec import MethodSpec, Param
from mergebench.engine.request import MergeRequest

__all__ = [
    "MERGEKIT_METHODS",
    "MergekitConfigError",
    "UNSUPPORTED_MERGEKIT_METHODS",
    "load_mergekit_yaml",
    "request_from_mergekit_dict",
]


class MergekitConfigError(MergebenchError, ValueError):
    """A mergekit YAML that mergebench cannot (or will not) translate; names file and key."""


# mergekit method name -> mergebench method name.
MERGEKIT_METHODS: dict[str, str] = {
    "linear": "linear",
    "task_arithmetic": "task_arithmetic",
    "ties": "ties",
    "dare_linear": "dare_linear",
    "dare_ties": "dare_ties",
    "della": "della_ties",
    "della_linear": "della_linear",
    "breadcrumbs": "breadcrumbs",
    "breadcrumbs_ties": "breadcrumbs_ties",
    "sce": "sce",
    "slerp": "slerp",
    "multislerp": "multislerp",
    "karcher": "karcher",
    "model_stock": "model_stock",
    "arcee_fusion": "arcee_fusion",
}

UNSUPPORTED_MERGEKIT_METHODS: dict[str, str] = {
    "nuslerp": "mergekit's nuslerp (row-wise/flattened SLERP of two task vectors) has no mergebench equivalent; "
    "use slerp (two models) or multislerp",
    "nearswap": "nearswap has no mergebench equivalent",
    "passthrough": "passthrough (layer stacking / frankenmerges) is not a weight merge; mergebench does not do it",
    "ram": "RAM has no mergebench equivalent",
    "ramplus_tl": "RAM+ has no mergebench equivalent",
}

# mergekit parameter name -> mergebench parameter name, per mergebench method. A value of
# None means "accepted and ignored" (``int8_mask`` only changes mergekit's mask storage).
# Names absent from a table pass through unchanged; the method's own validation applies.
_IGNORED = {"int8_mask": None}
PARAM_ALIASES: dict[str, dict[str, str | None]] = {
    m: _IGNORED
    for m in (
        "task_arithmetic", "ties", "dare_linear", "dare_ties", "della_ties", "della_linear",
        "breadcrumbs", "breadcrumbs_ties", "sce",
    )
}  # fmt: skip

# mergekit's boolean ``rescale`` -> mergebench's choice. For DARE/DELLA, ``true`` keeps the
# method's own (paper, 1/p) rescaling in mergebench, where mergekit rescales to the L1 norm;
# write ``rescale: l1`` to get mergekit's. For TIES/Breadcrumbs, mergekit's ``true`` *is*
# an L1 rescale of the pruned vector (no paper variant exists), so it maps to ``l1``.
VALUE_ALIASES: dict[str, dict[str, dict[Any, Any]]] = {
    **{m: {"rescale": {True: "paper", False: None}} for m in ("dare_linear", "dare_ties", "della_ties", "della_linear")},  # noqa: E501
    **{m: {"rescale": {True: "l1", False: None}} for m in ("ties", "breadcrumbs", "breadcrumbs_ties")},
}

_DTYPES = {
    "float32": "float32", "fp32": "float32", "float": "float32", "f32": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16", "f16": "float16",
    "float64": "float64", "fp64": "float64", "double": "float64", "f64": "float64",
}  # fmt: skip

_TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source"}
_UNSUPPORTED_TOP_KEYS = {
    "slices": "layer slices (frankenmerges) are not supported; list whole models under 'models'",
    "modules": "per-module configurations are not supported; list whole models under 'models'",
    "tokenizer": "the 'tokenizer' block (vocabulary union, token sourcing) is not supported; "
    "use 'tokenizer_source: base' or omit it",
    "chat_template": "'chat_template' is not supported; the base model's tokenizer files are copied as they are",
}


def load_mergekit_yaml(path: str | Path, **overrides: Any) -> MergeRequest:
    """Parse the YAML file at ``path`` into a validated :class:`MergeRequest`.

    ``overrides`` replace request fields afterwards (e.g. ``seed=1, device="cuda"``). Raises
    :class:`MergekitConfigError` (a ``ValueError``) naming the file and the offending key.
    """
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise MergekitConfigError(f"{path}: cannot read mergekit config: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise MergekitConfigError(f"{path}: invalid YAML{where}: {what}") from None
    return request_from_mergekit_dict(data, source=str(path), root=path.parent, **overrides)


def request_from_mergekit_dict(
    data: Any, *, source: str = "<config>", root: str | Path | None = None, **overrides: Any
) -> MergeRequest:
    """Translate an already-parsed mergekit config mapping (see :func:`load_mergekit_yaml`)."""
    return _Translator(source, Path(root) if root is not None else None).translate(data, overrides)


class _Translator:
    def __init__(self, source: str, root: Path | None):
        self.source = source
        self.root = root
        self.weight_key: str | None = None

    def error(self, key: str, msg: str) -> MergekitConfigError:
        return MergekitConfigError(f"{self.source}: {key}: {msg}" if key else f"{self.source}: {msg}")

    # -- top level ---------------------------------------------------------------------
    def translate(self, data: Any, overrides: Mapping[str, Any]) -> MergeRequest:
        if not isinstance(data, Mapping):
            raise self.error("", f"expected a mapping at the top level, got {type(data).__name__}")
        for key in data:
            if key in _UNSUPPORTED_TOP_KEYS:
                raise self.error(str(key), _UNSUPPORTED_TOP_KEYS[key])
            if key not in _TOP_KEYS:
                raise self.error(str(key), f"unknown key; supported keys: {', '.join(sorted(_TOP_KEYS))}")

        spec, mk_name = self.method(data.get("merge_method"))
        base = self.model_ref(data["base_model"], "base_model") if data.get("base_model") is not None else None
        models = self.models(data.get("models"))
        global_params = self.param_block(data.get("parameters"), "parameters")

        experts, expert_params = self.arrange(spec, mk_name, base, models)
        weights, params, per_expert = self.parameters(spec, global_params, experts, expert_params)

        fields: dict[str, Any] = {"method": spec.name, "experts": experts, "base": base, "params": params}
        if weights is not None:
            fields["weights"] = weights
        if per_expert:
            fields["per_expert_params"] = per_expert
        for key in ("dtype", "out_dtype"):
            if data.get(key) is not None:
                fields[key] = self.dtype(data[key], key)
        tok = data.get("tokenizer_source")
        if tok is not None:
            if tok != "base":
                raise self.error(
                    "tokenizer_source",
                    "only 'base' is supported (the base model's tokenizer; embeddings aligned to its vocabulary), "
                    f"got {tok!r}",
                )
            if base is None:
                raise self.error("tokenizer_source", "'base' needs a base_model")
            fields["vocab_policy"] = "base"
        fields.update(overrides)

        self.check_contract(spec, base, experts, weights)
        from pydantic import ValidationError

        try:
            return MergeRequest(**fields)
        except ValidationError as exc:
            msg = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise self.error("", msg) from None

    def check_contract(self, spec: MethodSpec, base: str | None, experts: list[str], weights: Any) -> None:
        c = spec.contract
        if c.base == "required" and base is None:
            raise self.error("base_model", f"method {spec.name!r} needs a base_model")
        n = len(experts)
        if c.min_models is not None and n + (base is not None and c.base != "unused") < c.min_models:
            raise self.error(
                "models", f"method {spec.name!r} needs {c.min_models} models (base_model included); got {n}"
                + (" besides the base_model" if base is not None else "")
            )
        if n < c.min_experts or (c.max_experts is not None and n > c.max_experts):
            upper = "+" if c.max_experts is None else (f"-{c.max_experts}" if c.max_experts != c.min_experts else "")
            want = f"{c.min_experts}{upper}"
            what = "models (the base included)" if c.base == "unused" else "models besides the base_model"
            raise self.error("models", f"method {spec.name!r} merges {want} {what}; got {n}")
        if weights is not None and not c.per_expert_weights:
            msg = f"method {spec.name!r} does not take per-model weights; remove 'weight'"
            raise self.error(self.weight_key or "weight", msg)

    def method(self, name: Any) -> tuple[MethodSpec, str]:
        if name is None:
            raise self.error("merge_method", "missing (required)")
        if not isinstance(name, str):
            raise self.error("merge_method", f"must be a string, got {name!r}")
        if name in UNSUPPORTED_MERGEKIT_METHODS:
            raise self.error("merge_method", f"{name!r} is not supported: {UNSUPPORTED_MERGEKIT_METHODS[name]}")
        mapped = MERGEKIT_METHODS.get(name, name)
        registered = {s.name for s in list_methods()}
        if mapped not in registered:
            mk = sorted(k for k, v in MERGEKIT_METHODS.items() if v in registered)
            native = sorted(registered - set(mk))
            raise self.error(
                "merge_method",
                f"unknown merge method {name!r}; supported mergekit names: {', '.join(mk)}"
                + (f"; mergebench names: {', '.join(native)}" if native else ""),
            )
        return get_method(mapped), name

    def model_ref(self, ref: Any, key: str) -> str:
        if isinstance(ref, Mapping):
            raise self.error(
                key, "structured model references (path/revision/lora mappings) are not supported; give a path/hub id"
            )
        if not isinstance(ref, str) or not ref.strip():
            raise self.error(key, f"must be a model path or hub id, got {ref!r}")
        ref = ref.strip()
        if "+" in ref:
            raise self.error(key, f"LoRA references ('model+lora') are not supported: {ref!r}; merge the adapter first")
        if "@" in ref:
            raise self.error(key, f"'@revision' references are not supported: {ref!r}; point at a local folder")
        p = Path(ref).expanduser()
        if not p.is_absolute() and self.root is not None and (self.root / p).exists():
            return str((self.root / p).resolve())
        return str(p) if p.is_absolute() or p.exists() else ref

    def models(self, models: Any) -> list[tuple[str, dict[str, Any]]]:
        if models is None:
            raise self.error("models", "missing (required): a list of {model: ..., parameters: {...}}")
        if not isinstance(models, list) or not models:
            raise self.error("models", "must be a non-empty list of {model: ..., parameters: {...}}")
        out = []
        seen: set[str] = set()
        for i, entry in enumerate(models):
            key = f"models[{i}]"
            if isinstance(entry, str):
                entry = {"model": entry}
            if not isinstance(entry, Mapping) or "model" not in entry:
                raise self.error(key, "must be a mapping with a 'model' key")
            extra = set(entry) - {"model", "parameters"}
            if extra:
                raise self.error(f"{key}.{sorted(extra)[0]}", "unknown key; a model entry has 'model' and 'parameters'")
            ref = self.model_ref(entry["model"], f"{key}.model")
            if ref in seen:
                raise self.error(f"{key}.model", f"{ref!r} is listed twice")
            seen.add(ref)
            out.append((ref, self.param_block(entry.get("parameters"), f"{key}.parameters")))
        return out

    def param_block(self, block: Any, key: str) -> dict[str, tuple[str, Any]]:
        """``{name: (yaml key path, value)}`` after rejecting conditional parameters."""
        if block is None:
            return {}
        if not isinstance(block, Mapping):
            raise self.error(key, f"must be a mapping of parameter names to values, got {block!r}")
        out = {}
        for name, value in block.items():
            k = f"{key}.{name}"
            if isinstance(value, Mapping) or (isinstance(value, list) and any(isinstance(v, Mapping) for v in value)):
                raise self.error(k, "conditional (filter:/value:) parameters are not supported; give one value")
            if isinstance(value, list) and (not value or any(isinstance(v, list) for v in value)):
                raise self.error(k, f"must be a scalar or a flat, non-empty list, got {value!r}")
            out[str(name)] = (k, value)
        return out

    def dtype(self, value: Any, key: str) -> str:
        name = str(value).removeprefix("torch.").lower()
        if name not in _DTYPES:
            raise self.error(key, f"unsupported dtype {value!r}; use one of float32, bfloat16, float16, float64")
        return _DTYPES[name]

    # -- which models are experts -----------------------------------------------------
    def arrange(
        self, spec: MethodSpec, mk_name: str, base: str | None, models: list[tuple[str, dict]]
    ) -> tuple[list[str], list[dict]]:
        """Experts in order and their per-model parameter blocks.

        A listed base is the base, not an expert, for methods that use a base; for methods
        whose kernel never sees a base (``unused``: linear, karcher, ...) a listed base is an
        expert like any other. SLERP with a base_model interpolates from the base (t=0) to
        the one other model (t=1), as in mergekit: mergebench's ``base`` + ``experts=[other]``.
        """
        if spec.name == "slerp" and mk_name == "slerp" and base is not None:
            others = [(m, p) for m, p in models if m != base]
            if len(others) != 1:
                raise self.error(
                    "models", f"slerp interpolates base_model and exactly one other model; got {len(others)} others"
                )
            listed = [(i, p) for i, (m, p) in enumerate(models) if m == base and p]
            if listed:
                i, block = listed[0]
                key = next(iter(block.values()))[0]
                raise self.error(key, "slerp takes no per-model parameters for the base_model; put them under the global 'parameters'")
            return [others[0][0]], [others[0][1]]
        if spec.contract.base == "unused":
            return [m for m, _ in models], [p for _, p in models]
        kept = [(m, p) for m, p in models if m != base]
        if not kept:
            raise self.error("models", "lists only the base model; add at least one model to merge")
        return [m for m, _ in kept], [p for _, p in kept]

    # -- parameters ----------------------------------------------------------------------
    def parameters(
        self,
        spec: MethodSpec,
        global_params: dict[str, tuple[str, Any]],
        experts: list[str],
        expert_params: list[dict[str, tuple[str, Any]]],
    ) -> tuple[list[float] | None, dict[str, Any], dict[str, list[Any]]]:
        n = len(experts)
        by_name = {p.name: p for p in spec.params}
        aliases = PARAM_ALIASES.get(spec.name, {})

        def target(name: str, key: str) -> Param | None:
            """The mergebench Param for a mergekit name (None: ignored)."""
            mapped = aliases.get(name, name)
            if name in aliases and mapped is None:
                return None
            if mapped not in by_name:
                valid = sorted({*by_name, *(k for k, v in aliases.items() if v is None or v in by_name)} | {"weight"})
                raise self.error(key, f"method {spec.name!r} has no parameter {name!r}; valid: {', '.join(valid)}")
            return by_name[mapped]

        def value_for(param: Param, key: str, value: Any) -> Any:
            table = VALUE_ALIASES.get(spec.name, {}).get(param.name, {})
            if isinstance(value, bool) and value in table:
                value = table[value]
            if isinstance(value, list):
                if param.type != "floats":
                    raise self.error(
                        key,
                        f"per-layer gradients (lists) are not supported for parameter {param.name!r} of method "
                        f"{spec.name!r}; give one value"
                        + ("; for per-layer t schedules use method layer_adaptive_slerp" * (spec.name == "slerp")),
                    )
            elif param.type == "floats" and isinstance(value, (int, float)) and not isinstance(value, bool):
                value = [value]
            try:
                coerced = param.coerce(value, spec.name)
            except ParameterError as exc:
                raise self.error(key, str(exc)) from None
            return list(coerced) if isinstance(coerced, tuple) else coerced

        # weights: per-model value, else the global one, else none at all
        w_global = global_params.pop("weight", None)
        w_each = [p.pop("weight", None) for p in expert_params]
        weights: list[float] | None = None
        self.weight_key = (w_global or next((w for w in w_each if w is not None), (None, None)))[0]
        if w_global is not None or any(w is not None for w in w_each):
            weights = []
            for i, w in enumerate(w_each):
                k, v = w if w is not None else (w_global or (None, None))
                if k is None:
                    raise self.error(
                        f"models[{i}].parameters.weight",
                        f"missing for {experts[i]!r} while other models have one (and there is no global weight)",
                    )
                if isinstance(v, (list, Mapping)) or isinstance(v, bool):
                    raise self.error(k, f"must be one number (per-layer weight gradients are not supported), got {v!r}")
                try:
                    weights.append(float(v))
                except (TypeError, ValueError):
                    raise self.error(k, f"must be a number, got {v!r}") from None
                if not math.isfinite(weights[-1]):
                    raise self.error(k, f"must be a finite number, got {v!r}")

        params: dict[str, Any] = {}
        resolved_global: dict[str, Any] = {}
        for name, (key, value) in global_params.items():
            p = target(name, key)
            if p is not None:
                resolved_global[p.name] = (key, value_for(p, key, value))

        per_model_names = {name for block in expert_params for name in block}
        per_expert: dict[str, list[Any]] = {}
        for name in sorted(per_model_names):
            first_key = next(block[name][0] for block in expert_params if name in block)
            p = target(name, first_key)
            if p is None:
                continue
            values = []
            for i, block in enumerate(expert_params):
                if name in block:
                    key, value = block[name]
                    values.append(value_for(p, key, value))
                elif p.name in resolved_global:
                    values.append(resolved_global[p.name][1])
                elif p.per_expert or p.default is not None:
                    values.append(p.default[i] if isinstance(p.default, tuple) and p.per_expert else p.default)
                else:
                    raise self.error(f"models[{i}].parameters.{name}", f"missing for {experts[i]!r} and has no default")
            resolved_global.pop(p.name, None)
            if p.per_expert:
                per_expert[p.name] = values
            elif all(v == values[0] for v in values):
                params[p.name] = values[0]
            else:
                raise self.error(
                    first_key,
                    f"method {spec.name!r} takes one value of {p.name!r} for all models, but the models give {values}",
                )
        params.update({name: v for name, (_, v) in resolved_global.items()})

        # one more check across all parameters at once (e.g. combinations, expert counts)
        try:
            spec.validate_params({**params, **per_expert}, n_experts=n)
        except ParameterError as exc:
            raise self.error("parameters", str(exc)) from None
        return weights, params, per_expert
