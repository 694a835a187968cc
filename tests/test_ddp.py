"""Two CPU processes (torchrun, gloo on 127.0.0.1) train the same model as one process with the same global batch.

The backbone is timm's `test_vit` (LayerNorm, no BatchNorm, no dropout), so per-rank batch statistics cannot
differ from the global batch's; augmentation is seeded per sample, so both runs see the same images.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from timm_exits.training.checkpoint import load_checkpoint
from timm_exits.training.train import train

RECIPE = {
    "name": "ddp",
    "method": "soft",
    "model": "test_vit",
    "model_kwargs": {"img_size": 32},
    "dataset": "digits",
    "img_size": 32,
    "max_train_samples": 96,
    "max_eval_samples": 50,
    "batch_size": 16,
    "eval_batch_size": 32,
    "num_workers": 0,
    "epochs": 1,
    "lr": 0.05,
    "threads": 1,
    "progress": False,
    "report": False,
}


def _torchrun(recipe_file: Path, out: Path, *overrides: str) -> Path:
    """Train `recipe_file` in two torchrun processes into `out`."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MASTER_ADDR": "127.0.0.1",
        "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
        "PYTHONWARNINGS": "ignore",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc_per_node=2",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=127.0.0.1:0",
        "-m",
        "timm_exits.training.cli",
        "train",
        "-c",
        str(recipe_file),
        "--output",
        str(out),
        *overrides,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=out.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_two_processes_match_one_process(tmp_path):
    recipe_file = tmp_path / "ddp.yaml"
    recipe_file.write_text(yaml.safe_dump(RECIPE))
    one = train(str(recipe_file), tmp_path / "one")
    two = _torchrun(recipe_file, tmp_path / "two")

    a, _ = load_checkpoint(one)
    b, meta = load_checkpoint(two)
    assert a["model"].keys() == b["model"].keys()
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    # the optimizer state is the same too (DDP averages the gradients of the two half batches)
    for k, v in a["optim"].items():
        torch.testing.assert_close(b["optim"][k], v, rtol=1e-4, atol=1e-5, msg=k)

    # validation metrics are summed over both ranks: every val image counted once, same accuracies
    va = json.loads((one / "metrics.jsonl").read_text().splitlines()[-1])["val"]
    vb = meta["history"][-1]["val"]
    assert vb["num_samples"] == va["num_samples"] == 50
    assert vb["exit_accuracy"] == va["exit_accuracy"]
    assert vb["gate"]["exit_distribution"] == va["gate"]["exit_distribution"]

    # only rank 0 wrote: one start line and one epoch line in the log, world size recorded
    log = (two / "train.log").read_text().splitlines()
    assert sum(line.startswith("starting") for line in log) == 1
    assert sum(line.startswith("epoch ") for line in log) == 1
    assert "2 process(es)" in log[0]
    assert json.loads((two / "run.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in Path(two).iterdir()) == sorted(p.name for p in Path(one).iterdir())


@pytest.mark.slow  # each rank compiles the DDP-wrapped model: minutes on 2 cores
def test_two_compiled_processes_match_one_eager_process(tmp_path):
    recipe_file = tmp_path / "ddp.yaml"
    recipe_file.write_text(yaml.safe_dump(RECIPE))
    one = train(str(recipe_file), tmp_path / "one")
    two = _torchrun(recipe_file, tmp_path / "two", "compile=true")
    a, b = load_checkpoint(one)[0]["model"], load_checkpoint(two)[0]["model"]
    assert a.keys() == b.keys()
    for k, v in a.items():
        torch.testing.assert_close(b[k], v, rtol=1e-3, atol=1e-4, msg=k)


def test_validation_under_ddp_is_that_of_the_model_rank_0_saves(tmp_path):
    """Each rank's last step updates its own BatchNorm statistics; validation takes rank 0's (the saved ones),
    so the logged numbers are the saved model's. A val split smaller than the ranks leaves one rank nothing."""
    from timm_exits.training.report import evaluate

    recipe = {**RECIPE, "model": "test_resnet", "model_kwargs": {}, "max_train_samples": 192, "lr": 0.2}
    recipe_file = tmp_path / "bn.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    two = _torchrun(recipe_file, tmp_path / "two")
    logged = load_checkpoint(two)[1]["history"][-1]["val"]
    report = evaluate(two, timing=False, log=lambda line: None)
    assert logged["num_samples"] == report["val"]["num_samples"] == 50
    assert logged["exit_accuracy"] == report["val"]["exit_accuracy"]
    assert logged["soft_accuracy"] == pytest.approx(report["val"]["soft_accuracy"], abs=1e-6)
    recipe_file.write_text(yaml.safe_dump({**recipe, "max_eval_samples": 1}))
    one_image = _torchrun(recipe_file, tmp_path / "one_image")
    assert load_checkpoint(one_image)[1]["history"][-1]["val"]["num_samples"] == 1


def _fake_gpus(monkeypatch, count: int) -> list:
    """Pretend `count` CUDA devices are visible; returns the list `torch.cuda.set_device` records into."""
    calls: list = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    return calls


@pytest.mark.parametrize(
    ("pref", "local_rank", "expected"),
    [("cuda", 0, "cuda:0"), ("cuda", 1, "cuda:1"), ("cuda:1", 0, "cuda:1"), ("auto", 1, "cuda:1")],
)
def test_device_cuda_gets_the_local_rank_index(monkeypatch, pref, local_rank, expected):
    from timm_exits.training.distributed import _setup_distributed

    calls = _fake_gpus(monkeypatch, 2)
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    d = _setup_distributed(pref)
    assert d.device == torch.device(expected) and d.world == 1
    assert calls == [torch.device(expected)]  # torch refuses a bare "cuda" here


@pytest.mark.parametrize(("pref", "count", "visible"), [("cuda", 0, 0), ("cuda:0", 0, 0), ("cuda:2", 2, 2)])
def test_device_cuda_without_that_gpu_is_a_recipe_error(monkeypatch, tmp_path, pref, count, visible):
    from timm_exits.training.recipe_types import RecipeError

    calls = _fake_gpus(monkeypatch, count)
    index = pref.partition(":")[2] or "0"
    with pytest.raises(RecipeError) as err:
        train({**RECIPE, "device": pref}, tmp_path / "run")
    assert str(err.value) == (
        f"device={pref}: no such CUDA device is visible (cuda:{index} asked for, {visible} visible); "
        "use device=cpu or device=auto."
    )
    assert calls == [] and not (tmp_path / "run").exists()


@pytest.mark.parametrize("pref", ["gpu", "cuda:x"])
def test_a_device_torch_does_not_know_is_a_recipe_error(tmp_path, pref):
    from timm_exits.training.recipe_types import RecipeError

    with pytest.raises(RecipeError) as err:
        train({**RECIPE, "device": pref}, tmp_path / "run")
    assert str(err.value) == f"device={pref}: not a device; use auto, cpu, cuda or cuda:N."
    assert not (tmp_path / "run").exists()


_FAIL_ON_RANK_1 = """
import sys
from timm_exits.training import train as T
from timm_exits.training.sources import DataError

step = T._Trainer._step


def failing_step(self, *args, **kwargs):
    if self.d.rank == 1 and self.pos.step == 2:
        raise DataError("bad image on rank 1")
    return step(self, *args, **kwargs)


T._Trainer._step = failing_step
from timm_exits.training.cli import main

sys.exit(main())
"""


def test_an_error_on_one_rank_is_one_line_on_every_rank(tmp_path):
    """Rank 1 fails mid-epoch; rank 0, waiting in the gradient all-reduce, stops with one line too (no traceback)."""
    script = tmp_path / "fail_on_rank_1.py"
    script.write_text(_FAIL_ON_RANK_1)
    recipe_file = tmp_path / "ddp.yaml"
    recipe_file.write_text(yaml.safe_dump(RECIPE))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "PYTHONWARNINGS": "ignore"}
    env["GLOO_SOCKET_IFNAME"] = os.environ.get("GLOO_SOCKET_IFNAME", "lo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2", "--rdzv-backend=c10d"]
    cmd += [
        "--rdzv-endpoint=127.0.0.1:0",
        str(script),
        "train",
        "-c",
        str(recipe_file),
        "--output",
        str(tmp_path / "r"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "timm-exits train: error: bad image on rank 1" in out
    assert "[rank0]:" not in out and "[rank1]:" not in out, out[-3000:]  # no worker's traceback
    errors = [line for line in out.splitlines() if line.startswith("timm-exits train: error:")]
    assert len(errors) <= 2 and all(("rank 1" in e) or ("another process" in e) for e in errors), errors
