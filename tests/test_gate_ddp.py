"""The gate under real 2-process DDP on CPU (gloo): every rank raises, nothing hangs."""

import textwrap
from pathlib import Path

import pytest
from helpers import run_python

ROOT = Path(__file__).parents[1]

SCRIPT = textwrap.dedent(
    """
    import os, sys, warnings
    sys.path.insert(0, {tests!r})
    warnings.simplefilter("ignore")
    import pytorch_lightning as pl
    import torch
    from helpers import Module, PlainConvNet, loader, sgd
    from lightning_smd import EquilibriumNotReachedError, SMDCallback

    class Recording(SMDCallback):
        # ddp_spawn workers do not run on_exception hooks: record the raise where it happens
        def _gate(self, trainer):
            try:
                super()._gate(trainer)
            except EquilibriumNotReachedError as err:
                with open(os.path.join({out!r}, f"rank{{trainer.global_rank}}.txt"), "w") as fh:
                    fh.write(type(err).__name__)
                raise

    if __name__ == "__main__":
        torch.set_num_threads(1)
        trainer = pl.Trainer(
            accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=20, log_every_n_steps=5,
            callbacks=[Recording(on_no_equilibrium="raise", verbose=False)],
            default_root_dir={out!r}, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        )
        trainer.fit(Module(PlainConvNet(), optimizer=sgd(weight_decay=0.0)), loader())
        print("not reached")
    """
)


@pytest.mark.slow
def test_raise_on_every_rank_under_ddp(tmp_path):
    script = tmp_path / "ddp_gate.py"
    script.write_text(SCRIPT.format(tests=str(ROOT / "tests"), out=str(tmp_path)))
    proc = run_python([script], env={"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}, cwd=tmp_path, check=False)
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "not reached" not in proc.stdout
    assert "EquilibriumNotReachedError" in proc.stderr
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text() == "EquilibriumNotReachedError", rank
    summaries = list(tmp_path.rglob("smd_summary.json"))
    assert len(summaries) == 1  # written once, by rank zero
