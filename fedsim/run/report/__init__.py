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

Modules: ``runs`` (reading run directories), ``plots``, ``page`` (the HTML and
:func:`build_report`).
"""
from fedsim.run.report.page import REPORT, Report, build_report
from fedsim.run.report.plots import DPI, LEAKAGE_SIZE, PLOT_SIZE, SCATTER_SIZE, ScatterPoint, scatter_points
from fedsim.run.report.runs import ReportError, Run, load_run

__all__ = ["DPI", "LEAKAGE_SIZE", "PLOT_SIZE", "REPORT", "SCATTER_SIZE", "Report", "ReportError", "Run",
           "ScatterPoint", "build_report", "load_run", "scatter_points"]
