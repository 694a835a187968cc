"""Hard early exit: same answers as a full forward, fewer samples in later stages, calibration."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from conftest import images, make_backbone, spread_thresholds

from timm_exits import Collected, EarlyExitModel, calibrate, collect, fit_gates, predict, simulate, sweep, wrap
from timm_exits.core.gates import logit_stats
from timm_exits.core.layout import to_nchw
from timm_exits.inference.hard_exit import _check_batch_shrink, _run_hard, run_assigned
from timm_exits.inference.policies import exit_mask, resolve_thresholds


def _wrapped(name: str, exits="auto"):
    m, size = make_backbone(name)
    return wrap(m, exits, input_size=(3, size, size)).eval(), size


def _model_of(data: Collected, exits) -> EarlyExitModel:
    """A resnet18 with the classes and exit costs of `data` (calibrate refuses another model's data); its gates
    read features, which calibrate cannot recompute from logits, so made-up gate logits are taken as given."""
    m, size = make_backbone("resnet18", num_classes=data.logits.shape[-1])
    return wrap(m, exits, input_size=(3, size, size), costs=data.costs.tolist(), gate="features").eval()


def _reference(model, x, policy, thresholds):
    """Full forward, then pick each sample's first exit whose rule fires."""
    with torch.no_grad():
        out = model(x)
    index = torch.full((x.shape[0],), model.num_exits - 1)
    for b in reversed(range(model.num_exits - 1)):
        index[exit_mask(policy, out.logits[b], out.gate_logits[:, b], thresholds[b])] = b
    logits = torch.stack([out.logits[int(index[i])][i] for i in range(x.shape[0])])
    return index, logits.float(), out


def _mixing_thresholds(model, x, policy):
    """Per-exit thresholds that send roughly a quarter of the remaining samples out at each exit."""
    with torch.no_grad():
        out = model(x)
    ts = []
    for b in range(model.num_exits - 1):
        if policy == "gate":
            s = torch.sigmoid(out.gate_logits[:, b])
            ts.append(float(torch.quantile(s, 0.75)))
        elif policy == "confidence":
            ts.append(float(torch.quantile(logit_stats(out.logits[b])[:, 0], 0.75)))
        else:
            ts.append(float(torch.quantile(logit_stats(out.logits[b])[:, 1], 0.25)))
    return ts


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224", "swin_tiny_patch4_window7_224"])
@pytest.mark.parametrize("policy", ["gate", "confidence", "entropy"])
def test_hard_exit_equals_full_forward_then_pick(name, policy):
    model, size = _wrapped(name)
    x = images(16, size, seed=3)
    thresholds = _mixing_thresholds(model, x, policy)
    index, logits, _ = _reference(model, x, policy, thresholds)
    assert len(set(index.tolist())) >= 3, "the thresholds should mix exits"
    pred = predict(model, x, policy, thresholds)
    assert pred.stats.batch_shrink
    assert torch.equal(pred.exit_index, index)
    torch.testing.assert_close(pred.logits, logits, rtol=1e-4, atol=1e-4)
    assert pred.stats.counts == torch.bincount(index, minlength=model.num_exits).tolist()
    torch.testing.assert_close(pred.stats.expected_cost, float(model.costs[index].mean()))


def _stage_batch_sizes(model, names):
    seen = {n: [] for n in names}
    modules = dict(model.backbone.named_modules())
    handles = [modules[n].register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].shape[0])) for n in names]
    return seen, handles


def test_batch_1_stops_the_backbone():
    model, size = _wrapped("resnet18")
    seen, handles = _stage_batch_sizes(model, ["layer2", "layer3", "layer4", "fc"])
    x = images(1, size)
    pred = predict(model, x, "confidence", 0.0)  # every sample leaves at the first exit
    assert pred.exit_index.tolist() == [0]
    assert seen == {"layer2": [], "layer3": [], "layer4": [], "fc": []}
    pred = predict(model, x, "confidence", 1.0)  # nobody is that confident: all layers run
    assert pred.exit_index.tolist() == [model.num_exits - 1]
    assert seen == {"layer2": [1], "layer3": [1], "layer4": [1], "fc": [1]}
    for h in handles:
        h.remove()


def test_batch_shrinks_after_each_exit():
    model, size = _wrapped("resnet18")
    x = images(12, size, seed=5)
    thresholds = _mixing_thresholds(model, x, "confidence")
    index, _, _ = _reference(model, x, "confidence", thresholds)
    predict(model, x, "confidence", thresholds)  # runs the one-off batch-shrink check (on 2 samples)
    assert model._batch_shrink_safe is True
    seen, handles = _stage_batch_sizes(model, ["layer2", "layer3", "layer4"])
    predict(model, x, "confidence", thresholds)
    remaining = [int((index > b).sum()) for b in range(3)]
    assert seen == {"layer2": [remaining[0]], "layer3": [remaining[1]], "layer4": [remaining[2]]}
    for h in handles:
        h.remove()


def test_the_batch_shrink_check_judges_the_structure_in_eval_mode_and_leaves_the_model_as_it_was():
    model, size = _wrapped("resnet18")
    model.train()  # batch statistics would make any sample's result depend on the others
    x = images(4, size, seed=6)
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "cannot drop exited samples" fallback for a resnet
        assert _check_batch_shrink(model, x) is True
    assert model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in buffers.items())  # BatchNorm running stats untouched


