"""The audit of the param groups (lightning_smd.engine.groups): gains and biases with weight decay, a parameter in
two optimizers, and the conventional groups that fix both (lightning_smd.param_groups)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from helpers import teacher_loader, trainer
from torch import nn

from lightning_smd import SMDCallback, SMDMonitor, param_groups
from lightning_smd.engine.groups import audit_groups, embedding_parameters, norm_parameters, param_roles


class RMSNormLike(nn.Module):
    """A normalization layer of another library (found by its class name)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
        nn.Linear(8 * 6 * 6, 16), nn.LayerNorm(16), nn.Linear(16, 16), RMSNormLike(16), nn.Linear(16, 4),
    )  # fmt: skip


def test_norm_layers_parameters_are_found_by_type_and_by_name():
    found = norm_parameters(_net())
    assert found == {"1.weight": "BatchNorm2d", "1.bias": "BatchNorm2d", "5.weight": "LayerNorm", "5.bias": "LayerNorm", "7.weight": "RMSNormLike"}


def test_model_parameters_with_weight_decay_decay_every_gain_and_bias():
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, weight_decay=5e-4)
    audit = audit_groups(dict(net.named_parameters()), norm_parameters(net), [opt])
    (finding,) = audit.decayed
    assert set(finding.norm) == set(norm_parameters(net))  # every gain and shift: recall 100 %
    assert set(finding.other) == {"4.bias", "6.bias", "8.bias"}
    assert finding.weight_decay == 5e-4 and not audit.shared


def test_the_conventional_groups_have_no_finding_and_decay_every_weight():
    net = _net()
    groups = param_groups(net, weight_decay=0.05)
    opt = torch.optim.AdamW(groups, lr=1e-3)
    assert not audit_groups(dict(net.named_parameters()), norm_parameters(net), [opt]).decayed
    decayed = {id(p) for p in groups[0]["params"]}
    names = {n for n, p in net.named_parameters() if id(p) in decayed}
    assert names == {"0.weight", "4.weight", "6.weight", "8.weight"} and groups[0]["weight_decay"] == 0.05
    assert groups[1]["weight_decay"] == 0.0 and len(groups[1]["params"]) == 8
    # every parameter in exactly one group; frozen ones left out
    net[0].weight.requires_grad_(False)
    assert sum(len(g["params"]) for g in param_groups(net, 0.05)) == len(list(net.parameters())) - 1


def test_a_one_dimensional_normalized_weight_can_be_kept_in_the_decay():
    net = _net()
    groups = param_groups(net, 0.1, decay=["7.weight"])
    assert any(p is net[7].weight for p in groups[0]["params"])


def test_a_parameter_in_two_optimizers_is_found():
    net = _net()
    a = torch.optim.SGD(net.parameters(), lr=0.1)
    b = torch.optim.SGD(net[4].parameters(), lr=0.1)
    audit = audit_groups(dict(net.named_parameters()), norm_parameters(net), [a, b])
    assert audit.shared == {"4.weight": [0, 1], "4.bias": [0, 1]}
    assert not audit.decayed  # weight_decay 0: nothing decayed


def test_the_callback_warns_at_fit_start_names_the_fix_and_keeps_the_audit_in_the_summary(tmp_path):
    """A real Trainer: ``model.parameters()`` with weight decay gets SMD038 with the parameters and the one-line fix, and
    the summary's ``groups`` block lists them; the demo's groups (decay on the normalized weights only) get neither."""
    import functools

    from helpers import Module

    from lightning_smd.demo import HeadNet

    sgd = functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9)
    for grouped in (False, True):
        torch.manual_seed(0)
        module = Module(HeadNet(), optimizer=sgd, decay=2.5e-3) if grouped else Module(HeadNet(), optimizer=functools.partial(sgd, weight_decay=2.5e-3))
        path = tmp_path / f"s{grouped}.json"
        smd = SMDCallback(verbose=False, summary_path=str(path))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer(tmp_path, [smd], max_steps=20).fit(module, teacher_loader())
        said = [str(w.message) for w in caught if "[SMD038]" in str(w.message)]
        groups = json.loads(path.read_text())["groups"]
        norms = {n for n in norm_parameters(module)}
        if grouped:
            assert not said and groups["decayed_gains_and_biases"] == []
        else:
            (message,) = said
            assert "lightning_smd.param_groups(model, weight_decay=0.0025)" in message, message
            (row,) = groups["decayed_gains_and_biases"]
            assert set(row["normalization"]) == norms and norms  # every gain and shift of the model
            assert row["weight_decay"] == pytest.approx(0.0025)


