"""EMR-Merging: one unified task vector, plus a light mask and rescaler per task.

Huang, Ye, Chen, He, Yue and Ouyang, "EMR-Merging: Tuning-Free High-Performance Model Merging"
(NeurIPS 2024, arXiv:2405.17461); the merging-collapse study runs it on GLUE (App. G.3, Table 58).

* Elect: the unified sign gamma = sign(sum_i tau_i); the unified magnitude at each entry is the
  largest |tau_i| among the experts whose sign agrees with gamma: tau_uni = gamma * max_i |tau_i| [agree].
* Mask: M_i = [tau_i * gamma > 0], one bit per entry and task.
* Rescale: xi_i = sum |tau_i| / sum |M_i * tau_uni|, one scalar per task over the whole model.

Task i's model is theta_0 + xi_i M_i * tau_uni: the method's output is per task
(``outputs="per_task"``; the evaluation scores each task with its own model). ``task=None``
gives the unified model theta_0 + tau_uni. The rescalers need whole-model sums: a prepass
collects them per tensor. No calibration data are needed (EMR is tuning-free).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from mergebench.baselines._common import task_vectors
from mergebench.methods import InputContract, Param, ParameterError, method

__all__ = ["emr_merging", "emr_parts", "emr_rescalers"]

EMR_CITATION = (
    "C. Huang, P. Ye, T. Chen, T. He, X. Yue and W. Ouyang. EMR-Merging: Tuning-Free High-Performance Model "
    "Merging. NeurIPS 2024 (arXiv:2405.17461). Run on GLUE in the merging-collapse study, App. G.3, Table 58."
)
RESCALERS = ("sum", "tensor_mean")


def emr_parts(base: torch.Tensor, experts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(tau, masks, tau_uni)``: stacked task vectors ``(N, *shape)``, the agreement masks (as
    0/1 in the tensors' dtype) and the unified task vector. NaN/inf inputs reach ``tau_uni``."""
    tau = task_vectors(base, experts)
    flag = torch.sign(tau.sum(dim=0))
    masks = ((tau * flag) > 0).to(tau.dtype)
    uni = (tau.abs() * masks).amax(dim=0) * flag
    return tau, masks, uni


def _prepass(base, experts, params, ctx) -> Mapping[str, float]:
    tau, masks, uni = emr_parts(base, experts)
    acc = torch.float64
    out: dict[str, float] = {"numel": float(base.numel())}
    for i in range(len(experts)):
        out[f"abs_tau_{i}"] = float(tau[i].abs().sum(dtype=acc))
        out[f"abs_uni_{i}"] = float((masks[i] * uni).abs().sum(dtype=acc))
    return out


_CACHE: tuple[object, int, str, tuple[float, ...]] | None = None


def emr_rescalers(model_stats: Mapping[str, Mapping[str, float]], n_experts: int, mode: str = "sum") -> tuple[float, ...]:
    """xi_i = sum_t |tau_i,t| / sum_t |M_i,t tau_uni,t| over every tensor t (``mode="sum"``, the EMR
    paper's rescaler), or with each tensor's sums divided by its size first (``"tensor_mean"``,
    FusionBench's emr_merge). 1 where the denominator is 0 (nothing survives the mask)."""
    global _CACHE
    if _CACHE is not None and _CACHE[0] is model_stats and _CACHE[1] == len(model_stats) and _CACHE[2] == mode:
        return _CACHE[3]
    num = [0.0] * n_experts
    den = [0.0] * n_experts
    for s in model_stats.values():
        if "numel" not in s:
            continue
        scale = 1.0 / s["numel"] if mode == "tensor_mean" and s["numel"] else 1.0
        for i in range(n_experts):
            num[i] += s[f"abs_tau_{i}"] * scale
            den[i] += s[f"abs_uni_{i}"] * scale
    out = tuple(n / d if d != 0 else (1.0 if math.isfinite(n) else math.nan) for n, d in zip(num, den))
    _CACHE = (model_stats, len(model_stats), mode, out)
    return out


def _validate(params: dict[str, Any], n_experts: int | None) -> dict[str, Any]:
    task = params["task"]
    if task is not None and n_experts is not None and task >= n_experts:
        raise ParameterError(f"method 'emr_merging': parameter 'task' is {task}, but there are {n_experts} experts "
                             f"(tasks 0..{n_experts - 1})")
    return params


@method(
    "emr_merging",
    citation=EMR_CITATION,
    paper="emr_merging2024",
    params=[
        Param("task", "int", None, ge=0, nullable=True,
              help="which task's model to build (the expert's index); None = the unified model theta_0 + tau_uni. "
              "The evaluation builds one per task"),
        Param("rescaler", "str", "sum", choices=RESCALERS,
              help="'sum': xi_i = sum|tau_i| / sum|M_i tau_uni| over the whole model (the EMR paper); "
              "'tensor_mean': each tensor's mean |.| summed instead (FusionBench's emr_merge)"),
    ],
    contract=InputContract(base="required", min_experts=1, per_expert_weights=False),
    outputs="per_task",
    granularity="tensor",
    prepass=_prepass,
    validate=_validate,
    related_papers=("glue_collapse",),
    properties={"identity_on_base", "idempotent", "order_invariant"},
)
def emr_merging(base, experts, weights, params, ctx):
    """EMR-Merging: theta_0 + xi_k M_k * tau_uni for task k (elect, mask, rescale); theta_0 + tau_uni for task=None.

    xi_k comes from the prepass sums over the whole model (``ctx.model_stats``). With one
    expert, tau_uni = tau, M = [tau != 0] and xi = 1: task 0's model is that expert.
    """
    _tau, masks, uni = emr_parts(base, experts)
    task = params["task"]
    if task is None:
        return uni.add_(base)
    if task >= len(experts):
        raise ValueError(f"{ctx.name}: task {task} out of range for {len(experts)} experts")
    xi = emr_rescalers(ctx.model_stats, len(experts), params["rescaler"])[task]
    return (masks[task] * uni).mul_(xi).add_(base)