def test_unsafe_backbone_falls_back_to_masking():
    # Exits inside densenet's dense blocks: the block concatenates earlier layers' full-batch outputs.
    m, size = make_backbone("densenet121")
    model = wrap(
        m, ["features.denseblock1.denselayer2", "features.denseblock2.denselayer3"], input_size=(3, size, size)
    )
    model.eval()
    x = images(8, size)
    thresholds = _mixing_thresholds(model, x, "confidence")
    index, logits, _ = _reference(model, x, "confidence", thresholds)
    with pytest.warns(UserWarning, match="cannot drop exited samples"):
        pred = predict(model, x, "confidence", thresholds)
    assert not pred.stats.batch_shrink
    assert torch.equal(pred.exit_index, index)
    torch.testing.assert_close(pred.logits, logits, rtol=1e-4, atol=1e-4)
    # said once: the result of the check is kept
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        predict(model, x, "confidence", thresholds)


def test_soft_policy_and_labels():
    model, size = _wrapped("resnet18")
    x = images(6, size)
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    pred = predict(model, x, "soft", labels=y)
    with torch.no_grad():
        ref = model(x).log_probs
    torch.testing.assert_close(pred.logits, ref)
    assert pred.stats.counts[-1] == 6
    assert pred.stats.accuracy == pytest.approx(float((ref.argmax(-1) == y).float().mean()))
    hard = predict(model, x, "confidence", 0.0, labels=y)
    acc0 = float((hard.logits.argmax(-1) == y).float().mean())
    assert hard.stats.exit_accuracy[0] == pytest.approx(acc0)
    assert hard.stats.exit_accuracy[1:] == [None] * (model.num_exits - 1)


def test_inference_mode_and_bf16_autocast():
    model, size = _wrapped("resnet18")
    x = images(8, size)
    thresholds = spread_thresholds(model, x, "confidence")
    with torch.inference_mode():
        a = predict(model, x, "confidence", thresholds)
    model._batch_shrink_safe = None
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        b = predict(model, x, "confidence", thresholds)
        out = model(x)
    assert b.stats.batch_shrink, "the one-off batch-shrink check must not be fooled by bf16 rounding"
    assert a.logits.dtype == b.logits.dtype == torch.float32
    assert torch.isfinite(b.logits).all() and torch.isfinite(out.log_probs).all()
    index, logits, full = _reference(model, x, "confidence", thresholds)
    assert len(set(index.tolist())) == model.num_exits, "the thresholds should mix exits"
    assert torch.equal(a.exit_index, index)  # inference mode changes nothing in fp32
    torch.testing.assert_close(a.logits, logits)

    # bf16: each sample's logits are the fp32 logits of the exit it took, to bf16 rounding (measured 2e-3)
    took = torch.stack([full.logits[int(e)][i] for i, e in enumerate(b.exit_index)])
    torch.testing.assert_close(b.logits, took, rtol=0, atol=1e-2)
    # and it took fp32's exit wherever bf16 rounding cannot carry a score across a threshold: the samples
    # whose scores at the exits they reach lie 3x the largest bf16 score error away from the thresholds
    n_early = model.num_exits - 1
    scores32 = torch.stack([logit_stats(t)[:, 0] for t in full.logits[:-1]], 1)
    scores16 = torch.stack([logit_stats(t.float())[:, 0] for t in out.logits[:-1]], 1)
    err = float((scores32 - scores16).abs().max())
    reached = torch.arange(n_early)[None] <= index[:, None]
    gap = (scores32 - torch.tensor(thresholds)).abs().masked_fill(~reached, math.inf).min(1).values
    safe = gap > 3 * err
    assert len(set(index[safe].tolist())) >= 3, "the comparison should cover several exits"
    assert torch.equal(b.exit_index[safe], index[safe])
    torch.testing.assert_close(b.logits[safe], logits[safe], rtol=0, atol=1e-2)


def test_bad_inputs():
    model, size = _wrapped("resnet18")
    x = images(2, size)
    with pytest.raises(ValueError, match="unknown policy"):
        predict(model, x, "fastest")
    with pytest.raises(ValueError, match="thresholds for 3 early exits"):
        predict(model, x, "gate", [0.5, 0.5])
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        predict(model, x, "gate", 1.5)
    with pytest.raises(ValueError, match="empty batch"):
        predict(model, x[:0], "gate")
    with pytest.raises(ValueError, match="channels"):
        predict(model, images(2, size, channels=1), "gate")
    with pytest.raises(ValueError, match="unsqueeze"):
        model(x[0])
    with pytest.raises(ValueError, match="'soft' takes no thresholds"):
        resolve_thresholds(model, "soft", None)


