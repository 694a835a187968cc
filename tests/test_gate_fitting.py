"""Fitting gates on frozen exits: only the gates change, and they learn which exits are right."""

from __future__ import annotations

import pytest
import torch
from conftest import make_backbone

from timm_exits import Collected, calibrate, simulate, wrap
from timm_exits.gate_fitting import fit_gates


def _data(n: int = 600, classes: int = 5, seed: int = 0) -> Collected:
    """Exit 0 is right on half the samples; when wrong it still looks fairly confident, but its
    margin over the runner-up is small, which max-softmax alone cannot see as well."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    right = torch.rand(n, generator=g) < 0.5
    logits0 = torch.randn(n, classes, generator=g) * 0.3
    wrong = (labels + 1) % classes
    top = torch.where(right, labels, wrong)
    logits0[torch.arange(n), top] += torch.where(
        right, 2.0 + torch.rand(n, generator=g), 1.6 + torch.rand(n, generator=g)
    )
    # the wrong answers have a strong runner-up: the true class
    logits0[torch.arange(n), labels] += torch.where(right, torch.zeros(n), 1.4 * torch.ones(n))
    final = torch.randn(n, classes, generator=g) * 0.3
    final[torch.arange(n), labels] += 4.0
    logits = torch.stack([logits0, final], dim=1)
    return Collected(logits, torch.zeros(n, 1), labels, torch.tensor([0.4, 1.0]))


def _model():
    m, size = make_backbone("resnet18", num_classes=5)
    return wrap(m, ["layer2"], input_size=(3, size, size), costs=[0.4, 1.0])


def test_only_gates_change_and_objective_drops():
    model = _model()
    data = _data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit = fit_gates(model, data, objective="correct")
    assert fit.loss_after < fit.loss_before
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".gate." in k for k in changed)
    assert all(p.grad is None for p in model.parameters())


def test_correctness_gates_beat_max_softmax_at_equal_cost():
    model = _model()
    train, held_out = _data(seed=0), _data(seed=1)
    fit_gates(model, train, objective="correct")
    gate_logits = torch.stack(
        [b.gate(None, torch.cat([_stats(held_out, j) for j in range(b.position + 1)], 1)) for b in model.branches], 1
    ).detach()
    test = Collected(held_out.logits, gate_logits, held_out.labels, held_out.costs)
    for budget in (0.6, 0.7):
        gate = calibrate(model, test, policy="gate", target_cost=budget, apply=False)
        conf = calibrate(model, test, policy="confidence", target_cost=budget, apply=False)
        assert gate.accuracy > conf.accuracy, (budget, gate.accuracy, conf.accuracy)
        assert gate.cost <= budget
    idx = simulate(test, "gate", gate.threshold)
    assert (idx == 0).any() and (idx == 1).any(), "the calibrated gates should route some samples to each exit"


def _stats(data: Collected, b: int) -> torch.Tensor:
    from timm_exits.gates import logit_stats

    return logit_stats(data.logits[:, b])


def test_soft_objective_and_errors():
    model = _model()
    data = _data()
    fit = fit_gates(model, data, objective="soft", cost_weight=2.0)
    assert fit.loss_after < fit.loss_before and fit.cost_after < fit.cost_before
    with pytest.raises(ValueError, match="objective"):
        fit_gates(model, data, objective="accuracy")
    m, size = make_backbone("resnet18", num_classes=5)
    feats = wrap(m, ["layer2"], gate="features", input_size=(3, size, size))
    with pytest.raises(ValueError, match="gate='stats'"):
        fit_gates(feats, data)


def _hopeless_data(n: int = 900, classes: int = 5, seed: int = 0) -> Collected:
    """Three kinds of samples: (a) exit 0 right and confident; (b) exit 0 fairly confident but wrong,
    the final exit right; (c) exit 0 unsure and wrong, and the final exit wrong too (hopeless)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    kind = torch.randint(0, 3, (n,), generator=g)
    wrong = (labels + 1) % classes
    rows = torch.arange(n)
    logits0 = torch.randn(n, classes, generator=g) * 0.3
    logits0[rows, torch.where(kind == 0, labels, wrong)] += torch.where(
        kind == 0, 3.0, torch.where(kind == 1, 2.0, 0.4)
    ) + 0.3 * torch.rand(n, generator=g)
    final = torch.randn(n, classes, generator=g) * 0.3
    final[rows, torch.where(kind == 2, wrong, labels)] += 4.0
    return Collected(torch.stack([logits0, final], dim=1), torch.zeros(n, 1), labels, torch.tensor([0.4, 1.0]))


def _fitted_gate_data(model, held_out: Collected) -> Collected:
    gate_logits = torch.stack(
        [b.gate(None, torch.cat([_stats(held_out, j) for j in range(b.position + 1)], 1)) for b in model.branches], 1
    ).detach()
    return Collected(held_out.logits, gate_logits, held_out.labels, held_out.costs)


def test_no_gain_gates_let_hopeless_samples_out_and_beat_max_softmax():
    train, held_out = _hopeless_data(seed=0), _hopeless_data(seed=1)
    budget = 0.62  # about two thirds of the samples can leave at exit 0
    results = {}
    for objective in ("no_gain", "correct"):
        model = _model()
        fit_gates(model, train, objective=objective)
        test = _fitted_gate_data(model, held_out)
        results[objective] = calibrate(model, test, policy="gate", target_cost=budget, apply=False)
        if objective == "no_gain":
            idx = simulate(test, "gate", results[objective].threshold)
    conf = calibrate(model, held_out, policy="confidence", target_cost=budget, apply=False)
    # max-softmax lets the confident-but-wrong (b) samples out; "no_gain" keeps them for the final exit
    # and lets the hopeless (c) ones out instead: about 2/3 right against about 1/3.
    assert results["no_gain"].cost <= budget and conf.cost <= budget
    assert results["no_gain"].accuracy > conf.accuracy + 0.2, (results["no_gain"].accuracy, conf.accuracy)
    assert results["no_gain"].accuracy > results["correct"].accuracy + 0.05
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 5, (900,), generator=g)
    kind = torch.randint(0, 3, (900,), generator=g)
    assert torch.equal(labels, held_out.labels)
    assert (idx[kind == 1] == 1).float().mean() > 0.9, "the fixable samples should go on to the final exit"
    assert (idx[kind == 2] == 0).float().mean() > 0.9, "the hopeless samples should leave at exit 0"
