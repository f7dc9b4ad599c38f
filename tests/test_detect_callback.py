"""Detection inside the callback: the recorded first batch, the numerical check, overrides, the table."""


import pytest
import torch
from helpers import Module, PlainConvNet, SmallConvNet, loader, sgd, trainer, fit_smd
from torch import nn
from torch.nn import functional as F
from zoo import LazyNet, Untraceable

from lightning_smd import SMDCallback, find_normalized_weights

GOOD_OPT = sgd(lr=0.2, weight_decay=0.05)  # tau = 5 steps: no short-run warning


def fit(tmp_path, model, steps=10, **kw):
    kw.setdefault("window", 8)  # detection tests train a few steps: a short judged window keeps the short-run warning out
    kw.setdefault("verbose", False)
    smd, msgs, _ = fit_smd(tmp_path, model, steps, **kw)
    # the verdict and its per-layer warnings are tested elsewhere: a run of a few steps judges nothing robustly
    return smd, [m for m in msgs if not (m.startswith("No equilibrium reached") or "never reached equilibrium while others did" in m)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_untraceable_model_is_detected_from_the_first_training_batch(tmp_path, seed):
    torch.manual_seed(seed)
    net = Untraceable()
    net.fc = nn.Linear(8, 10)
    smd, msgs = fit(tmp_path, Module(net, optimizer=GOOD_OPT), steps=16)
    assert msgs == []
    s = smd.summary()
    assert s["detection_method"] == "run"
    assert [layer["name"] for layer in s["layers"]] == ["net.conv1.weight", "net.conv2.weight"]
    assert all(layer["steps"] == 16 and layer["found_by"] == "run" for layer in s["layers"])  # from the first step on
    assert all(layer["verification"] < 1e-2 for layer in s["layers"])


def test_lazy_modules_are_detected_once_materialized(tmp_path):
    net = LazyNet()
    net.fc = nn.LazyLinear(10)
    model = Module(net, optimizer=GOOD_OPT)
    smd, msgs = fit(tmp_path, model, steps=16)
    assert msgs == []
    assert [layer["name"] for layer in smd.summary()["layers"]] == ["net.conv.weight"]
    assert smd.summary()["layers"][0]["steps"] == 16


class L2OnWeights(Module):
    """Adds an explicit L2 penalty on conv1's weight: its gradient is no longer orthogonal to it."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y) + 0.5 * self.net.conv1.weight.pow(2).sum()


def test_numerical_check_warns_when_the_gradient_is_not_orthogonal(tmp_path):
    smd, msgs = fit(tmp_path, L2OnWeights(SmallConvNet(), optimizer=GOOD_OPT), steps=16)
    assert len(msgs) == 1
    assert "net.conv1.weight" in msgs[0] and "not orthogonal" in msgs[0] and "L2 penalty" in msgs[0]
    layers = {layer["name"]: layer for layer in smd.summary()["layers"]}
    assert layers["net.conv1.weight"]["verification"] > 0.1
    assert layers["net.conv2.weight"]["verification"] < 1e-2


def test_summary_reports_verification_and_rejected_values(tmp_path):
    smd, _ = fit(tmp_path, Module(SmallConvNet(), optimizer=GOOD_OPT), steps=3)
    s = smd.summary()
    assert all(layer["verification"] is not None and layer["granularity"] == "filter" for layer in s["layers"])
    assert "net.fc.weight" in s["not_tracked"] and s["not_tracked_verification"]["net.fc.weight"] > 1e-2


def test_table_is_printed_with_the_verification_value(tmp_path, capsys):
    fit(tmp_path, Module(SmallConvNet(), optimizer=GOOD_OPT), steps=2, verbose=True)
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("name"))
    for column in ("shape", "layer", "normalization", "granularity", "found by", "|cos(g,w)|"):
        assert column in header
    assert "net.conv2.weight" in out and "BatchNorm2d" in out


def test_include_and_exclude_through_the_callback(tmp_path):
    smd, _ = fit(tmp_path, Module(SmallConvNet(), optimizer=GOOD_OPT), steps=3, include=["net.fc.weight"], exclude=["*conv2*"])
    names = [layer["name"] for layer in smd.summary()["layers"]]
    assert names == ["net.conv1.weight", "net.conv3.weight", "net.fc.weight"]
    assert smd.summary()["not_tracked"]["net.conv2.weight"] == "excluded by the user"


def test_a_model_that_cannot_be_run_gets_a_clear_message_not_a_crash():
    det = find_normalized_weights(Untraceable(), example_input=torch.randn(2, 5, 8, 8))  # wrong channel count
    assert det.units == [] and det.method == "none"
    assert "include=" in det.error and "torch.fx failed" in det.error
    det = find_normalized_weights(Untraceable(), example_input=torch.randn(2, 5, 8, 8), include=["conv1.weight"])
    assert [u.name for u in det.units] == ["conv1.weight"]


def test_callback_pickles_before_and_after_fit(tmp_path):
    import pickle

    smd = SMDCallback(verbose=False)
    pickle.loads(pickle.dumps(smd))
    trainer(tmp_path, [smd], max_steps=2).fit(Module(SmallConvNet(), optimizer=torch.optim.SGD), loader())
    clone = pickle.loads(pickle.dumps(smd))
    assert clone.recorder is None and clone.config == smd.config


@pytest.mark.parametrize("every", [1, 3])
def test_logging_interval_option(tmp_path, every):
    smd = SMDCallback(verbose=False, log_every_n_steps=every)
    t = trainer(tmp_path, [smd], max_steps=6)
    t.fit(Module(SmallConvNet(), optimizer=GOOD_OPT), loader())
    import csv

    with open(tmp_path / "metrics.csv") as fh:
        logged = [int(r["step"]) for r in csv.DictReader(fh) if r.get("smd/equilibrium_fraction")]
    assert logged == ([0, 1, 2, 3, 4, 5] if every == 1 else [2, 5])


def test_resume_continues_as_if_never_interrupted(tmp_path):
    """2N steps straight == N steps, checkpoint, resume for N more (same data: one epoch of N batches)."""
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_smd.demo import NoisyTemplates

    stream = iter(NoisyTemplates(batch_size=32, size=8))
    batches = [next(stream) for _ in range(60)]
    data = DataLoader(TensorDataset(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])), batch_size=32)

    def run(root, epochs, ckpt=None):
        torch.manual_seed(0)
        smd = SMDCallback(verbose=False, window=20)
        t = trainer(root, [smd], max_steps=-1, max_epochs=epochs, log_every_n_steps=7)
        t.fit(Module(PlainConvNet(), optimizer=sgd(lr=0.2, weight_decay=0.01)), data, ckpt_path=ckpt)
        return smd, t

    straight, _ = run(tmp_path / "straight", 2)
    first, t1 = run(tmp_path / "first", 1)
    t1.save_checkpoint(tmp_path / "half.ckpt")
    ckpt = torch.load(tmp_path / "half.ckpt", weights_only=True)  # plain types only
    assert any(key.startswith("SMDCallback") for key in ckpt["callbacks"])
    resumed, _ = run(tmp_path / "resumed", 2, ckpt=str(tmp_path / "half.ckpt"))
    a, b = straight.summary(), resumed.summary()
    assert a["steps"] == b["steps"] == 120
    for la, lb in zip(a["layers"], b["layers"]):
        for key in ("angular_update", "ratio", "weight_norm", "predicted_weight_norm", "effective_lr", "steady_ratio", "drift", "drift_se", "norm_drift"):
            assert lb[key] == pytest.approx(la[key], rel=1e-9, abs=1e-12), key
        for key in (
            "steps", "first_equilibrium_step", "steps_in_equilibrium", "state", "in_equilibrium", "steady", "agreement",
            "not_in_equilibrium_because", "verification", "granularity",
        ):  # fmt: skip
            assert lb[key] == la[key], key
    assert a["verdict"] == b["verdict"]
