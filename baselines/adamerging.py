"""AdaMerging: task-arithmetic coefficients learned by entropy minimisation on unlabeled inputs.

Yang, Wang, Shen, Liu, Guo, Wang and Tao, "AdaMerging: Adaptive Model Merging for Multi-Task
Learning" (ICLR 2024, arXiv:2310.02575), as the merging-collapse study (App. F.1, Table 53)
runs it on task pairs: theta = theta_0 + sum_i lambda_i tau_i with one lambda per task
(``task``-wise, Table 53 reports lambda_1, lambda_2) or one per task and tensor (``layer``-wise:
AdaMerging's layer-wise variant, one coefficient per parameter tensor, as in its reference
implementation), learned with Adam to minimise the Shannon entropy of the merged model's
predictions on unlabeled validation inputs of every task.

For a causal LM the prediction is the next-token distribution at the last prompt token (the
position that predicts the answer); ``entropy_at="all"`` averages over every prompt position.
The learning is the method's model-level step (:func:`adamerging_step`); the kernel then applies
the learned coefficients tensor by tensor.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from mergebench.baselines._calibrated import floats, statistic
from mergebench.methods import InputContract, Param, method
from mergebench.methods.calibration import CalibrationBudget, CalibrationNeed, ModelProblem

__all__ = ["adamerging", "adamerging_step", "prediction_entropy"]

ADAMERGING_CITATION = (
    "E. Yang, Z. Wang, L. Shen, S. Liu, G. Guo, X. Wang and D. Tao. AdaMerging: Adaptive Model Merging for "
    "Multi-Task Learning. ICLR 2024 (arXiv:2310.02575). Setup of the merging-collapse study, App. F.1 "
    "(500 epochs, learning rate 1e-3, 16 samples per epoch, task pairs) and Table 53."
)

ADAMERGING_BUDGET = CalibrationBudget(
    documents=100, max_tokens=256, seed=0,
    source="documents: the pool each epoch's 16 samples are drawn from (mergebench's choice: up to 100 "
    "validation prompts per task, the size of the largest embedded validation split)",
)


def prediction_entropy(logits: torch.Tensor, attention_mask: torch.Tensor, at: str = "last") -> torch.Tensor:
    """Mean Shannon entropy (nats) of the next-token distributions: at each sequence's last
    non-padding position (``at="last"``), or over every non-padding position (``"all"``)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    h = -(logp.exp() * logp).sum(-1)  # (B, T)
    if at == "last":
        last = attention_mask.sum(1) - 1
        return h[torch.arange(h.shape[0]), last].mean()
    m = attention_mask.to(h.dtype)
    return (h * m).sum() / m.sum()


def _groups(problem: ModelProblem, granularity: str) -> dict[str, int]:
    names = list(problem.base)
    return {n: 0 for n in names} if granularity == "task" else {n: k for k, n in enumerate(names)}


