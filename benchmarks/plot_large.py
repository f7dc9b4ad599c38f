"""How long ``lightning-smd plot`` takes on a large ``metrics.csv``.

    python benchmarks/plot_large.py [--rows 1000000] [--layers 3] [--dir DIR]

Writes a CSVLogger-shaped ``metrics.csv`` with ``--rows`` log steps of every series the callback logs for
``--layers`` layers (random values around the equilibrium), then runs ``lightning-smd plot`` on it in this
interpreter and prints the file's size, the time to write it and the time the plot took (read, draw, save).
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
import time

import numpy as np

from lightning_smd.io.cli import main as cli
from lightning_smd.analysis.diagnostics import LAYER_METRICS


def write_csv(path: str, rows: int, layers: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    names = [f"net.conv{i + 1}.weight" for i in range(layers)]
    columns = ["step", "smd/angular_update_ratio", "smd/equilibrium_fraction"] + [f"smd/{n}/{m}" for n in names for m in LAYER_METRICS]
    chunk = 100_000
    with open(path, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(columns)
        for start in range(0, rows, chunk):
            k = min(chunk, rows - start)
            values = 1.0 + 0.05 * rng.standard_normal((k, len(columns) - 1))
            steps = np.arange(start, start + k)
            out.writerows([[int(s), *(f"{v:.6g}" for v in row)] for s, row in zip(steps, values)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write metrics.csv (default: a temporary directory)")
    args = parser.parse_args()
    directory = args.dir or tempfile.mkdtemp(prefix="smd_plot_large.")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "metrics.csv")
    t0 = time.perf_counter()
    write_csv(path, args.rows, args.layers)
    written = time.perf_counter() - t0
    size = os.path.getsize(path) / 2**20
    t0 = time.perf_counter()
    code = cli(["plot", directory, "-o", os.path.join(directory, "smd.png")])
    took = time.perf_counter() - t0
    print(f"metrics.csv: {args.rows} rows x {3 + args.layers * len(LAYER_METRICS)} columns, {size:.1f} MiB, written in {written:.1f} s")
    print(f"plot: {took:.2f} s (exit {code})")


if __name__ == "__main__":
    main()
