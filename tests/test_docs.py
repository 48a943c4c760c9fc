"""Every example in the docs runs.

- Each line starting with `$ tierlm` inside a ```console block of docs/*.md (and README.md, when
  it exists) is run through `typer.testing.CliRunner` on `tierlm.cli.app` and must exit 0.
  Commands run in a temporary directory. A file that a doc gives as a ```json block directly
  after an HTML comment `<!-- file: NAME -->` is written there first, so that an example like
  `--hardware my-gpu.json` finds it. A `--plot PATH` argument is redirected into that
  directory.
- Each ```python block is executed with `exec` in a fresh namespace, from a temporary working
  directory.

Tests are parametrized by file, block index and line, so a failure names the example.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tierlm.cli import app

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```([A-Za-z0-9_+-]*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
NAMED_FILE = re.compile(r"<!--\s*file:\s*([\w.\-]+)\s*-->\s*\n```[A-Za-z0-9_+-]*[^\n]*\n(.*?)^```[ \t]*$",
                        re.M | re.S)


def doc_files() -> list[Path]:
    files = sorted((ROOT / "docs").glob("*.md"))
    readme = ROOT / "README.md"
    if readme.is_file():
        files.append(readme)
    return files


def blocks(path: Path, lang: str) -> list[str]:
    return [m.group(2) for m in FENCE.finditer(path.read_text()) if m.group(1) == lang]


def named_files(path: Path) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in NAMED_FILE.finditer(path.read_text())}


def _label(path: Path) -> str:
    return str(path.relative_to(ROOT))


def console_cases():
    out = []
    for path in doc_files():
        for b, text in enumerate(blocks(path, "console")):
            for n, line in enumerate(text.splitlines()):
                if line.startswith("$ tierlm"):
                    out.append(pytest.param(path, line, id=f"{_label(path)}#console{b}:{n}"))
    return out


def python_cases():
    return [pytest.param(path, code, id=f"{_label(path)}#python{b}")
            for path in doc_files() for b, code in enumerate(blocks(path, "python"))]


def _redirect_plot(args: list[str], tmp: Path) -> list[str]:
    out = []
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--plot" and i + 1 < len(args):
            out += [a, str(tmp / Path(args[i + 1]).name)]
            i += 2
            continue
        if a.startswith("--plot="):
            a = "--plot=" + str(tmp / Path(a.split("=", 1)[1]).name)
        out.append(a)
        i += 1
    return out


def test_docs_have_examples():
    assert console_cases(), "no ```console examples found in docs/"
    assert python_cases(), "no ```python examples found in docs/"


@pytest.mark.parametrize("path,line", console_cases())
def test_console_example(path: Path, line: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    for name, content in named_files(path).items():
        (tmp_path / name).write_text(content)
    monkeypatch.chdir(tmp_path)
    args = _redirect_plot(shlex.split(line[len("$ tierlm"):]), tmp_path)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, (
        f"{_label(path)}: `{line}` exited {result.exit_code}\n{result.output}\n{result.exception!r}")


@pytest.mark.parametrize("path,code", python_cases())
def test_python_example(path: Path, code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    server = None
    if "REDIS_URL" in code:                   # an example of the remote tier: a live Redis for it
        from redis_server import live_url
        url, server = live_url(tmp_path)
        monkeypatch.setenv("REDIS_URL", url)
    try:
        _run_example(path, code)
    finally:
        if server is not None:
            server.stop()


def _run_example(path: Path, code: str) -> None:
    namespace: dict = {"__name__": "__docs_example__"}
    exec(compile(code, f"{_label(path)} (python block)", "exec"), namespace)