def test_numpy_and_tensor_thresholds_act_as_the_same_floats():
    model, size = _wrapped("resnet18")
    x = images(6, size, seed=8)
    for given in (np.float32(0.5), np.array(0.5), torch.tensor(0.5)):
        assert resolve_thresholds(model, "confidence", given) == [0.5, 0.5, 0.5]
    for given in (np.array([0.3, 0.5, 0.7], dtype=np.float64), torch.tensor([0.3, 0.5, 0.7], dtype=torch.float64)):
        assert resolve_thresholds(model, "confidence", given) == [0.3, 0.5, 0.7]  # per exit, in order
    # distinct per-exit thresholds that mix exits, so an array or tensor read in another order would show
    thresholds = spread_thresholds(model, x, "confidence")
    ref = predict(model, x, "confidence", thresholds)
    index, logits, _ = _reference(model, x, "confidence", thresholds)
    assert torch.equal(ref.exit_index, index) and len(set(index.tolist())) >= 3
    assert not torch.equal(predict(model, x, "confidence", thresholds[::-1]).exit_index, index)
    for given in (np.array(thresholds, dtype=np.float64), torch.tensor(thresholds, dtype=torch.float64)):
        assert resolve_thresholds(model, "confidence", given) == thresholds
        pred = predict(model, x, "confidence", given)
        assert torch.equal(pred.exit_index, index)
        torch.testing.assert_close(pred.logits, logits)


def _loader(x, y, batch=8):
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, x.shape[0], batch)]


def test_sweep_equals_each_threshold_recomputed_from_the_exit_rule():
    # logits on a coarse grid: many samples share a score, so many quantiles fall on the same ties
    g = torch.Generator().manual_seed(3)
    n, exits, classes = 300, 4, 6
    logits = torch.randint(-3, 4, (n, exits + 1, classes), generator=g).float() / 2
    gate_logits = torch.randint(-4, 5, (n, exits), generator=g).float() / 2
    labels = torch.randint(0, classes, (n,), generator=g)
    data = Collected(logits, gate_logits, labels, torch.tensor([0.1, 0.3, 0.5, 0.7, 1.0]))
    for policy in ("gate", "confidence", "entropy"):
        curve = sweep(data, policy, num=41)
        assert len(curve) >= 8
        for point in curve:
            index = torch.full((n,), exits)
            for b in reversed(range(exits)):
                index[exit_mask(policy, logits[:, b], gate_logits[:, b], point["threshold"])] = b
            assert torch.equal(simulate(data, policy, point["threshold"]), index)
            right = torch.tensor([int(logits[i, index[i]].argmax()) == int(labels[i]) for i in range(n)])
            assert point["accuracy"] == int(right.sum()) / n, (policy, point)
            assert point["cost"] == pytest.approx(float(data.costs[index].mean()), abs=1e-7)
    with pytest.raises(ValueError, match="got 2 thresholds for 4 early exits"):
        simulate(data, "gate", [0.5, 0.5])
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match=rf"num={bad!r}: give 1 or more candidate thresholds"):
            sweep(data, "gate", num=bad)
    for given in (np.float32(0.25), torch.tensor(0.25), np.full(4, 0.25)):  # numpy and torch numbers act as floats
        assert torch.equal(simulate(data, "gate", given), simulate(data, "gate", 0.25))
    for bad in (-100, classes):
        with pytest.raises(ValueError, match=rf"class indices in \[0, 6\) for the model's 6 classes; got \[{bad}\]"):
            Collected(logits, gate_logits, torch.where(labels == 0, bad, labels), data.costs)


@pytest.mark.parametrize("k", [2, 7, 10, 1000])
def test_threshold_one_lets_every_uniform_output_exit(k):
    logits = torch.zeros(4, 3, k)  # every exit uniform: entropy 1, max softmax 1 / k
    data = Collected(logits, torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), torch.tensor([0.3, 0.6, 1.0]))
    stats = logit_stats(logits[:, 0])
    assert bool((stats >= 0).all() & (stats <= 1).all())  # rounding must not leave [0, 1]
    torch.testing.assert_close(stats[:, 1], torch.ones(4))
    assert simulate(data, "entropy", 1.0).tolist() == [0, 0, 0, 0]


def test_collect_reads_tuples_with_extras_and_dicts_and_names_other_batches():
    model, size = _wrapped("resnet18")
    x, y = images(4, size, seed=9), torch.tensor([0, 1, 2, 3])
    ref = collect(model, [(x, y)])
    for loader in ([(x, y, torch.arange(4))], [{"image": x, "label": y}]):
        got = collect(model, loader)
        assert torch.equal(got.logits, ref.logits) and torch.equal(got.labels, y)
    with pytest.raises(TypeError, match=r"got \['img', 'y'\]"):
        collect(model, [{"img": x, "y": y}])


