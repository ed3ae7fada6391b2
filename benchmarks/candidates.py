"""How clean is the trusted set when only K random samples are scored (``select_trusted(...,
candidates=K)``)?

1. Measured on the digits demo (25% symmetric label noise, 1294 training samples, the cached
   noisy CNNs of ``sap-fast demo``): share of mislabelled samples among the n lowest-loss
   samples (class-balanced) of K random candidates, over several models and candidate draws.
2. SIMULATION of the million-sample case (no data set that large is available here): losses
   drawn from a smoothed bootstrap (log-loss KDE) of the digits models' clean and mislabelled
   training losses, N = 1,000,000 samples with noise rate ρ, the 1000 lowest of K random ones.
   It shows how the threshold quantile n/K moves, under that loss model only.

    python benchmarks/candidates.py [--seeds 0 1 2] [--draws 20]
    → benchmarks/results/candidates.jsonl and markdown tables on stdout
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_results  # noqa: E402

import sap_fast  # noqa: E402
from sap_fast.experiments.digits import default_cache_dir, noisy_model  # noqa: E402
from sap_fast.experiments.metrics import trusted_set_quality  # noqa: E402


def measured(seeds, draws: int, ns=(100, 300), ks=(200, 400, 800, None)) -> tuple:
    rows, losses = [], {"clean": [], "corrupted": []}
    for seed in seeds:
        demo = noisy_model(seed, "symmetric", 0.25, 100, default_cache_dir())
        model, x, y = demo["model"], demo["x_train"], demo["y_train_noisy"]
        corrupted = demo["corrupted_train"]
        with torch.no_grad():
            loss = F.cross_entropy(model(x).double(), y, reduction="none")
        losses["clean"] += loss[~corrupted].tolist()
        losses["corrupted"] += loss[corrupted].tolist()
        for n in ns:
            for k in ks:
                if k is not None and k < n:
                    continue
                fractions = []
                for draw in range(draws if k is not None else 1):
                    idx = sap_fast.select_trusted(model, (x, y), n=n, candidates=k, seed=draw)
                    fractions.append(trusted_set_quality(idx, corrupted)["corrupted_fraction"])
                rows.append({"seed": seed, "n": n, "K": k or len(x), "all": k is None,
                             "corrupted_fraction_mean": statistics.fmean(fractions),
                             "corrupted_fraction_draws": fractions,
                             "base_rate": float(corrupted.float().mean())})
    return rows, losses


def summarise(rows) -> list:
    out = []
    for n in sorted({r["n"] for r in rows}):
        for k in sorted({r["K"] for r in rows if r["n"] == n}):
            sel = [r for r in rows if r["n"] == n and r["K"] == k]
            draws = [f for r in sel for f in r["corrupted_fraction_draws"]]
            out.append({"n": n, "K": k, "all": sel[0]["all"], "models": len(sel), "selections": len(draws),
                        "corrupted_fraction_mean": statistics.fmean(draws),
                        "corrupted_fraction_max": max(draws),
                        "per_model_means": [r["corrupted_fraction_mean"] for r in sel],
                        "base_rate": statistics.fmean(r["base_rate"] for r in sel)})
    return out


def simulate(losses: dict, *, population: int = 1_000_000, n: int = 1000, rates=(0.25, 0.38),
             ks=(10_000, 50_000, 200_000, 1_000_000), draws: int = 5) -> list:
    """SIMULATION: smoothed-bootstrap losses (Gaussian KDE on log loss, Silverman bandwidth)."""
    gen = torch.Generator().manual_seed(0)
    logs = {k: torch.tensor(v, dtype=torch.float64).clamp_min(1e-300).log() for k, v in losses.items()}

    def draw(kind, m):
        v = logs[kind]
        h = 1.06 * float(v.std()) * v.numel() ** -0.2
        pick = v[torch.randint(0, v.numel(), (m,), generator=gen)]
        return pick + h * torch.randn(m, generator=gen, dtype=torch.float64)

    out = []
    for rate in rates:
        for k in ks:
            if k > population:
                continue
            fractions = []
            for _ in range(draws if k < population else 1):
                bad = torch.rand(k, generator=gen) < rate  # a uniform random K-subset of the population
                score = torch.empty(k, dtype=torch.float64)
                score[~bad], score[bad] = draw("clean", int((~bad).sum())), draw("corrupted", int(bad.sum()))
                lowest = torch.topk(score, n, largest=False).indices
                fractions.append(float(bad[lowest].float().mean()))
            out.append({"noise_rate": rate, "population": population, "n": n, "K": k, "quantile_n_over_K": n / k,
                        "corrupted_fraction_mean": statistics.fmean(fractions), "draws": len(fractions)})
    return out


def markdown(summary, sim) -> str:
    size = max(s["K"] for s in summary)
    lines = [f"Measured (digits, 25% symmetric noise, {size} training samples):", "",
             "| n | K scored | selections | mislabelled in trusted set (mean) | worst selection | base rate |",
             "|---:|---:|---:|---:|---:|---:|"]
    for s in summary:
        k = f"{s['K']} (all)" if s["all"] else str(s["K"])
        lines.append(f"| {s['n']} | {k} | {s['selections']} | {100 * s['corrupted_fraction_mean']:.2f}% | "
                     f"{100 * s['corrupted_fraction_max']:.2f}% | {100 * s['base_rate']:.1f}% |")
    lines += ["", "SIMULATION (KDE of the digits models' log-losses; not a measurement on real data):", "",
              "| noise rate | population | K scored | n/K | mislabelled among the n lowest (n = 100 at "
              "digits scale, 1000 at a million) |",
              "|---:|---:|---:|---:|---:|"]
    for s in sim:
        lines.append(f"| {100 * s['noise_rate']:.0f}% | {s['population']:,} | {s['K']:,} | "
                     f"{s['quantile_n_over_K']:.3%} | {100 * s['corrupted_fraction_mean']:.3f}% |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--draws", type=int, default=20, help="candidate draws per model and K")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                        "results", "candidates.jsonl"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows, losses = measured(args.seeds, args.draws)
    summary = summarise(rows)
    # the same loss model at the digits scale first: does it reproduce the measured table?
    check = simulate(losses, population=len(losses["clean"] + losses["corrupted"]) // len(args.seeds),
                     n=100, rates=(0.25,), ks=(200, 400, 800), draws=200)
    sim = simulate(losses)
    print(markdown(summary, check + sim))
    write_results(args.out, {"summary": summary, "per_model": rows, "simulation": sim,
                             "simulation_at_digits_scale": check,
                             "simulation_note": "smoothed bootstrap of the digits models' per-sample "
                                                "log-losses (clean / mislabelled), Silverman bandwidth; "
                                                "a model of the loss distribution, not real data"},
                  seeds=args.seeds, draws=args.draws)


if __name__ == "__main__":
    main()