def test_the_monitor_warns_too():
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mon = SMDMonitor(net, opt, example_input=torch.randn(4, 3, 8, 8))
    # 5 gains and shifts and the classifier's bias; the two Linear biases before LayerNorm and RMSNorm are part of
    # their normalized weight+bias units, for which decay is right
    assert any("[SMD038]" in str(w.message) and "6 gain(s) and bias(es)" in str(w.message) for w in caught), [str(w.message) for w in caught]
    assert mon.summary()["groups"]["decayed_gains_and_biases"][0]["optimizer"] == 0


class TinyLM(nn.Module):
    """Embedding → LayerNorm → linear → RMS-normalized head: one embedding, one normalized weight."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.norm = nn.LayerNorm(16)
        self.proj = nn.Linear(16, 16, bias=False)
        self.head = nn.Linear(16, 50)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(self.norm(self.embed(x)))
        return self.head(h / h.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt())


def test_embeddings_decayed_by_an_adam_type_optimizer_are_information_not_a_finding():
    net = TinyLM()
    named, norms, emb = dict(net.named_parameters()), norm_parameters(net), ["embed.weight"]
    adamw = torch.optim.AdamW(param_groups(net, 0.1), lr=1e-3)  # decays the embedding (as nanoGPT)
    audit = audit_groups(named, norms, [adamw], embeddings=emb)
    assert audit.embeddings == ["embed.weight"] and audit.findings == 0 and not audit.decayed
    assert "1 embedding weight(s) (embed.weight)" in audit.embeddings_note() and "decay_embeddings=False" in audit.embeddings_note()
    sgd = torch.optim.SGD(param_groups(net, 1e-4), lr=0.1)  # a gradient step: decay on embeddings is the usual L2
    assert audit_groups(named, norms, [sgd], embeddings=emb).embeddings == []
    kept = torch.optim.AdamW(param_groups(net, 0.1, decay_embeddings=False), lr=1e-3)
    assert audit_groups(named, norms, [kept], embeddings=emb).embeddings == []
    assert not any(p is net.embed.weight for p in param_groups(net, 0.1, decay_embeddings=False)[0]["params"])


def test_a_normalized_weight_without_weight_decay_is_in_the_audit():
    net = TinyLM()
    groups = [{"params": [net.proj.weight], "weight_decay": 0.0}, {"params": [p for n, p in net.named_parameters() if n != "proj.weight"], "weight_decay": 0.0}]
    audit = audit_groups(dict(net.named_parameters()), norm_parameters(net), [torch.optim.AdamW(groups)], normalized=[("proj.weight",)])
    assert audit.undecayed == ["proj.weight"] and audit.findings == 1
    assert audit.summary()["normalized_without_decay"] == ["proj.weight"]
    ok = audit_groups(dict(net.named_parameters()), norm_parameters(net), [torch.optim.AdamW(param_groups(net, 0.1))], normalized=[("proj.weight",)])
    assert ok.undecayed == [] and ok.findings == 0


def test_the_verbose_fit_start_prints_the_embedding_note_once(tmp_path, capsys):
    """A real Trainer: AdamW decaying an embedding prints the note (no warning); the summary lists it."""
    import pytorch_lightning as pl
    from torch.nn import functional as F

    class LM(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = TinyLM()

        def training_step(self, batch, batch_idx):
            x = batch[0]
            return F.cross_entropy(self.net(x).flatten(0, 1), x.flatten())

        def configure_optimizers(self):
            return torch.optim.AdamW(param_groups(self, 0.1), lr=1e-3)

    torch.manual_seed(0)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randint(0, 50, (64, 6))), batch_size=8)
    path = tmp_path / "s.json"
    smd = SMDCallback(summary_path=str(path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, [smd], max_steps=4).fit(LM(), data)
    out = capsys.readouterr().out
    assert out.count("embedding weight(s) (net.embed.weight) are decayed by an Adam-type optimizer") == 1, out
    assert not any(c in str(w.message) for w in caught for c in ("[SMD038]", "[SMD039]", "[SMD002]"))
    groups = json.loads(path.read_text())["groups"]
    assert groups["decayed_embeddings_adaptive"] == ["net.embed.weight"] and groups["decayed_gains_and_biases"] == []


def test_a_weight_and_bias_unit_with_its_weight_decayed_is_not_undecayed():
    """Conv + bias → GroupNorm: only weight and bias together are invariant. The conventional groups decay the weight,
    not the bias: the unit is still pulled in, no finding; with neither decayed it is SMD002's case."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 4))
    named, norms, unit = dict(net.named_parameters()), norm_parameters(net), [("0.weight", "0.bias")]
    conventional = torch.optim.AdamW(param_groups(net, 0.05), lr=1e-3)
    assert audit_groups(named, norms, [conventional], normalized=unit).findings == 0
    none = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.0)
    assert audit_groups(named, norms, [none], normalized=unit).undecayed == ["0.weight"]