def test_calibration_meets_targets_and_matches_hard_path():
    model, size = _wrapped("resnet18")
    torch.manual_seed(0)
    x = images(48, size, seed=7)
    with torch.no_grad():
        y = model(x).logits[-1].argmax(-1)  # labels the final exit gets right
    loader = _loader(x, y)
    data = collect(model, loader)
    assert data.exit_accuracy[-1] == 1.0
    cal = calibrate(model, data, policy="confidence", target_cost=0.6)
    assert cal.cost <= 0.6 and cal.threshold == model.config.thresholds[0]
    assert model.config.policy == "confidence"
    # predict() uses the stored calibration and reproduces the simulated cost
    pred = predict(model, x)
    assert torch.equal(pred.exit_index, simulate(data, "confidence", cal.threshold))
    assert pred.stats.expected_cost == pytest.approx(cal.cost, abs=1e-6)
    drop = calibrate(model, data, policy="entropy", max_accuracy_drop=0.0, apply=False)
    chosen = simulate(data, "entropy", drop.threshold)
    assert drop.accuracy == 1.0 and drop.cost == pytest.approx(float(model.costs[chosen].mean()), abs=1e-6)
    # the lowest cost on the sweep that keeps the final exit's accuracy
    assert drop.cost == pytest.approx(min(c["cost"] for c in drop.curve if c["accuracy"] >= 1.0), abs=1e-6)
    again = calibrate(model, _loader(x, y), policy="entropy", max_accuracy_drop=0.0, apply=False)
    assert again.threshold == drop.threshold and again.curve == drop.curve
    with pytest.raises(ValueError, match="lowest expected cost"):
        calibrate(model, data, policy="gate", target_cost=0.05)
    with pytest.raises(ValueError, match="exactly one"):
        calibrate(model, data, policy="gate")
    with pytest.raises(ValueError, match="no batches"):
        calibrate(model, [], policy="gate", target_cost=0.5)


def _scores(data: Collected, policy: str) -> torch.Tensor:
    """Every early exit's scores under `policy`, flattened."""
    if policy == "gate":
        return torch.sigmoid(data.gate_logits).flatten()
    col = 0 if policy == "confidence" else 1
    return torch.cat([logit_stats(data.logits[:, b])[:, col] for b in range(data.gate_logits.shape[1])])


