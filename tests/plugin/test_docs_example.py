"""docs/testing-your-app.md's worked example, run as the user would: its app.py,
pytest.ini, conftest.py and test_app.py blocks in a pytester project, then with the
app mishandling the device fault, whose failure output must read as the page shows."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parents[2] / "docs" / "testing-your-app.md"


def page_files() -> dict[str, str]:
    """The page's fenced blocks whose first line is ``# <file name>``, by file name."""
    files = {}
    for m in re.finditer(r"```\w+\n# (\S+\.(?:py|ini))\n(.*?)```", PAGE.read_text(), re.S):
        files[m.group(1)] = m.group(2)
    return files


def output_blocks() -> list[str]:
    return re.findall(r"```text\n(.*?)```", PAGE.read_text(), re.S)


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    files = page_files()
    assert sorted(files) == ["app.py", "conftest.py", "pytest.ini", "test_app.py",
                             "test_long_run.py"]
    (pytester.path / "pytest.ini").write_text(files["pytest.ini"])
    for name in ("app.py", "conftest.py", "test_app.py", "test_long_run.py"):
        (pytester.path / name).write_text(files[name])
    return pytester


def test_the_worked_example_passes(project: pytest.Pytester) -> None:
    result = project.runpytest("test_app.py", "-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=6)
    assert "6 passed" in output_blocks()[0]


def test_the_mishandled_fault_fails_as_the_page_shows(project: pytest.Pytester) -> None:
    app = project.path / "app.py"
    assert "except mx.DeviceError" in app.read_text()
    app.write_text(app.read_text().replace("except mx.DeviceError", "except TimeoutError"))
    result = project.runpytest("test_app.py", "-q", "-ra", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4, failed=2)
    shown = output_blocks()[1]
    # every line the page shows is in the output, in order (but "..." elisions, the
    # banners, and the timing)
    expected = []
    for line in shown.splitlines():
        text = line.rstrip()
        if not text or text == "..." or text.startswith("="):
            continue
        if text.startswith("_"):
            text = "*" + text.strip("_ ") + "*"
        elif re.match(r"\d+ failed", text):
            text = text.split(" in ")[0] + " in *"
        expected.append(text.replace("[", "[[]") + "*")
    result.stdout.fnmatch_lines(expected)
    assert "2 failed, 4 passed" in shown


@pytest.mark.timeout(300)  # a hang guard: 12 minutes of camera time, twice
def test_the_virtual_clock_example_passes(project: pytest.Pytester) -> None:
    result = project.runpytest("test_long_run.py", "-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=6)
    assert "6 passed" in output_blocks()[2]
