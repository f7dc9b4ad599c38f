"""The README's commands and CI stay in sync; the package ships its type marker."""

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]


def _readme_commands():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text)


def test_ci_runs_exactly_the_readme_test_command():
    commands = _readme_commands()
    assert len(commands) >= 2
    run_cmd, test_cmd = commands[0], commands[1]
    assert "examples/quickstart.py" in run_cmd and "pytest" in test_cmd
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_cmd.strip() in ci_lines


def test_package_is_typed():
    assert (ROOT / "lightning_smd" / "py.typed").exists()
    assert 'py.typed' in (ROOT / "pyproject.toml").read_text()
