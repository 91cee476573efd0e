"""``mace_lr_analyze``: long-range diagnostics of an MD trajectory (S_QQ(k), ε, σ).

Subcommands (each reads any file ``ase.io.read(path, ":")`` reads, prints a table and can
write a PNG and a JSON file of the results):

* ``sqq TRAJ``: charge structure factor S_QQ(k), with the small-k k² fit and the
  Stillinger–Lovett slope. Charges: ``--charges_key`` (per-atom array in the file, e.g.
  ``MACE_charges`` written by ``mace_lr_eval_configs``; default ``charges``) or
  ``--charges Na=1,Cl=-1``.
* ``dielectric TRAJ``: ε from total-dipole fluctuations (tin-foil boundary), block errors.
* ``conductivity TRAJ --dt FS``: Green–Kubo and Einstein–Helfand σ in S/m with integer
  oxidation numbers (``--oxidation_numbers``; default only for known monatomic ions).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, Optional, Sequence

import numpy as np


def _mapping(text: str) -> Dict[str, float]:
    out = {}
    for item in text.split(","):
        if "=" not in item:
            raise argparse.ArgumentTypeError(
                f"expected ELEMENT=CHARGE pairs separated by commas, got {text!r}"
            )
        key, value = item.split("=", 1)
        out[key.strip()] = float(value)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mace_lr_analyze", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("trajectory", help="trajectory file (extxyz, ASE .traj, ...)")
        p.add_argument("--index", default=":", help="frames to read, ase.io.read syntax (default ':')")
        p.add_argument("--temperature", type=float, default=None, help="K (default: kinetic temperature)")
        p.add_argument("--plot", default=None, help="PNG file to write")
        p.add_argument("--json", default=None, help="JSON file for the results")

    def charges(p):
        p.add_argument("--charges", type=_mapping, default=None, help="fixed charges, e.g. Na=1,Cl=-1")
        p.add_argument(
            "--charges_key", default="charges", help="per-atom charge array in the file (default 'charges')"
        )

    p = sub.add_parser("sqq", help="charge structure factor S_QQ(k)")
    common(p)
    charges(p)
    p.add_argument("--kmax", type=float, default=2.0, help="largest |k|, 1/Å (default 2)")
    p.add_argument("--bin_width", type=float, default=None, help="|k| bin width, 1/Å (default: shells)")
    p.add_argument("--n_fit", type=int, default=3, help="smallest-k bins in the k² fit (default 3)")
    p.add_argument(
        "--n_blocks",
        type=int,
        default=None,
        help="consecutive blocks for the error bars (MD frames are correlated; default: per frame)",
    )

    p = sub.add_parser("dielectric", help="dielectric constant from dipole fluctuations")
    common(p)
    charges(p)
    p.add_argument("--n_blocks", type=int, default=5)

    p = sub.add_parser("conductivity", help="ionic conductivity (Green–Kubo and Einstein–Helfand)")
    common(p)
    p.add_argument("--dt", type=float, required=True, help="time between frames, fs")
    p.add_argument("--oxidation_numbers", type=_mapping, default=None, help="e.g. Na=1,Cl=-1")
    p.add_argument("--max_lag", type=float, default=None, help="longest correlation time, fs")
    p.add_argument("--fit_start", type=float, default=None, help="start of the Einstein–Helfand fit, fs")
    p.add_argument("--n_blocks", type=int, default=5)
    return parser


def _frame_charges(frames, args):
    if args.charges is not None:
        return args.charges
    key = args.charges_key
    if not all(key in a.arrays for a in frames):
        raise SystemExit(
            f"the frames have no per-atom array {key!r}; use --charges_key or --charges Na=1,Cl=-1"
        )
    return np.stack([a.arrays[key] for a in frames])


def _jsonable(res):
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in res.items()}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from mace_lr import analysis

    frames = analysis.read_trajectory(args.trajectory, args.index)
    try:
        if args.command == "sqq":
            res = analysis.charge_structure_factor(
                frames,
                _frame_charges(frames, args),
                args.kmax,
                args.bin_width,
                args.n_fit,
                args.temperature,
                n_blocks=args.n_blocks,
            )
            print(
                f"S_QQ(k) from {res['n_frames']} frames; T = {res['temperature']:.1f} K; "
                f"<q^2> = {res['q2_mean']:.4f} e^2"
            )
            print(f"{'k (1/A)':>10} {'S_QQ (e^2)':>12} {'error':>10} {'vectors':>8}")
            for k, s, e, c in zip(res["k"], res["S"], res["S_err"], res["count"]):
                print(f"{k:10.4f} {s:12.5f} {e:10.5f} {c:8d}")
            print(f"small-k fit S = A k^2: A = {res['fit_slope']:.5f} e^2 A^2")
            print(f"Stillinger-Lovett slope 1/(4 pi beta k_e n) = {res['sl_slope']:.5f} e^2 A^2")
            if args.plot:
                analysis.plot_sqq({args.trajectory: res}, args.plot)
        elif args.command == "dielectric":
            res = analysis.dielectric_constant(
                frames, _frame_charges(frames, args), args.temperature, n_blocks=args.n_blocks
            )
            print(
                f"epsilon = {res['epsilon']:.3f} +- {res['epsilon_err']:.3f} ({len(frames)} frames, "
                f"T = {res['temperature']:.1f} K, volume {res['volume']:.1f} A^3)"
            )
            if args.plot:
                analysis.plot_dielectric({args.trajectory: res}, args.plot)
        else:
            res = analysis.ionic_conductivity(
                frames,
                dt=args.dt,
                oxidation_numbers=args.oxidation_numbers,
                temperature=args.temperature,
                max_lag=args.max_lag,
                fit_start=args.fit_start,
                n_blocks=args.n_blocks,
            )
            print(f"T = {res['temperature']:.1f} K, volume {res['volume']:.1f} A^3, {len(frames)} frames")
            print(f"Green-Kubo        sigma = {res['sigma_gk']:.1f} +- {res['sigma_gk_err']:.1f} S/m")
            print(f"Einstein-Helfand  sigma = {res['sigma_eh']:.1f} +- {res['sigma_eh_err']:.1f} S/m")
            print(f"Nernst-Einstein   sigma = {res['sigma_nernst_einstein']:.1f} S/m (no cross-correlations)")
            if args.plot:
                analysis.plot_conductivity({args.trajectory: res}, args.plot)
    except ValueError as err:
        raise SystemExit(f"mace_lr_analyze {args.command}: {err}") from None
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(_jsonable(res), fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
