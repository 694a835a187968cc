"""Fitting gates on frozen exits: only the gates change, and they learn which exits are right."""

from __future__ import annotations

import pytest
import torch
from conftest import images, make_backbone

from timm_exits import Collected, calibrate, collect, simulate, sweep, wrap
from timm_exits.inference.gate_fitting import fit_gates


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
    from timm_exits.core.gates import logit_stats

    return logit_stats(data.logits[:, b])


def test_soft_objective_and_errors():
    model = _model()
    data = _data()
    fit = fit_gates(model, data, objective="soft", cost_weight=2.0)
    assert fit.loss_after < fit.loss_before and fit.cost_after < fit.cost_before
    with pytest.raises(ValueError, match="objective"):
        fit_gates(model, data, objective="accuracy")
    with pytest.raises(TypeError, match="positional"):  # an objective passed by position cannot become the cost weight
        fit_gates(model, data, "correct")
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


# ------------------------------------------------------------------------------------ non-finite values
def _gate_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if ".gate." in k}


def _assert_same_gates(model, before: dict[str, torch.Tensor]) -> None:
    after = _gate_state(model)
    assert after.keys() == before.keys()
    for k, v in before.items():  # bit for bit, not close
        assert torch.equal(after[k].view(torch.int32), v.view(torch.int32)), k


def _with_nonfinite(data: Collected) -> Collected:
    logits, gate_logits = data.logits.clone(), data.gate_logits.clone()
    logits[17, 0, 2] = float("nan")
    logits[40, 0] = float("inf")
    logits[101, 0, 1] = -float("inf")
    logits[5, 1, 0] = float("nan")  # the final head
    gate_logits[200, 0] = float("nan")
    return Collected(logits, gate_logits, data.labels, data.costs)


_NONFINITE = (
    "3 of 288 samples have non-finite logits at exit 0 (first: 17, 40, 101); "
    "1 of 288 samples have non-finite logits at exit 1 (the final head) (first: 5); "
    "1 of 288 samples have non-finite gate logits at exit 0 (first: 200). "
    "Drop those samples (index logits, gate_logits and labels with the finite rows) or collect again on clean "
    "held-out data; thresholds and gates fitted on NaN or inf would be meaningless."
)


def test_calibrate_refuses_nonfinite_data_and_keeps_the_stored_policy():
    model = _model()
    clean = _data(n=288)
    single = clean.logits.clone()
    single[123, 0, 0] = float("nan")  # one sample is enough
    one = Collected(single, clean.gate_logits, clean.labels, clean.costs)
    for data, message in ((one, "1 of 288 samples have non-finite logits at exit 0 (first: 123)"), (None, None)):
        data = data or _with_nonfinite(clean)
        message = message or _NONFINITE
        for policy in ("gate", "confidence", "entropy"):
            with pytest.raises(ValueError) as e:
                calibrate(model, data, policy=policy, target_cost=0.6)
            assert str(e.value).startswith(f"calibrate: {message}"), str(e.value)
            assert model.config.policy == "gate" and model.config.thresholds is None
    with pytest.raises(ValueError, match=r"^sweep: 3 of 288 samples"):
        sweep(_with_nonfinite(clean), "confidence")
    with pytest.raises(ValueError, match="target_cost=nan is not a finite number"):
        calibrate(model, clean, policy="gate", target_cost=float("nan"))
    cal = calibrate(model, clean, policy="confidence", target_cost=0.6)  # the clean data still calibrates
    assert cal.cost <= 0.6 and model.config.thresholds == [cal.threshold]


def test_fit_gates_refuses_nonfinite_data_and_leaves_the_gates_bit_identical():
    model = _model()
    before = _gate_state(model)
    with pytest.raises(ValueError) as e:
        fit_gates(model, _with_nonfinite(_data(n=288)))
    assert str(e.value) == f"fit_gates: {_NONFINITE}"
    _assert_same_gates(model, before)

    data = _data(n=288)  # finite logits too large to normalise: the label's log-probability overflows
    logits = data.logits.clone()
    label = int(data.labels[7])
    logits[7, 0] = 0.0
    logits[7, 0, (label + 1) % logits.shape[-1]] = 3e38
    logits[7, 0, label] = -3e38
    huge = Collected(logits, data.gate_logits, data.labels, data.costs)
    with pytest.raises(ValueError, match=r"^fit_gates: 1 of 288 samples have non-finite exit statistics .*first: 7\)"):
        fit_gates(model, huge, objective="soft")
    _assert_same_gates(model, before)