def adamerging_step(problem: ModelProblem, params: Mapping[str, Any], log: dict[str, Any]) -> dict[str, list[torch.Tensor]]:
    """Learn the coefficients: ``epochs`` Adam steps, each on ``samples_per_epoch`` prompts per
    task drawn (without replacement) from ``problem.generator``; the loss is the sum over tasks
    of the mean prediction entropy. Returns ``{tensor: [lambda_i per expert]}``."""
    group = _groups(problem, params["granularity"])
    n = len(problem.task_vectors)
    n_groups = max(group.values()) + 1
    dtype = next(iter(problem.base.values())).dtype
    raw = torch.full((n, n_groups), float(params["init_lambda"]), dtype=dtype, device=problem.device,
                     requires_grad=True)
    opt = torch.optim.Adam([raw], lr=params["lr"])
    clamp = params["clamp"]
    losses: list[float] = []

    def coefficients() -> torch.Tensor:
        return raw.clamp(0.0, 1.0) if clamp else raw

    for _epoch in range(params["epochs"]):
        lam = coefficients()
        merged = {}
        for name, theta0 in problem.base.items():
            g = group[name]
            t = theta0
            for i, tv in enumerate(problem.task_vectors):
                t = t + lam[i, g] * tv[name]
            merged[name] = t
        loss = 0.0
        for batch in problem.batches:
            size = batch["input_ids"].shape[0]
            pick = torch.randperm(size, generator=problem.generator)[: params["samples_per_epoch"]]
            mask = batch["attention_mask"][pick]
            width = int(mask.sum(1).max())
            ids, mask = batch["input_ids"][pick, :width].to(problem.device), mask[:, :width].to(problem.device)
            if params["entropy_at"] == "last":  # the output layer only where the entropy is read
                last = mask.sum(1) - 1
                logits = problem.forward(merged, ids, mask, positions=last)
                loss = loss + prediction_entropy(logits[:, None], torch.ones_like(last)[:, None], "last")
            else:
                loss = loss + prediction_entropy(problem.forward(merged, ids, mask), mask, "all")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        del merged, loss
    final = coefficients().detach()
    log.update({
        "epochs": params["epochs"],
        "granularity": params["granularity"],
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "loss_every_50": losses[::50],
        "lambda_mean_per_task": final.mean(dim=1).tolist(),
    })
    if params["granularity"] == "task":
        log["lambda"] = final[:, 0].tolist()
    return {name: [final[i, g].clone() for i in range(n)] for name, g in group.items()}


@method(
    "adamerging",
    citation=ADAMERGING_CITATION,
    paper="adamerging2024",
    params=[
        Param("granularity", "str", "task", choices=("task", "layer"),
              help="one coefficient per task (merging-collapse study Table 53 reports lambda_1, lambda_2 per task "
              "pair) or per task and parameter tensor (AdaMerging's layer-wise variant)"),
        Param("epochs", "int", 500, ge=0, help="optimisation steps (merging-collapse study App. F.1: 500 epochs)"),
        Param("lr", "float", 1e-3, ge=0.0, help="Adam learning rate (merging-collapse study App. F.1: 1e-3)"),
        Param("samples_per_epoch", "int", 16, ge=1,
              help="unlabeled prompts per task per step (merging-collapse study App. F.1: 16 samples per epoch)"),
        Param("init_lambda", "float", 0.3,
              help="initial coefficient of every task vector (AdaMerging's initial value 0.3; FusionBench's "
              "adamerging/clip.yaml init_values = 0.3)"),
        Param("clamp", "bool", True,
              help="keep coefficients in [0, 1] (Table 53 reports lambda_2 = 0.0 exactly, consistent with it)"),
        Param("entropy_at", "str", "last", choices=("last", "all"),
              help="which next-token distributions the entropy averages: the last prompt position (the "
              "answer's prediction) or every position"),
        Param("calibration_docs", "int", 100, ge=1,
              help="validation prompts per task that the per-epoch samples are drawn from"),
    ],
    contract=InputContract(base="required", min_experts=1, per_expert_weights=False),
    calibration=CalibrationNeed(model_step=adamerging_step, output="coefficients", labels=False,
                                budget=ADAMERGING_BUDGET, budget_params={"documents": "calibration_docs"}),
    granularity="elementwise",
    related_papers=("glue_collapse",),
    properties={"identity_on_base", "nonfinite_propagates"},
)
def adamerging(base, experts, weights, params, ctx):
    """theta_0 + sum_i lambda_i tau_i with the learned coefficients of ``ctx.aux["coefficients"]``.

    ``ctx.aux["coefficients"]`` holds one scalar tensor per expert for this tensor; a tensor
    the model step did not see (not a parameter of the model) keeps ``init_lambda``.
    """
    given = statistic(ctx, "coefficients", len(experts))
    lam = floats(given) if given is not None else [params["init_lambda"]] * len(experts)
    out = base.clone()
    tmp = torch.empty_like(base)
    for e, c in zip(experts, lam):
        torch.sub(e, base, out=tmp)
        out.add_(tmp, alpha=c)  # also at lambda 0, so NaN/inf inputs stay visible
    return out

