"""Hub format: local round trips, a hand-built offline HF cache, uploads to a local hub server, strict loading
errors and model cards whose numbers come from the training report."""

from __future__ import annotations

import base64
import copy
import hashlib
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors
import safetensors.torch
import timm
import torch
import yaml
from timm.models._hub import save_for_hf

from timm_exits import EarlyExitModel, hub, wrap
from timm_exits.core.config import FORMAT_VERSION, ExitConfig
from timm_exits.hub import (
    ExitCheckpointError,
    from_pretrained,
    load_exits,
    push_run,
    push_to_hub,
    render_model_card,
    save_pretrained,
)
from timm_exits.training.cli import main as cli_main

SIZE = 32
EXITS = "exits.safetensors"
FILES = {"config.json", "model.safetensors", "exits.safetensors", "README.md", "report.json"}
CASES = {
    "resnet": ("test_resnet", {}, 10, {}),
    "vit": ("test_vit", {"img_size": SIZE}, 10, {}),
    "added_head": ("test_resnet", {}, 0, {"num_classes": 10}),  # num_classes=0 backbone: exits add a final head
}


# --------------------------------------------------------------------------------------------- helpers
def _make(case: str, seed: int = 0) -> EarlyExitModel:
    """A wrapped tiny backbone whose every tensor differs from a fresh init (exit weights, BN statistics)."""
    name, kwargs, classes, wrap_kwargs = CASES[case]
    torch.manual_seed(seed)
    backbone = timm.create_model(name, pretrained=False, num_classes=classes, **kwargs)
    model = wrap(backbone, input_size=(3, SIZE, SIZE), **wrap_kwargs)
    with torch.no_grad():
        for p in model.exit_parameters():
            p.add_(0.1 * torch.randn_like(p))
        model.train()
        model(torch.randn(4, 3, SIZE, SIZE))  # moves the BatchNorm running statistics
    return model.eval()


def _report(model: EarlyExitModel) -> dict[str, Any]:
    n = model.num_exits
    dist = [0.004, 0.224] + [0.0] * (n - 3) + [0.772]
    return {
        "model": "test_resnet",
        "dataset": "cifar10",
        "method": "soft",
        "recipe": {"epochs": 30, "lr": 0.05, "batch_size": 128, "cost_weight": 0.1, "opt": "sgd"},
        "exits": [{"name": b.name, "cost": round(0.17 * (i + 1), 3)} for i, b in enumerate(model.branches)],
        "test": {
            "exit_accuracy": [round(0.5 + 0.07 * i, 4) for i in range(n)],
            "soft_accuracy": 0.8712,
            "final_accuracy": 0.8634,
            "num_samples": 10000,
        },
        "policies": {
            "gate": {
                "threshold": 0.5,
                "accuracy": 0.8492,
                "expected_cost": 0.4217,
                "exit_distribution": dist,
                "ms_per_image": 2.18,
                "speedup": 1.58,
            },
            "confidence": {"threshold": 0.93, "accuracy": 0.8611, "expected_cost": 0.6133, "ms_per_image": 2.71},
        },
        "timing": {"machine": "Xeon 8480 VM", "threads": 2, "batch_size": 1, "baseline_ms_per_image": 3.45},
    }


def _x(seed: int = 1) -> torch.Tensor:
    return torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _outputs(model: EarlyExitModel, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = model(x)
    res = {f"logits.{i}": t for i, t in enumerate(out.logits)}
    res.update(
        gate_logits=out.gate_logits,
        gates=out.gates,
        soft=out.soft,
        log_probs=out.log_probs,
        exit_log_probs=out.exit_log_probs,
        expected_cost=out.expected_cost,
    )
    return res


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "copy"))


def _edit_config(folder: Path, edit) -> None:
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    edit(cfg)
    path.write_text(json.dumps(cfg))