def test_fit_gates_that_diverge_are_not_stored():
    model = _model()
    fit_gates(model, _data(), objective="correct", steps=20)  # gates the model already had
    before = _gate_state(model)
    with pytest.raises(
        ValueError,
        match=r"fit_gates diverged: after 50 steps \(lr=1e\+30\) the fitted gates of "
        r"exit 0 \('layer2'\) have non-finite parameters",
    ) as e:
        fit_gates(model, _data(), lr=1e30, steps=50)
    assert "left unchanged" in str(e.value)
    _assert_same_gates(model, before)


def test_fit_gates_on_a_float16_model_equals_the_float32_fit_and_keeps_the_dtype():
    data = _data()
    fits, gates = [], []
    for dtype in (torch.float32, torch.float16):
        model = _model().to(dtype)
        fits.append(fit_gates(model, data, objective="no_gain", steps=50))
        gates.append(model.branches[0].gate)
    assert all(p.dtype == torch.float16 for p in gates[1].parameters())
    assert fits[1] == fits[0]  # fitted on float32 copies: the same numbers
    for a, b in zip(gates[0].parameters(), gates[1].parameters()):
        torch.testing.assert_close(b.float(), a.half().float())


# ------------------------------------------------------------------------------------ labels and other models
def test_labels_of_any_integer_dtype_or_whole_floats_fit_and_calibrate_as_int64_labels():
    data = _data(n=288)
    model = _model()
    ref = fit_gates(model, data, steps=20)
    gates = _gate_state(model)
    cal = calibrate(model, data, policy="confidence", target_cost=0.7, apply=False)
    for dtype in (torch.uint8, torch.int16, torch.int32, torch.float32, torch.float64):
        given = Collected(data.logits, data.gate_logits, data.labels.to(dtype), data.costs)
        assert given.labels.dtype == torch.int64 and torch.equal(given.labels, data.labels)
        model = _model()
        assert fit_gates(model, given, steps=20) == ref
        _assert_same_gates(model, gates)
        assert calibrate(model, given, policy="confidence", target_cost=0.7, apply=False) == cal
    for bad, shown in ((2.5, r"\[2.5\]"), (float("nan"), r"\[nan\]"), (float("inf"), r"\[inf\]")):
        labels = data.labels.float()
        labels[3] = bad
        with pytest.raises(
            ValueError, match=rf"^labels must be whole class indices; got torch.float32 labels with values {shown}"
        ):
            Collected(data.logits, data.gate_logits, labels, data.costs)


def test_calibrate_and_fit_gates_refuse_data_collected_from_another_model():
    def wrapped(exits, num_classes=5):
        m, size = make_backbone("resnet18", num_classes=num_classes)
        return wrap(m, exits, input_size=(3, size, size)).eval()

    model = wrapped(["layer1", "layer2", "layer3"])
    x = images(16, 64, seed=2)
    data = collect(model, [(x, torch.arange(16) % 5)])
    others = {
        r"data has 3 early exits; the model has 2; data has exit costs \[": wrapped(["layer2", "layer3"]),
        r"data has 5 classes; the model has 10; data has exit costs": wrapped(
            ["layer1", "layer2", "layer3"], num_classes=10
        ),
        r"data has exit costs \[[^]]*\]; the model has \[[^]]*\]\. The data": wrapped(["layer1.0", "layer2", "layer3"]),
    }
    for message, other in others.items():
        before = _gate_state(other)
        for where, run in (
            ("calibrate", lambda m: calibrate(m, data, policy="confidence", target_cost=0.7)),
            ("fit_gates", lambda m: fit_gates(m, data, steps=5)),
        ):
            with pytest.raises(ValueError, match=rf"^{where}: {message}") as e:
                run(other)
            assert str(e.value).endswith("collect it again with this model, timm_exits.collect(model, loader).")
        assert other.config.thresholds is None
        _assert_same_gates(other, before)
    cal = calibrate(model, data, policy="confidence", target_cost=0.7)  # the model it came from
    assert model.config.thresholds == [cal.threshold] * 3
    fit_gates(model, data, steps=5)


def test_an_empty_collected_is_refused_and_leaves_the_gates_and_policy_as_they_were():
    model, data = _model(), _data()
    model.config.policy, model.config.thresholds = "gate", [0.7]
    before = _gate_state(model)
    empty = Collected(data.logits[:0], data.gate_logits[:0], data.labels[:0], data.costs)
    for call in (
        lambda: fit_gates(model, empty, steps=3),
        lambda: calibrate(model, empty, "confidence", target_cost=0.7),
        lambda: calibrate(model, empty, "gate", max_accuracy_drop=0.01),
        lambda: sweep(empty, "entropy"),
    ):
        with pytest.raises(ValueError, match=r"the collected data holds no sample"):
            call()
    _assert_same_gates(model, before)
    assert (model.config.policy, model.config.thresholds) == ("gate", [0.7])
