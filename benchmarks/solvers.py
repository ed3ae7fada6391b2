"""The two routes from a Gram to corrected weights, side by side on one layer per width:
``eigh`` (one eigendecomposition, then one matmul update per α) against ``cholesky`` (one
normalisation and G̃Wᵀ, then one Cholesky solve per α), float64. Prints a table and writes
``benchmarks/results/solvers-<device>.jsonl``: seconds for one α (what ``correct()`` does) and
for the 11-α default grid (what ``sweep()`` does, evaluations aside), and the two routes'
relative difference.

    python benchmarks/solvers.py [--device cuda] [--widths 576,1152,2304,4608]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from common import write_results  # noqa: E402
from sap_fast import solve  # noqa: E402
from sap_fast.project import projected_weight  # noqa: E402
from sap_fast.spectrum import layer_spectrum  # noqa: E402
from sap_fast.stats import LayerStats  # noqa: E402
from sap_fast.sweep import DEFAULT_ALPHAS  # noqa: E402


def clock(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def measure(d: int, out: int, device: torch.device) -> dict:
    gen = torch.Generator().manual_seed(d)
    # rows with a decaying spectrum (s from ~1 to ~1e-9), as layer inputs have
    rows = torch.randn(2 * d, d, generator=gen, dtype=torch.float64) * torch.logspace(0, -4.5, d, dtype=torch.float64)
    record = LayerStats(d, 1, torch.float64, device)
    record.add(rows.to(device).unsqueeze(0))
    weight = torch.randn(1, out, d, generator=gen, dtype=torch.float64).to(device)
    t0 = clock(device)
    spec = layer_spectrum(record)
    wu = weight @ spec.basis
    t1 = clock(device)
    for alpha in DEFAULT_ALPHAS:
        a = projected_weight(weight, spec, alpha, wu)
    t2 = clock(device)
    prep = solve.prepare(record, weight)
    t3 = clock(device)
    for alpha in DEFAULT_ALPHAS:
        b, _ = solve.solved_weight(prep, alpha)
    t4 = clock(device)
    k = len(DEFAULT_ALPHAS)
    eigh_setup, eigh_alpha = t1 - t0, (t2 - t1) / k
    chol_setup, chol_alpha = t3 - t2, (t4 - t3) / k
    return {"d": d, "out": out, "eigh_setup_s": eigh_setup, "eigh_per_alpha_s": eigh_alpha,
            "cholesky_setup_s": chol_setup, "cholesky_per_alpha_s": chol_alpha,
            "one_alpha": {"eigh_s": eigh_setup + eigh_alpha, "cholesky_s": chol_setup + chol_alpha},
            "grid": {"eigh_s": eigh_setup + k * eigh_alpha, "cholesky_s": chol_setup + k * chol_alpha},
            "rel_difference": float((a - b).norm() / a.norm())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="576,1152,2304,4608")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = [measure(int(d), max(64, int(d) // 9), device) for d in args.widths.split(",")]
    lines = ["| d | one α: eigh → cholesky | 11 α: eigh → cholesky | difference |", "|---:|---:|---:|---:|"]
    for r in rows:
        one, grid = r["one_alpha"], r["grid"]
        lines.append(f"| {r['d']} | {one['eigh_s']:.3f} → {one['cholesky_s']:.3f} s "
                     f"({one['eigh_s'] / one['cholesky_s']:.1f}×) | {grid['eigh_s']:.3f} → {grid['cholesky_s']:.3f} s "
                     f"({grid['eigh_s'] / grid['cholesky_s']:.2f}×) | {r['rel_difference']:.1e} |")
    print("\n".join(lines))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    out = args.out or os.path.join(HERE, "results", f"solvers-{name.replace(' ', '-')}.jsonl")
    write_results(out, {"device": name, "threads": torch.get_num_threads(), "rows": rows, "table": "\n".join(lines)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