def _rewrite_header(path: Path, edit) -> None:
    """Rewrite a safetensors header (JSON) in place, keeping the data bytes."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])


def _header(path: Path) -> dict[str, Any]:
    raw = path.read_bytes()
    return json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])


# ------------------------------------------------------------------------------------------- fixtures
class _Models(dict):
    """Models built on first use, once per module."""

    def __missing__(self, case: str) -> EarlyExitModel:
        self[case] = _make(case)
        return self[case]


@pytest.fixture(scope="module")
def models() -> _Models:
    return _Models()


@pytest.fixture(scope="module")
def saved(models, tmp_path_factory) -> Path:
    """The resnet model saved with a report; tests copy it before breaking it."""
    folder = tmp_path_factory.mktemp("saved") / "resnet-exits"
    save_pretrained(models["resnet"], folder, _report(models["resnet"]))
    return folder


class _HubServer(http.server.ThreadingHTTPServer):
    """The few Hub endpoints an upload uses, recording what they receive."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _HubHandler)
        self.created: list[dict] = []
        self.branches: list[str] = []
        self.validated: list[str] = []
        self.preuploads: list[dict] = []
        self.commits: list[dict] = []
        self.unknown: list[str] = []
        self.files: dict[str, set[str]] = {}  # "org/name@revision" -> the file paths its commits left there

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _HubHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HubServer

    def log_message(self, *args: Any) -> None:
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                n = int(self.rfile.readline().strip(), 16)
                chunk = self.rfile.read(n + 2)[:n]
                if n == 0:
                    return data
                data += chunk
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _send(self, code: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _not_found(self) -> None:
        self.server.unknown.append(f"{self.command} {self.path}")
        self._send(404, {"error": "not found"}, {"X-Error-Code": "EntryNotFound"})

    def do_GET(self) -> None:
        self._not_found()

    def do_HEAD(self) -> None:
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", urllib.parse.urlsplit(self.path).path)
        if m is None:
            return self._not_found()
        repo, rev, name = m.group(1), urllib.parse.unquote(m.group(2)), urllib.parse.unquote(m.group(3))
        if name not in self.server.files.get(f"{repo}@{rev}", set()):
            return self._send(404, {"error": "not found"}, {"X-Error-Code": "EntryNotFound"})
        self._send(200, {}, {"ETag": '"0"', "X-Repo-Commit": "0" * 40})

    def do_POST(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        body = self._body()
        srv = self.server
        if path == "/api/repos/create":
            payload = json.loads(body)
            srv.created.append(payload)
            repo = f"{payload.get('organization') or 'me'}/{payload['name']}"  # 'me': the token's own namespace
            return self._send(200, {"url": f"{srv.url}/{repo}", "name": repo, "id": "0" * 24})
        if path == "/api/validate-yaml":
            srv.validated.append(json.loads(body)["content"])
            return self._send(200, {"errors": [], "warnings": []})
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit|branch)/(.+)", path)
        if m is None:
            return self._not_found()
        repo, kind, rev = m.group(1), m.group(2), urllib.parse.unquote(m.group(3))
        if kind == "branch":
            srv.branches.append(f"{repo}@{rev}")
            srv.files[f"{repo}@{rev}"] = set(srv.files.get(f"{repo}@main", set()))
            return self._send(200, {})
        if kind == "preupload":
            files = json.loads(body)["files"]
            srv.preuploads.append({"repo": repo, "revision": rev, "files": files})
            modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
            return self._send(200, {"files": modes})
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        files = {v["value"]["path"]: base64.b64decode(v["value"]["content"]) for v in lines if v["key"] == "file"}
        deleted = [v["value"]["path"] for v in lines if v["key"] == "deletedFile"]
        oid = hashlib.sha1(body).hexdigest()
        srv.commits.append(
            {"repo": repo, "revision": rev, "header": lines[0], "files": files, "deleted": deleted, "oid": oid}
        )
        srv.files[f"{repo}@{rev}"] = (srv.files.get(f"{repo}@{rev}", set()) | set(files)) - set(deleted)
        self._send(200, {"commitUrl": f"{srv.url}/{repo}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None})


@pytest.fixture
def hub_server():
    """A local hub on a random port; shuts down after the test, or by itself after two minutes."""
    server = _HubServer()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    watchdog = threading.Timer(120.0, server.shutdown)
    watchdog.daemon = True
    watchdog.start()
    try:
        yield server
    finally:
        watchdog.cancel()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_interrupted_save_leaves_the_earlier_files(models, saved, tmp_path, monkeypatch):
    folder = tmp_path / "m"
    shutil.copytree(saved, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def broken_card(*args: Any, **kwargs: Any) -> str:
        raise OSError("disk full")

    monkeypatch.setattr(hub.save, "render_model_card", broken_card)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(models["added_head"], folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no staging folder left behind
    assert from_pretrained(folder).config == from_pretrained(saved).config


def test_a_users_folder_named_saving_something_survives_a_save(models, saved, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(saved, folder)
    two_hours_ago = time.time() - 7200  # past the age after which a staging folder of unknown owner is removed
    for name in (".saving-drafts", ".saving-notes123"):  # the second one has the length of an old-format name
        (folder / name).mkdir()
        (folder / name / "my_notes.txt").write_text("user data")
        os.utime(folder / name, (two_hours_ago, two_hours_ago))
    save_pretrained(models["resnet"], folder)
    for name in (".saving-drafts", ".saving-notes123"):
        assert (folder / name / "my_notes.txt").read_text() == "user data"
    assert from_pretrained(folder).config == from_pretrained(saved).config


def test_save_refuses_a_folder_holding_other_files_at_its_names(models, tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "README.md").write_text("my notes")
    (theirs / "report.json").write_text("{}")
    plain = tmp_path / "plain"
    save_for_hf(models["resnet"].backbone, plain, safe_serialization=True)  # a plain timm model, not a save of ours
    for folder, names in ((theirs, "README.md, report.json"), (plain, "config.json, model.safetensors")):
        before = {p.name: p.read_bytes() for p in folder.iterdir()}
        with pytest.raises(FileExistsError, match=f"holds {names}, which no earlier timm-exits save wrote"):
            save_pretrained(models["resnet"], folder)
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    beside = tmp_path / "beside"
    beside.mkdir()
    (beside / "notes.txt").write_text("keep me")
    save_pretrained(models["resnet"], beside)  # other names are left alone
    assert (beside / "notes.txt").read_text() == "keep me" and (beside / "config.json").is_file()


def test_a_report_with_numpy_and_torch_values_is_saved_as_plain_json(models, tmp_path):
    report = _report(models["resnet"])
    exit_accuracy = report["test"]["exit_accuracy"]
    report["test"]["exit_accuracy"] = np.array(exit_accuracy)
    report["test"]["soft_accuracy"] = torch.tensor(0.8712)
    report["test"]["num_samples"] = np.int64(10000)
    folder = save_pretrained(models["resnet"], tmp_path / "m", report)
    saved = json.loads((folder / "report.json").read_text())["test"]
    assert saved["exit_accuracy"] == exit_accuracy and saved["num_samples"] == 10000
    assert saved["soft_accuracy"] == pytest.approx(0.8712)


@pytest.mark.parametrize(
    ("repo_id", "match"),
    [
        ("a b/c", "alphanumeric"),
        ("org/na/me", "namespace/repo_name"),
        ("org/name--x", "Cannot have --"),
        ("org/name@", "names no revision"),
    ],
)
def test_a_repo_id_the_hub_would_refuse_is_refused_before_anything_is_written(
    models, hub_server, tmp_path, repo_id, match
):
    model = models["resnet"]
    with pytest.raises(ValueError, match=rf"repo_id={re.escape(repr(repo_id))} .*{match}"):
        save_pretrained(model, tmp_path / "m", repo_id=repo_id)
    assert not (tmp_path / "m").exists()
    with pytest.raises(ValueError, match=match):
        render_model_card(model, repo_id=repo_id)
    with pytest.raises(ValueError, match=match):
        push_to_hub(model, repo_id, endpoint=hub_server.url, token="hf_test")
    assert not hub_server.created and not hub_server.commits and not hub_server.unknown
    assert "hf-hub:org/name@v1" in render_model_card(model, repo_id="org/name@v1")


def test_a_home_relative_folder_is_expanded_when_saving_and_loading(models, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    folder = save_pretrained(models["resnet"], "~/m")
    assert folder == tmp_path / "home" / "m" and not (tmp_path / "~").exists()
    for source in ("~/m", "local-dir:~/m"):
        assert from_pretrained(source).config == from_pretrained(folder).config


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, hidden ones included (relative path -> bytes)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_config_that_would_not_load_back_is_refused_before_anything_is_written(models, saved, tmp_path):
    folder = _copy(saved, tmp_path)
    before = _files(folder)
    n = len(models["resnet"].config.exits)
    cases = (
        ("soft", [0.7] * n, "policy 'soft' takes no thresholds; set thresholds=None"),
        ("confidence", 0.8, f"thresholds=0.8 must hold one value in [0, 1] per early exit ({n})"),
        ("gate", [1.5] * n, f"thresholds={[1.5] * n} must hold one value in [0, 1] per early exit ({n})"),
    )
    for policy, thresholds, reason in cases:
        model = copy.deepcopy(models["resnet"])
        model.config.policy, model.config.thresholds = policy, thresholds  # set after the config was checked
        message = (
            f"model.config (policy={policy!r}, thresholds={thresholds!r}) would not load back: {reason}. Nothing "
            "was written; fix model.config (thresholds: None, or one value in [0, 1] per early exit) and save again."
        )
        for target in (folder, tmp_path / "new"):
            with pytest.raises(ValueError) as e:
                save_pretrained(model, target, _report(model))
            assert str(e.value) == message
        assert _files(folder) == before and not (tmp_path / "new").exists()
    assert from_pretrained(folder).config == from_pretrained(saved).config


def test_a_home_relative_report_and_run_folder_are_expanded(models, hub_server, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "home" / "runs" / "r18"
    report = _report(models["resnet"])
    save_pretrained(models["resnet"], run / "model")
    (run / "report.json").write_text(json.dumps(report))

    folder = save_pretrained(models["resnet"], "~/out", "~/runs/r18/report.json")
    assert json.loads((folder / "report.json").read_text()) == report
    push_run("~/runs/r18", "org/tilde", endpoint=hub_server.url, token="hf_test")
    assert len(hub_server.commits) == 1 and json.loads(hub_server.commits[0]["files"]["report.json"]) == report
    assert hub_server.commits[0]["header"]["value"]["summary"] == "Upload run r18 (timm-exits)"
    assert not (tmp_path / "~").exists()


# ----------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_local_folder(case, models, tmp_path, monkeypatch):
    model = models[case]
    data_config = {"input_size": (3, SIZE, SIZE), "mean": (0.49, 0.48, 0.45), "std": (0.25, 0.24, 0.26)}
    folder = save_pretrained(model, tmp_path / "first" / "m", _report(model), data_config=data_config)
    assert {p.name for p in folder.iterdir()} == FILES  # no pickle (pytorch_model.bin) anywhere

    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architecture"] == CASES[case][0]
    upstream = {"url", "hf_hub_id", "tag", "origin_url", "paper_ids", "paper_name"}
    assert upstream & set(model.backbone.pretrained_cfg) and not upstream & set(cfg["pretrained_cfg"])
    assert cfg["pretrained_cfg"]["input_size"] == [3, SIZE, SIZE]  # the training's own preprocessing stays
    files = cfg["timm_exits"].pop("files")
    assert files == {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in ("model.safetensors", EXITS)}
    with safetensors.safe_open(folder / EXITS, "pt") as f:
        assert json.loads(f.metadata()["timm_exits"])["backbone_sha256"] == files["model.safetensors"]
    assert cfg["timm_exits"].pop("dtype") == "float32"
    assert cfg["timm_exits"].pop("upstream_hf_hub_id") == model.backbone.pretrained_cfg["hf_hub_id"]
    assert cfg["timm_exits"].pop("costs_measured") is True and model.config.costs is None
    expected = model.config.to_dict() | {"costs": model.exit_costs.tolist()}
    assert cfg["timm_exits"] == json.loads(json.dumps(expected))
    assert cfg["timm_exits"]["format_version"] == FORMAT_VERSION
    exit_keys = set(safetensors.torch.load_file(folder / "exits.safetensors"))
    assert exit_keys == {k for k in model.state_dict() if not k.startswith("backbone.")}
    assert "exit_costs" in exit_keys and any(k.startswith("final_head.") for k in exit_keys) == (case == "added_head")

    def no_pickle(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("torch.load called: pickle must never be read")

    monkeypatch.setattr(torch, "load", no_pickle)
    loaded = from_pretrained(folder)
    x = _x()
    _assert_equal(_outputs(model, x), _outputs(loaded, x))
    _assert_equal(_state(model), _state(loaded))
    assert loaded.config == model.config and ExitConfig.from_dict(cfg["timm_exits"]).costs == expected["costs"]
    assert not loaded.training

    plain = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()  # timm alone loads the backbone
    with torch.no_grad():
        assert torch.equal(plain(x), model.backbone(x))
    assert timm.data.resolve_data_config({}, model=plain)["input_size"] == (3, SIZE, SIZE)

    again = save_pretrained(loaded, tmp_path / "again" / "m", folder / "report.json")
    for name in FILES:  # saving what was loaded writes the same bytes
        assert (again / name).read_bytes() == (folder / name).read_bytes(), name


def test_a_compiled_model_is_saved_and_pushed_as_the_model_it_compiles(models, hub_server, tmp_path):
    model, report = models["resnet"], _report(models["resnet"])
    compiled = torch.compile(model)  # lazy: nothing is compiled before a call
    eager = save_pretrained(model, tmp_path / "eager", report, repo_id="org/compiled")
    folder = save_pretrained(compiled, tmp_path / "compiled", report, repo_id="org/compiled")
    assert _files(folder) == _files(eager)
    assert set(safetensors.torch.load_file(folder / EXITS)) == {
        k for k in model.state_dict() if not k.startswith("backbone.")
    }
    _assert_equal(_outputs(model, _x()), _outputs(from_pretrained(folder), _x()))

    push_to_hub(compiled, "org/compiled", report, endpoint=hub_server.url, token="hf_test")
    assert hub_server.commits[0]["files"] == {name: (eager / name).read_bytes() for name in FILES}

    extra = copy.deepcopy(model)
    extra.register_buffer("calibration", torch.zeros(3))  # would land in neither file that loading reads
    with pytest.raises(ValueError) as e:
        save_pretrained(extra, tmp_path / "extra")
    assert str(e.value) == (
        "the model's state dict holds ['calibration']: a saved model keeps only 'backbone.*' (in model.safetensors) "
        "and 'branches.*', 'final_head.*' and 'exit_costs' (in exits.safetensors); nothing was written. Save the "
        "EarlyExitModel itself, not a module wrapping it."
    )
    assert not (tmp_path / "extra").exists()


def test_a_bf16_model_loads_back_in_bf16_and_exits_as_saved(models, tmp_path):
    model = copy.deepcopy(models["resnet"]).to(torch.bfloat16)
    x = torch.randn(32, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    with torch.no_grad():
        confidence = model(x).logits[0].float().softmax(-1).amax(-1)
    model.config.policy = "confidence"
    model.config.thresholds = [float(confidence.median())] * len(model.config.exits)
    folder = save_pretrained(model, tmp_path / "m")

    loaded = from_pretrained(folder)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16} and loaded.exit_costs.dtype == torch.float32
    assert json.loads((folder / "config.json").read_text())["timm_exits"]["dtype"] == "bfloat16"
    _assert_equal(_state(model), _state(loaded))
    _assert_equal(_outputs(model, x), _outputs(loaded, x))
    want, got = model.predict(x), loaded.predict(x)
    assert 0 < int((want.exit_index == 0).sum()) < len(x)  # the threshold splits the batch at the first exit
    assert torch.equal(want.exit_index, got.exit_index) and torch.equal(want.logits, got.logits)

    as_float = from_pretrained(folder, dtype=torch.float32)
    assert {p.dtype for p in as_float.parameters()} == {torch.float32}
    plain = timm.create_model(f"local-dir:{folder}", pretrained=True)  # timm alone: float32, as always
    assert {p.dtype for p in plain.parameters()} == {torch.float32}


def test_a_revision_with_a_local_folder_is_refused(models, saved):
    backbone = timm.create_model("test_resnet", pretrained=False, num_classes=10)
    for source in (saved, f"local-dir:{saved}"):
        with pytest.raises(
            ValueError, match=r"revision='v2' was given but .* is a local folder, which has no revisions"
        ):
            from_pretrained(source, revision="v2")
        with pytest.raises(ValueError, match=r"revision='v2' was given but .* is a local folder"):
            load_exits(backbone, source, revision="v2")
    assert _hooks(backbone) == 0


def test_a_channels_last_model_saves_as_the_contiguous_one(models, tmp_path):
    model = copy.deepcopy(models["resnet"]).to(memory_format=torch.channels_last)
    folder = save_pretrained(model, tmp_path / "channels_last" / "m")

    assert _files(folder) == _files(save_pretrained(models["resnet"], tmp_path / "contiguous" / "m"))
    assert next(model.backbone.parameters()).is_contiguous(memory_format=torch.channels_last)  # left as it was
    x = _x()
    _assert_equal(_outputs(models["resnet"], x), _outputs(from_pretrained(folder), x))


def test_a_model_on_the_meta_device_is_refused_before_anything_is_written(models, tmp_path):
    model = copy.deepcopy(models["resnet"]).to("meta")
    with pytest.raises(
        ValueError, match=r"'backbone\.conv1\.0\.weight'\) are on the 'meta' device .*nothing was written"
    ):
        save_pretrained(model, tmp_path / "new" / "m")
    assert not (tmp_path / "new").exists()


def test_token_exits_pool_as_saved_after_the_backbones_pool_changed(models, tmp_path):
    model = copy.deepcopy(models["vit"])
    assert model.backbone.global_pool == "token"
    model.reset_classifier(7, global_pool="avg")  # the exits keep reading the class token
    assert model.backbone.global_pool == "avg" and model.config.token_pool == "token"
    folder = save_pretrained(model, tmp_path / "m")
    assert json.loads((folder / "config.json").read_text())["timm_exits"]["token_pool"] == "token"
    loaded = from_pretrained(folder)
    assert [b.head.pool.token_pool for b in loaded.branches] == ["token"] * len(model.branches)
    _assert_equal(_outputs(model.eval(), _x()), _outputs(loaded, _x()))

    older = save_pretrained(models["vit"], tmp_path / "older")  # as the previous version wrote it: no token_pool
    _edit_config(older, lambda c: c["timm_exits"].pop("token_pool"))
    loaded = from_pretrained(older)  # pools as the backbone does, as before
    assert loaded.config.token_pool == "token"
    _assert_equal(_outputs(models["vit"], _x()), _outputs(loaded, _x()))


def test_measured_costs_are_measured_again_after_a_reload(models, tmp_path):
    model = copy.deepcopy(models["resnet"])
    folder = save_pretrained(model, tmp_path / "measured")
    loaded = from_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["timm_exits"]["costs_measured"] is True
    assert loaded.config.costs is None and loaded.exit_costs.tolist() == model.exit_costs.tolist()
    before = model.exit_costs.tolist()
    model.reset_classifier(1000)
    loaded.reset_classifier(1000)  # the classifiers' FLOPs changed: both measure again
    assert loaded.exit_costs.tolist() == model.exit_costs.tolist() != before

    given = copy.deepcopy(models["resnet"])
    costs = [0.2, 0.4, 0.6, 0.8, 1.0]
    given.set_costs(costs)
    folder = save_pretrained(given, tmp_path / "given")
    assert json.loads((folder / "config.json").read_text())["timm_exits"]["costs_measured"] is False
    loaded = from_pretrained(folder)
    loaded.reset_classifier(1000)  # given costs are kept
    assert loaded.config.costs == pytest.approx(costs) and loaded.exit_costs.tolist() == pytest.approx(costs)

    older = save_pretrained(models["resnet"], tmp_path / "older")  # as the previous version wrote it
    _edit_config(older, lambda c: c["timm_exits"].pop("costs_measured"))
    assert from_pretrained(older).config.costs == models["resnet"].exit_costs.tolist()  # taken as given, as before


def test_numpy_thresholds_and_costs_are_saved_as_plain_numbers(models, tmp_path):
    exits = models["resnet"].config.exits
    backbone = timm.create_model("test_resnet", pretrained=False, num_classes=10)
    thresholds = [np.float32(0.5)] * len(exits)
    model = wrap(backbone, exits, input_size=(3, SIZE, SIZE), policy="confidence", thresholds=thresholds)
    assert model.config.thresholds == [0.5] * len(exits) and {type(t) for t in model.config.thresholds} == {float}
    assert from_pretrained(save_pretrained(model, tmp_path / "m")).config.thresholds == [0.5] * len(exits)

    model.config.thresholds = np.full(len(exits), 0.25)  # set after the config was built
    assert from_pretrained(save_pretrained(model, tmp_path / "m")).config.thresholds == [0.25] * len(exits)


def test_a_backbone_argument_json_cannot_hold_is_saved_with_model_args(hub_server, tmp_path):
    torch.manual_seed(0)
    backbone = timm.create_model("test_resnet", pretrained=False, num_classes=10, act_layer=torch.nn.SiLU)
    model = wrap(backbone, input_size=(3, SIZE, SIZE)).eval()
    earlier = save_pretrained(_make("resnet"), tmp_path / "earlier")
    before = _files(earlier)
    for target in (tmp_path / "new" / "m", earlier):
        with pytest.raises(ValueError, match=r"'act_layer' is not serializable.*model_args=\{'act_layer': 'silu'\}"):
            save_pretrained(model, target)
    assert not (tmp_path / "new").exists() and _files(earlier) == before  # nothing made, nothing changed

    folder = save_pretrained(model, tmp_path / "new" / "m", model_args={"act_layer": "silu"})
    assert json.loads((folder / "config.json").read_text())["model_args"]["act_layer"] == "silu"
    loaded = from_pretrained(folder)
    assert isinstance(loaded.backbone.act1, torch.nn.SiLU)
    _assert_equal(_outputs(model, _x()), _outputs(loaded, _x()))
    plain = timm.create_model(f"local-dir:{folder}", pretrained=True)
    assert isinstance(plain.act1, torch.nn.SiLU)

    with pytest.raises(ValueError, match=r"'act_layer' is not serializable"):
        push_to_hub(model, "org/silu", endpoint=hub_server.url, token="hf_test")
    assert not hub_server.created and not hub_server.commits  # a model that cannot be saved never reaches the Hub
    push_to_hub(model, "org/silu", endpoint=hub_server.url, token="hf_test", model_args={"act_layer": "silu"})
    assert json.loads(hub_server.commits[0]["files"]["config.json"])["model_args"]["act_layer"] == "silu"


def test_load_exits_keeps_the_users_backbone(models, saved):
    backbone = timm.create_model(f"local-dir:{saved}", pretrained=True)  # train mode, as timm returns it
    backbone.layer1.eval()  # a mixed mode the wrapper must not flatten
    modes = {n: m.training for n, m in backbone.named_modules()}
    before = _state(backbone)

    model = load_exits(backbone, saved)
    assert model.backbone is backbone
    _assert_equal(before, _state(backbone))
    assert modes == {n: m.training for n, m in backbone.named_modules()}
    assert model.training and all(b.training for b in model.branches)

    _assert_equal(_outputs(models["resnet"], _x()), _outputs(model.eval(), _x()))


def test_load_exits_refuses_another_architecture(saved):
    other = timm.create_model("test_vit", pretrained=False, num_classes=10, img_size=SIZE)
    with pytest.raises(ExitCheckpointError, match="test_resnet") as e:
        load_exits(other, saved)
    assert e.value.key == "architecture" and e.value.file.endswith("config.json")
    for classes, said in ((0, r"has 0 \(created with num_classes=0\)"), (7, "has 7")):
        headless = timm.create_model("test_resnet", pretrained=False, num_classes=classes)
        with pytest.raises(ExitCheckpointError, match=said + r"; create it with .*num_classes=10\)") as e:
            load_exits(headless, saved)
        assert e.value.key == "num_classes"


_OFFLINE_SCRIPT = r"""
import os, sys
import huggingface_hub.constants as c
assert c.HF_HUB_OFFLINE, "offline mode must be set before huggingface_hub is imported"
import safetensors.torch, timm, torch
from timm_exits.hub import from_pretrained, load_exits

x = safetensors.torch.load_file(sys.argv[1])["x"]
res = {}
with torch.no_grad():
    for tag, source in (("main", "hf-hub:org/multi-exit"), ("v1", "hf-hub:org/multi-exit@v1")):
        out = from_pretrained(source)(x)
        res[tag + ".soft"] = out.soft
        res[tag + ".gates"] = out.gates
        for i, t in enumerate(out.logits):
            res[f"{tag}.logits.{i}"] = t
    backbone = timm.create_model("hf-hub:org/multi-exit", pretrained=True).eval()
    res["timm"] = backbone(x)
    res["load_exits.soft"] = load_exits(backbone, "hf-hub:org/multi-exit")(x).soft
safetensors.torch.save_file({k: v.contiguous() for k, v in res.items()}, sys.argv[2])
"""


def _build_hf_cache(cache: Path, repo_id: str, revisions: dict[str, Path]) -> None:
    """models--org--name/{refs/<ref>, blobs/<sha256>, snapshots/<commit>/<file> -> blob}, as the HF cache."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    for ref, folder in revisions.items():
        commit = hashlib.sha1(ref.encode()).hexdigest()
        (repo / "refs" / ref).write_text(commit)
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True)
        for f in folder.iterdir():
            data = f.read_bytes()
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            if not blob.exists():
                blob.write_bytes(data)
            (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))


def test_offline_hf_cache_loads_with_both_loaders(models, saved, tmp_path):
    v1_model = copy.deepcopy(models["resnet"])
    with torch.no_grad():
        for p in v1_model.exit_parameters():
            p.mul_(-1.0)
    v1 = save_pretrained(v1_model, tmp_path / "v1")
    cache = tmp_path / "hub"
    _build_hf_cache(cache, "org/multi-exit", {"main": saved, "v1": v1})

    x = _x()
    safetensors.torch.save_file({"x": x}, tmp_path / "x.safetensors")
    script = tmp_path / "offline.py"
    script.write_text(_OFFLINE_SCRIPT)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(cache),
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_ENDPOINT": "http://127.0.0.1:9",  # nothing listens there: any request would fail
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "OMP_NUM_THREADS": "1",
    }
    args = [sys.executable, str(script), str(tmp_path / "x.safetensors"), str(tmp_path / "out.safetensors")]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = safetensors.torch.load_file(tmp_path / "out.safetensors")

    for tag, model in (("main", models["resnet"]), ("v1", v1_model)):
        ref = _outputs(model, x)
        assert torch.equal(got[f"{tag}.soft"], ref["soft"]) and torch.equal(got[f"{tag}.gates"], ref["gates"])
        for i in range(model.num_exits):
            assert torch.equal(got[f"{tag}.logits.{i}"], ref[f"logits.{i}"])
    assert not torch.equal(got["main.logits.0"], got["v1.logits.0"])
    with torch.no_grad():
        assert torch.equal(got["timm"], models["resnet"].backbone(x))
    assert torch.equal(got["load_exits.soft"], _outputs(models["resnet"], x)["soft"])


# ---------------------------------------------------------------------------------------------- upload
def test_push_to_hub_sends_one_commit(models, hub_server, tmp_path):
    model, report = models["resnet"], _report(models["resnet"])
    info = push_to_hub(model, "org/resnet-exits", report, endpoint=hub_server.url, token="hf_test")

    assert [(c["organization"], c["name"]) for c in hub_server.created] == [("org", "resnet-exits")]
    assert hub_server.created[0].get("visibility") != "private"
    assert len(hub_server.commits) == 1 and not hub_server.unknown and not hub_server.branches
    commit = hub_server.commits[0]
    assert commit["repo"] == "org/resnet-exits" and commit["revision"] == "main"
    assert info.oid == commit["oid"]
    files = commit["files"]
    assert set(files) == FILES

    # what arrived is byte for byte what save_pretrained writes, and the announced sizes match
    local = save_pretrained(model, tmp_path / "local", report, repo_id="org/resnet-exits")
    sizes = {f["path"]: f["size"] for f in hub_server.preuploads[0]["files"]}
    for name, data in files.items():
        assert data == (local / name).read_bytes(), name
        assert sizes[name] == len(data)
    exits = safetensors.torch.load(files["exits.safetensors"])
    assert set(exits) == {k for k in model.state_dict() if not k.startswith("backbone.")}
    weights = safetensors.torch.load(files["model.safetensors"])
    assert set(weights) == set(model.backbone.state_dict())
    assert "timm_exits" in json.loads(files["config.json"])

    card = files["README.md"].decode()
    assert hub_server.validated == [card]
    assert "hf-hub:org/resnet-exits" in card
    for text in ("87.12 %", "86.34 %", "84.92 %", "1.58x", "3.45 ms", "Xeon 8480 VM", "#1: 0.4 %, #2: 22.4 %"):
        assert text in card, text
    _assert_card_numbers_from_report(card, report, model)


def test_a_push_without_a_report_deletes_the_report_an_earlier_push_left(models, hub_server):
    model, report = models["resnet"], _report(models["resnet"])
    push_to_hub(model, "org/resnet-exits", report, endpoint=hub_server.url, token="hf_test")
    push_to_hub(model, "org/resnet-exits", endpoint=hub_server.url, token="hf_test")
    first, second = hub_server.commits
    assert "report.json" in first["files"] and first["deleted"] == []
    assert "report.json" not in second["files"] and second["deleted"] == ["report.json"]
    assert hub_server.files["org/resnet-exits@main"] == FILES - {"report.json"}
    assert "87.12 %" not in second["files"]["README.md"].decode()

    push_to_hub(model, "org/resnet-exits", endpoint=hub_server.url, token="hf_test")  # nothing left to delete
    push_to_hub(model, "org/other-exits", endpoint=hub_server.url, token="hf_test", revision="v1")
    assert [c["deleted"] for c in hub_server.commits[2:]] == [[], []]
    assert not hub_server.unknown


def test_push_to_hub_names_the_repository_the_hub_created_on_the_card(models, hub_server):
    model, report = models["resnet"], _report(models["resnet"])
    push_to_hub(model, "resnet-exits", report, endpoint=hub_server.url, token="hf_test")  # no namespace given
    commit = hub_server.commits[0]
    assert commit["repo"] == "me/resnet-exits"
    card = commit["files"]["README.md"].decode()
    assert "hf-hub:me/resnet-exits" in card and "hf-hub:resnet-exits" not in card


def test_push_run_to_a_branch(models, hub_server, tmp_path):
    run = tmp_path / "run"
    report = _report(models["resnet"])
    save_pretrained(models["resnet"], run / "model")
    (run / "report.json").write_text(json.dumps(report))

    push_run(run, "org/run-exits", revision="v1", endpoint=hub_server.url, token="hf_test")
    assert hub_server.branches == ["org/run-exits@v1"]
    assert len(hub_server.commits) == 1 and hub_server.commits[0]["revision"] == "v1"
    assert hub_server.commits[0]["header"]["value"]["summary"] == "Upload run run (timm-exits)"
    card = hub_server.commits[0]["files"]["README.md"].decode()
    assert "hf-hub:org/run-exits@v1" in card and "87.12 %" in card
    assert json.loads(hub_server.commits[0]["files"]["report.json"]) == report


def test_push_run_describes_the_model_with_the_report_saved_beside_it(models, hub_server, tmp_path):
    run = tmp_path / "run"
    saved = _report(models["resnet"])
    save_pretrained(models["resnet"], run / "model", saved)
    newer = json.loads(json.dumps(saved))
    newer["test"]["soft_accuracy"] = 0.5555  # as `eval --no-save` leaves it: a report the saved model is not
    (run / "report.json").write_text(json.dumps(newer))
    push_run(run, "org/run-exits", endpoint=hub_server.url, token="hf_test")
    files = hub_server.commits[0]["files"]
    assert json.loads(files["report.json"]) == saved
    assert "87.12 %" in files["README.md"].decode() and "55.55" not in files["README.md"].decode()


def _front(card: str) -> dict[str, Any]:
    return yaml.safe_load(card.split("---", 2)[1])


def test_the_base_model_survives_a_reload_and_push_run(models, hub_server, tmp_path):
    model = models["resnet"]
    upstream = model.backbone.pretrained_cfg["hf_hub_id"]
    report = _report(model)
    report["recipe"]["pretrained"] = True  # fine-tuned from timm's weights
    run = tmp_path / "run"
    folder = save_pretrained(model, run / "model", report)
    assert _front((folder / "README.md").read_text())["base_model"] == upstream

    push_run(run, "org/base", endpoint=hub_server.url, token="hf_test")  # pushes the model loaded back
    assert _front(hub_server.commits[0]["files"]["README.md"].decode())["base_model"] == upstream
    loaded = from_pretrained(folder)
    assert loaded.backbone.pretrained_cfg["hf_hub_id"] == upstream
    assert _front(render_model_card(loaded, report))["base_model"] == upstream
    cfg = json.loads((folder / "config.json").read_text())  # recorded beside the exits; timm's own config
    assert cfg["timm_exits"]["upstream_hf_hub_id"] == upstream and "hf_hub_id" not in cfg["pretrained_cfg"]


def test_cli_push_uploads_a_run_to_the_endpoint(models, hub_server, tmp_path, capsys):
    run = tmp_path / "run"
    report = _report(models["resnet"])
    save_pretrained(models["resnet"], run / "model")
    (run / "report.json").write_text(json.dumps(report))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    env = {
        **os.environ,
        "HF_ENDPOINT": hub_server.url,  # loopback only
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")])
        ),
    }
    args = [sys.executable, "-m", "timm_exits.training.cli", "push", str(run), "--repo-id", "org/cli-exits"]
    proc = subprocess.run(
        [*args, "--private", "--token", "hf_test"], env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(f"pushed {run} to org/cli-exits")

    assert [(c["organization"], c["name"]) for c in hub_server.created] == [("org", "cli-exits")]
    assert hub_server.created[0].get("private") is True or hub_server.created[0].get("visibility") == "private"
    assert len(hub_server.commits) == 1 and hub_server.commits[0]["revision"] == "main" and not hub_server.unknown
    files = hub_server.commits[0]["files"]
    assert set(files) == FILES and json.loads(files["report.json"]) == report
    assert "hf-hub:org/cli-exits" in files["README.md"].decode() and "87.12 %" in files["README.md"].decode()
    local = save_pretrained(models["resnet"], tmp_path / "local", report, repo_id="org/cli-exits")
    for name in ("model.safetensors", "exits.safetensors", "config.json", "README.md"):
        assert files[name] == (local / name).read_bytes(), name
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # pushing changes nothing locally

    # a run folder without a saved model: one line, exit 2, nothing sent
    assert cli_main(["push", str(tmp_path / "nope"), "--repo-id", "org/cli-exits"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such folder" in err
    assert len(hub_server.commits) == 1 and len(hub_server.created) == 1


# ----------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("file", ["exits.safetensors", "model.safetensors"])
def test_missing_tensor(saved, tmp_path, file):
    folder = _copy(saved, tmp_path)
    tensors = safetensors.torch.load_file(folder / file)
    key = sorted(tensors)[1]
    del tensors[key]
    safetensors.torch.save_file(tensors, folder / file)
    with pytest.raises(ExitCheckpointError, match="missing") as e:
        from_pretrained(folder)
    assert e.value.file.endswith(file) and e.value.key == key


@pytest.mark.parametrize("file", ["exits.safetensors", "model.safetensors"])
def test_unexpected_tensor(saved, tmp_path, file):
    folder = _copy(saved, tmp_path)
    tensors = safetensors.torch.load_file(folder / file)
    tensors["branches.9.head.fc.weight"] = torch.zeros(2, 2)
    safetensors.torch.save_file(tensors, folder / file)
    with pytest.raises(ExitCheckpointError, match="unexpected") as e:
        from_pretrained(folder)
    assert e.value.file.endswith(file) and e.value.key == "branches.9.head.fc.weight"


def test_shape_mismatch(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    tensors = safetensors.torch.load_file(folder / "exits.safetensors")
    tensors["branches.1.head.fc.weight"] = torch.zeros(7, 3)
    safetensors.torch.save_file(tensors, folder / "exits.safetensors")
    with pytest.raises(ExitCheckpointError, match=r"shape \(7, 3\)") as e:
        from_pretrained(folder)
    assert e.value.file.endswith("exits.safetensors") and e.value.key == "branches.1.head.fc.weight"


def test_config_names_another_architecture_than_the_weights(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    _edit_config(folder, lambda c: c.update(architecture="test_vit", model_args={"num_classes": 10}))
    with pytest.raises(ExitCheckpointError, match="architecture 'test_vit'") as e:
        from_pretrained(folder)
    assert e.value.file.endswith("model.safetensors") and e.value.key is not None


@pytest.mark.parametrize("where", ["config", "exits"])
def test_newer_format_version(saved, tmp_path, where):
    folder = _copy(saved, tmp_path)
    if where == "config":
        _edit_config(folder, lambda c: c["timm_exits"].update(format_version=FORMAT_VERSION + 1))
        file, key = "config.json", "timm_exits.format_version"
    else:
        path = folder / "exits.safetensors"
        with safetensors.safe_open(path, "pt") as f:
            meta = f.metadata()
        tensors = safetensors.torch.load_file(path)
        info = json.loads(meta["timm_exits"])
        assert info == {
            "format_version": FORMAT_VERSION,
            "architecture": "test_resnet",
            "exits": info["exits"],
            "backbone_sha256": hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest(),
        }
        info["format_version"] = FORMAT_VERSION + 1
        safetensors.torch.save_file(tensors, path, metadata={"timm_exits": json.dumps(info)})
        file, key = "exits.safetensors", "__metadata__.timm_exits.format_version"
    with pytest.raises(ExitCheckpointError, match="newer") as e:
        from_pretrained(folder)
    assert e.value.file.endswith(file) and e.value.key == key


@pytest.mark.parametrize("file", ["exits.safetensors", "model.safetensors"])
def test_truncated_file(saved, tmp_path, file):
    folder = _copy(saved, tmp_path)
    path = folder / file
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    keep = (len(raw) - 8 - n) // 2
    entries = sorted((v["data_offsets"], k) for k, v in _header(path).items() if k != "__metadata__")
    first_cut = next(k for (begin, end), k in entries if end > keep)
    path.write_bytes(raw[: 8 + n + keep])
    with pytest.raises(ExitCheckpointError, match="truncated") as e:
        from_pretrained(folder)
    assert e.value.file.endswith(file) and e.value.key == first_cut


def test_corrupted_header(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    path = folder / "exits.safetensors"
    raw = bytearray(path.read_bytes())
    raw[9:40] = b"\xff" * 31
    path.write_bytes(bytes(raw))
    with pytest.raises(ExitCheckpointError, match="corrupted") as e:
        from_pretrained(folder)
    assert e.value.file.endswith("exits.safetensors")


def test_corrupted_tensor_entry(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    key = "branches.0.head.fc.weight"
    _rewrite_header(folder / "exits.safetensors", lambda h: h[key]["shape"].__setitem__(0, 11))
    with pytest.raises(ExitCheckpointError, match="corrupted") as e:
        from_pretrained(folder)
    assert e.value.file.endswith("exits.safetensors") and e.value.key == key


@pytest.mark.parametrize("case", ["resnet", "added_head"])
def test_load_exits_onto_a_headless_backbone_reads_a_damaged_file_strictly(models, tmp_path, case):
    folder = save_pretrained(models[case], tmp_path / "m")
    path = folder / EXITS
    raw = path.read_bytes()
    path.write_bytes(raw[:100])  # a truncated copy
    headless = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    with pytest.raises(ExitCheckpointError) as e:
        load_exits(headless, folder)
    n = int.from_bytes(raw[:8], "little")
    assert str(e.value) == (
        f"{path}: header claims {n} bytes but the file has 92 after its length: truncated or not a safetensors file."
    )


def test_an_incomplete_folder_or_hf_cache_says_what_is_missing(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    (folder / EXITS).unlink()  # an incomplete copy
    backbone = timm.create_model("test_resnet", pretrained=False, num_classes=10)
    for load in (from_pretrained, lambda source: load_exits(backbone, source)):
        with pytest.raises(FileNotFoundError) as e:
            load(folder)
        assert str(e.value) == (
            f"{folder / EXITS}: no such file; the folder is incomplete: its config.json describes exits (its "
            "'timm_exits' entry) but exits.safetensors is missing; copy the whole folder save_pretrained() wrote."
        )

    partial = tmp_path / "partial"  # what timm.create_model("hf-hub:...", pretrained=True) leaves in the cache
    partial.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(saved / name, partial / name)
    cache = tmp_path / "hub"
    _build_hf_cache(cache, "org/multi-exit", {"main": partial})
    offline = {"cache_dir": cache, "local_files_only": True}
    for load in (
        lambda source: from_pretrained(source, **offline),
        lambda source: load_exits(backbone, source, **offline),
    ):
        with pytest.raises(FileNotFoundError) as e:
            load("hf-hub:org/multi-exit")
        assert str(e.value) == (
            "hf-hub:org/multi-exit/exits.safetensors: not in the local Hugging Face cache, and offline mode "
            "(HF_HUB_OFFLINE=1 or local_files_only=True) does not ask the Hub. Connect to the network, or download "
            "it once without HF_HUB_OFFLINE and local_files_only so that it is cached "
            "(timm.create_model(..., pretrained=True) caches config.json and model.safetensors only)."
        )


def _hooks(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in module.modules())


def test_a_failed_load_exits_leaves_the_backbone_without_hooks(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    _flip_byte(folder / EXITS, "data")
    backbone = timm.create_model(f"local-dir:{saved}", pretrained=True)
    for _ in range(2):  # a retry adds nothing either
        with pytest.raises(ExitCheckpointError, match="SHA-256 is"):
            load_exits(backbone, folder)
        assert _hooks(backbone) == 0
    model = load_exits(backbone, saved)  # the backbone is still usable for a good folder
    assert _hooks(backbone) == len(model.branches)


def test_load_exits_refuses_a_backbone_with_a_classifier_for_an_added_final_head(models, tmp_path):
    folder = save_pretrained(models["added_head"], tmp_path / "m")
    backbone = timm.create_model("test_resnet", pretrained=False, num_classes=10)  # the saved model's class count
    before = _state(backbone)
    with pytest.raises(ExitCheckpointError) as e:
        load_exits(backbone, folder)
    assert str(e.value) == (
        f"{folder / 'config.json'}, key 'num_classes': the saved model's final exit is a head it added on a backbone "
        "without a classifier, but this backbone has its own with 10 classes; create it with "
        "timm.create_model(name, num_classes=0)."
    )
    assert _hooks(backbone) == 0
    _assert_equal(before, _state(backbone))


def _deep_json(folder: Path) -> None:
    (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)


def _set(key: str, value: Any):
    """An edit of config.json setting `key` ("a.b" for a nested one) to `value`."""

    def edit(cfg: dict[str, Any]) -> None:
        *path, last = key.split(".")
        for part in path:
            cfg = cfg[part]
        cfg[last] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "key", "match", "both"),
    [
        (_set("timm_exits.layouts", "NCHW"), "timm_exits", "layouts='NCHW' must map module names to layouts", True),
        (_set("timm_exits.detach_gate_inputs", "no"), "timm_exits", "detach_gate_inputs='no' must be True", True),
        (_set("timm_exits.num_classes", 10.0), "timm_exits", "num_classes=10.0 must be an integer", True),
        (_set("timm_exits.head_hidden", "x"), "timm_exits", "head_hidden='x' must be an integer", True),
        (_set("timm_exits.costs", "abc"), "timm_exits", "costs='abc' must hold one finite, non-negative value", True),
        (_set("timm_exits.thresholds", "0.5"), "timm_exits", r"thresholds='0.5' must hold one value in \[0, 1\]", True),
        (_set("timm_exits.token_pool", "cls"), "timm_exits", "token_pool='cls' is not a pooling", True),
        (_set("timm_exits.costs_measured", "yes"), "timm_exits.costs_measured", "expected true or false", True),
        (_set("architecture", 5), "architecture", "expected a timm model name, got 5", True),
        (_set("pretrained_cfg", []), "pretrained_cfg", "expected a JSON object, got list", True),
        (_set("model_args", "x"), "model_args", "expected a JSON object, got str", True),
        (_set("model_args", {"in_chans": "x"}), "model_args", "timm could not create 'test_resnet'", False),
        (_set("model_args", {"bogus": 1}), "model_args", "unexpected keyword argument 'bogus'", False),
        (None, None, "nested too deeply", True),
    ],
)
def test_a_damaged_config_json_is_refused_naming_it(saved, tmp_path, edit, key, match, both):
    folder = _copy(saved, tmp_path)
    if edit is None:
        _deep_json(folder)
    else:
        _edit_config(folder, edit)
    loaders = [from_pretrained]
    if both:  # load_exits does not build the backbone, so it never reads model_args
        loaders.append(lambda source: load_exits(timm.create_model("test_resnet", num_classes=10), source))
    for load in loaders:
        with pytest.raises(ExitCheckpointError, match=match) as e:
            load(folder)
        assert e.value.file == str(folder / "config.json") and e.value.key == key


def test_costs_must_agree(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    _edit_config(folder, lambda c: c["timm_exits"].update(costs=[0.5 * v for v in c["timm_exits"]["costs"]]))
    with pytest.raises(ExitCheckpointError, match="disagree") as e:
        from_pretrained(folder)
    assert e.value.file.endswith("exits.safetensors") and e.value.key == "exit_costs"


def test_exits_that_do_not_fit_the_backbone(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    edit = {"exits": ["layer1", "no_such_module"], "costs": [0.3, 0.6, 1.0]}  # one cost per exit, as a save writes
    _edit_config(folder, lambda c: c["timm_exits"].update(edit))
    with pytest.raises(ExitCheckpointError, match="no_such_module") as e:
        from_pretrained(folder)
    assert e.value.file.endswith("config.json") and e.value.key == "timm_exits.exits"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _flip_byte(path: Path, where: str) -> None:
    """Flip the lowest bit of one byte: in the middle of the largest tensor's data, in the header's metadata
    (the header stays valid JSON with the same structure) or in the first tensor name."""
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    text = raw[8 : 8 + n].decode()
    if where == "data":
        header = {k: v for k, v in _header(path).items() if k != "__metadata__"}
        begin, end = max((v["data_offsets"] for v in header.values()), key=lambda o: o[1] - o[0])
        at = 8 + n + (begin + end) // 2
    elif where == "metadata":
        at = 8 + text.index('"__metadata__"') + len('"__metadata__":{"') + 1
    else:
        at = 8 + 2
    raw[at] ^= 1
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(("file", "where"), [(EXITS, "data"), (EXITS, "metadata"), ("model.safetensors", "data")])
def test_one_flipped_byte_is_refused(saved, tmp_path, file, where):
    folder = _copy(saved, tmp_path)
    expected = _sha(folder / file)
    _flip_byte(folder / file, where)
    actual = _sha(folder / file)
    assert actual != expected
    safetensors.torch.load_file(folder / file)  # still a well-formed file: only the hash can tell
    with pytest.raises(ExitCheckpointError, match=f"SHA-256 is {actual} but .*config.json records {expected}") as e:
        from_pretrained(folder)
    assert e.value.file == str(folder / file) and e.value.key is None
    if file == EXITS:  # load_exits reads it too, and leaves the user's backbone as it was
        backbone = timm.create_model(f"local-dir:{saved}", pretrained=True)
        before = _state(backbone)
        with pytest.raises(ExitCheckpointError, match=f"SHA-256 is {actual}") as e:
            load_exits(backbone, folder)
        assert e.value.file == str(folder / file)
        _assert_equal(before, _state(backbone))


def test_flipped_byte_in_a_tensor_name(saved, tmp_path):
    """A flip that changes the header's structure is reported by the structural checks, naming the key."""
    folder = _copy(saved, tmp_path)
    first = min((v["data_offsets"], k) for k, v in _header(folder / "model.safetensors").items())[1]
    _flip_byte(folder / "model.safetensors", "name")
    with pytest.raises(ExitCheckpointError, match="missing from the file") as e:
        from_pretrained(folder)
    assert e.value.file == str(folder / "model.safetensors") and e.value.key == first


def test_exits_of_another_trained_model_are_refused(saved, tmp_path):
    other = _make("resnet", seed=1)  # the same architecture and exits, other weights
    other_folder = save_pretrained(other, tmp_path / "other")
    assert other.config.exits == json.loads((saved / "config.json").read_text())["timm_exits"]["exits"]
    folder = _copy(saved, tmp_path)
    shutil.copyfile(other_folder / EXITS, folder / EXITS)
    for load in (from_pretrained, lambda f: load_exits(timm.create_model(f"local-dir:{saved}", pretrained=True), f)):
        with pytest.raises(ExitCheckpointError, match="comes from another trained model") as e:
            load(folder)
        assert e.value.file == str(folder / EXITS) and e.value.key == "__metadata__.timm_exits.backbone_sha256"
        msg = str(e.value)
        assert str(folder / "model.safetensors") in msg and _sha(saved / "model.safetensors") in msg
        assert _sha(other_folder / "model.safetensors") in msg

    # with the other model's config.json as well, this folder's own model.safetensors is the odd one out
    shutil.copyfile(other_folder / "config.json", folder / "config.json")
    with pytest.raises(ExitCheckpointError, match=f"SHA-256 is {_sha(folder / 'model.safetensors')}") as e:
        from_pretrained(folder)
    assert e.value.file == str(folder / "model.safetensors")


def test_missing_or_malformed_hashes_are_refused(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    _edit_config(folder, lambda c: c["timm_exits"].pop("files"))
    with pytest.raises(ExitCheckpointError, match="records the SHA-256") as e:
        from_pretrained(folder)
    assert e.value.file == str(folder / "config.json") and e.value.key == "timm_exits.files"
    _edit_config(folder, lambda c: c["timm_exits"].update(files={"model.safetensors": "0" * 64, EXITS: "abc"}))
    with pytest.raises(ExitCheckpointError, match="'abc'") as e:
        load_exits(timm.create_model(f"local-dir:{saved}", pretrained=True), folder)
    assert e.value.key == f"timm_exits.files.{EXITS}"

    folder = _copy(saved, tmp_path / "b")  # an exits file without the backbone's hash, in a folder that records it
    tensors = safetensors.torch.load_file(folder / EXITS)
    safetensors.torch.save_file(tensors, folder / EXITS)
    with pytest.raises(ExitCheckpointError, match="SHA-256 is") as e:
        from_pretrained(folder)
    assert e.value.file == str(folder / EXITS)
    _edit_config(folder, lambda c: c["timm_exits"]["files"].update({EXITS: _sha(folder / EXITS)}))
    with pytest.raises(ExitCheckpointError, match="not written by save_pretrained") as e:
        from_pretrained(folder)
    assert e.value.file == str(folder / EXITS) and e.value.key == "__metadata__.timm_exits.backbone_sha256"


def _as_version_1(folder: Path) -> None:
    """Turn a saved folder into what format version 1 wrote: no hashes anywhere."""
    _edit_config(folder, lambda c: c["timm_exits"].pop("files") and c["timm_exits"].update(format_version=1))
    path = folder / EXITS
    with safetensors.safe_open(path, "pt") as f:
        info = json.loads(f.metadata()["timm_exits"])
    del info["backbone_sha256"]
    info["format_version"] = 1
    safetensors.torch.save_file(safetensors.torch.load_file(path), path, metadata={"timm_exits": json.dumps(info)})


def test_format_version_1_loads_with_a_warning_and_resaves_with_hashes(models, saved, tmp_path):
    folder = _copy(saved, tmp_path)
    _as_version_1(folder)
    with pytest.warns(UserWarning, match="format version 1 records no SHA-256.*re-save") as w:
        loaded = from_pretrained(folder)
    assert str(folder / "config.json") in str(w[0].message)
    _assert_equal(_outputs(models["resnet"], _x()), _outputs(loaded, _x()))
    with pytest.warns(UserWarning, match="format version 1"):
        load_exits(timm.create_model(f"local-dir:{folder}", pretrained=True), folder)

    again = save_pretrained(loaded, tmp_path / "again" / saved.name, folder / "report.json")
    for name in FILES:  # saved again: the current format version with hashes, the bytes of the original save
        assert (again / name).read_bytes() == (saved / name).read_bytes(), name


def test_plain_timm_model_and_pickles_are_refused(models, tmp_path):
    plain = tmp_path / "plain"
    save_for_hf(models["resnet"].backbone, plain, safe_serialization=True)
    with pytest.raises(ExitCheckpointError, match="plain timm model") as e:
        from_pretrained(plain)
    assert e.value.key == "timm_exits"

    folder = save_pretrained(models["resnet"], tmp_path / "m")
    (folder / "model.safetensors").unlink()
    torch.save(models["resnet"].backbone.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="never loads pickle"):
        from_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="hf-hub:org/name"):
        from_pretrained(tmp_path / "does-not-exist")


# ------------------------------------------------------------------------------------------ model card
_NUM = re.compile(r"(?<![\w.])\d+(?:\.\d+)?")


def _card_numbers(card: str) -> list[str]:
    """Numbers a reader sees as statements: prose and tables, not code, identifiers or exit ordinals."""
    body = card.split("---", 2)[2]
    body = re.sub(r"```.*?```", "", body, flags=re.S)
    body = re.sub(r"`[^`]*`", "", body)
    body = re.sub(r"#\d+", "", body)
    return _NUM.findall(body)


def _report_values(obj: Any) -> list[float]:
    if isinstance(obj, dict):
        return [v for x in obj.values() for v in _report_values(x)]
    if isinstance(obj, list):
        return [v for x in obj for v in _report_values(x)]
    if isinstance(obj, bool):
        return []
    if isinstance(obj, (int, float)):
        return [float(obj)]
    if isinstance(obj, str):
        return [float(s) for s in _NUM.findall(obj)]
    return []


def _assert_card_numbers_from_report(card: str, report: dict[str, Any], model: EarlyExitModel) -> None:
    constants = set(_card_numbers(render_model_card(model, None)))  # the template's own (the citation year)
    values = _report_values(report)
    for s in _card_numbers(card):
        if s in constants:
            continue
        tol = 0.5 * 10 ** -(len(s.split(".")[1]) if "." in s else 0) + 1e-9
        x = float(s)
        assert any(abs(x - v) <= tol or abs(x - 100 * v) <= tol for v in values), f"{s} is not in the report"


def test_card_without_report_states_no_numbers(models):
    card = render_model_card(models["resnet"], None, repo_id="org/resnet-2")
    assert "no training report was given" in card.lower() and "states no results" in card
    assert set(_card_numbers(card)) <= {"2020"}  # the citation's year only
    assert "%" not in card.split("---", 2)[2]
    assert "metrics" not in yaml.safe_load(card.split("---", 2)[1])


def test_card_numbers_come_from_the_report(models):
    model = models["vit"]
    report = _report(model)
    card = render_model_card(model, report, repo_id="org/vit-exits-2")
    _assert_card_numbers_from_report(card, report, model)
    # each kind of number is there: per-exit accuracy and cost, the distribution, speed, the machine, the recipe
    for text in ("50.00 %", "57.00 %", "0.17", "0.51", "#1: 0.4 %, #2: 22.4 %, #3: 0.0 %", "77.2 %", "2.18", "3.45"):
        assert text in card, text
    assert "Xeon 8480 VM" in card and "2 threads" in card and "cost_weight: 0.1" in card
    assert "Scardapane" in card and "ICASSP 2020" in card
    assert 'from_pretrained("hf-hub:org/vit-exits-2")' in card
    assert 'timm.create_model("hf-hub:org/vit-exits-2", pretrained=True)' in card

    # a number changed in the report changes on the card; a partial report gives a partial card
    report["policies"]["gate"]["speedup"] = 1.93
    assert "1.93x" in render_model_card(model, report)
    partial = {"dataset": "cifar100", "test": {"soft_accuracy": 0.6231}}
    card = render_model_card(model, partial)
    assert "62.31 %" in card and "gives no exit-policy results" in card
    _assert_card_numbers_from_report(card, partial, model)

    # gates re-fitted after training: the card gives the stored gates' soft output beside the trained one
    report["test"]["soft_accuracy_fitted_gates"] = 0.8655
    card = render_model_card(model, report)
    assert "87.12 % accuracy on 10000 test images with the jointly trained gates (86.55 % with the re-fitted" in card
    _assert_card_numbers_from_report(card, report, model)


def test_card_front_matter(models):
    report = _report(models["resnet"]) | {"base_model": "timm/test_resnet.r160_in1k", "license": "mit"}
    meta = yaml.safe_load(render_model_card(models["resnet"], report).split("---", 2)[1])
    assert meta["library_name"] == "timm" and meta["pipeline_tag"] == "image-classification"
    assert {"early-exit", "image-classification", "timm"} <= set(meta["tags"])
    assert meta["datasets"] == ["cifar10"] and meta["metrics"] == ["accuracy"]
    assert meta["base_model"] == "timm/test_resnet.r160_in1k" and meta["license"] == "mit"
    meta = yaml.safe_load(render_model_card(models["resnet"], _report(models["resnet"])).split("---", 2)[1])
    assert "base_model" not in meta and meta["license"] == "apache-2.0"  # trained from scratch: no base model


def test_card_of_a_soft_policy_model_says_every_exit_runs(models):
    model = copy.deepcopy(models["resnet"])
    model.config.policy, model.config.thresholds = "soft", None  # as `eval RUN --policy soft` stores it
    report = _report(model)
    dist = [0.0] * (model.num_exits - 1) + [1.0]
    soft = {"threshold": None, "accuracy": 0.8712, "expected_cost": 1.0049, "exit_distribution": dist}
    report["policies"]["soft"] = soft
    card = render_model_card(model, report)
    assert (
        "With the stored policy (`soft`) every exit runs and the prediction is the soft-conditional output, the "
        "exits' class probabilities averaged with the gates' exit probabilities as weights; it reaches 87.12 % "
        "accuracy, an expected cost of 1.005 of the backbone's FLOPs." in card
    )
    assert "hard early exit by the stored policy" not in card
    assert "pred = model.predict(images)  # the stored policy (soft): every exit runs, their predictions " in card
    assert "| `soft` | none | 87.12 % | 1.005 | not reported | not reported |" in card
    assert "The `soft` policy exits nowhere early: every exit runs" in card
    _assert_card_numbers_from_report(card, report, model)
    gate_card = render_model_card(models["resnet"], _report(models["resnet"]))
    assert "pred = model.predict(images)  # hard early exit with the stored policy" in gate_card
    assert "With hard early exit by the stored policy (`gate`) it reaches 84.92 % accuracy" in gate_card


def test_card_of_an_unfinished_run_says_training_did_not_finish(models):
    report = _report(models["resnet"])
    report["recipe"]["epochs"] = 3
    report["training"] = {"epochs": 1, "planned_epochs": 3, "steps": 17, "unfinished": "1 of 3 epochs, step 17"}
    card = render_model_card(models["resnet"], report)
    top, training = card.split("## How to use")[0], card.split("## Training")[1]
    stopped = "Training did not finish: it stopped after 1 of 3 epochs, step 17 (1 of the 3 planned epochs trained)."
    assert stopped in top and stopped in training
    assert "These weights are its last checkpoint, not a fully trained model." in top
    report["training"]["unfinished"] = None  # a finished run's report: no such line
    assert "did not finish" not in render_model_card(models["resnet"], report)


def test_card_claims_no_timing_when_the_report_timed_nothing(models):
    report = _report(models["resnet"])
    report["timing"]["baseline_ms_per_image"] = None  # `eval --no-timing` still writes the machine and threads
    for pol in report["policies"].values():
        pol.pop("ms_per_image", None), pol.pop("speedup", None)
    speed = render_model_card(models["resnet"], report).split("### Speed")[1]
    assert "Times were measured" not in speed and "The report gives no timing." in speed


def test_card_of_an_older_report_does_not_give_the_joint_soft_figure_as_this_models(models):
    model = copy.deepcopy(models["resnet"])
    model.config.policy, model.config.thresholds = "soft", None
    report = _report(model)  # written before test.soft_accuracy_fitted_gates: policies.soft is the joint one
    report["gate_fit"] = {"objective": "no_gain", "split": "val"}
    dist = [0.0] * (model.num_exits - 1) + [1.0]
    report["policies"]["soft"] = {
        "threshold": None,
        "accuracy": 0.8712,
        "expected_cost": 1.0,
        "exit_distribution": dist,
    }
    card = render_model_card(model, report)
    assert "| `soft` (jointly trained gates' ensemble, not this model's re-fitted gates) | none | 87.12 %" in card
    assert "With the stored policy (`soft`)" in card and "it reaches 87.12 % accuracy" not in card
    assert "with the jointly trained gates (the report gives none for the re-fitted gates of this model)" in card
    report["test"]["soft_accuracy_fitted_gates"] = 0.8712  # the current format: the row is this model's
    card = render_model_card(model, report)
    assert "| `soft` | none | 87.12 %" in card and "it reaches 87.12 % accuracy" in card


def test_card_number_format_is_what_its_docstring_says():
    from timm_exits.hub.card import _fmt

    assert (_fmt(0.99996), _fmt(1.99996), _fmt(0.12344), _fmt(123.44), _fmt(3.0)) == ("1", "2", "0.1234", "123.4", "3")
    assert "rounding may change the integer part" in _fmt.__doc__


def test_card_licence_defaults_to_the_pretrained_backbones(tmp_path):
    torch.manual_seed(0)
    backbone = timm.create_model(
        "test_resnet", pretrained=False, num_classes=10, pretrained_cfg_overlay={"license": "cc-by-nc-4.0"}
    )
    model = wrap(backbone, input_size=(3, SIZE, SIZE)).eval()
    tuned = _report(model)
    tuned["recipe"]["pretrained"] = True
    folder = save_pretrained(model, tmp_path / "m", tuned)
    meta = _front((folder / "README.md").read_text())
    assert meta["license"] == "cc-by-nc-4.0" and meta["base_model"] == "timm/test_resnet.r160_in1k"
    assert _front(render_model_card(from_pretrained(folder), tuned))["license"] == "cc-by-nc-4.0"
    assert _front(render_model_card(model, tuned | {"license": "mit"}))["license"] == "mit"  # the report's wins
    assert _front(render_model_card(model, _report(model)))["license"] == "apache-2.0"  # trained from scratch


def test_report_for_other_exits_is_refused(models, tmp_path):
    report = _report(models["resnet"])
    report["exits"][0]["name"] = "layer4"
    with pytest.raises(ValueError, match="exits"):
        save_pretrained(models["resnet"], tmp_path / "m", report)
    assert not (tmp_path / "m").exists()
    report = _report(models["resnet"])
    report["policies"]["gate"]["exit_distribution"] = [0.5, 0.5]
    with pytest.raises(ValueError, match="distribution"):
        render_model_card(models["resnet"], report)


def test_pooled_final_head_round_trips(tmp_path):
    """A backbone returning tokens (num_classes=0, global_pool="") comes back with the same pooling
    and the same logits: timm's config keeps global_pool, the final head's weights sit in exits.safetensors."""
    from timm_exits import from_pretrained

    torch.manual_seed(0)
    backbone = timm.create_model("vit_tiny_patch16_224", num_classes=0, global_pool="", depth=4).eval()
    model = wrap(backbone, num_classes=5, input_size=(3, 224, 224)).eval()
    model.save_pretrained(tmp_path / "m")
    loaded = from_pretrained(tmp_path / "m").eval()
    assert loaded.final_head.pool.layout == "NLC"
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits[-1], model(x).logits[-1], rtol=0, atol=0)


def test_a_report_in_percentages_is_refused_before_anything_is_written(models, tmp_path):
    model = models["resnet"]
    report = _report(model)
    report["test"]["exit_accuracy"] = [100 * a for a in report["test"]["exit_accuracy"]]
    with pytest.raises(ValueError, match=r"the report's test.exit_accuracy holds \[.*\]: accuracies and exit shares"):
        render_model_card(model, report)
    with pytest.raises(ValueError, match=r"fractions in \[0, 1\], as timm-exits writes them"):
        save_pretrained(model, tmp_path / "m", report=report)
    assert not (tmp_path / "m").exists()
    report = _report(model)
    report["policies"]["gate"]["exit_distribution"][0] = 40.0  # one share in percent among fractions
    with pytest.raises(ValueError, match=r"policies.gate.exit_distribution holds \[40.0\]"):
        render_model_card(model, report)
