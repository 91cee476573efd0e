"""Cost of the `lorem` block against LES on NaCl-like boxes, measured side by side.

Energy + forces of a small MACE alone, + LES, + lorem (l_max = 1 and 2); each
(N, variant) runs in a fresh subprocess so its peak RSS is its own. The block cost is the
time of base + block minus the base time; the table gives lorem / LES ratios of that
block cost and of the total time. lorem's C·(l_max+1)² charge components go through
the engine as one multi-channel call per update.

    python benchmarks/bench_lorem.py                       # N = 4096, 32768
    python benchmarks/bench_lorem.py --sizes 4096 --repeats 3 --channels 8
    python benchmarks/bench_lorem.py --profile 4096 --channels 8   # where lorem's time goes

``--profile N`` times the pieces of one lorem update (l_max = 1) on the N-atom box, each
forward + backward on its own: the engine with 1 channel (what LES sends) and with the
C·(l_max+1)² channels lorem sends, the message tensor product, the charge map, the local
harmonics and the embedding.

Measured 2 Dec 2026 (N = 4096, float64, accuracy 1e-4, 1 thread, shared 2-core machine at
load average ~13; totals energy + forces, median of 3): base 1.8–2.2 s, LES 1.8–2.4 s,
lorem l_max 1 with C = 8 / 4 / 2: 14.3 / 7.5 / 4.1 s, i.e. 7.9× / 3.15× / 1.70× LES. Pieces
at C = 8: engine 11.6 s for 32 channels against 0.34 s for one (linear in channels: the
mesh assignment and FFTs are done per channel), local harmonics 0.46 s, tensor product
0.04 s, linear maps 0.01 s each.

After the engine's P3M assignment and interpolation took all channels in one scatter and
one gather (session 21; same machine, 1 thread, load average 1–2, median of 3): base
1.4–1.6 s, LES 1.7 s, lorem l_max 1 with C = 8 / 4 / 2: 6.6 / 4.3 / 3.2 s, i.e. 3.87× /
2.59× / 1.83× LES (main's code in the same conditions: 12.1 s at C = 8, 5.83×). The
32-channel engine call (1 thread, low load) went from 8.3 s to 5.1 s against 0.23 s for
one channel; what remains is linear in C by nature: the FFTs of the [32, 81, 81, 81] mesh
(~40 %), the p³·N·C assignment products and gathers, and zeroing and copying the mesh.

After the P3M k-space went through channel chunks of at most 1M mesh values end to end
(assignment, FFTs, interpolation) with a symmetric filter backward (session 22; 8 Dec
2026, 1 thread, load average 0.5–1.0, median of 3, this code and e1aa86d's side by side):

    N      |  base s | LES s  | lorem l1 C=8 s | lorem/LES total | block/LES | peak MB LES / lorem
    4096   |  0.91   | 1.09   | 2.49  (4.71)   | 2.29  (4.62)    | 8.9 (26.6) | 1485 / 2158 (2698)
    32768  | 13.74   | 14.35  | 30.12 (80.18)  | 2.10  (5.63)    | 26.9 (78.1) | 5288 / 10836 (14543)

(in brackets: e1aa86d). One batched FFT over all 32 channels of an 81³ mesh ran about 2×
slower than per-chunk FFTs, and full-size [n_mesh, C] buffers were re-faulted on every
allocation; at 162³ one channel per chunk is fastest.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

VARIANTS = ("base", "les", "lorem_l1", "lorem_l2")


def _worker(n_cells: int, variant: str, repeats: int, dtype: str, accuracy: float, channels: int) -> dict:
    import resource

    import numpy as np
    import torch
    from ase.build import bulk

    import mace_lr
    from mace_lr import testing as T
    from mace_lr._data import atoms_to_batch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    device = os.environ.get("BENCH_DEVICE", "cpu")
    tdtype = getattr(torch, dtype)
    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True) * (n_cells, n_cells, n_cells)
    atoms.positions += np.random.default_rng(0).normal(scale=0.1, size=atoms.positions.shape)
    base = T.make_test_model(hidden_irreps="8x0e+8x1o", r_max=4.0, num_interactions=2, dtype=tdtype)
    if variant == "base":
        model = base
    elif variant == "les":
        model = mace_lr.augment(base, "les", accuracy=accuracy)
        with torch.no_grad():
            model.blocks["les"].coupling.fill_(0.1)
    else:
        l_max = int(variant[-1])
        model = mace_lr.augment(base, "lorem", accuracy=accuracy, l_max=l_max, channels=channels)
        with torch.no_grad():
            model.blocks["lorem"].readout_out.weight.normal_(std=0.1)
    model = model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    batch = atoms_to_batch([atoms], [11, 17], 4.0, dtype=tdtype, device=device)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def step():
        data = {k: v.clone() if k == "positions" else v for k, v in batch.items()}
        out = model(data, compute_force=True)
        value = float(out["energy"].detach()[0])
        if device != "cpu":
            torch.cuda.synchronize()
        return value

    step()  # warm-up (parameter choice, caches)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "n_atoms": len(atoms),
        "variant": variant,
        "time_s": float(np.median(times)),
        "peak_rss_mb": peak / 1024.0,
        "rss_after_setup_mb": rss_before / 1024.0,
    }


def _profile(n_atoms: int, repeats: int, dtype: str, accuracy: float, channels: int, l_max: int = 1) -> None:
    import numpy as np
    import torch
    from ase.build import bulk

    import mace_lr
    from mace_lr import testing as T
    from mace_lr._data import atoms_to_batch
    from mace_lr.electrostatics import coulomb_potential_batch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    tdtype = getattr(torch, dtype)
    n_cells = round((n_atoms / 8) ** (1 / 3))
    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True) * (n_cells, n_cells, n_cells)
    atoms.positions += np.random.default_rng(0).normal(scale=0.1, size=atoms.positions.shape)
    base = T.make_test_model(hidden_irreps="8x0e+8x1o", r_max=4.0, num_interactions=2, dtype=tdtype)
    model = mace_lr.augment(base, "lorem", accuracy=accuracy, l_max=l_max, channels=channels)
    block = model.blocks["lorem"]
    batch = atoms_to_batch([atoms], [11, 17], 4.0, dtype=tdtype)
    n = len(atoms)
    gen = torch.Generator().manual_seed(0)
    k = channels * (l_max + 1) ** 2

    def timed(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return float(np.median(times))

    def engine(width: int):
        def run():
            pos = batch["positions"].clone().requires_grad_(True)
            q = torch.randn((n, width), generator=gen, dtype=tdtype).requires_grad_(True)
            phi = coulomb_potential_batch(
                pos, q if width > 1 else q[:, 0], batch["cell"].view(-1, 3, 3), batch["pbc"].view(-1, 3),
                batch["ptr"], smearing=block.smearing, accuracy=accuracy,
            )  # fmt: skip
            (phi * torch.randn_like(phi)).sum().backward()

        return run

    dim = block.embed.irreps_out.dim
    h = torch.randn((n, dim), generator=gen, dtype=tdtype)

    def module(fn):
        def run():
            x = h.clone().requires_grad_(True)
            out = fn(x)
            (out * torch.randn_like(out)).sum().backward()

        return run

    ctx = {k_: batch[k_] for k_ in ("positions", "edge_index", "shifts", "node_attrs")}

    def harmonics():
        c = dict(ctx, positions=ctx["positions"].clone().requires_grad_(True))
        out = block.harmonics(c)
        (out * torch.randn_like(out)).sum().backward()

    feats = torch.randn((n, block.embed.irreps_in.dim), generator=gen, dtype=tdtype)
    rows = [
        ("engine, 1 channel (LES)", timed(engine(1))),
        (f"engine, {k} channels (lorem)", timed(engine(k))),
        ("message tensor product h ⊗ V", timed(module(lambda x: block.messages[0](x, x)))),
        ("charge map (o3.Linear)", timed(module(block.charge_maps[0]))),
        ("local harmonics", timed(harmonics)),
        ("embedding (o3.Linear)", timed(module(lambda x: block.embed(feats) + 0 * x))),
    ]
    print(f"lorem pieces, N = {n}, l_max = {l_max}, C = {channels}, {dtype}, accuracy {accuracy:g}, "
          f"forward + backward, median of {repeats}")  # fmt: skip
    for label, t in rows:
        print(f"  {label:34s} {t:8.3f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 32768])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--accuracy", type=float, default=1e-4)
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--json", help="write the raw rows to this file")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument(
        "--profile", type=int, default=None, metavar="N", help="time lorem's pieces at N atoms"
    )
    args = parser.parse_args()
    if args.profile:
        _profile(args.profile, args.repeats, args.dtype, args.accuracy, args.channels)
        return
    if args.worker:
        row = _worker(
            int(args.worker[0]), args.worker[1], args.repeats, args.dtype, args.accuracy, args.channels
        )
        print(json.dumps(row))
        return
    rows = []
    for n in args.sizes:
        n_cells = round((n / 8) ** (1 / 3))
        for variant in args.variants:
            cmd = [sys.executable, __file__, "--worker", str(n_cells), variant, "--repeats", str(args.repeats),
                   "--dtype", args.dtype, "--accuracy", str(args.accuracy), "--channels", str(args.channels)]  # fmt: skip
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if res.returncode != 0:
                print(res.stderr[-3000:], file=sys.stderr)
                print(f"  N={n} {variant}: worker failed (exit {res.returncode})", file=sys.stderr)
                continue
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"  measured N={r['n_atoms']:>6} {variant:9s} {r['time_s']:.3f} s  {r['peak_rss_mb']:.0f} MB",
                  file=sys.stderr, flush=True)  # fmt: skip
    threads = os.environ.get("BENCH_THREADS", "2")
    device = os.environ.get("BENCH_DEVICE", "cpu")
    print(
        f"\nlorem vs LES, energy+forces, {args.dtype}, accuracy {args.accuracy:g}, C = {args.channels}, "
        f"{device}, {threads} threads"
    )
    print(
        f"{'N':>7} | {'variant':>9} | {'total s':>8} | {'block s':>8} | {'block/LES':>9} | {'total/LES':>9} | {'peak MB':>8}"
    )
    print("-" * 80)
    for n in sorted({r["n_atoms"] for r in rows}):
        got = {r["variant"]: r for r in rows if r["n_atoms"] == n}
        base_t = got["base"]["time_s"] if "base" in got else float("nan")
        les = got.get("les")
        les_block = les["time_s"] - base_t if les else float("nan")
        for variant in VARIANTS:
            if variant not in got:
                continue
            r = got[variant]
            block = r["time_s"] - base_t if variant != "base" else 0.0
            ratio = block / les_block if variant != "base" and les else float("nan")
            total = r["time_s"] / les["time_s"] if les else float("nan")
            print(f"{n:>7} | {variant:>9} | {r['time_s']:8.3f} | {block:8.3f} | {ratio:9.2f} | {total:9.2f} | "
                  f"{r['peak_rss_mb']:8.0f}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
