"""Opt-in `torch.compile` of the exits: eager results, bounded recompiles, nothing compiled without it."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from conftest import images, spread_thresholds
from torch._dynamo.utils import counters

from timm_exits import predict, wrap
from timm_exits.inference.hard_exit import run_assigned

CASES = [("test_resnet", ["layer1", "layer2"]), ("test_vit", ["blocks.0", "blocks.2"])]


def _tiny(name: str, exits: list[str]):
    torch.manual_seed(0)
    model = wrap(timm.create_model(name, num_classes=10), exits, input_size=(3, 64, 64)).eval()
    for p in model.branches.parameters():  # non-trivial norms, biases and gates
        torch.nn.init.normal_(p, std=0.2)
    return model


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize(("name", "exits"), CASES)
def test_compiled_exits_equal_eager(name, exits):
    """Inductor-compiled exits give the eager logits, gate logits and exit decisions (NCHW and token
    exits, batch 1 and 4, and the hard path whose later exits see the shrunk batch)."""
    model = _tiny(name, exits)
    compiled = copy.deepcopy(model).compile_exits()
    x = images(4, 64, seed=3)
    before = _graphs()
    with torch.no_grad():
        for batch in (1, 4):
            ref, got = model(x[:batch]), compiled(x[:batch])
            for a, b in zip(ref.logits, got.logits):
                torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(got.gate_logits, ref.gate_logits, rtol=1e-4, atol=1e-4)
    assigned = torch.tensor([2, 0, 1, 2])  # 4 samples reach exit 0, 3 reach exit 1
    torch.testing.assert_close(run_assigned(compiled, x, assigned), run_assigned(model, x, assigned))
    threshold = float(torch.sigmoid(ref.gate_logits[:, 0]).median())  # about half leave at exit 0
    ref_pred, got_pred = predict(model, x, "gate", threshold), predict(compiled, x, "gate", threshold)
    assert torch.equal(got_pred.exit_index, ref_pred.exit_index)
    torch.testing.assert_close(got_pred.logits, ref_pred.logits, rtol=1e-4, atol=1e-4)
    # per exit at most: the first batch size, a symbolic batch for the other sizes, batch 1
    assert 0 < _graphs() - before <= 3 * len(exits)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("name", "exits"), CASES)
def test_cuda_compiled_exits_equal_eager(name, exits):
    """On CUDA (inductor's Triton kernels) compiled exits give the eager logits, gate logits and exit
    decisions, at batch 1 and 4 and on the hard path whose later exits see the shrunk batch."""
    model = _tiny(name, exits).cuda()
    compiled = copy.deepcopy(model).compile_exits()
    x = images(4, 64, seed=3).cuda()
    tol = {"rtol": 1e-3, "atol": 1e-4}  # Triton's reductions round differently from cuDNN's and ATen's
    before = _graphs()
    with torch.no_grad():
        for batch in (1, 4):
            ref, got = model(x[:batch]), compiled(x[:batch])
            assert all(t.device.type == "cuda" for t in got.logits)
            for a, b in zip(ref.logits, got.logits):
                torch.testing.assert_close(b, a, **tol)
            torch.testing.assert_close(got.gate_logits, ref.gate_logits, **tol)
    assigned = torch.tensor([2, 0, 1, 2], device="cuda")  # 4 samples reach exit 0, 3 reach exit 1
    torch.testing.assert_close(run_assigned(compiled, x, assigned), run_assigned(model, x, assigned), **tol)
    thresholds = spread_thresholds(model, x, "gate")  # away from every score: rounding cannot flip a decision
    ref_pred, got_pred = predict(model, x, "gate", thresholds), predict(compiled, x, "gate", thresholds)
    assert got_pred.logits.device.type == "cuda"
    assert torch.equal(got_pred.exit_index, ref_pred.exit_index)
    torch.testing.assert_close(got_pred.logits, ref_pred.logits, **tol)
    assert 0 < _graphs() - before <= 3 * len(exits)


def test_batch_sizes_compile_once_per_exit_and_copies_compile_their_own():
    """Every batch size of the shrinking hard path reuses one graph per exit (batch 1 has its own), a
    deep copy runs its own weights, and without the opt-in (or after turning it off) nothing compiles."""
    model = _tiny(*CASES[0])
    x = images(6, 64, seed=4)
    before = _graphs()
    with torch.no_grad():
        eager = model(x)
        predict(model, x, "gate", 0.5)
    assert _graphs() == before, "compiled without the opt-in"

    model.compile_exits(backend="eager")  # dynamo's capture without inductor's code generation: quick
    with torch.no_grad():
        for batch in (6, 5, 3, 2, 1, 4):  # exit 1 sees two thirds of each batch
            run_assigned(model, x[:batch], torch.arange(batch) % 3)
        compiled = _graphs()
        assert 0 < compiled - before <= 3 * 2  # the first size, a symbolic batch, batch 1
        for batch in (1, 2, 3, 4, 5, 6):
            run_assigned(model, x[:batch], torch.arange(batch) % 3)
            predict(model, x[:batch], "gate", 0.5)
        torch.testing.assert_close(model(x).logits[1], eager.logits[1])
    assert _graphs() == compiled, "a batch size recompiled an exit again"

    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.branches[1].parameters():
            p.mul_(-1.0)
        assert twin.branches[1]._compiled.fn is None  # the copy compiles against its own branch
        mine, theirs = model(x).logits[1], twin(x).logits[1]
    torch.testing.assert_close(mine, eager.logits[1])
    assert not torch.allclose(theirs, mine)
    with torch.no_grad():
        torch.testing.assert_close(theirs, copy.deepcopy(twin).compile_exits(False)(x).logits[1])

    model.compile_exits(False)
    after = _graphs()
    with torch.no_grad():
        model(images(7, 64))
    assert _graphs() == after
