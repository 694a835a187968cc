"""The soft-conditional output and expected cost against a direct, slow evaluation of the recursion."""

from __future__ import annotations

import pytest
import torch

from timm_exits import SoftConditionalLoss, cross_entropy, exit_log_probs, expected_cost, soft_log_output
from timm_exits.core.losses import BranchyNetLoss, FinalExitLoss
from timm_exits.core.model import ExitOutput


def _slow(logits: list[torch.Tensor], gate_logits: torch.Tensor, costs: torch.Tensor):
    """y_b = g_b f_b + (1 - g_b) y_{b+1} and C_b = g_b gamma_b + (1 - g_b) C_{b+1}, in float64, per sample."""
    batch = logits[0].shape[0]
    ys, cs = [], []
    for i in range(batch):
        y = torch.softmax(logits[-1][i].double(), -1)
        c = costs[-1].double()
        for b in reversed(range(len(logits) - 1)):
            g = torch.sigmoid(gate_logits[i, b].double())
            y = g * torch.softmax(logits[b][i].double(), -1) + (1 - g) * y
            c = g * costs[b].double() + (1 - g) * c
        ys.append(y)
        cs.append(c)
    return torch.stack(ys), torch.stack(cs)


@pytest.mark.parametrize("num_exits", [1, 2, 4, 8])
def test_matches_direct_recursion(num_exits):
    g = torch.Generator().manual_seed(num_exits)
    logits = [torch.randn(5, 7, generator=g) * 3 for _ in range(num_exits)]
    gates = torch.randn(5, num_exits - 1, generator=g) * 2
    costs = torch.sort(torch.rand(num_exits, generator=g)).values
    log_pi = exit_log_probs(gates)
    y, c = _slow(logits, gates, costs)
    torch.testing.assert_close(soft_log_output(logits, log_pi).exp().double(), y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(expected_cost(log_pi, costs).double(), c, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(log_pi.exp().sum(1), torch.ones(5))


def test_confident_gates_stay_finite_and_route_exactly():
    logits = [torch.randn(3, 4) * 5 for _ in range(3)]  # log-probs far above -100: pi = e^-100 is negligible
    gates = torch.tensor([[100.0, -100.0], [-100.0, 100.0], [-100.0, -100.0]])
    log_pi = exit_log_probs(gates)
    out = soft_log_output(logits, log_pi)
    assert torch.isfinite(out).all() and torch.isfinite(log_pi).all()
    # each sample's soft output is (numerically) the exit its gates pick
    for i, b in enumerate([0, 1, 2]):
        torch.testing.assert_close(out[i], torch.log_softmax(logits[b][i], -1), rtol=1e-4, atol=1e-4)
    cost = expected_cost(log_pi, torch.tensor([0.2, 0.5, 1.0]))
    torch.testing.assert_close(cost, torch.tensor([0.2, 0.5, 1.0]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(dtype):
    logits = [(torch.randn(4, 10) * 30).to(dtype) for _ in range(3)]
    gates = (torch.randn(4, 2) * 40).to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        log_pi = exit_log_probs(gates)
        out = soft_log_output(logits, log_pi)
        cost = expected_cost(log_pi, torch.tensor([0.3, 0.6, 1.0]))
    assert out.dtype == torch.float32 and torch.isfinite(out).all() and torch.isfinite(cost).all()
    y, c = _slow([f.float() for f in logits], gates.float(), torch.tensor([0.3, 0.6, 1.0]))
    torch.testing.assert_close(out.exp().double(), y, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cost.double(), c, rtol=1e-4, atol=1e-5)


def _output(num_exits=3, batch=6, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = [torch.randn(batch, classes, generator=g, requires_grad=True) for _ in range(num_exits)]
    gates = torch.randn(batch, num_exits - 1, generator=g, requires_grad=True)
    log_pi = exit_log_probs(gates)
    costs = torch.tensor([0.3, 0.6, 1.0][:num_exits])
    out = ExitOutput(logits, gates, log_pi, soft_log_output(logits, log_pi), expected_cost(log_pi, costs))
    return out, costs


def test_losses_hard_and_soft_targets():
    out, _ = _output()
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    onehot = torch.nn.functional.one_hot(y, 5).float()
    literal = SoftConditionalLoss(cost_weight=0.5, exit_weight=0.0)
    ref = torch.nn.functional.nll_loss(out.log_probs, y) + 0.5 * out.expected_cost.mean()
    torch.testing.assert_close(literal(out, y), ref)
    torch.testing.assert_close(literal(out, onehot), ref)
    deep = SoftConditionalLoss(cost_weight=0.5, exit_weight=1.0)
    ce = torch.stack([torch.nn.functional.cross_entropy(f, y) for f in out.logits]).sum()
    torch.testing.assert_close(deep(out, y), ref + ce)
    mean = SoftConditionalLoss(cost_weight=0.5, exit_weight=2.0, exit_reduction="mean")
    torch.testing.assert_close(mean(out, y), ref + 2.0 * ce / len(out.logits))
    torch.testing.assert_close(mean.last["exit_ce"], ce / len(out.logits))
    with pytest.raises(ValueError, match="exit_reduction must be one of sum, mean"):
        SoftConditionalLoss(exit_reduction="max")
    bnet = BranchyNetLoss([1.0, 0.5, 0.25])
    ref_b = sum(w * torch.nn.functional.cross_entropy(f, y) for w, f in zip([1.0, 0.5, 0.25], out.logits))
    torch.testing.assert_close(bnet(out, y), ref_b)
    mixed = 0.7 * onehot + 0.3 * onehot.roll(1, 0)
    ref_mix = -(mixed * torch.log_softmax(out.logits[-1], -1)).sum(-1).mean()
    torch.testing.assert_close(FinalExitLoss()(out, mixed), ref_mix)
    with pytest.raises(ValueError, match="3 exits"):
        BranchyNetLoss([1.0, 1.0])(out, y)
    with pytest.raises(ValueError, match="do not match"):
        FinalExitLoss()(out, y[:3])
    for bad in (y[:, None], y[:, None].float(), onehot[:, :4]):  # (B, 1) labels were read as soft targets
        with pytest.raises(ValueError, match=r"do not match outputs \(6, 5\)"):
            literal(out, bad)
    with pytest.raises(ValueError, match=r"target.squeeze\(1\)"):
        FinalExitLoss()(out, y[:, None])


def test_cost_term_pushes_gates_open():
    out, _ = _output()
    y = torch.tensor([0, 1, 2, 3, 4, 0])

    def grad(cost_weight: float) -> torch.Tensor:
        loss = SoftConditionalLoss(cost_weight=cost_weight, exit_weight=0.0)(out, y)
        return torch.autograd.grad(loss, out.gate_logits, retain_graph=True)[0]

    # raising a gate sends mass to a cheaper exit, so the cost term's gradient on every gate logit is negative
    cost_grad = torch.autograd.grad(out.expected_cost.mean(), out.gate_logits, retain_graph=True)[0]
    assert (cost_grad < 0).all()
    # and the loss adds exactly cost_weight times it to the gradient of its cross-entropy
    torch.testing.assert_close(grad(1.0) - grad(0.0), cost_grad)
    torch.testing.assert_close(grad(2.5) - grad(0.0), 2.5 * cost_grad)


def test_a_class_no_exit_can_predict_leaves_the_gate_statistics_finite():
    """A -inf logit is a class of probability 0: it adds nothing to the entropy, which is still normalised
    by the log of every class, and no NaN reaches the gradient or the gates."""
    from timm_exits.core.gates import logit_stats

    logits = torch.tensor([[2.0, 0.0, -float("inf")], [1.0, -1.0, 0.5]], requires_grad=True)
    stats = logit_stats(logits)
    p = torch.softmax(torch.tensor([2.0, 0.0]), -1)
    expected = torch.stack([p[0], -(p * p.log()).sum() / torch.log(torch.tensor(3.0)), p[0] - p[1]])
    torch.testing.assert_close(stats[0], expected)
    torch.testing.assert_close(stats[1], logit_stats(logits[1:].detach())[0])
    stats.sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[0, 2] == 0


def test_a_class_no_exit_can_predict_leaves_the_gates_and_loss_finite():
    import timm

    from timm_exits import wrap

    torch.manual_seed(0)
    model = wrap(timm.create_model("resnet18", num_classes=5), input_size=(3, 32, 32))
    x, y = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1])
    with torch.no_grad():
        model.branches[0].head.fc.bias[3] = -1e4  # probability exactly 0 in float32, with finite logits
        reference = model(x)
        model.branches[0].head.fc.bias[3] = -float("inf")
    out = model(x)
    torch.testing.assert_close(out.gate_logits, reference.gate_logits)
    loss = SoftConditionalLoss()(out, y)
    torch.testing.assert_close(loss, SoftConditionalLoss()(reference, y))
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: SoftConditionalLoss(label_smoothing=1.5), r"label_smoothing=1.5 must be in \[0, 1\]"),
        (lambda: SoftConditionalLoss(label_smoothing=-0.5), r"label_smoothing=-0.5 must be in \[0, 1\]"),
        (lambda: SoftConditionalLoss(cost_weight=float("nan")), "cost_weight=nan must be a finite, non-negative"),
        (lambda: SoftConditionalLoss(exit_weight=-1.0), "exit_weight=-1.0 must be a finite, non-negative"),
        (lambda: BranchyNetLoss(weights=[float("nan"), 1.0]), r"weights\[0\]=nan must be a finite, non-negative"),
        (lambda: BranchyNetLoss(weights=[1.0, -0.5]), r"weights\[1\]=-0.5 must be a finite, non-negative"),
        (lambda: BranchyNetLoss(label_smoothing=float("inf")), r"label_smoothing=inf must be in \[0, 1\]"),
        (lambda: FinalExitLoss(label_smoothing=2), r"label_smoothing=2 must be in \[0, 1\]"),
    ],
)
def test_loss_settings_that_make_the_objective_meaningless_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 1.0])
def test_cross_entropy_matches_torch_for_every_integer_label_dtype(smoothing):
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(6, 5, generator=g), torch.tensor([0, 1, 2, 3, 4, 0])
    reference = torch.nn.functional.cross_entropy(logits, y, label_smoothing=smoothing)
    for dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
        torch.testing.assert_close(cross_entropy(logits, y.to(dtype), smoothing), reference)
    out, _ = _output()
    loss = SoftConditionalLoss(label_smoothing=smoothing)
    torch.testing.assert_close(loss(out, y.int()), loss(out, y))
    with pytest.raises(ValueError, match=r"-0.5"):
        cross_entropy(logits, y, -0.5)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize(("bad", "low", "high"), [(-100, -100, 4), (5, 0, 5)])