def test_frozen_parameters_and_a_normalized_units_bias_are_not_findings():
    """A frozen BatchNorm moves with no step; a Linear bias before a LayerNorm is part of its weight+bias unit."""
    net = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16, elementwise_affine=False), nn.Linear(16, 16, bias=False), nn.BatchNorm1d(16))
    net[3].requires_grad_(False)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, weight_decay=1e-3)
    audit = audit_groups(dict(net.named_parameters()), norm_parameters(net), [opt], normalized=[("0.weight", "0.bias")])
    assert audit.findings == 0 and not audit.decayed


def test_a_module_named_like_a_norm_keeps_its_matrix_in_the_decay():
    class NormedLinear(nn.Linear):  # a cosine classifier: its weight is a weight, not a gain
        def forward(self, x):
            return nn.functional.linear(nn.functional.normalize(x, dim=-1), nn.functional.normalize(self.weight, dim=-1))

    net = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), NormedLinear(8, 3, bias=False))
    assert norm_parameters(net) == {"1.weight": "LayerNorm", "1.bias": "LayerNorm"}
    assert any(p is net[2].weight for p in param_groups(net, 0.1)[0]["params"])


def test_a_tied_embedding_is_found_by_identity_and_names_follow_the_front_end():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(8, 20, bias=False)  # declared first: named_parameters() calls the tied weight head.weight
            self.embed = nn.Embedding(20, 8)
            self.embed.weight = self.head.weight

    net = Tied()
    assert embedding_parameters(net) == ["head.weight"]
    assert not any(p is net.head.weight for g in param_groups(net, 0.1, decay_embeddings=False) if g["weight_decay"] > 0 for p in g["params"])
    # a front end that lists a wrapped module's parameter twice (the wrapper's path, then its own): the last name is used
    named = {"_wrapped.head.weight": net.head.weight, "head.weight": net.head.weight}
    norms, embeddings = param_roles(net).named(named)
    assert embeddings == ["head.weight"] and norms == {}
    audit = audit_groups(named, norms, [torch.optim.AdamW(net.parameters(), lr=1e-3)], embeddings=embeddings)
    assert audit.embeddings == ["head.weight"]
