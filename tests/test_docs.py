"""The pages a reader follows: every relative link leads somewhere, every table a page says a command
prints is what that command prints from the committed results, and every public name is described."""

from __future__ import annotations

import importlib
import pkgutil
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
# the committed results and benchmark outputs, run reports included
RESULT_PAGES = sorted([*(ROOT / "results").rglob("*.md"), *(ROOT / "benchmarks").rglob("*.md")])
LINK = re.compile(r"\]\(([^)\s]+)\)")
TABLE_BY = re.compile(r"Table by `python (benchmarks/\w+\.py[^`]*)`")
# where a reader looks up a public name
API_PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _slug(heading: str) -> str:
    """The anchor a Markdown renderer gives a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _broken_links(page: Path) -> list[str]:
    broken = []
    for link in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", link):
            broken.append(f"{link} (leaves the repository)")
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists() or ROOT not in target.parents:
            broken.append(f"{link} (no such file in the repository)")
        elif anchor and target.suffix == ".md":
            headings = re.findall(r"^#+\s+(.*)$", target.read_text(), re.M)
            if anchor not in {_slug(h) for h in headings}:
                broken.append(f"{link} (no heading #{anchor} in {target.name})")
    return broken


def _public_names() -> dict[str, list[str]]:
    """`__all__` of `timm_exits` and of each of its subpackages (their modules' own lists are internals)."""
    import timm_exits

    packages = ["timm_exits"] + [m.name for m in pkgutil.walk_packages(timm_exits.__path__, "timm_exits.") if m.ispkg]
    return {name: list(importlib.import_module(name).__all__) for name in packages}


def _undocumented(names: dict[str, list[str]], text: str) -> list[str]:
    """The names that `text` never shows in backticks: as `name`, `name(...)` or qualified by their
    package (`timm_exits.name`, `hub.name`, `timm_exits.deploy.serve.name`, ...)."""
    missing = []
    for package, public in names.items():
        parts = package.split(".")
        prefixes = "|".join(re.escape(".".join(parts[i:]) + ".") for i in range(len(parts)))
        for name in public:
            if not re.search(rf"`(?:{prefixes})?{re.escape(name)}(?:\([^`]*\))?`", text):
                missing.append(f"{package}.{name}")
    return missing


def _tables_by_command(page: Path) -> list[tuple[str, list[str]]]:
    """(command, rows) of each table that follows a 'Table by `python ...`' line within a few lines."""
    lines = page.read_text().splitlines()
    found = []
    for i, line in enumerate(lines):
        match = TABLE_BY.search(line)
        if not match:
            continue
        start = next((j for j in range(i + 1, min(i + 6, len(lines))) if lines[j].startswith("|")), None)
        if start is None or any(lines[j].startswith("#") for j in range(i + 1, start)):
            continue  # the page names the command without showing its table
        rows = []
        for row in lines[start:]:
            if not row.startswith("|"):
                break
            rows.append(row)
        found.append((match.group(1), rows))
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_leads_to_a_file_and_heading_of_the_repository(page):
    assert _broken_links(page) == []


def test_committed_results_link_only_to_committed_files():
    assert len(RESULT_PAGES) > 40  # every committed run's report.md among them
    broken = {str(p.relative_to(ROOT)): b for p in RESULT_PAGES if (b := _broken_links(p))}
    assert broken == {}


def test_the_link_check_catches_a_missing_file_a_missing_heading_and_an_outside_link(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "other.md").write_text("# A heading\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#a-heading) [gone](nothing.md) [anchor](other.md#b) [web](https://example.org)\n")
    assert [b.split(" ")[0] for b in _broken_links(page)] == ["nothing.md", "other.md#b", "https://example.org"]


def test_every_public_name_is_documented():
    names = _public_names()
    assert {"timm_exits", "timm_exits.hub", "timm_exits.deploy.serve"} <= set(names)
    assert sum(len(v) for v in names.values()) > 60
    missing = _undocumented(names, "\n".join(page.read_text() for page in API_PAGES))
    assert not missing, "public names on no page (README.md or docs/*.md): " + ", ".join(missing)


def test_the_name_check_needs_the_name_in_backticks_bare_called_or_qualified():
    names = {"timm_exits": ["wrap", "split", "POLICIES"], "timm_exits.hub": ["CONFIG_NAME", "push_run"]}
    text = "`wrap(model)` and `timm_exits.split`; `hub.CONFIG_NAME`, `timm_exits.hub.push_run(d, r)`; POLICIES"
    assert _undocumented(names, text) == ["timm_exits.POLICIES"]
    assert _undocumented(names, "`model.split` `unwrap` `other.CONFIG_NAME` `push_run_all`") == [
        "timm_exits.wrap",
        "timm_exits.split",
        "timm_exits.POLICIES",
        "timm_exits.hub.CONFIG_NAME",
        "timm_exits.hub.push_run",
    ]


def test_tables_shown_under_a_command_are_that_commands_output():
    shown = [(page, cmd, rows) for page in PAGES for cmd, rows in _tables_by_command(page)]
    assert len(shown) >= 3  # the two speed tables and the model sweep's
    for page, cmd, rows in shown:
        out = subprocess.run(
            [sys.executable, *shlex.split(cmd)], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.splitlines()
        printed = [line for line in out if line.startswith("|")]
        missing = [row for row in rows if row not in printed]
        assert not missing, f"{page.name}: rows not printed by `python {cmd}`:\n" + "\n".join(missing[:5])
        first = printed.index(rows[0])
        assert printed[first : first + len(rows)] == rows, f"{page.name}: rows out of order for `python {cmd}`"
