"""The report's one HTML page: every picture embedded as a data URI, tables as HTML, the style
inline; :func:`build_report` writes it with its plots."""
from __future__ import annotations

import base64
import html
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from fedsim.run.report.plots import ScatterPoint, accuracy_plot, leakage_plot, privacy_utility_plot, scatter_points
from fedsim.run.report.runs import ReportError, Run, finite, label_runs, load_run
from fedsim.run.tables import LEAKAGE_HEADER, fmt, leakage_rows, rounds_columns
from fedsim.rundir import SUMMARY

REPORT = "report.html"


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
    parts = ([f"rounds {s.get('rounds_completed', '?')} of {s.get('rounds_planned', '?')}"] if "rounds_planned" in s
             else [f"single-shot attack on one round-1 update, attack jobs {s.get('jobs_recorded', '?')} of "
                   f"{s.get('attack_jobs', '?')}"])
    if finite(s.get("seconds")):
        parts.append(f"{s['seconds']:.1f} s")
    if finite(s.get("driver_peak_rss_mb")):
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
    label_runs(runs)
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
        if run.rounds or not run.leakage:  # a single-shot attack has no rounds
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
