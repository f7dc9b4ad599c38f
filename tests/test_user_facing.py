"""Small things a user notices: where the summary went, who can read it, what the examples import."""

import os
import stat

import torch
from helpers import ROOT, Module, PlainConvNet, fit_smd, run_python, sgd


def test_summary_file_follows_the_umask_and_its_path_is_printed(tmp_path, capsys):
    old = os.umask(0o022)
    try:
        torch.manual_seed(0)
        fit = fit_smd(tmp_path, Module(PlainConvNet(), optimizer=sgd(momentum=0.9)), 6, verbose=True, log_heatmap=False)
    finally:
        os.umask(old)
    path = fit.smd.summary_file
    assert path is not None and os.path.exists(path)
    # readable by a CI collector or a colleague (0644 under umask 022), as every other log file; mkstemp made it 0600
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert f"SMDCallback: summary written to {path}" in capsys.readouterr().out


def test_the_plain_pytorch_example_imports_no_lightning(tmp_path):
    code = (
        "import runpy, sys\n"
        f"sys.path.insert(0, {str(ROOT / 'examples')!r})\n"
        f"sys.argv = ['plain_pytorch.py', '--steps', '20', '--summary', {str(tmp_path / 's.json')!r}]\n"
        f"runpy.run_path({str(ROOT / 'examples' / 'plain_pytorch.py')!r}, run_name='__main__')\n"
        "loaded = sorted({m.split('.')[0] for m in sys.modules} & {'lightning', 'pytorch_lightning', 'lightning_fabric'})\n"
        "assert not loaded, loaded\n"
        "print('NO-LIGHTNING')\n"
    )
    proc = run_python(["-c", code], cwd=tmp_path)
    assert "NO-LIGHTNING" in proc.stdout and os.path.exists(tmp_path / "s.json")
