"""mergekit-style YAML -> MergeRequest (``mergebench.engine.mergekit_config``)."""

from __future__ import annotations

import textwrap

import pytest

from mergebench.engine.mergekit_config import (
    MERGEKIT_METHODS,
    MergekitConfigError,
    load_mergekit_yaml,
    request_from_mergekit_dict,
)


@pytest.fixture
def models(tmp_path):
    """Empty model folders next to the YAML, so relative references resolve to them."""
    for name in ("base", "a", "b", "c"):
        (tmp_path / name).mkdir()
    return tmp_path


def write(tmp_path, text: str, name: str = "merge.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def load(tmp_path, text: str, **kw):
    return load_mergekit_yaml(write(tmp_path, text), **kw)


def error(tmp_path, text: str) -> str:
    p = write(tmp_path, text)
    with pytest.raises(MergekitConfigError) as info:
        load_mergekit_yaml(p)
    msg = str(info.value)
    assert msg.startswith(str(p)), msg  # every error names the file
    return msg


# -- translation of valid configs ---------------------------------------------------------


def test_ties_full_translation(models):
    req = load(
        models,
        """
        merge_method: ties
        base_model: base
        models:
          - model: base            # listed base: the base, not an expert
          - model: a
            parameters: {weight: 1.0, density: 0.5}
          - model: b
            parameters: {weight: 0.3, density: 0.7}
        parameters: {normalize: false, int8_mask: true, lambda: 0.9}
        dtype: bf16
        out_dtype: float16
        tokenizer_source: base
        """,
    )
    d = str(models)
    assert req.method == "ties"
    assert req.base == f"{d}/base"
    assert req.experts == [f"{d}/a", f"{d}/b"]
    assert req.weights == [1.0, 0.3]
    assert req.per_expert_params == {"density": [0.5, 0.7]}
    assert req.params == {"normalize": False, "lambda": 0.9}  # int8_mask: storage detail, dropped
    assert (req.dtype, req.out_dtype, req.vocab_policy) == ("bfloat16", "float16", "base")


def test_global_parameters_fill_models_without_their_own(models):
    req = load(
        models,
        """
        merge_method: dare_ties
        base_model: base
        models:
          - model: a
            parameters: {density: 0.2}
          - model: b
          - model: c
        parameters: {weight: 0.5, density: 0.9}
        """,
    )
    assert req.weights == [0.5, 0.5, 0.5]
    assert req.per_expert_params == {"density": [0.2, 0.9, 0.9]}
    assert "density" not in req.params


def test_global_only_per_expert_parameter_stays_scalar(models):
    req = load(
        models,
        """
        merge_method: breadcrumbs
        base_model: base
        models: [{model: a}, {model: b}]
        parameters: {density: 0.8, gamma: 0.02}
        """,
    )
    assert req.params == {"density": 0.8, "gamma": 0.02}
    assert req.weights is None and req.per_expert_params == {}


@pytest.mark.parametrize(
    ("mk_method", "rescale", "expected_method", "expected"),
    [
        ("della", True, "della_ties", "paper"),  # mergebench keeps the paper's 1/p meaning
        ("della_linear", False, "della_linear", None),
        ("dare_linear", "l1", "dare_linear", "l1"),  # mergekit's L1 rescale, asked for by name
        ("dare_ties", True, "dare_ties", "paper"),
        ("ties", True, "ties", "l1"),  # mergekit's rescale of magnitude pruning is L1
        ("breadcrumbs_ties", False, "breadcrumbs_ties", None),
    ],
)
def test_method_names_and_rescale_flag(models, mk_method, rescale, expected_method, expected):
    val = "l1" if rescale == "l1" else str(rescale).lower()
    req = load(
        models,
        f"""
        merge_method: {mk_method}
        base_model: base
        models: [{{model: a, parameters: {{weight: 1}}}}]
        parameters: {{rescale: {val}, density: 0.6}}
        """,
    )
    assert req.method == expected_method
    assert req.params["rescale"] == expected


@pytest.mark.parametrize("order", ["base_first", "base_second", "base_not_listed"])
def test_slerp_base_and_one_model(models, order):
    listed = {
        "base_first": "[{model: base}, {model: a}]",
        "base_second": "[{model: a}, {model: base}]",
        "base_not_listed": "[{model: a}]",
    }[order]
    req = load(
        models,
        f"""
        merge_method: slerp
        base_model: base
        models: {listed}
        parameters: {{t: 0.3}}
        """,
    )
    d = str(models)
    assert req.method == "slerp"
    # t=0 -> base, t=1 -> the other, as in mergekit (mergebench's slerp takes a base + one expert)
    assert req.base == f"{d}/base" and req.experts == [f"{d}/a"]
    assert req.params == {"t": 0.3}
    assert req.weights is None


def test_slerp_without_base_interpolates_first_to_second(models):
    # mergekit needs a base here; mergebench's slerp does not, so the listed order decides
    req = load(models, "merge_method: slerp\nmodels: [{model: b}, {model: a}]\nparameters: {t: 0.25}\n")
    assert req.experts == [f"{models}/b", f"{models}/a"] and req.base is None and req.params == {"t": 0.25}


def test_unused_base_methods_keep_listed_models_as_experts(models):
    req = load(
        models,
        """
        merge_method: karcher
        base_model: base
        models:
          - model: base
            parameters: {weight: 2.0}
          - model: a
            parameters: {weight: 1.0}
          - model: b
            parameters: {weight: 1.0}
        parameters: {max_iter: 20}
        """,
    )
    d = str(models)
    assert req.experts == [f"{d}/base", f"{d}/a", f"{d}/b"]  # mergekit also averages the base here
    assert req.weights == [2.0, 1.0, 1.0]
    assert req.base == f"{d}/base"  # still supplies config and tokenizer
    assert req.params == {"max_iter": 20}


def test_equal_per_model_values_collapse_for_shared_parameter(models):
    req = load(
        models,
        """
        merge_method: model_stock
        base_model: base
        models:
          - model: a
            parameters: {filter_wise: true}
          - model: b
            parameters: {filter_wise: true}
        """,
    )
    assert req.params == {"filter_wise": True} and req.per_expert_params == {}


def test_native_mergebench_method_and_overrides(models):
    req = load(
        models,
        """
        merge_method: tsv_merge
        base_model: base
        models: [{model: a}, {model: b}]
        parameters: {rank_fraction: 0.25}
        """,
        seed=7,
        device="cpu",
    )
    assert (req.method, req.params, req.seed) == ("tsv_merge", {"rank_fraction": 0.25}, 7)


def test_unresolvable_references_pass_through_unchanged(tmp_path):
    req = request_from_mergekit_dict(
        {"merge_method": "linear", "models": [{"model": "org/model-a"}, {"model": "org/model-b"}]}, root=tmp_path
    )
    assert req.experts == ["org/model-a", "org/model-b"] and req.base is None


def test_every_supported_mergekit_name_maps_to_a_registered_method():
    from mergebench import get_method

    for mk, mb in MERGEKIT_METHODS.items():
        assert get_method(mb).name == mb, mk


# -- errors: file, key, and what is wrong -------------------------------------------------


@pytest.mark.parametrize("method", ["nuslerp", "passthrough", "nearswap", "ram"])
def test_unsupported_mergekit_methods(models, method):
    msg = error(models, f"merge_method: {method}\nbase_model: base\nmodels: [{{model: a}}, {{model: b}}]\n")
    assert "merge_method" in msg and f"'{method}' is not supported" in msg


def test_unknown_method_lists_supported(models):
    msg = error(models, "merge_method: tiez\nmodels: [{model: a}]\n")
    assert "unknown merge method 'tiez'" in msg
    for name in ("ties", "dare_ties", "della", "slerp", "model_stock", "karcher"):
        assert name in msg


@pytest.mark.parametrize(
    ("text", "key", "phrase"),
    [
        ("tokenizer_source: union\n", "tokenizer_source", "only 'base'"),
        ("tokenizer_source: a\n", "tokenizer_source", "only 'base'"),
        ("tokenizer: {source: base}\n", "tokenizer", "not supported"),
        ("chat_template: chatml\n", "chat_template", "not supported"),
        ("dtype: int8\n", "dtype", "unsupported dtype"),
        ("out_dtyp: float16\n", "out_dtyp", "unknown key"),
        ("parameters: {densty: 0.5}\n", "parameters.densty", "has no parameter 'densty'"),
        ("parameters: {density: 1.5}\n", "parameters.density", "must be in [0.0, 1.0]"),
        ("parameters: {density: [0.1, 0.9]}\n", "parameters.density", "per-layer gradients"),
        ("parameters: {density: [{filter: mlp, value: 0.3}, {value: 0.5}]}\n", "parameters.density", "conditional"),
    ],
)
def test_top_level_errors_name_the_key(models, text, key, phrase):
    msg = error(models, "merge_method: ties\nbase_model: base\nmodels: [{model: a, parameters: {weight: 1}}]\n" + text)
    assert f": {key}:" in msg and phrase in msg, msg


def test_unknown_per_model_parameter_lists_valid_names(models):
    msg = error(
        models,
        """
        merge_method: ties
        base_model: base
        models:
          - model: a
            parameters: {weight: 1, density: 0.5}
          - model: b
            parameters: {weight: 1, densty: 0.5}
        """,
    )
    assert "models[1].parameters.densty" in msg
    assert "valid:" in msg and "density" in msg and "weight" in msg


def test_missing_weight_for_one_model(models):
    msg = error(
        models,
        """
        merge_method: task_arithmetic
        base_model: base
        models:
          - model: a
            parameters: {weight: 1}
          - model: b
        """,
    )
    assert "models[1].parameters.weight" in msg and "missing" in msg


def test_weights_rejected_where_the_method_takes_none(models):
    msg = error(
        models,
        """
        merge_method: model_stock
        base_model: base
        models:
          - model: a
            parameters: {weight: 0.5}
          - model: b
            parameters: {weight: 0.5}
        """,
    )
    assert "models[0].parameters.weight" in msg and "does not take per-model weights" in msg


def test_differing_values_for_a_shared_parameter(models):
    msg = error(
        models,
        """
        merge_method: model_stock
        base_model: base
        models:
          - model: a
            parameters: {filter_wise: true}
          - model: b
            parameters: {filter_wise: false}
        """,
    )
    assert "filter_wise" in msg and "one value" in msg


@pytest.mark.parametrize(
    ("text", "key", "phrase"),
    [
        (
            "merge_method: slerp\nbase_model: base\nmodels: [{model: a}, {model: b}]\nparameters: {t: 0.5}\n",
            "models",
            "exactly one other model",
        ),
        (
            "merge_method: slerp\nbase_model: base\nmodels: [{model: a}]\nparameters: {t: [0, 0.5, 1]}\n",
            "parameters.t",
            "layer_adaptive_slerp",
        ),
        (
            "merge_method: slerp\nbase_model: base\nmodels: [{model: base, parameters: {t: 0.2}}, {model: a}]\n",
            "models[0].parameters.t",
            "no per-model parameters for the base_model",
        ),
        ("merge_method: slerp\nmodels: [{model: a}]\nparameters: {t: 0.5}\n", "models", "needs 2 models"),
        ("merge_method: ties\nmodels: [{model: a}]\n", "base_model", "needs a base_model"),
        ("merge_method: ties\nbase_model: base\nmodels: [{model: base}]\n", "models", "only the base"),
        ("merge_method: arcee_fusion\nbase_model: base\nmodels: [{model: a}, {model: b}]\n", "models", "got 2"),
        ("merge_method: ties\nbase_model: base\nmodels: [{model: a+lora}]\n", "models[0].model", "LoRA"),
        ("merge_method: ties\nbase_model: base@main\nmodels: [{model: a}]\n", "base_model", "@revision"),
        ("merge_method: ties\nbase_model: base\nmodels: [{model: a}, {model: a}]\n", "models[1].model", "listed twice"),
        ("merge_method: ties\nbase_model: base\nmodels: [{model: a, weight: 1}]\n", "models[0].weight", "unknown key"),
        ("merge_method: ties\nbase_model: base\nslices: []\nmodels: [{model: a}]\n", "slices", "not supported"),
        ("merge_method: ties\nbase_model: base\n", "models", "missing"),
        ("base_model: base\nmodels: [{model: a}]\n", "merge_method", "missing"),
    ],
)
def test_structural_errors_name_the_key(models, text, key, phrase):
    msg = error(models, text)
    assert f": {key}:" in msg and phrase in msg, msg


def test_invalid_yaml_and_non_mapping(tmp_path):
    assert "invalid YAML" in error(tmp_path, "merge_method: [ties\n")
    assert "mapping at the top level" in error(tmp_path, "- ties\n")
    with pytest.raises(MergekitConfigError, match="cannot read"):
        load_mergekit_yaml(tmp_path / "missing.yaml")


def test_errors_are_value_errors(models):
    # the CLI reports ValueError subclasses as one-line usage errors
    assert issubclass(MergekitConfigError, ValueError)


# -- the produced requests run -------------------------------------------------------------


def test_request_from_yaml_runs_through_the_engine(tiny_pool, tmp_path):
    import torch
    from safetensors.torch import load_file

    from mergebench.engine import merge

    base, experts = tiny_pool
    p = write(
        tmp_path,
        f"""
        merge_method: ties
        base_model: {base}
        models:
          - model: {experts[0]}
            parameters: {{weight: 1.0, density: 0.5}}
          - model: {experts[1]}
            parameters: {{weight: 0.5, density: 1.0}}
        dtype: float32
        """,
    )
    result = merge(load_mergekit_yaml(p), None, progress=False)
    b = load_file(str(base / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"
    merged, delta = result.state_dict[name], result.state_dict[name] - b[name]
    assert merged.shape == b[name].shape and merged.dtype == torch.float32
    # expert 1 kept everything (density 1): every element moved away from the base
    assert (delta != 0).float().mean() > 0.9


@pytest.mark.mergekit
def test_valid_examples_are_valid_mergekit_configs(models):
    """The YAML accepted above is genuine mergekit syntax (its own parser agrees)."""
    yaml = pytest.importorskip("yaml")
    config = pytest.importorskip("mergekit.config")
    text = textwrap.dedent(
        """
        merge_method: ties
        base_model: base
        models:
          - model: base
          - model: a
            parameters: {weight: 1.0, density: 0.5}
        parameters: {normalize: false, int8_mask: true, lambda: 0.9}
        dtype: bfloat16
        tokenizer_source: base
        """
    )
    config.MergeConfiguration.model_validate(yaml.safe_load(text))
    assert load(models, text).experts == [f"{models}/a"]
