"""The README and the guides cannot drift from the code: every code block in them is run here,
and the documentation site builds with ``mkdocs build --strict``.

* ```` ```python ```` blocks run in order, one namespace per page (a page reads like a notebook);
  a block that needs a framework that is not installed skips its page through the conftest rule,
  naming the extra.
* ```` ```bash ```` blocks: lines that call ``stabilize`` run through ``python -m stabilize`` and
  must exit 0, or the code their comment states when it starts with ``exit N``. A block preceded by
  ``<!-- not run: reason -->`` (installing packages, several processes, the whole test suite) is
  listed with its reason instead; every other bash block fails this test.
* ```` ```toml ```` blocks must parse; ```` ```text ```` blocks are output, not code.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"(?P<before>(?:<!--[^\n]*-->\n)?)```(?P<lang>[\w-]*)\n(?P<body>.*?)```", re.S)
NOT_RUN = re.compile(r"<!-- not run: (?P<reason>[^>]+?) -->")
KNOWN = {"python", "bash", "toml", "text"}


def blocks(page: Path):
    """(language, body, reason it is not run or None, line) for each fenced block of ``page``."""
    text = page.read_text(encoding="utf-8")
    for m in FENCE.finditer(text):
        why = NOT_RUN.search(m.group("before"))
        reason = why.group("reason") if why else None
        if "<!-- test-command -->" in m.group("before"):
            reason = "the test command: .ci/run reads it from the README and runs it"
        yield m.group("lang"), m.group("body"), reason, text[:m.start()].count("\n") + 1


def _id(page: Path) -> str:
    return str(page.relative_to(ROOT))


@pytest.mark.parametrize("page", PAGES, ids=_id)
def test_every_block_has_a_known_language(page):
    for lang, _, _, line in blocks(page):
        assert lang in KNOWN, f"{_id(page)}:{line}: a ```{lang} block; use one of {sorted(KNOWN)}"


@pytest.mark.parametrize("page", [p for p in PAGES if any(b[0] == "python" for b in blocks(p))], ids=_id)
def test_python_blocks_run(page, tmp_path):
    level = logging.getLogger("stabilize").level
    namespace = {"__name__": "__doc__"}
    try:
        for lang, body, reason, line in blocks(page):
            if lang != "python" or reason is not None:
                continue
            code = compile(body, f"{_id(page)}:{line}", "exec")
            exec(code, namespace)  # noqa: S102 - the documentation's own examples
    finally:
        logging.getLogger("stabilize").setLevel(level)


def _cli_lines(body):
    for raw in body.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        command, _, comment = line.partition("#")
        expect = re.match(r"\s*exit (\d)\b", comment)  # a comment that starts "exit N" states the code
        yield shlex.split(command), int(expect.group(1)) if expect else 0


@pytest.mark.slow  # one process per command, each importing the frameworks
@pytest.mark.parametrize("page", [p for p in PAGES if any(b[0] == "bash" for b in blocks(p))], ids=_id)
def test_bash_blocks_run_or_say_why_not(page, tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for lang, body, reason, line in blocks(page):
        if lang != "bash" or reason is not None:
            continue
        for argv, expected in _cli_lines(body):
            if argv[:1] == ["stabilize"]:
                argv = [sys.executable, "-m", "stabilize", *argv[1:]]
            elif argv[:3] == ["python", "-m", "stabilize"]:
                argv = [sys.executable, *argv[1:]]
            else:
                pytest.fail(f"{_id(page)}:{line}: {' '.join(argv)!r} is neither run by this test nor marked "
                            f"'<!-- not run: reason -->'")
            out = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
            _skip_if_a_backend_is_missing(out)
            assert out.returncode == expected, f"{_id(page)}:{line}: {argv[2:]} exited {out.returncode}: {out.stderr[-1500:]}"


def _skip_if_a_backend_is_missing(out):
    """A command that needs a framework this install lacks (and this run does not require) is skipped,
    naming the extra, as the conftest rule does for a test that imports it."""
    missing = re.search(r"backend '(\w+)' is known but its framework failed to import \(ModuleNotFoundError: "
                        r"No module named '(\w+)'", out.stderr)
    required = os.environ.get("STABILIZE_TEST_BACKENDS", "torch,tensorflow").split(",")
    if out.returncode == 2 and missing and missing.group(1) not in required \
            and importlib.util.find_spec(missing.group(2)) is None:
        pytest.skip(f"needs {missing.group(2)} (the '{missing.group(1)}' extra), not installed")


@pytest.mark.parametrize("page", [p for p in PAGES if any(b[0] == "toml" for b in blocks(p))], ids=_id)
def test_toml_blocks_parse(page):
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    for lang, body, _, line in blocks(page):
        if lang == "toml":
            tomllib.loads(body)


def test_the_readme_stays_short_and_shows_a_guard_loop_early():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200
    assert any("guard.step(loss)" in line for line in lines[:60])
    marker = lines.index("<!-- test-command -->")
    assert lines[marker + 1] == "```bash" and lines[marker + 2].startswith("python -m pytest")


def test_the_cause_catalogue_page_lists_every_cause_in_order():
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        from hooks import cause_table
    finally:
        sys.path.pop(0)
    from stabilize.diagnosis.rules import ADVICE, RULES

    table = cause_table().splitlines()[2:]
    assert [row.split("|")[2].strip(" `") for row in table] == [rule.name for rule in RULES]
    for rule, row in zip(RULES, table):
        if rule.name in ADVICE:
            assert ADVICE[rule.name].replace("|", "\\|") in row
    assert "<!-- causes -->" in (ROOT / "docs" / "guides" / "diagnosis.md").read_text(encoding="utf-8")


@pytest.mark.slow  # a subprocess that imports the package for the API reference
@pytest.mark.needs("mkdocs", "material", "mkdocstrings")
def test_mkdocs_build_strict(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), NO_MKDOCS_2_WARNING="1")
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert (tmp_path / "site" / "guides" / "diagnosis" / "index.html").exists()
