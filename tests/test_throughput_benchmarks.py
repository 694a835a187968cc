"""The training-throughput benchmarks run end to end on a tiny recipe and report consistent JSON.

`data_throughput.py` (the recipe's loop against the model on in-memory tensors) and
`grid_throughput.py` (one training process against several side by side) on the `tiny()` recipe of
test_recipes.py: the fields a reader needs, every layout's processes counted, ratios that are the
quotients of the medians printed. No timing is asserted.
"""

from __future__ import annotations

import contextlib
import io
import json
import statistics
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_recipes import tiny

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import data_throughput  # noqa: E402
import grid_throughput  # noqa: E402


def _run(main, argv: list[str]) -> dict:
    old = sys.argv
    sys.argv = ["prog", *argv]
    try:
        with contextlib.redirect_stdout(io.StringIO()) as out:
            main()
    finally:
        sys.argv = old
    return json.loads(out.getvalue())


@pytest.fixture()
def recipe(tmp_path) -> str:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny()))
    return str(path)


def test_data_throughput_compares_the_loop_with_in_memory_steps(recipe, tmp_path):
    # 3 steps a round, 2 rounds and a warm-up round of each side: more batches than the 4 of an epoch
    out = _run(data_throughput.main, ["--recipe", recipe, "--data-dir", str(tmp_path), "--threads", "1",
                                      "--steps", "3", "--repeats", "2", "--set", "channels_last=true"])  # fmt: skip
    assert out["machine"]["threads"] == 1 and out["steps_per_round"] == 3 and out["repeats"] == 2
    assert out["overrides"] == ["channels_last=true"] and out["warmup_rounds"] == 1
    assert out["recipe"]["batch_size"] == 32 and out["recipe"]["model"] == "test_resnet"
    assert out["recipe"]["channels_last"] is True and out["recipe"]["amp"] is None  # settings that move the rate
    assert set(out["round_ms"]) == {"recipe_loop", "in_memory"}
    for name, rounds in out["round_ms"].items():
        assert len(rounds) == 2
        median_s = statistics.median(rounds) / 1e3
        assert out["images_per_s"][name] == pytest.approx(3 * 32 / median_s, rel=0.01, abs=0.1)


def test_recipe_trainer_gives_back_the_callers_thread_count(recipe, tmp_path):
    """Building a benchmark's trainer left torch at the benchmark's thread count for the rest of the process."""
    before = torch.get_num_threads()
    other = 2 if before == 1 else 1
    with data_throughput.recipe_trainer(recipe, str(tmp_path), other, []) as (trainer, _, _):
        assert torch.get_num_threads() == other and trainer.recipe.runtime.threads == other
    assert torch.get_num_threads() == before


@pytest.mark.slow  # three training processes, each importing torch and timm: about a minute on 2 cores
def test_grid_throughput_sums_each_layouts_processes(recipe, tmp_path):
    argv = ["--recipe", recipe, "--data-dir", str(tmp_path), "--layouts", "1x1", "2x1"]
    # a warm-up step and 4 timed steps: more batches than the 4 of an epoch
    out = _run(grid_throughput.main, [*argv, "--steps", "4", "--warmup", "1", "--repeats", "1"])
    assert out["recipe"]["batch_size"] == 32 and out["recipe"]["model"] == "test_resnet"
    assert out["machine"]["threads"] == 2  # the largest layout's processes x threads
    assert out["steps_per_process"] == 4 and out["warmup_steps"] == 1 and out["repeats"] == 1
    rounds = out["rounds_images_per_s"]
    assert set(rounds) == {"1x1", "2x1"} and all(len(v) == 1 and min(v) > 0 for v in rounds.values())
    medians = {k: statistics.median(v) for k, v in rounds.items()}
    assert out["images_per_s"] == pytest.approx(medians, abs=0.1)
    assert out["ratio_to_1x1"]["1x1"] == 1.0
    assert out["ratio_to_1x1"]["2x1"] == pytest.approx(medians["2x1"] / medians["1x1"], abs=2e-3)


@pytest.mark.slow  # two training processes: about 40 s on 2 cores
def test_grid_throughput_gives_a_layout_its_own_recipe_overrides(recipe, tmp_path):
    layouts = ["1x1", "1x1+optim.channels_last=true+model_kwargs.drop_rate=0.25"]
    argv = ["--recipe", recipe, "--data-dir", str(tmp_path), "--layouts", *layouts]
    out = _run(grid_throughput.main, [*argv, "--steps", "1", "--warmup", "1", "--repeats", "1"])
    # the values the recipe resolves, not the strings given
    assert out["layout_overrides"] == {
        "1x1": {},
        layouts[1]: {"optim.channels_last": True, "model_kwargs.drop_rate": 0.25},
    }
    assert set(out["rounds_images_per_s"]) == set(layouts)


def test_grid_throughput_resolves_each_layouts_overrides_before_starting_a_process(recipe, tmp_path):
    layouts = ["2x1", "1x2+optim.channels_last=true+model_kwargs.drop_rate=0.25", "2x1+lr=0.5"]
    resolved = grid_throughput._resolve_layouts(recipe, [f"data_dir={tmp_path}", "lr=0.2"], layouts)
    assert resolved == {
        "2x1": {},
        layouts[1]: {"optim.channels_last": True, "model_kwargs.drop_rate": 0.25},
        "2x1+lr=0.5": {"lr": 0.5},  # a layout's own value wins over the shared override
    }
    assert grid_throughput._parse_layout(layouts[1]) == (1, 2, layouts[1].split("+")[1:])
    with pytest.raises(SystemExit, match=r"--layouts 2x1\+lr=fast: "):
        grid_throughput._resolve_layouts(recipe, [f"data_dir={tmp_path}"], ["2x1+lr=fast"])


def test_grid_throughput_refuses_a_malformed_layout(recipe, tmp_path):
    with pytest.raises(SystemExit, match="PROCESSESxTHREADS"):
        _run(grid_throughput.main, ["--recipe", recipe, "--data-dir", str(tmp_path), "--layouts", "2by1"])
    with pytest.raises(SystemExit, match=r"--layouts 1x1\+no_such_key=1: .*no_such_key"):
        _run(grid_throughput.main, ["--recipe", recipe, "--data-dir", str(tmp_path), "--layouts", "1x1+no_such_key=1"])


@pytest.mark.parametrize(
    "script, argv, message",
    [
        ("speed", ["--models", "resnet50"], "argument --models: invalid choice: 'resnet50'"),
        ("exit_cost_in_place", ["--rounds", "0"], "argument --rounds: 0 is not a positive count"),
    ],
)
def test_timing_scripts_refuse_what_they_would_not_measure(script, argv, message, capsys):
    """An unknown model printed an empty result list, and zero rounds reported the warm-up as the result."""
    module = __import__(script)
    old = sys.argv
    sys.argv = ["prog", *argv]
    try:
        with pytest.raises(SystemExit) as stop:
            module.main()
    finally:
        sys.argv = old
    assert stop.value.code == 2 and message in capsys.readouterr().err
