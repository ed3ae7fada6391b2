"""How far lower-precision Gram accumulation moves Wp and the corrected model's accuracy.

Modes (``collect_stats(dtype=..., input_precision=...)``; the spectrum is float64 in all):
  fp64        fp32 activations, float64 accumulation (the default; equals the oracle to ~1e-10)
  fp32        fp32 activations, float32 accumulation
  tf32        activations rounded to TF32 (10-bit mantissa), float32 accumulation
  bf16        activations rounded to BF16 (7-bit mantissa), float32 accumulation
  tf32-in/f64 and bf16-in/f64: the same input rounding with float64 accumulation, to separate the
  effect of input rounding from that of accumulation.

The first row compares fp64 mode with the oracle (materialized R, float64 SVD); the others
compare each mode with fp64 mode.
Wp error = ‖Wp(mode) − Wp(fp64)‖_F / ‖Wp(fp64)‖_F, max over layers, at α ∈ {1e2, 1e3, 3e4, 1e6}.
Models: the digits demo's noisy CNN (trained, 300 trusted samples; also test accuracy after
correction) and a wider synthetic conv stack (3×3 convs 3→64→64 on 32×32 smooth random images,
random weights, 64 samples; d = 27 and 576).

    python benchmarks/precision.py [--seed 0] [--out benchmarks/results/precision.jsonl]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import sap_fast  # noqa: E402
from common import write_results  # noqa: E402
from sap_fast.experiments.digits import make_noisy_model  # noqa: E402
from sap_fast import reference  # noqa: E402
from sap_fast.spectrum import importance, spectra  # noqa: E402

MODES = {
    "fp64": dict(dtype=torch.float64, input_precision="fp32"),
    "fp32": dict(dtype=torch.float32, input_precision="fp32"),
    "tf32": dict(dtype=torch.float32, input_precision="tf32"),
    "bf16": dict(dtype=torch.float32, input_precision="bf16"),
    "tf32-in/f64": dict(dtype=torch.float64, input_precision="tf32"),
    "bf16-in/f64": dict(dtype=torch.float64, input_precision="bf16"),
}
ALPHAS = (1e2, 1e3, 3e4, 1e6)


def projection_matrices(stats, alpha):
    """Wp = U diag(λ) Uᵀ per layer (and group), stacked; small layers only (benchmark use)."""
    out = {}
    for name, spec in spectra(stats).items():
        lam = importance(spec.energies, alpha)
        out[name] = (spec.basis * lam.unsqueeze(-2)) @ spec.basis.transpose(-1, -2)
    return out


def wp_error(stats, ref_stats, alpha):
    wp, ref = projection_matrices(stats, alpha), projection_matrices(ref_stats, alpha)
    return max(float((wp[n] - ref[n]).norm() / ref[n].norm()) for n in ref)


def oracle_error(model, x, ref_stats, alpha):
    """fp64 mode against the oracle's Wp (materialized R, float64 SVD); one group per layer here."""
    ours = projection_matrices(ref_stats, alpha)
    reps = reference.representations(model, x)
    return max(float((ours[n][0] - reference.projection_matrix(reps[n][0], alpha)).norm()
                     / ours[n][0].norm()) for n in ours)


def synthetic_stack(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    x = F.avg_pool2d(torch.randn(64, 3, 36, 36), 5, stride=1)  # smooth images: a decaying spectrum
    return model, x


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trusted", type=int, default=300)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "precision.jsonl"))
    args = parser.parse_args()
    torch.set_num_threads(2)

    demo = make_noisy_model(args.seed)
    model = demo["model"]
    train = (demo["x_train"], demo["y_train_noisy"])
    idx = sap_fast.select_trusted(model, train, n=args.trusted)
    trusted = demo["x_train"][idx]
    test = (demo["x_test"], demo["y_test"])
    synth_model, synth_x = synthetic_stack(args.seed)

    ref = {"digits": sap_fast.collect_stats(model, trusted, **MODES["fp64"]),
           "synthetic": sap_fast.collect_stats(synth_model, synth_x, **MODES["fp64"])}
    rows = []
    oracle = {"mode": "fp64 vs oracle"}
    for alpha in ALPHAS:
        oracle[f"wp_err_digits@{alpha:g}"] = oracle_error(model, trusted, ref["digits"], alpha)
        oracle[f"wp_err_synthetic@{alpha:g}"] = oracle_error(synth_model, synth_x, ref["synthetic"], alpha)
        oracle[f"test_acc@{alpha:g}"] = sap_fast.evaluate(reference.correct(model, trusted, alpha=alpha), test).accuracy
    rows.append(oracle)
    print(oracle, flush=True)
    for mode, kwargs in MODES.items():
        digits = sap_fast.collect_stats(model, trusted, **kwargs)
        synth = sap_fast.collect_stats(synth_model, synth_x, **kwargs)
        row = {"mode": mode}
        for alpha in ALPHAS:
            row[f"wp_err_digits@{alpha:g}"] = wp_error(digits, ref["digits"], alpha)
            row[f"wp_err_synthetic@{alpha:g}"] = wp_error(synth, ref["synthetic"], alpha)
            fixed = sap_fast.correct(model, stats=digits, alpha=alpha)
            row[f"test_acc@{alpha:g}"] = sap_fast.evaluate(fixed, test).accuracy
        rows.append(row)
        print(mode, {k: f"{v:.2e}" if k.startswith("wp") else f"{v:.4f}" for k, v in row.items() if k != "mode"},
              flush=True)

    header = "| mode | " + " | ".join(f"Wp err α={a:g} (digits / wide conv)" for a in ALPHAS) + \
             " | " + " | ".join(f"test acc α={a:g}" for a in ALPHAS) + " |"
    lines = [header, "|" + "---|" * (1 + 2 * len(ALPHAS))]
    for r in rows:
        errs = " | ".join(f"{r[f'wp_err_digits@{a:g}']:.1e} / {r[f'wp_err_synthetic@{a:g}']:.1e}" for a in ALPHAS)
        accs = " | ".join(f"{100 * r[f'test_acc@{a:g}']:.2f}%" for a in ALPHAS)
        lines.append(f"| {r['mode']} | {errs} | {accs} |")
    table = "\n".join(lines)
    print(f"\nvanilla (noisy) test accuracy: {100 * demo['test_acc']:.2f}%\n")
    print(table)
    write_results(args.out, {"rows": rows, "markdown": table}, seed=args.seed, trusted=args.trusted,
                  vanilla_test_acc=demo["test_acc"])


if __name__ == "__main__":
    main()
