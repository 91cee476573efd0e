"""Cost of the nonlocal blocks (mesh, and attention when installed) next to LES.

Time and peak memory of energy+forces on the benchmark NaCl boxes (rattled rocksalt,
a = 5.64 Å, 8·n³ atoms), for each block alone (the base model's ``node_feats`` are fixed
inputs; energy plus its gradient with respect to the positions) and for the whole model
(small MACE + block). The block list comes from the registry: every installed block among
``les``, ``mesh`` and ``attention``. Each (N, variant) runs in a fresh subprocess so the
peak RSS is that configuration's own; the ratios are measured side by side in one run.

    python benchmarks/bench_nonlocal.py                       # N = 512 ... 32768
    python benchmarks/bench_nonlocal.py --sizes 512 4096 --repeats 3 --full
    python benchmarks/bench_nonlocal.py --config mesh='{"spacing": 1.0}'

Measured again (2026-12-08, stop 23, float64, BENCH_THREADS=1, 2 repeats, idle machine),
attention block / LES block CPU time at N = 32768: 2.08 (wall 2.13; 1.368 vs 0.659 s, peak
959 vs 741 MB) with key_dim 4, and 1.06 (wall 1.10; 0.820 vs 0.772 s, 821 vs 749 MB) with
key_dim 2, the default since then (``--sizes 32768 --blocks attention [--config
attention='{"key_dim": 4}']``).

Measured (2026-12-08, float64, BENCH_THREADS=1, 3 repeats, load average ~1.8 on 2 cores,
so compare the CPU-time ratios): CPU time of energy+forces relative to LES at N = 4096 /
13824 / 32768 — mesh 1.31 / 1.13 / 1.83, attention 2.19 / 2.16 / 2.46 (mesh path; the
direct sum below ~1000 atoms); extra peak RSS at 32768: LES 753 MB, mesh 474 MB,
attention 923 MB. The same window, previous mesh_convolution (index_add/index_select
stencil, autograd saving the [N·p³, C] products): mesh 1.55 / 2.04 / 3.03, attention
9.72 / 9.42 / 10.99 and 4191 MB. Attention's mesh path spreads H·D·C = 32 channels
(LES: one charge); at 32768 about half of its time is the sparse products (assignment,
interpolation, the sampled product of the weight gradient, the one sort that builds the
assignment matrix) and a quarter the FFTs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

CANDIDATES = ("les", "mesh", "attention")


def _worker(n_cells: int, variant: str, mode: str, repeats: int, dtype: str, config: dict) -> dict:
    import resource

    import mace  # noqa: F401
    import numpy as np
    import torch
    from ase.build import bulk

    import mace_lr
    from mace_lr import testing as T
    from mace_lr._data import atoms_to_batch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    tdtype = getattr(torch, dtype)
    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True) * (n_cells, n_cells, n_cells)
    atoms.positions += np.random.default_rng(0).normal(scale=0.1, size=atoms.positions.shape)
    base = T.make_test_model(hidden_irreps="8x0e", r_max=4.0, num_interactions=2, dtype=tdtype)
    if variant == "base":
        model = base
    else:
        model = T.perturb_blocks(mace_lr.augment(base, {variant: config}), scale=0.1)
    for p in model.parameters():
        p.requires_grad_(False)
    batch = atoms_to_batch([atoms], [11, 17], 4.0, dtype=tdtype)

    if mode == "block":
        from e3nn import o3

        block = model.blocks[variant]
        n = len(atoms)
        n_feats = o3.Irreps(block.feature_irreps).dim
        gen = torch.Generator().manual_seed(0)
        ctx = {
            "positions": batch["positions"],
            "cell": batch["cell"].reshape(-1, 3, 3),
            "pbc": torch.ones(1, 3, dtype=torch.bool),
            "batch": torch.zeros(n, dtype=torch.int64),
            "ptr": torch.tensor([0, n]),
            "atomic_numbers": torch.tensor(atoms.numbers, dtype=torch.int64),
            "node_attrs": batch["node_attrs"],
            "node_feats": torch.randn(n, n_feats, generator=gen).to(tdtype),
            "total_charge": torch.zeros(1, dtype=tdtype),
            "external_field": torch.zeros(1, 3, dtype=tdtype),
            "edge_index": batch["edge_index"],
            "shifts": batch["shifts"],
            "electrode": torch.zeros(n, dtype=torch.int64),
            "electrode_potential": torch.zeros(1, dtype=tdtype),
        }

        def step():
            pos = ctx["positions"].detach().clone().requires_grad_(True)
            local = dict(ctx)
            local["positions"] = pos
            energy = block(local)["energy"].sum()
            (grad,) = torch.autograd.grad(energy, pos)
            return float(energy.detach())

    else:

        def step():
            data = {k: v.clone() if k == "positions" else v for k, v in batch.items()}
            return float(model(data, compute_force=True)["energy"].detach()[0])

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()  # warm-up (parameter choice, caches)
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "n_atoms": len(atoms),
        "variant": variant,
        "mode": mode,
        "time_s": float(np.median(times)),
        "cpu_s": float(np.median(cpu)),
        "peak_rss_mb": peak / 1024.0,
        "extra_rss_mb": (peak - rss_before) / 1024.0,
    }


def _installed() -> list:
    import mace_lr

    names = set(mace_lr.available_blocks())
    return [b for b in CANDIDATES if b in names]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 4096, 13824, 32768])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument(
        "--blocks", nargs="+", help="blocks to compare (default: installed among les/mesh/attention)"
    )
    parser.add_argument("--config", nargs="*", default=[], help="per-block config, name='{json}'")
    parser.add_argument("--full", action="store_true", help="also time the whole model (base + block)")
    parser.add_argument("--json", help="write the raw rows to this file")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    configs = {}
    for item in args.config:
        name, _, text = item.partition("=")
        configs[name] = json.loads(text)
    if args.worker:
        n_cells, variant, mode = args.worker
        row = _worker(int(n_cells), variant, mode, args.repeats, args.dtype, configs.get(variant, {}))
        print(json.dumps(row))
        return
    blocks = args.blocks or _installed()
    if "les" not in blocks:
        blocks = ["les"] + list(blocks)
    modes = ["block"] + (["full"] if args.full else [])
    rows = []
    for n in args.sizes:
        n_cells = round((n / 8) ** (1 / 3))
        variants = [(b, m) for m in modes for b in blocks] + ([("base", "full")] if args.full else [])
        for variant, mode in variants:
            cmd = [sys.executable, __file__, "--worker", str(n_cells), variant, mode]
            cmd += ["--repeats", str(args.repeats), "--dtype", args.dtype]
            if args.config:
                cmd += ["--config", *args.config]
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if res.returncode != 0:
                tail = res.stderr.strip().splitlines()[-1:] or ["(no message)"]
                print(f"  N={8 * n_cells**3} {variant} {mode}: failed ({tail[0][:200]})", file=sys.stderr)
                rows.append({"n_atoms": 8 * n_cells**3, "variant": variant, "mode": mode, "failed": True})
                continue
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(
                f"  measured N={rows[-1]['n_atoms']:>6} {variant:9s} {mode:5s} {rows[-1]['time_s']:.3f} s "
                f"{rows[-1]['extra_rss_mb']:.0f} MB over setup",
                file=sys.stderr,
                flush=True,
            )
    threads = os.environ.get("BENCH_THREADS", "2")
    sizes = sorted({r["n_atoms"] for r in rows})

    def get(n, variant, mode):
        for r in rows:
            if r["n_atoms"] == n and r["variant"] == variant and r["mode"] == mode and not r.get("failed"):
                return r
        return None

    others = [b for b in blocks if b != "les"]
    print(
        f"\nBlock alone, energy+forces, {args.dtype}, {threads} threads: wall time s, CPU time s "
        "(all threads; less sensitive to other load), extra peak RSS MB"
    )
    head = f"{'N':>7} | {'les s':>8} | {'les cpu':>8} | {'les MB':>7}"
    for b in others:
        head += f" | {b + ' s':>11} | {b + ' cpu':>11} | {b + ' MB':>11} | {'t ratio':>7} | {'cpu ratio':>9} | {'mem ratio':>9}"
    print(head)
    print("-" * len(head))
    for n in sizes:
        les = get(n, "les", "block")
        line = f"{n:>7} | " + (
            f"{les['time_s']:8.3f} | {les['cpu_s']:8.3f} | {les['extra_rss_mb']:7.0f}"
            if les
            else f"{'fail':>8} | {'':>8} | {'':>7}"
        )
        for b in others:
            r = get(n, b, "block")
            if r is None:
                line += f" | {'fail/OOM':>11} | {'':>11} | {'':>11} | {'':>7} | {'':>9} | {'':>9}"
                continue
            rt = f"{r['time_s'] / les['time_s']:7.2f}" if les else f"{'':>7}"
            rc = f"{r['cpu_s'] / les['cpu_s']:9.2f}" if les else f"{'':>9}"
            rm = f"{r['extra_rss_mb'] / max(les['extra_rss_mb'], 1.0):9.2f}" if les else f"{'':>9}"
            line += f" | {r['time_s']:11.3f} | {r['cpu_s']:11.3f} | {r['extra_rss_mb']:11.0f} | {rt} | {rc} | {rm}"
        print(line)
    print("\nGrowth: block CPU time / (N ln N) × 1e6 (constant means N log N)")
    print(f"{'N':>7} | " + " | ".join(f"{b:>10}" for b in blocks))
    for n in sizes:
        vals = []
        for b in blocks:
            r = get(n, b, "block")
            vals.append(f"{1e6 * r['cpu_s'] / (n * math.log(n)):10.3f}" if r else f"{'fail':>10}")
        print(f"{n:>7} | " + " | ".join(vals))
    if args.full:
        print(f"\nWhole model (small MACE + block), energy+forces, {args.dtype} (time s / peak RSS MB)")
        print(f"{'N':>7} | {'base':>14} | " + " | ".join(f"{'+' + b:>14}" for b in blocks))
        for n in sizes:
            cells = []
            for v in ["base"] + blocks:
                r = get(n, v, "full")
                cells.append(f"{r['time_s']:6.2f} / {r['peak_rss_mb']:5.0f}" if r else f"{'fail':>14}")
            print(f"{n:>7} | " + " | ".join(cells))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
