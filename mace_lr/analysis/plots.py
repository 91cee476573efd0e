"""Figures of the diagnostics (matplotlib, the ``plot`` extra); each writes one PNG."""

from __future__ import annotations

from typing import Dict, Mapping

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, ax, xlabel: str, ylabel: str, title: str, path, legend_size: int = 8) -> None:
    """Axis labels, title and legend, then write ``path`` (PNG, 120 dpi) and close the figure."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)


def plot_sqq(results: Mapping[str, Dict], path, log: bool = True) -> None:
    """S_QQ(k) of several models (label → :func:`charge_structure_factor` output) with k² guides."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    sl_done = False
    for (label, res), marker in zip(results.items(), "os^vD<>"):
        ax.errorbar(
            res["k"], res["S"], yerr=res["S_err"], fmt=marker + "-", ms=4, lw=1, capsize=2, label=label
        )
        kk = np.geomspace(res["k"][0] / 3, res["k"].max(), 100)
        m = min(3, len(res["k"]))
        ax.plot(
            kk[kk <= res["k"][m - 1] * 1.5],
            res["fit_slope"] * kk[kk <= res["k"][m - 1] * 1.5] ** 2,
            ":",
            lw=1,
            color=ax.lines[-1].get_color(),
        )
        if not sl_done and np.isfinite(res["sl_slope"]):
            ax.plot(
                kk,
                res["sl_slope"] * kk**2,
                "k--",
                lw=1,
                label=f"Stillinger–Lovett k²/(4πβk_e n), {res['temperature']:.0f} K",
            )
            sl_done = True
    if log:
        ax.set_xscale("log")
        ax.set_yscale("log")
    _finish(fig, ax, "k (Å⁻¹)", "S_QQ(k) (e²)", "Charge structure factor (dotted: k² fit at small k)", path)


def plot_dielectric(results: Mapping[str, Dict], path) -> None:
    """Running ε (label → :func:`dielectric_constant` output) against the number of frames."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, res in results.items():
        n = np.arange(1, len(res["running"]) + 1)
        line = ax.plot(
            n[1:],
            res["running"][1:],
            lw=1,
            label=f"{label}: ε = {res['epsilon']:.2f} ± {res['epsilon_err']:.2f}",
        )
        ax.axhline(res["epsilon"], color=line[0].get_color(), ls=":", lw=1)
    _finish(
        fig,
        ax,
        "frames",
        "ε (running estimate)",
        "Dielectric constant from total-dipole fluctuations (tin foil)",
        path,
    )


def plot_conductivity(results: Mapping[str, Dict], path) -> None:
    """Green–Kubo running integral and Einstein–Helfand value (label → :func:`ionic_conductivity`)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, res in results.items():
        line = ax.plot(
            res["time"],
            res["gk_running"],
            lw=1.2,
            label=f"{label} GK: {res['sigma_gk']:.0f} ± {res['sigma_gk_err']:.0f} S/m",
        )
        c = line[0].get_color()
        ax.axhspan(
            res["sigma_eh"] - res["sigma_eh_err"],
            res["sigma_eh"] + res["sigma_eh_err"],
            color=c,
            alpha=0.2,
            label=f"{label} EH: {res['sigma_eh']:.0f} ± {res['sigma_eh_err']:.0f} S/m",
        )
        ax.axvline(res["fit_start"], color=c, ls=":", lw=0.8)
    _finish(
        fig,
        ax,
        "correlation time τ (fs)",
        "σ (S/m)",
        "Ionic conductivity: GK ∫⟨J·J⟩ (lines), Einstein–Helfand (bands)",
        path,
        legend_size=7,
    )


def plot_size_consistency(results: Mapping[str, Dict], path) -> None:
    """|ΔU| against distance (label → :func:`size_consistency` output) with the point-charge tail."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    floor = 1e-12
    for (label, res), marker in zip(results.items(), "os^vD"):
        ax.plot(res["distance"], np.maximum(np.abs(res["delta"]), floor), marker + "-", label=label)
    first = next(iter(results.values()))
    if first["charge_a"] * first["charge_b"] != 0:
        ax.plot(first["distance"], np.abs(first["coulomb_tail"]), "k--", lw=1, label="|k_e q_A q_B / d|")
    ax.set_xscale("log")
    ax.set_yscale("log")
    _finish(
        fig, ax, "separation d (Å)", "|U(A…B) − U(A) − U(B)| (eV)  (zeros at 1e-12)", "Size consistency", path
    )
