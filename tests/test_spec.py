"""The method contract: parameter typing/validation and the input contract."""

import pytest

from mergebench.methods import InputContract, MethodSpec, ModuleKind, Param, ParameterError, TensorContext
from mergebench.methods.naming import count_layers, layer_index, module_kind


def _spec(**kw):
    return MethodSpec(name="toy", kernel=lambda b, e, w, p, c: e[0], **kw)


def test_defaults_and_coercion_from_cli_strings():
    spec = _spec(
        params=(
            Param("lambda", "float", 1.0, ge=0),
            Param("max_iter", "int", 10, ge=1),
            Param("normalize", "bool", True),
            Param("consensus", "str", "sum", choices=("sum", "count")),
            Param("schedule", "floats", (0.0, 1.0)),
        )
    )
    assert spec.validate_params() == {"lambda": 1.0, "max_iter": 10, "normalize": True, "consensus": "sum", "schedule": (0.0, 1.0)}
    got = spec.validate_params({"lambda": "0.5", "max_iter": "3", "normalize": "false", "consensus": "count", "schedule": "0,0.25,1"})
    assert got == {"lambda": 0.5, "max_iter": 3, "normalize": False, "consensus": "count", "schedule": (0.0, 0.25, 1.0)}


@pytest.mark.parametrize(
    "given, fragment",
    [
        ({"lambda": -1}, "'lambda' must be in [0"),
        ({"lambda": "abc"}, "'lambda' must be of type float"),
        ({"lambda": float("nan")}, "'lambda' must be of type float"),
        ({"max_iter": 2.5}, "'max_iter' must be of type int"),
        ({"normalize": "maybe"}, "'normalize' must be of type bool"),
        ({"consensus": "vote"}, "'consensus' must be one of sum, count"),
        ({"lamda": 1}, "has no parameter 'lamda'; valid: lambda, max_iter, normalize, consensus"),
    ],
)
def test_bad_parameters_name_the_parameter(given, fragment):
    spec = _spec(
        params=(
            Param("lambda", "float", 1.0, ge=0),
            Param("max_iter", "int", 10, ge=1),
            Param("normalize", "bool", True),
            Param("consensus", "str", "sum", choices=("sum", "count")),
        )
    )
    with pytest.raises(ParameterError) as err:
        spec.validate_params(given)
    assert fragment in str(err.value)
    assert "method 'toy'" in str(err.value) or "valid:" in str(err.value)


def test_per_expert_values():
    spec = _spec(params=(Param("density", "float", 0.5, ge=0, le=1, per_expert=True),))
    assert spec.validate_params(n_experts=3) == {"density": (0.5, 0.5, 0.5)}
    assert spec.validate_params({"density": "0.2,0.4,0.6"}, n_experts=3) == {"density": (0.2, 0.4, 0.6)}
    with pytest.raises(ParameterError, match="2 per-expert values for 3 experts"):
        spec.validate_params({"density": [0.1, 0.2]}, n_experts=3)
    with pytest.raises(ParameterError, match="'density' must be in"):
        spec.validate_params({"density": [0.1, 0.2, 1.5]}, n_experts=3)


def test_nullable():
    spec = _spec(params=(Param("tau", "float", None, nullable=True, gt=0),))
    assert spec.validate_params() == {"tau": None}
    assert spec.validate_params({"tau": "none"}) == {"tau": None}
    assert spec.validate_params({"tau": "0.3"}) == {"tau": 0.3}


@pytest.mark.parametrize(
    "contract, has_base, n, fragment",
    [
        (InputContract(base="required"), False, 2, "needs a base model"),
        (InputContract(min_experts=2), True, 1, "at least 2 experts"),
        (InputContract(max_experts=2), True, 3, "at most 2 experts"),
    ],
)
def test_input_contract(contract, has_base, n, fragment):
    with pytest.raises(ParameterError, match=fragment):
        contract.check("toy", has_base=has_base, n_experts=n)
    contract.check("toy", has_base=True, n_experts=2)


def test_describe_is_json_ready():
    import json

    spec = _spec(params=(Param("t", "float", 0.5, ge=0, le=1, help="interpolation"),), citation="X et al.")
    d = json.loads(json.dumps(spec.describe()))
    assert d["params"][0] == {"name": "t", "type": "float", "default": 0.5, "range": "[0, 1]", "per_expert": False, "help": "interpolation"}


@pytest.mark.parametrize(
    "name, layer, kind",
    [
        ("model.layers.3.self_attn.q_proj.weight", 3, ModuleKind.ATTENTION),
        ("model.layers.11.mlp.down_proj.weight", 11, ModuleKind.MLP),
        ("model.layers.0.input_layernorm.weight", 0, ModuleKind.NORM),
        ("model.layers.0.post_attention_layernorm.weight", 0, ModuleKind.NORM),
        ("model.embed_tokens.weight", None, ModuleKind.EMBEDDING),
        ("lm_head.weight", None, ModuleKind.EMBEDDING),
        ("model.norm.weight", None, ModuleKind.NORM),
        ("transformer.h.5.attn.c_attn.weight", 5, ModuleKind.ATTENTION),
        ("model.rotary_emb.inv_freq", None, ModuleKind.OTHER),
    ],
)
def test_naming(name, layer, kind):
    assert layer_index(name) == layer
    assert module_kind(name) == kind


def test_depth_and_layer_count():
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(5)] + ["lm_head.weight"]
    assert count_layers(names) == 5
    assert TensorContext(layer=0, num_layers=5).depth == 0.0
    assert TensorContext(layer=4, num_layers=5).depth == 1.0
    assert TensorContext(layer=None, num_layers=5).depth is None
