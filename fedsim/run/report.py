"""``fedsim report``: one or more run directories -> plots (PNG) and one self-contained HTML page.

Per run: test accuracy per round (with ε when the defense is accounted), leakage PSNR per
round per attack (mean and best in batch, the recovered share as bars on a second axis), the
rounds and leakage tables, the reconstruction grids and how the run ended (``summary.json``).
For several runs (a sweep, different defenses) the page opens with the privacy–utility
scatter (final test accuracy against mean leakage PSNR, one labelled point per run) and one
comparison table.

The PNGs are written to a folder next to the page (``report.html`` -> ``report_files/``); the
page embeds every picture as a base64 data URI and styles itself inline, so the one HTML file
is the whole report (no external resource, no JavaScript). Plots are drawn with matplotlib's
object API on the Agg canvas (no pyplot state, no display needed).

Bad input raises :class:`ReportError` (one line; the CLI exits with status 2): a path that is
not a run directory (no ``rounds.jsonl``), a records file that does not parse, an ``--out``
that cannot be written.
"""
from __future__ import annotations

import base64
import html
import json
import math
import os
import tomllib
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from fedsim.rundir import LEAKAGE, RECONSTRUCTIONS, ROUNDS, SUMMARY
from fedsim.run.tables import LEAKAGE_HEADER, fmt, leakage_rows, rounds_columns

REPORT = "report.html"
DPI = 100
PLOT_SIZE = (8.0, 4.0)      # inches: 800 x 400 pixels at DPI
LEAKAGE_SIZE = (8.0, 5.0)   # 800 x 500: the legend sits below the axes, off the points
SCATTER_SIZE = (8.0, 5.0)   # 800 x 500 pixels

_ROUND_DEFAULTS: dict[str, Any] = {"test_accuracy": None, "test_loss": None, "train_loss": None, "clients": [],
                                   "failures": [], "diverged": False, "seconds": None}
_LEAKAGE_DEFAULTS: dict[str, Any] = {
    "client": None, "attack": "?", "defense": "?", "status": "?", "psnr_mean": None, "psnr_best": None,
    "ssim_mean": None, "lpips_mean": None, "label_acc": None, "recovered_share": None, "num_images": None,
    "iterations": None, "seconds": None, "image": None}


class ReportError(Exception):
    """The report cannot be made from this input (one line for the CLI, exit status 2)."""


# ------------------------------------------------------------------ reading a run directory