def test_swept_thresholds_lie_between_scores_and_give_every_batch_size_the_same_exits():
    model, size = _wrapped("resnet18")
    with torch.no_grad():
        for b in model.branches:  # decisive exits: scores spread over [0, 1]
            for p in b.head.parameters():
                p.mul_(30)
    x = images(12, size, seed=11)
    data = collect(model, [(x, torch.arange(12) % 10)])
    for policy in ("gate", "confidence", "entropy"):
        scores = _scores(data, policy)
        distinct = torch.unique(scores)
        # the thresholds the sweep placed on the quantiles themselves, and the samples each let out
        quantiles = torch.quantile(scores.double(), torch.linspace(0, 1, 9, dtype=torch.float64)).tolist()
        placed = {tuple(simulate(data, policy, t).tolist()) for t in [0.0, 1.0, *quantiles]}
        curve = sweep(data, policy, num=9)
        assert {tuple(simulate(data, policy, p["threshold"]).tolist()) for p in curve} == placed
        inner = [p["threshold"] for p in curve if p["threshold"] not in (0.0, 1.0)]
        for t in inner:  # each sample takes the simulated exit, in the batch and alone
            index = simulate(data, policy, t)
            assert torch.equal(predict(model, x, policy, t).exit_index, index)
            alone = torch.cat([predict(model, x[i : i + 1], policy, t).exit_index for i in range(12)])
            assert torch.equal(alone, index), (policy, t)
        for t in inner:  # on no sample's score: halfway between two
            assert not (distinct == t).any(), (policy, t)
            lo, hi = float(distinct[distinct < t].max()), float(distinct[distinct > t].min())
            assert t == float(torch.tensor((lo + hi) / 2)), (policy, t, lo, hi)
        # calibrating picks the same cost and accuracy as the thresholds on the quantiles would
        cal = calibrate(model, data, policy, target_cost=0.7, apply=False, num=9)
        correct = data.logits.argmax(-1) == data.labels[:, None]
        points = [
            (correct.gather(1, torch.tensor(i)[:, None]).double().mean(), data.costs.double()[list(i)].mean())
            for i in placed
        ]
        acc, cost = max((float(a), -float(c)) for a, c in points if float(c) <= 0.7 + 1e-12)
        assert (cal.accuracy, cal.cost) == (acc, -cost)


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same_state(model, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_collect_refuses_nonfinite_inputs_and_outputs():
    model, size = _wrapped("resnet18")
    model.train()  # collect runs in eval mode and gives the mode back
    before = _state(model)
    x = images(48, size, seed=7)
    y = torch.zeros(48, dtype=torch.long)
    x[17, 0, 3, 3] = float("nan")
    x[40, 2] = float("inf")
    x[45, 1, 0, 0] = -float("inf")
    with pytest.raises(ValueError) as e:
        collect(model, _loader(x, y))
    msg = str(e.value)
    last = model.num_exits - 1
    for part in (
        "collect: 3 of 48 samples have non-finite input images (first: 17, 40, 45); ",
        "3 of 48 samples have non-finite logits at exit 0 (first: 17, 40, 45); ",
        f"3 of 48 samples have non-finite logits at exit {last} (the final head) (first: 17, 40, 45)",
        "Fix or drop those images",
    ):
        assert part in msg, msg
    with pytest.raises(ValueError, match=r"^collect: 3 of 48 samples have non-finite input images"):
        calibrate(model, _loader(x, y), policy="confidence", target_cost=0.6)
    assert model.config.thresholds is None
    assert model.training and all(b.training for b in model.branches)
    _assert_same_state(model, before)

    # finite inputs the model overflows on: the outputs are refused, and the message says where they come from
    x = images(48, size, seed=7)
    x[9] = 3e38
    with pytest.raises(
        ValueError, match=r"^collect: 1 of 48 samples have non-finite logits at exit 0 \(first: 9\)"
    ) as e:
        collect(model, _loader(x, y))
    assert "input images" not in str(e.value) and "The inputs are finite, so the model produces them" in str(e.value)
    _assert_same_state(model, before)


def test_predict_with_nonfinite_inputs():
    model, size = _wrapped("resnet18")
    x = images(6, size, seed=3)
    x[1, 0, 5, 5] = float("nan")
    x[4] = float("inf")
    before = _state(model)
    with pytest.raises(ValueError) as e:
        predict(model, x, "confidence", 0.0)
    assert str(e.value).startswith("2 of 6 input samples hold NaN or inf (first: 1, 4);")
    assert "allow_nonfinite=True" in str(e.value)
    assert model._batch_shrink_safe is None  # the one-off batch check never saw the bad rows
    _assert_same_state(model, before)

    last = model.num_exits - 1
    labels = torch.arange(6) % model.num_classes
    pred = predict(model, x, "confidence", 0.0, labels=labels, allow_nonfinite=True)
    assert pred.stats.nonfinite == [1, 4]
    assert pred.exit_index.tolist() == [0, last, 0, 0, last, 0]  # threshold 0: every finite sample leaves at once
    good = torch.tensor([0, 2, 3, 5])
    alone = predict(model, x[good], "confidence", 0.0)
    assert torch.equal(pred.logits[good], alone.logits) and alone.stats.nonfinite == []
    with torch.no_grad():
        full = model(x[[1, 4]])
    torch.testing.assert_close(pred.logits[[1, 4]], full.final.float(), rtol=0, atol=0, equal_nan=True)
    assert not torch.isfinite(pred.logits[[1, 4]]).any()
    assert pred.stats.counts == [4] + [0] * (last - 1) + [2]
    assert pred.stats.expected_cost == pytest.approx((4 * float(model.costs[0]) + 2 * float(model.costs[-1])) / 6)

    soft = predict(model, x, "soft", allow_nonfinite=True)
    assert soft.stats.nonfinite == [1, 4] and soft.exit_index.tolist() == [last] * 6
    with torch.no_grad():
        torch.testing.assert_close(soft.logits[good], model(x[good]).log_probs.float(), rtol=1e-5, atol=1e-6)
    all_bad = predict(model, x[[1, 4]], "gate", allow_nonfinite=True)
    assert all_bad.stats.nonfinite == [0, 1] and all_bad.exit_index.tolist() == [last, last]
    with pytest.raises(ValueError, match="outside"):
        predict(model, x[[1, 4]], "gate", 2.0, allow_nonfinite=True)


def test_nonfinite_samples_leave_a_train_mode_model_as_the_finite_samples_alone_would():
    model, size = _wrapped("resnet18")
    model.train()
    x = images(6, size, seed=4)
    x[1, 0, 2, 2] = float("nan")
    x[4] = float("inf")
    good = torch.tensor([0, 2, 3, 5])
    alone = copy.deepcopy(model)
    ref = predict(alone, x[good], "confidence", 0.5)
    pred = predict(model, x, "confidence", 0.5, allow_nonfinite=True)
    assert pred.stats.nonfinite == [1, 4]
    assert torch.equal(pred.logits[good], ref.logits) and torch.equal(pred.exit_index[good], ref.exit_index)
    _assert_same_state(model, _state(alone))  # BatchNorm's running statistics saw the finite samples only
    assert model.training and all(m.training for m in model.modules())
    # a single non-finite sample: no train-mode BatchNorm over one sample, and nothing on the model changes
    before = _state(model)
    one = predict(model, x[1:2], "confidence", 0.5, allow_nonfinite=True)
    assert one.stats.nonfinite == [0] and one.exit_index.tolist() == [model.num_exits - 1]
    _assert_same_state(model, before)
    assert torch.isfinite(predict(model.eval(), images(4, size), "confidence", 0.5).logits).all()


def test_finite_check_of_predict_agrees_with_an_elementwise_check():
    from timm_exits.inference.hard_exit import _all_finite

    x = images(4, 32, seed=5)
    cases = {"finite": x.clone(), "huge but finite (the sum overflows)": torch.full_like(x, 3e38)}
    for i, value in enumerate([float("nan"), float("inf"), -float("inf")]):
        bad = x.clone()
        bad[i % 4, 1, 3, i] = value
        cases[f"one {value}"] = bad
    both = x.clone()
    both[0, 0, 0, 0], both[2, 0, 0, 0] = float("inf"), -float("inf")  # the sum is NaN, not inf
    cases["inf and -inf"] = both
    for name, t in cases.items():
        assert _all_finite(t) == bool(torch.isfinite(t).all()), name
        assert _all_finite(t.to(torch.bfloat16)) == bool(torch.isfinite(t.to(torch.bfloat16)).all()), name

    model, size = _wrapped("resnet18")
    huge = torch.full((2, 3, size, size), 3e38)
    pred = predict(model, huge, "confidence", 1.0)  # finite input: predicted, not refused
    assert pred.stats.nonfinite == [] and pred.logits.shape == (2, model.num_classes)


_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@_CUDA
@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224", "swin_tiny_patch4_window7_224"])
@pytest.mark.parametrize("amp", [False, True])
def test_cuda_hard_exit_equals_full_forward_then_pick(name, amp):
    model, size = _wrapped(name)
    model = model.cuda()
    x = images(16, size, seed=3).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp), torch.inference_mode():
        thresholds = _mixing_thresholds(model, x, "confidence")
        index, logits, _ = _reference(model, x, "confidence", thresholds)
        pred = predict(model, x, "confidence", thresholds)
    assert pred.logits.device.type == "cuda" and pred.stats.batch_shrink
    assert len(set(index.tolist())) >= 3
    assert torch.equal(pred.exit_index.cpu(), index)
    torch.testing.assert_close(pred.logits.cpu(), logits.cpu(), rtol=1e-2 if amp else 1e-4, atol=1e-2 if amp else 1e-4)


