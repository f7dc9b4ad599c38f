"""The README's commands and CI stay in sync; the package ships its type marker."""

import re
from pathlib import Path
from helpers import run_python

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


def test_import_and_cli_do_not_load_lightning(tmp_path):
    """``import lightning_smd`` and ``lightning-smd check`` load no Lightning (it takes 1–2 s and is not needed);
    the callback imports it on first use."""
    code = (
        "import sys, lightning_smd\n"
        "from lightning_smd import cli\n"
        f"rc = cli.main(['check', {str(tmp_path / 'missing.json')!r}])\n"
        "loaded = sorted({m.split('.')[0] for m in sys.modules} & {'lightning', 'pytorch_lightning'})\n"
        "assert rc == 2 and not loaded, (rc, loaded)\n"
        "lightning_smd.SMDCallback\n"
        "assert {m.split('.')[0] for m in sys.modules} & {'lightning', 'pytorch_lightning'}\n"
    )
    run_python(["-c", code])