def _read_jsonl(file: Path, required: tuple[str, ...], defaults: dict[str, Any]) -> list[dict[str, Any]]:
    records = []
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ReportError(f"{file}: not UTF-8 text; is it a fedsim records file?") from None
    except OSError as exc:
        raise ReportError(f"{file}: cannot be read ({exc.strerror or exc})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ReportError(f"{file}: line {number} is not JSON ({exc.msg})") from None
        missing = [key for key in required if not isinstance(record, dict) or key not in record]
        if missing:
            raise ReportError(f"{file}: line {number} has no {', '.join(repr(k) for k in missing)}")
        records.append({**defaults, **record})
    return records


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class Run:
    """What the report reads of one run directory."""

    path: Path
    scenario: dict[str, Any]
    rounds: list[dict[str, Any]]
    leakage: list[dict[str, Any]]
    summary: dict[str, Any] | None
    summary_problem: str | None = None
    grids: list[Path] = field(default_factory=list)
    label: str = ""

    @property
    def name(self) -> str:
        return str(self.scenario.get("name") or self.path.resolve().name)

    @property
    def defense(self) -> str:
        table = self.scenario.get("defense")
        if isinstance(table, dict) and table.get("name"):
            return str(table["name"])
        names = sorted({str(r["defense"]) for r in self.leakage})
        return ", ".join(names) if names else "?"

    @property
    def defense_params(self) -> str:
        table = self.scenario.get("defense")
        if not isinstance(table, dict):
            return ""
        return ", ".join(f"{k} = {v}" for k, v in table.items() if k != "name")

    @property
    def recovered_psnr(self) -> float:
        attack = self.scenario.get("attack")
        value = attack.get("recovered_psnr") if isinstance(attack, dict) else None
        return float(value) if _finite(value) else 20.0

    @property
    def final_accuracy(self) -> float | None:
        """The test accuracy of the last round that has one (a diverged round has none)."""
        values = [r["test_accuracy"] for r in self.rounds if _finite(r["test_accuracy"])]
        return values[-1] if values else None

    @property
    def has_epsilon(self) -> bool:
        return any(r.get("epsilon") is not None for r in self.rounds)

    @property
    def final_epsilon(self) -> float | None:
        values = [r.get("epsilon") for r in self.rounds if _finite(r.get("epsilon"))]
        return values[-1] if values else None

    @property
    def scored(self) -> list[dict[str, Any]]:
        """The attack jobs that have a PSNR (failed jobs have none)."""
        return [r for r in self.leakage if _finite(r["psnr_mean"])]

    @property
    def psnr_mean(self) -> float | None:
        """Mean over all scored attack jobs of each job's mean PSNR."""
        return _mean([r["psnr_mean"] for r in self.scored])

    @property
    def psnr_best(self) -> float | None:
        """The best single image PSNR of any attack job."""
        values = [r["psnr_best"] for r in self.leakage if _finite(r["psnr_best"])]
        return max(values) if values else None

    @property
    def recovered_share(self) -> float | None:
        """Share of all attacked images that were recovered (jobs weighted by their images)."""
        return _recovered_share(self.leakage)


def _recovered_share(records: list[dict[str, Any]]) -> float | None:
    pairs = [(r["recovered_share"], r["num_images"] if _finite(r["num_images"]) and r["num_images"] > 0 else 1)
             for r in records if _finite(r["recovered_share"])]
    total = sum(n for _, n in pairs)
    return sum(s * n for s, n in pairs) / total if total else None


def load_run(path: str | Path) -> Run:
    """Read a run directory; :class:`ReportError` if ``path`` is not one or its records do not parse.
    ``leakage.jsonl``, ``summary.json``, ``scenario.toml`` and ``reconstructions/`` may be absent."""
    path = Path(path)
    if not path.exists():
        raise ReportError(f"{path}: no such run directory")
    if not path.is_dir():
        raise ReportError(f"{path} is a file, not a run directory")
    if not (path / ROUNDS).is_file():
        raise ReportError(f"{path} is not a run directory (no {ROUNDS}); give the folder `fedsim run` wrote")
    rounds = _read_jsonl(path / ROUNDS, ("round",), _ROUND_DEFAULTS)
    leakage = _read_jsonl(path / LEAKAGE, ("round",), _LEAKAGE_DEFAULTS) if (path / LEAKAGE).is_file() else []
    scenario: dict[str, Any] = {}
    if (path / "scenario.toml").is_file():
        try:
            scenario = tomllib.loads((path / "scenario.toml").read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ReportError(f"{path / 'scenario.toml'}: does not parse ({exc})") from None
    summary, problem = None, None
    if (path / SUMMARY).is_file():
        try:
            summary = json.loads((path / SUMMARY).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            problem = f"{SUMMARY} is unreadable ({exc})"
    folder = path / RECONSTRUCTIONS
    grids = sorted(folder.glob("*.png")) if folder.is_dir() else []
    return Run(path, scenario, rounds, leakage, summary if isinstance(summary, dict) else None, problem, grids)


def _label_runs(runs: list[Run]) -> None:
    """Scenario names when they tell the runs apart, else folder names, else the paths given."""
    for candidates in ([r.name for r in runs], [r.path.resolve().name for r in runs], [str(r.path) for r in runs]):
        if len(set(candidates)) == len(runs):
            break
    for run, label in zip(runs, candidates):
        run.label = label


# ------------------------------------------------------------------ plots

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
    points = [(r["round"], r["test_accuracy"]) for r in run.rounds if _finite(r["test_accuracy"])]
    handles = []
    if points:
        handles += ax.plot(*zip(*points), "o-", color="C0", label="test accuracy")
    for i, r in enumerate([r for r in run.rounds if r.get("diverged")]):
        handles.append(ax.axvline(r["round"], color="C3", ls=":", label="diverged" if i == 0 else None))
    ax.set_ylim(0, 1)
    ax.set_ylabel("test accuracy")
    _round_axis(ax, run)
    eps = [(r["round"], r.get("epsilon")) for r in run.rounds if _finite(r.get("epsilon"))]
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
        scored = [r for r in jobs if _finite(r["psnr_mean"])]
        ax.scatter([r["round"] + offset for r in scored], [r["psnr_mean"] for r in scored], color=color, zorder=3,
                   label=f"{attack}: mean PSNR")
        best = [r for r in jobs if _finite(r["psnr_best"])]
        ax.scatter([r["round"] + offset for r in best], [r["psnr_best"] for r in best], marker="^", zorder=3,
                   facecolors="none", edgecolors=color, label=f"{attack}: best in batch")
        per_round = sorted({r["round"] for r in scored})
        if len(per_round) > 1:
            ax.plot([n + offset for n in per_round],
                    [_mean([r["psnr_mean"] for r in scored if r["round"] == n]) for n in per_round],
                    color=color, alpha=0.6, zorder=2)
        unscored = [r for r in jobs if not _finite(r["psnr_mean"])]
        if unscored:
            ax.scatter([r["round"] + offset for r in unscored], [0] * len(unscored), marker="x", color=color,
                       zorder=3, clip_on=False, label=f"{attack}: no score ({len(unscored)})")
        bars = sorted({r["round"] for r in jobs})
        heights = [_recovered_share([r for r in jobs if r["round"] == n]) or 0.0 for n in bars]
        shares.bar([n + offset for n in bars], heights, width=width * 0.9, color=color, alpha=0.2,
                   label=f"{attack}: recovered share")
    ax.axhline(run.recovered_psnr, color="grey", ls="--", lw=1, label=f"recovered at ≥ {run.recovered_psnr:g} dB")
    ax.set_ylim(bottom=0, top=max([r["psnr_best"] for r in run.leakage if _finite(r["psnr_best"])]
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


# ------------------------------------------------------------------ the page

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #1d2330;
       max-width: 1120px; margin: 2em auto; padding: 0 1.2em; line-height: 1.45; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 2px solid #d7dce5; padding-bottom: 0.2em; margin-top: 2.2em; }
h3 { margin-top: 1.6em; }
.meta { color: #505a6b; margin: 0.2em 0; }
.status { display: inline-block; padding: 0.1em 0.6em; border-radius: 0.8em; font-weight: 600; }
.ok { background: #dcf3e2; color: #17622e; } .bad { background: #fbe0df; color: #8c1d18; }
table { border-collapse: collapse; margin: 0.6em 0 1em; font-size: 0.9em; }
th, td { padding: 0.25em 0.7em; border-bottom: 1px solid #e3e7ee; text-align: right;
         font-variant-numeric: tabular-nums; white-space: nowrap; }
th { background: #eef1f6; position: sticky; top: 0; }
td.text, th.text { text-align: left; }
tr:nth-child(even) td { background: #f8f9fb; }
tr.flag td { background: #fff1f0; }
.scroll { overflow-x: auto; }
img { max-width: 100%; height: auto; }
figure { margin: 0.8em 0; } figcaption { color: #505a6b; font-size: 0.9em; }
.grids { display: flex; flex-wrap: wrap; gap: 1.2em; }
.grids figure { margin: 0; max-width: 300px; }
.grids img { image-rendering: pixelated; border: 1px solid #d7dce5; }
"""

_TEXT_COLUMNS = {"attack", "defense", "status", "run", "ends"}


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _table_html(header: list[str], rows: list[list[object]], flags: list[bool] | None = None) -> str:
    cls = lambda name: ' class="text"' if name in _TEXT_COLUMNS else ""  # noqa: E731
    head = "".join(f"<th{cls(h)}>{_esc(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        flag = ' class="flag"' if flags and flags[i] else ""
        body.append(f"<tr{flag}>" + "".join(f"<td{cls(h)}>{_esc(c)}</td>" for h, c in zip(header, row)) + "</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _data_uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")


def _img(png: Path, alt: str) -> str:
    from PIL import Image

    with Image.open(png) as image:
        width, height = image.size
    return f'<img src="{_data_uri(png)}" alt="{_esc(alt)}" width="{width}" height="{height}">'


def _status_html(run: Run) -> str:
    if run.summary is None:
        why = run.summary_problem or f"no {SUMMARY}: the run is still going, or it was killed"
        return f'<span class="status bad">unknown</span> {_esc(why)}'
    s = run.summary
    status = str(s.get("status", "?"))
    badge = "ok" if status == "completed" else "bad"
    parts = [f"rounds {s.get('rounds_completed', '?')} of {s.get('rounds_planned', '?')}"]
    if _finite(s.get("seconds")):
        parts.append(f"{s['seconds']:.1f} s")
    if _finite(s.get("driver_peak_rss_mb")):
        parts.append(f"driver peak memory {s['driver_peak_rss_mb']:.0f} MB")
    word, _, why = status.partition(": ")  # "stopped: round 3 diverged (...)" -> badge "stopped", then why
    if why:
        parts.insert(0, why)
    return f'<span class="status {badge}">{_esc(word)}</span> ' + _esc(" · ".join(parts))


def _rounds_html(run: Run) -> str:
    header, rows = rounds_columns(run.rounds)
    if any(r.get("diverged") for r in run.rounds):
        header.append("diverged")
        for row, r in zip(rows, run.rounds):
            row.append("yes" if r.get("diverged") else "")
    flags = [bool(r.get("diverged")) or bool(r["failures"]) for r in run.rounds]
    return _table_html(header, rows, flags)


def _grid_caption(run: Run, grid: Path) -> str:
    for r in run.leakage:
        if r["image"] and Path(str(r["image"])).name == grid.name:
            return (f"round {r['round']} · client {r['client']} · {r['attack']} · {r['status']} · PSNR "
                    f"{fmt(r['psnr_mean'], '.2f')} dB mean, {fmt(r['psnr_best'], '.2f')} best · recovered "
                    f"{fmt(r['recovered_share'], '.2f')}")
    return grid.name


@dataclass
class Report:
    """What :func:`build_report` wrote: the page, the plot files, the data URIs it embeds and
    the privacy–utility points (several runs only)."""

    html: Path
    figures: list[Path]
    embedded: list[Path]
    scatter: list[ScatterPoint]
    runs: list[Run]


def _check_out(out: Path) -> None:
    if out.exists() and out.is_dir():
        raise ReportError(f"--out {out} is a folder; give the HTML file to write (e.g. {out / REPORT})")
    existing = next(p for p in (out.parent, *out.absolute().parent.parents) if p.exists())
    if not existing.is_dir():
        raise ReportError(f"--out {out}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise ReportError(f"--out {out}: {existing if not out.exists() else out} is not writable")


def build_report(run_dirs: list[str | Path], out: str | Path | None = None) -> Report:
    """Write the plots and the HTML page for ``run_dirs``. ``out``: the HTML file (default
    ``RUN_DIR/report.html`` for one run, ``./report.html`` for several); the PNGs go to
    ``<stem>_files/`` beside it. Raises :class:`ReportError` for bad input."""
    if not run_dirs:
        raise ReportError("no run directory given")
    unique = list(dict.fromkeys(Path(p) for p in run_dirs))
    runs = [load_run(p) for p in unique]
    _label_runs(runs)
    out = Path(out) if out is not None else (runs[0].path / REPORT if len(runs) == 1 else Path.cwd() / REPORT)
    _check_out(out)
    files = out.parent / f"{out.stem}_files"
    try:
        files.mkdir(parents=True, exist_ok=True)
        return _write(runs, out, files)
    except OSError as exc:
        raise ReportError(f"--out {out}: cannot write the report ({exc.strerror or exc})") from None


def _write(runs: list[Run], out: Path, files: Path) -> Report:
    figures: list[Path] = []
    embedded: list[Path] = []
    sections: list[str] = []

    def image(png: Path, alt: str) -> str:
        embedded.append(png)
        return _img(png, alt)

    points: list[ScatterPoint] = []
    if len(runs) > 1:
        points, left_out = scatter_points(runs)
        parts = ["<h2>Comparison</h2>"]
        if points:
            figures.append(privacy_utility_plot(points, files / "privacy_utility.png"))
            parts.append(f"<figure>{image(figures[-1], 'privacy-utility scatter')}<figcaption>Final test accuracy "
                         "against the mean PSNR over every scored attack job; one point per run.</figcaption></figure>")
        if left_out:
            parts.append(f'<p class="meta">Not plotted (no test accuracy or no scored attack job): '
                         f"{_esc(', '.join(left_out))}.</p>")
        header = ["run", "defense", "ends", "rounds", "final_acc", "attack_jobs", "psnr_mean", "psnr_best",
                  "recovered"]
        rows = [[r.label, r.defense, (r.summary or {}).get("status", "?"), len(r.rounds), fmt(r.final_accuracy),
                 f"{len(r.scored)}/{len(r.leakage)}", fmt(r.psnr_mean, ".2f"), fmt(r.psnr_best, ".2f"),
                 fmt(r.recovered_share, ".2f")] for r in runs]
        if any(r.has_epsilon for r in runs):
            header.append("final_ε")
            for row, r in zip(rows, runs):
                row.append(fmt(r.final_epsilon, ".2f"))
        parts.append(_table_html(header, rows))
        parts.append('<p class="meta">psnr_mean: mean over the scored attack jobs of each job\'s mean PSNR; '
                     "psnr_best: the best single image; recovered: share of all attacked images recovered; "
                     "attack_jobs: scored / all.</p>")
        sections.append("\n".join(parts))

    for i, run in enumerate(runs, start=1):
        prefix = f"run{i}_" if len(runs) > 1 else ""
        parts = [f"<h2>{_esc(run.label)}</h2>",
                 f'<p class="meta">{_esc(run.path.resolve())}</p>']
        description = run.scenario.get("description")
        if description:
            parts.append(f'<p class="meta">{_esc(description)}</p>')
        params = f" ({run.defense_params})" if run.defense_params else ""
        attacks = (run.scenario.get("attack") or {}).get("attacks") if isinstance(run.scenario.get("attack"), dict) \
            else None
        parts.append(f'<p class="meta">defense <b>{_esc(run.defense)}</b>{_esc(params)} · attacks '
                     f"{_esc(', '.join(attacks) if attacks else 'none planned')}</p>")
        parts.append(f'<p class="meta">ends: {_status_html(run)}</p>')
        figures.append(accuracy_plot(run, files / f"{prefix}accuracy.png"))
        parts.append(f"<figure>{image(figures[-1], f'{run.label}: test accuracy per round')}</figure>")
        parts.append("<h3>Rounds</h3>" + _rounds_html(run))
        if run.leakage:
            figures.append(leakage_plot(run, files / f"{prefix}leakage.png"))
            parts.append("<h3>Leakage</h3>")
            parts.append(f"<figure>{image(figures[-1], f'{run.label}: leakage per round')}<figcaption>Filled: a "
                         "job's mean PSNR over its images after optimal matching; hollow: its best image; bars "
                         f"(right axis): share of images recovered (PSNR ≥ {run.recovered_psnr:g} dB)."
                         "</figcaption></figure>")
            flags = [r["status"] != "ok" for r in run.leakage]
            parts.append(_table_html(LEAKAGE_HEADER, leakage_rows(run.leakage), flags))
        if run.grids:
            parts.append("<h3>Reconstructions</h3><p class=\"meta\">Each grid: the client's images on top, the "
                         "reconstructions below in matched order.</p>")
            cells = [f"<figure>{image(g, g.name)}<figcaption>{_esc(_grid_caption(run, g))}</figcaption></figure>"
                     for g in run.grids]
            parts.append(f'<div class="grids">{"".join(cells)}</div>')
        sections.append("\n".join(parts))

    title = runs[0].label if len(runs) == 1 else f"{len(runs)} runs"
    page = (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>fedsim report: {_esc(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
            f"<h1>fedsim report: {_esc(title)}</h1>\n"
            f'<p class="meta">{len(runs)} run director{"y" if len(runs) == 1 else "ies"} · written '
            f"{datetime.now().strftime('%Y-%m-%d %H:%M')}</p>\n"
            + "\n".join(f"<section>{s}</section>" for s in sections) + "\n</body>\n</html>\n")
    out.write_text(page, encoding="utf-8")
    return Report(out, figures, embedded, points, runs)
