"""The report's plots, drawn with matplotlib's object API on the Agg canvas (no pyplot state, no
display): accuracy per round, leakage per round, the privacy–utility scatter."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedsim.run.report.runs import Run, finite, mean, recovered_share

DPI = 100
PLOT_SIZE = (8.0, 4.0)      # inches: 800 x 400 pixels at DPI
LEAKAGE_SIZE = (8.0, 5.0)   # 800 x 500: the legend sits below the axes, off the points
SCATTER_SIZE = (8.0, 5.0)   # 800 x 500 pixels


def _figure(size: tuple[float, float]):  # noqa: ANN202 - a matplotlib Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:  # noqa: ANN001
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=DPI, metadata={"Software": None})
    return path


def _round_axis(ax, run: Run) -> None:  # noqa: ANN001
    from matplotlib.ticker import MaxNLocator

    last = max([r["round"] for r in run.rounds] + [r["round"] for r in run.leakage] + [1])
    ax.set_xlim(0.5, last + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.grid(True, alpha=0.3)


def accuracy_plot(run: Run, path: Path) -> Path:
    """Test accuracy per round (diverged rounds marked); ε per round on a second axis when the
    records carry it."""
    fig = _figure(PLOT_SIZE)
    ax = fig.add_subplot()
    points = [(r["round"], r["test_accuracy"]) for r in run.rounds if finite(r["test_accuracy"])]
    handles = []
    if points:
        handles += ax.plot(*zip(*points), "o-", color="C0", label="test accuracy")
    for i, r in enumerate([r for r in run.rounds if r.get("diverged")]):
        handles.append(ax.axvline(r["round"], color="C3", ls=":", label="diverged" if i == 0 else None))
    ax.set_ylim(0, 1)
    ax.set_ylabel("test accuracy")
    _round_axis(ax, run)
    eps = [(r["round"], r.get("epsilon")) for r in run.rounds if finite(r.get("epsilon"))]
    if eps:
        ax2 = ax.twinx()
        handles += ax2.plot(*zip(*eps), "s--", color="C1", label="ε (cumulative)")
        ax2.set_ylabel("ε")
        ax2.set_ylim(bottom=0)
    ax.set_title(f"{run.label}: test accuracy per round")
    if handles:
        ax.legend(handles=[h for h in handles if not h.get_label().startswith("_")], loc="best")
    return _save(fig, path)


def leakage_plot(run: Run, path: Path) -> Path:
    """Per round and attack: each job's mean PSNR (filled) and best-in-batch PSNR (hollow), a
    line through the per-round average of the means, the recovered share as bars (right axis)
    and the recovered threshold; jobs without a score as crosses on the round axis."""
    fig = _figure(LEAKAGE_SIZE)
    ax = fig.add_subplot()
    shares = ax.twinx()
    attacks = list(dict.fromkeys(str(r["attack"]) for r in run.leakage))
    width = min(0.3, 0.7 / max(len(attacks), 1))
    for i, attack in enumerate(attacks):
        color, offset = f"C{i % 10}", (i - (len(attacks) - 1) / 2) * width
        jobs = [r for r in run.leakage if str(r["attack"]) == attack]
        scored = [r for r in jobs if finite(r["psnr_mean"])]
        ax.scatter([r["round"] + offset for r in scored], [r["psnr_mean"] for r in scored], color=color, zorder=3,
                   label=f"{attack}: mean PSNR")
        best = [r for r in jobs if finite(r["psnr_best"])]
        ax.scatter([r["round"] + offset for r in best], [r["psnr_best"] for r in best], marker="^", zorder=3,
                   facecolors="none", edgecolors=color, label=f"{attack}: best in batch")
        per_round = sorted({r["round"] for r in scored})
        if len(per_round) > 1:
            ax.plot([n + offset for n in per_round],
                    [mean([r["psnr_mean"] for r in scored if r["round"] == n]) for n in per_round],
                    color=color, alpha=0.6, zorder=2)
        unscored = [r for r in jobs if not finite(r["psnr_mean"])]
        if unscored:
            ax.scatter([r["round"] + offset for r in unscored], [0] * len(unscored), marker="x", color=color,
                       zorder=3, clip_on=False, label=f"{attack}: no score ({len(unscored)})")
        bars = sorted({r["round"] for r in jobs})
        heights = [recovered_share([r for r in jobs if r["round"] == n]) or 0.0 for n in bars]
        shares.bar([n + offset for n in bars], heights, width=width * 0.9, color=color, alpha=0.2,
                   label=f"{attack}: recovered share")
    ax.axhline(run.recovered_psnr, color="grey", ls="--", lw=1, label=f"recovered at ≥ {run.recovered_psnr:g} dB")
    ax.set_ylim(bottom=0, top=max([r["psnr_best"] for r in run.leakage if finite(r["psnr_best"])]
                                  + [run.recovered_psnr]) * 1.15)
    ax.set_ylabel("PSNR (dB)")
    shares.set_ylim(0, 1)
    shares.set_ylabel("recovered share (bars)")
    ax.set_zorder(shares.get_zorder() + 1)  # points over the bars
    ax.patch.set_visible(False)
    _round_axis(ax, run)
    ax.set_title(f"{run.label}: leakage per round (defense {run.defense})")
    handles, labels = ax.get_legend_handles_labels()
    more_handles, more_labels = shares.get_legend_handles_labels()
    ax.legend(handles + more_handles, labels + more_labels, loc="upper center", bbox_to_anchor=(0.5, -0.13),
              ncol=3, fontsize="small", frameon=False)
    return _save(fig, path)


@dataclass(frozen=True)
class ScatterPoint:
    label: str
    accuracy: float
    psnr: float


def scatter_points(runs: list[Run]) -> tuple[list[ScatterPoint], list[str]]:
    """One point per run that has both a final accuracy and a scored attack job; the labels of
    the runs left out."""
    points, left_out = [], []
    for run in runs:
        if run.final_accuracy is None or run.psnr_mean is None:
            left_out.append(run.label)
        else:
            points.append(ScatterPoint(run.label, run.final_accuracy, run.psnr_mean))
    return points, left_out


def privacy_utility_plot(points: list[ScatterPoint], path: Path) -> Path:
    """Final test accuracy (x) against mean leakage PSNR (y), one labelled point per run."""
    fig = _figure(SCATTER_SIZE)
    ax = fig.add_subplot()
    for i, point in enumerate(points):
        ax.scatter([point.accuracy], [point.psnr], s=60, color=f"C{i % 10}", zorder=3)
        ax.annotate(point.label, (point.accuracy, point.psnr), xytext=(6, 5), textcoords="offset points")
    xs, ys = [p.accuracy for p in points], [p.psnr for p in points]
    ax.set_xlim(max(0.0, min(xs) - 0.1), min(1.0, max(xs) + 0.15))
    ax.set_ylim(max(0.0, min(ys) - 5), max(ys) + 5)
    ax.set_xlabel("final test accuracy (utility →)")
    ax.set_ylabel("mean leakage PSNR, dB (← privacy)")
    ax.set_title("privacy–utility: lower right is better")
    ax.grid(True, alpha=0.3)
    return _save(fig, path)