@_CUDA
@pytest.mark.parametrize("batch", [1, 32])
def test_cuda_hard_exit_syncs_once_per_exit(batch):
    """Deciding an exit needs one host sync (how many samples leave); nothing else in the path may sync."""
    model, size = _wrapped("resnet18")
    model = model.cuda()
    x = images(batch, size, seed=3).cuda()
    thresholds = _mixing_thresholds(model, images(32, size, seed=3).cuda(), "confidence")
    predict(model, x, "confidence", thresholds)  # the one-off batch-shrink check syncs; keep it out of the count
    with torch.inference_mode():
        logits = model.backbone(x)  # warm-up of the plain path
    torch.cuda.synchronize()
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with torch.inference_mode():
                run = _run_hard(model, x, _decide_confidence(thresholds), shrink=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "called a synchronizing" in str(w.message)]
    exits_reached = int(run.exit_index.max()) + 1 if batch > 1 else int(run.exit_index[0]) + 1
    assert len(syncs) <= min(exits_reached, model.num_exits - 1), [str(w.message) for w in syncs]
    assert logits.shape == (batch, 10)


def _decide_confidence(thresholds):
    def decide(pos, stats, gate, rows):
        return exit_mask("confidence", None, gate, thresholds[pos], stats=stats)

    return decide


def _branch_reference(branch, x: torch.Tensor, prev_stats: torch.Tensor):
    """One exit through its submodules' own `__call__`s, the statistics from their definitions."""
    head, gate = branch.head, branch.gate
    if head.conv is not None:
        x = head.conv(to_nchw(x, head.layout, head.num_prefix_tokens))
    feats = head.hidden(head.norm(head.pool(x)))
    logits = head.fc(head.drop(feats))
    p = logits.float().softmax(-1)
    top = p.sort(-1, descending=True).values
    entropy = -(p * p.log()).sum(-1) / math.log(p.shape[-1])
    stats = torch.cat([prev_stats, torch.stack([top[:, 0], entropy, top[:, 0] - top[:, 1]], -1)], -1)
    parts = {"stats": [stats], "features": [feats], "both": [stats, feats]}[gate.kind]
    return logits, gate.mlp(torch.cat(parts, -1)).squeeze(-1), stats


