"""A small transformer with QK-norm, trained with AdamW: the query and key projections are scale-invariant
per head (each head's q and k are LayerNorm'ed), so SMD tracks them, per head, with AdamW's prediction
sqrt(2·lr·wd·(1-β1)/(1+β1)) (Kosson et al., *Rotational Equilibrium*, 2024).

    python examples/transformer_qknorm.py                       # full size: lr 3e-3, 4,000 steps
    SMD_EXAMPLE_FAST=1 python examples/transformer_qknorm.py    # CI size: lr 1e-2, 1,500 steps

The task: reverse a random token sequence, with 10 % of the target tokens replaced at random (persistent
label noise keeps the gradient noise alive, as SMD assumes). The value, output and MLP projections are not
scale-invariant (their LayerNorm comes before them, not after) and are not tracked; the detection table at
fit start shows what is tracked and why.

What you should see, in both sizes: the loss falls to its noise floor (about 0.65) within a few hundred
steps; the angular updates of q and k dip below the prediction while Adam's second moment still remembers
the larger gradients of the learning phase, then settle at it; the verdict is ``equilibrium``.

One block, not two: with ``--depth 2`` the reversal needs only one attention layer; the first block's q/k
gradients fade (``L`` 100× and more below its peak while the loss stays at its noise floor), weight decay shrinks
those weights along its pure-decay curve (no equilibrium exists for a weight the loss no longer reaches), and they
read ``dead`` (SMD048); the verdict is ``not_reached``.
"""

from __future__ import annotations

import argparse
import os

import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, IterableDataset

from lightning_smd import SMDCallback


class ReverseTokens(IterableDataset):
    def __init__(self, vocab: int = 32, length: int = 12, batch: int = 64, noise: float = 0.1, seed: int = 0) -> None:
        self.vocab, self.length, self.batch, self.noise, self.seed = vocab, length, batch, noise, seed

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        while True:
            x = torch.randint(0, self.vocab, (self.batch, self.length), generator=g)
            y = x.flip(1)
            flip = torch.rand(y.shape, generator=g) < self.noise
            yield x, torch.where(flip, torch.randint(0, self.vocab, y.shape, generator=g), y)


class QKNormAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.q_norm, self.k_norm = nn.LayerNorm(self.head_dim, elementwise_affine=False), nn.LayerNorm(self.head_dim, elementwise_affine=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        split = lambda z: z.view(b, t, self.heads, self.head_dim).transpose(1, 2)  # noqa: E731
        q, k, v = self.q_norm(split(self.q(x))), self.k_norm(split(self.k(x))), split(self.v(x))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(dim), QKNormAttention(dim, heads)
        self.ln2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim, bias=False), nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyTransformer(pl.LightningModule):
    def __init__(self, vocab: int = 32, length: int = 12, dim: int = 64, heads: int = 4, depth: int = 1, lr: float = 3e-3, weight_decay: float = 0.5) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(length, dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, heads) for _ in range(depth)))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln(self.blocks(self.embed(x) + self.pos)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x).flatten(0, 1), y.flatten())
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        h = self.hparams
        # weight decay on the matrices (the scale-invariant ones among them reach SMD equilibrium)
        decay = [p for n, p in self.named_parameters() if p.dim() == 2 and not n.startswith(("embed", "pos"))]
        rest = [p for n, p in self.named_parameters() if not (p.dim() == 2 and not n.startswith(("embed", "pos")))]
        return torch.optim.AdamW([{"params": decay, "weight_decay": h.weight_decay}, {"params": rest, "weight_decay": 0.0}], lr=h.lr)


def main(argv: list[str] | None = None) -> dict:
    fast = os.environ.get("SMD_EXAMPLE_FAST", "") not in ("", "0")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500 if fast else 4000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--depth", type=int, default=1, help="transformer blocks (see the docstring for 2)")
    parser.add_argument("--out", default="smd_runs/transformer")
    args = parser.parse_args(argv)
    pl.seed_everything(args.seed, verbose=False)
    smd = SMDCallback(window=50 if fast else 100)
    trainer = pl.Trainer(
        max_steps=args.steps,
        accelerator="auto",
        devices=1,
        logger=pl.loggers.CSVLogger(args.out, name="", version=""),
        callbacks=[smd],
        log_every_n_steps=20,
        enable_checkpointing=False,
        enable_progress_bar=not fast,
    )
    # lr*wd = 1.5e-3: relaxation time 1/(2*lr*wd) ~ 330 steps (full size); 5e-3: 100 steps (CI size)
    model = TinyTransformer(lr=1e-2 if fast else 3e-3, weight_decay=0.5, depth=args.depth)
    trainer.fit(model, DataLoader(ReverseTokens(seed=args.seed), batch_size=None))
    return smd.summary()


if __name__ == "__main__":
    main()