def test_labels_outside_the_classes_are_refused_with_or_without_smoothing(smoothing, bad, low, high):
    out, _ = _output()
    y = torch.tensor([0, 1, bad, 3, 4, 0])
    message = rf"class indices must be in \[0, 5\) for 5 classes, got labels from {low} to {high}"
    for loss in (SoftConditionalLoss(label_smoothing=smoothing), BranchyNetLoss(), FinalExitLoss()):
        with pytest.raises(ValueError, match=message):
            loss(out, y)
    with pytest.raises(ValueError, match=message):
        cross_entropy(out.final, y, smoothing)
    with pytest.raises(ValueError, match="class indices must be integers, got torch.float32"):
        cross_entropy(out.final, y.float().clamp(0, 4), smoothing)


def test_soft_output_and_cost_refuse_counts_that_do_not_match():
    logits = [torch.randn(2, 5) for _ in range(4)]
    with pytest.raises(ValueError, match=r"the logits of 4 exits but log_pi of shape \(2, 1\)"):
        soft_log_output(logits, exit_log_probs(torch.zeros(2, 0)))
    log_pi = exit_log_probs(torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"costs of shape \(1,\) for log_pi of shape \(2, 4\).*a \(4,\) tensor"):
        expected_cost(log_pi, torch.tensor([0.5]))
    with pytest.raises(ValueError, match=r"costs of shape \(2, 4\)"):
        expected_cost(log_pi, torch.ones(2, 4))
    assert soft_log_output(logits, log_pi).exp().sum(-1).tolist() == pytest.approx([1.0, 1.0])