def _captured(model, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each exit's branch-point tensor in a plain backbone forward."""
    captured = {}
    modules = dict(model.backbone.named_modules())
    hooks = [
        modules[b.name].register_forward_hook(lambda mod, i, o, name=b.name: captured.__setitem__(name, o))
        for b in model.branches
    ]
    with torch.no_grad():
        model.backbone(x)
    for h in hooks:
        h.remove()
    return captured


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224", "swin_tiny_patch4_window7_224"])
@pytest.mark.parametrize(
    ("head", "gate", "gate_hidden"), [("linear", "stats", 32), ("mlp", "both", 0), ("conv", "features", 32)]
)
def test_exit_equals_module_reference(name, head, gate, gate_hidden):
    """An exit's forward (which applies its layers to their parameters directly) gives what its submodules
    compute when called as modules: logits, gate logits and statistics, in the soft forward too."""
    m, size = make_backbone(name)
    model = wrap(m, "auto", head=head, gate=gate, gate_hidden=gate_hidden, input_size=(3, size, size)).eval()
    for p in model.branches.parameters():  # non-trivial norms and biases
        torch.nn.init.normal_(p, std=0.2)
    x = images(4, size, seed=5)
    captured = _captured(model, x)
    with torch.no_grad():
        out = model(x)
        stats = x.new_zeros(4, 0)
        for b, branch in enumerate(model.branches):
            logits, gate_logit, new_stats = branch.infer(captured[branch.name], stats)
            ref_logits, ref_gate, ref_stats = _branch_reference(branch, captured[branch.name], stats)
            torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(gate_logit, ref_gate, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(new_stats, ref_stats, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(logits, out.logits[b], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(gate_logit, out.gate_logits[:, b], rtol=1e-5, atol=1e-5)
            stats = new_stats


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224"])
def test_assigned_exit_at_batch_1_equals_full_forward(name):
    """run_assigned (what benchmarks/speed.py times) at batch 1, every exit: the assigned exit's logits
    of a full forward, and the backbone's classifier runs only for the final exit."""
    model, size = _wrapped(name)
    x = images(1, size, seed=5)
    with torch.no_grad():
        out = model(x)
    calls = []
    hook = model.backbone.get_classifier().register_forward_hook(lambda *a: calls.append(1))
    for k in range(model.num_exits):
        calls.clear()
        torch.testing.assert_close(run_assigned(model, x, torch.tensor([k])), out.logits[k], rtol=1e-5, atol=1e-5)
        assert bool(calls) == (k == model.num_exits - 1)
    hook.remove()


# ------------------------------------------------------------------ inputs predict and calibrate refuse
def test_a_bad_first_input_does_not_switch_predict_to_masking_for_good():
    model, size = _wrapped("resnet18")
    x = images(4, size, seed=2)
    with pytest.raises(RuntimeError):
        predict(model, x.double(), "confidence", 0.5)  # float64 images into a float32 model
    assert model._batch_shrink_safe is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert predict(model, x, "confidence", 0.5).stats.batch_shrink


def test_outputs_that_overflow_leave_the_batch_shrink_check_to_a_later_call():
    model, size = _wrapped("resnet18")
    huge = images(2, size).clamp(-1, 1) * 3e38  # finite images whose outputs overflow to NaN at every exit
    with torch.no_grad():
        assert not any(torch.isfinite(t).any() for t in model(huge).logits)
    x = images(4, size, seed=2)
    thresholds = spread_thresholds(model, x, "confidence")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "cannot drop exited samples" for a resnet
        assert not predict(model, huge, "confidence", thresholds).stats.batch_shrink  # masked, this call only
        assert model._batch_shrink_safe is None
        pred = predict(model, x, "confidence", thresholds)
    assert pred.stats.batch_shrink and model._batch_shrink_safe is True
    index, logits, _ = _reference(model, x, "confidence", thresholds)
    assert torch.equal(pred.exit_index, index)
    torch.testing.assert_close(pred.logits, logits, rtol=1e-4, atol=1e-4)


def test_predict_and_forward_name_integer_images_and_how_to_convert_them():
    model, size = _wrapped("resnet18")
    pixels = (images(2, size) * 60 + 128).clamp(0, 255)
    for dtype in (torch.uint8, torch.int64):
        with pytest.raises(TypeError, match=rf"^input images are {dtype}; the model takes floating-point images\. "):
            predict(model, pixels.to(dtype), "confidence", 0.5)
        with pytest.raises(TypeError, match=rf"^input images are {dtype}; the model takes floating-point images\. "):
            model(pixels.to(dtype))
    assert model._batch_shrink_safe is None
    assert predict(model, pixels.to(torch.uint8).float() / 255, "confidence", 0.5).logits.shape == (2, 10)


def test_predict_refuses_a_soft_threshold_labels_of_another_shape_and_text_thresholds():
    model, size = _wrapped("resnet18")
    x = images(4, size, seed=2)
    with pytest.raises(ValueError, match=r"policy 'soft' takes no thresholds \(it averages every exit\)"):
        predict(model, x, "soft", 0.5)
    labels = predict(model, x, "confidence", 0.5).logits.argmax(-1)
    assert predict(model, x, "confidence", 0.5, labels=labels).stats.accuracy == 1.0
    with pytest.raises(ValueError, match=r"labels of shape \(4, 1\) for a batch of 4: .*labels.flatten\(\)"):
        predict(model, x, "confidence", 0.5, labels=labels[:, None])
    with pytest.raises(ValueError, match=r"labels of shape \(1,\) for a batch of 4"):
        predict(model, x, "confidence", 0.5, labels=labels[:1])
    with pytest.raises(TypeError, match=r"threshold '0.9' is text; give a number"):
        predict(model, x, "confidence", "0.9")


def _saturated(n: int = 10) -> Collected:
    """Final exit right on all; exit 0 right on all but the last sample, which it gets wrong with a max
    softmax of exactly 1.0 in float32 (and an entropy of exactly 0)."""
    logits = torch.zeros(n, 2, 3)
    logits[:, :, 0] = 5.0
    logits[-1, 0] = torch.tensor([0.0, 40.0, 0.0])
    return Collected(logits, torch.full((n, 1), 40.0), torch.zeros(n, dtype=torch.long), torch.tensor([0.3, 1.0]))


def test_the_conservative_threshold_keeps_every_sample_even_where_scores_saturate():
    data = _saturated()
    assert float(logit_stats(data.logits[-1:, 0])[0, 0]) == 1.0 and float(torch.sigmoid(torch.tensor(40.0))) == 1.0
    for policy, never, always in (("confidence", 1.0, 0.0), ("gate", 1.0, 0.0), ("entropy", 0.0, 1.0)):
        assert simulate(data, policy, never).tolist() == [1] * 10
        assert simulate(data, policy, always).tolist() == [0] * 10
        cal = calibrate(_model_of(data, ["layer1"]), data, policy, max_accuracy_drop=0.0, apply=False)
        assert (cal.accuracy, cal.threshold) == (1.0, never)


def test_calibration_points_on_a_target_are_not_lost_to_float32_rounding():
    model, _ = _wrapped("resnet18", ["layer1", "layer3"])
    costs = model.exit_costs.float()
    n = next(n for n in range(2, 200) if float(costs[torch.zeros(n, dtype=torch.long)].mean()) > float(costs[0]))
    g = torch.Generator().manual_seed(0)
    logits, gates = torch.randn(n, 3, 10, generator=g), torch.randn(n, 2, generator=g)
    data = Collected(logits, gates, torch.randint(0, 10, (n,)), costs)
    cal = calibrate(model, data, "confidence", target_cost=float(costs[0]), apply=False)  # every sample at exit 0
    assert cal.cost == pytest.approx(float(costs[0]), abs=1e-12) and cal.exit_distribution[0] == 1.0
    # 300 samples, exit 0 right on 177 (59 %), the final exit on 180 (60 %): exactly 1 point below
    n, logits = 300, torch.zeros(300, 2, 3)
    logits[:180, 1, 0] = logits[:177, 0, 0] = 5.0
    logits[180:, 1, 1] = logits[177:, 0, 1] = 5.0
    data = Collected(logits, torch.zeros(n, 1), torch.zeros(n, dtype=torch.long), torch.tensor([0.3, 1.0]))
    cal = calibrate(_model_of(data, ["layer1"]), data, "confidence", max_accuracy_drop=0.01, apply=False)
    assert (cal.cost, cal.accuracy) == (pytest.approx(0.3), pytest.approx(0.59))


def test_calibrate_checks_the_policy_before_the_loader_and_simulate_checks_thresholds():
    model, size = _wrapped("resnet18")
    seen = []

    def loader():
        for i in range(3):
            seen.append(i)
            yield images(2, size, seed=i), torch.zeros(2, dtype=torch.long)

    with pytest.raises(ValueError, match=r"cannot calibrate policy 'confidance'; use one of"):
        calibrate(model, loader(), "confidance", target_cost=0.5)
    assert seen == []
    data = collect(model, loader())
    for bad in (float("nan"), 7.0, -0.1):
        with pytest.raises(ValueError, match=r"thresholds \[.*\] are outside \[0, 1\]"):
            simulate(data, "confidence", bad)
    with pytest.raises(ValueError, match=r"policy 'soft' has no exit rule"):
        simulate(data, "soft", 0.5)


def test_collected_refuses_rows_that_do_not_line_up():
    logits, gates, labels = torch.randn(6, 2, 3), torch.zeros(6, 1), torch.zeros(6, dtype=torch.long)
    for bad in (
        (logits, gates, labels[:4]),
        (logits, gates[:5], labels),
        (logits, torch.zeros(6, 2), labels),
        (logits, gates, labels[:, None]),
    ):
        with pytest.raises(ValueError, match=r"do not describe the same samples: give logits \(N, E \+ 1, K\)"):
            Collected(*bad, torch.tensor([0.3, 1.0]))


def test_calibrated_exit_distribution_is_the_one_predict_reports_and_gives_the_cost():
    model, size = _wrapped("resnet18")
    x, y = images(40, size, seed=3), torch.arange(40) % 10
    data = collect(model, _loader(x, y))
    for policy in ("confidence", "entropy", "gate"):
        cal = calibrate(model, data, policy, target_cost=0.8, apply=False)
        pred = predict(model, x, policy, cal.threshold)
        assert cal.exit_distribution == pred.stats.distribution
        assert sum(cal.exit_distribution) == pytest.approx(1.0, abs=1e-15)
        shares = sum(d * c for d, c in zip(cal.exit_distribution, data.costs.double().tolist()))
        assert shares == pytest.approx(cal.cost, abs=1e-12)


def test_calibrating_the_gates_on_outputs_collected_before_fit_gates_is_refused():
    model, size = _wrapped("resnet18", ["layer1", "layer2"])
    x = images(48, size, seed=5)
    with torch.no_grad():
        y = model(x).logits[-1].argmax(-1)
    y[::3] = (y[::3] + 1) % 10
    data = collect(model, _loader(x, y))
    fresh = calibrate(model, data, "gate", max_accuracy_drop=0.0, apply=False)  # the gates it was collected with
    assert torch.equal(predict(model, x, "gate", fresh.threshold).exit_index, simulate(data, "gate", fresh.threshold))
    fit_gates(model, data, steps=300)
    model.config.policy, model.config.thresholds = "confidence", [0.5, 0.5]
    with pytest.raises(ValueError, match=r"calibrate: the model's gates give other gate logits than the data holds"):
        calibrate(model, data, "gate", max_accuracy_drop=0.0)
    assert (model.config.policy, model.config.thresholds) == ("confidence", [0.5, 0.5])
    again = collect(model, _loader(x, y))
    cal = calibrate(model, again, "gate", max_accuracy_drop=0.0, apply=False)
    pred = predict(model, x, "gate", cal.threshold, labels=y)
    assert torch.equal(pred.exit_index, simulate(again, "gate", cal.threshold))
    assert pred.stats.accuracy == pytest.approx(cal.accuracy) and cal.accuracy >= again.exit_accuracy[-1] - 1e-12
    assert calibrate(model, data, "confidence", max_accuracy_drop=0.0, apply=False).policy == "confidence"
