"""``fedsim report``: run directories made by hand (no Flower) -> PNGs and one self-contained HTML
page; the numbers in its tables and plots; bad input in one line with status 2; ``fedsim run``
writes the page; and (slow) the page in a real headless browser."""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import tomli_w
from PIL import Image

from fedsim.run.report import plots as report_plots
from fedsim.run.cli import main
from fedsim.run.report import DPI, LEAKAGE_SIZE, PLOT_SIZE, SCATTER_SIZE, build_report
from fedsim.run.tables import rounds_table
from fedsim.rundir import RunDirectory

DATA_URI = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
PLOT_PIXELS = (int(PLOT_SIZE[0] * DPI), int(PLOT_SIZE[1] * DPI))        # 800 x 400
LEAKAGE_PIXELS = (int(LEAKAGE_SIZE[0] * DPI), int(LEAKAGE_SIZE[1] * DPI))  # 800 x 500
SCATTER_PIXELS = (int(SCATTER_SIZE[0] * DPI), int(SCATTER_SIZE[1] * DPI))  # 800 x 500


def _job(round_: int, client: int, attack: str, defense: str, psnr: list[float] | None, status: str = "ok",
         threshold: float = 20.0) -> dict:
    scored = psnr is not None
    return {"round": round_, "client": client, "attack": attack, "defense": defense, "status": status,
            "error": None if scored else "boom", "psnr_mean": sum(psnr) / len(psnr) if scored else None,
            "psnr_best": max(psnr) if scored else None, "ssim_mean": 0.5 if scored else None,
            "ssim_best": 0.6 if scored else None, "lpips_mean": None, "lpips_best": None,
            "label_acc": 1.0 if scored else None,
            "recovered_share": sum(p >= threshold for p in psnr) / len(psnr) if scored else None,
            "num_images": len(psnr) if scored else None, "iterations": 300 if scored else None, "objective": 0.01,
            "seconds": 2.5, "psnr": psnr or [], "extras": {},
            "image": f"reconstructions/r{round_:03d}_c{client:03d}_{attack}.png" if scored else None}


def _grid_png(path: Path, size: tuple[int, int] = (12, 20)) -> Path:
    """A small PNG of known content: red top half, blue bottom half."""
    image = Image.new("RGB", size, (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, size[0], size[1] // 2))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def make_run(folder: Path, name: str = "small", defense: str = "none", accuracies=(0.5, 0.7, 0.8125),
             jobs: list[dict] | None = None, epsilon: list[float] | None = None, status: str = "completed",
             grids: bool = True) -> Path:
    """A run directory as ``fedsim run`` writes it: scenario.toml, rounds.jsonl, leakage.jsonl (when
    ``jobs``), summary.json, one PNG per scored job under reconstructions/."""
    run = RunDirectory(folder)
    (folder / "scenario.toml").write_text(tomli_w.dumps({
        "name": name, "description": f"{name} made by hand", "seed": 0, "federation": {"rounds": len(accuracies)},
        "defense": {"name": defense, **({"percent": 10.0} if defense == "topk" else {})},
        "attack": {"attacks": sorted({j["attack"] for j in jobs or []}), "recovered_psnr": 20.0}}))
    for i, acc in enumerate(accuracies, start=1):
        record = {"round": i, "test_accuracy": acc, "test_loss": 2.0 / i, "train_loss": 2.5 / i, "clients": [0, 1, 2],
                  "failures": [], "diverged": False, "seconds": 1.25}
        if epsilon is not None:
            record["epsilon"] = epsilon[i - 1]
            record["epsilon_round"] = epsilon[0]
        run.append("rounds.jsonl", record)
    for job in jobs or []:
        run.append("leakage.jsonl", job)
        if job["image"] and grids:
            _grid_png(folder / job["image"])
    run.write_summary({"status": status, "rounds_completed": len(accuracies), "rounds_planned": 3,
                       "seconds": 12.5, "driver_peak_rss_mb": 900.0})
    return folder


def _data_uris(page: Path) -> list[bytes]:
    return [base64.b64decode(uri) for uri in DATA_URI.findall(page.read_text(encoding="utf-8"))]


def _one_line_error(capsys, code: int) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("fedsim: error: ") and "Traceback" not in err, err
    return err


# ------------------------------------------------------------------ one run

def test_one_run_writes_its_plots_and_embeds_every_picture(tmp_path):
    jobs = [_job(1, 0, "geiping", "none", [25.0, 31.0]), _job(2, 0, "geiping", "none", [18.0, 22.0]),
            _job(2, 0, "dlg", "none", [8.0, 9.0])]
    run = make_run(tmp_path / "run", jobs=jobs)
    report = build_report([run])

    assert report.html == run / "report.html"
    assert report.figures == [run / "report_files" / "accuracy.png", run / "report_files" / "leakage.png"]
    for png, pixels in zip(report.figures, [PLOT_PIXELS, LEAKAGE_PIXELS]):
        with Image.open(png) as image:
            assert image.format == "PNG" and image.size == pixels
    grids = sorted((run / "reconstructions").glob("*.png"))
    assert len(grids) == 3
    uris = _data_uris(report.html)
    assert len(uris) == 2 + 3 == len(report.embedded)
    assert uris == [p.read_bytes() for p in report.embedded]
    assert uris[0] == (run / "report_files" / "accuracy.png").read_bytes()
    assert (run / "reconstructions" / "r001_c000_geiping.png").read_bytes() in uris
    page = report.html.read_text(encoding="utf-8")
    assert "<script" not in page and not re.search(r'(src|href)="(?!data:)', page)  # nothing external
    assert 'width="12" height="20"' in page  # the grid at its own pixel size


def test_the_tables_hold_the_numbers_as_the_terminal_shows_them(tmp_path):
    jobs = [_job(1, 3, "geiping", "none", [25.0, 31.0]), _job(2, 4, "spear", "none", None, status="failed")]
    run = make_run(tmp_path / "run", accuracies=(0.5, 0.87654), jobs=jobs)
    page = build_report([run]).html.read_text(encoding="utf-8")

    assert "    2    0.8765     1.0000      1.2500" in rounds_table(RunDirectory(run).read("rounds.jsonl"))
    assert "<td>2</td><td>0.8765</td><td>1.0000</td><td>1.2500</td><td>3</td><td>0</td><td>1.2</td>" in page
    # geiping: mean 28.00, best 31.00, ssim 0.500, lpips -, labels 1.00, recovered 1.00, 2 images
    assert ('<td class="text">ok</td><td>28.00</td><td>31.00</td><td>0.500</td><td>-</td><td>1.00</td>'
            "<td>1.00</td><td>2</td><td>300</td><td>2.5</td>") in page
    assert '<tr class="flag"><td>2</td><td>4</td><td class="text">spear</td>' in page  # the failed job stands out
    assert '<span class="status ok">completed</span> rounds 2 of 3 · 12.5 s' in page
    assert "round 1 · client 3 · geiping · ok · PSNR 28.00 dB mean, 31.00 best · recovered 1.00" in page
    assert "<th>epsilon</th>" not in page  # no privacy accounting in these records


def test_epsilon_is_shown_when_the_records_carry_it(tmp_path):
    run = make_run(tmp_path / "run", defense="dp_local", jobs=[_job(1, 0, "geiping", "dp_local", [12.0])],
                   epsilon=[1.5, 2.25, 3.125])
    page = build_report([run]).html.read_text(encoding="utf-8")
    assert "<th>eps_round</th><th>epsilon</th>" in page
    assert "<td>1.5</td><td>3.12</td></tr>" in page  # round 3: the round's ε, then the cumulative one


def test_a_run_without_leakage_gets_a_report_without_leakage_section(tmp_path):
    run = make_run(tmp_path / "run", jobs=None)
    report = build_report([run])
    assert [p.name for p in report.figures] == ["accuracy.png"]
    page = report.html.read_text(encoding="utf-8")
    assert len(_data_uris(report.html)) == 1 and "<h3>Leakage</h3>" not in page and "Reconstructions" not in page
    assert "<h3>Rounds</h3>" in page


def test_a_stopped_run_without_summary_says_so(tmp_path):
    run = make_run(tmp_path / "run", jobs=None, status="stopped: round 2 diverged")
    page = build_report([run]).html.read_text(encoding="utf-8")
    assert '<span class="status bad">stopped</span> round 2 diverged · rounds 3 of 3 · 12.5 s' in page
    (run / "summary.json").unlink()
    page = build_report([run]).html.read_text(encoding="utf-8")
    assert '<span class="status bad">unknown</span> no summary.json' in page


# ------------------------------------------------------------------ several runs

def _sweep(tmp_path: Path) -> list[Path]:
    return [
        make_run(tmp_path / "a", name="baseline", defense="none", accuracies=(0.5, 0.9),
                 jobs=[_job(1, 0, "geiping", "none", [30.0, 32.0]), _job(2, 1, "geiping", "none", [18.0, 24.0])]),
        make_run(tmp_path / "b", name="pruned", defense="topk", accuracies=(0.4, 0.75),
                 jobs=[_job(1, 0, "geiping", "topk", [14.0, 16.0, 18.0, 21.0])]),
        make_run(tmp_path / "c", name="private", defense="dp_local", accuracies=(0.3, 0.6),
                 jobs=[_job(1, 0, "geiping", "dp_local", [10.0])], epsilon=[4.0, 8.5]),
        make_run(tmp_path / "d", name="unattacked", defense="none", accuracies=(0.45, 0.85)),
    ]


def test_several_runs_get_one_scatter_point_each_and_a_comparison_table(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs = _sweep(tmp_path)
    report = build_report(runs)

    assert report.html == tmp_path / "report.html"
    assert [(p.label, p.accuracy, p.psnr) for p in report.scatter] == [
        ("baseline", 0.9, 26.0), ("pruned", 0.75, 17.25), ("private", 0.6, 10.0)]  # "unattacked" has no PSNR
    files = tmp_path / "report_files"
    assert sorted(p.name for p in files.iterdir()) == sorted(
        ["privacy_utility.png", "run1_accuracy.png", "run1_leakage.png", "run2_accuracy.png", "run2_leakage.png",
         "run3_accuracy.png", "run3_leakage.png", "run4_accuracy.png"])
    with Image.open(files / "privacy_utility.png") as image:
        assert image.size == SCATTER_PIXELS
    assert len(_data_uris(report.html)) == 8 + 4  # plots + one grid per scored job
    page = report.html.read_text(encoding="utf-8")
    # run, defense, ends, rounds, final accuracy, scored/all jobs, mean PSNR, best PSNR, recovered, final ε
    assert ('<td class="text">baseline</td><td class="text">none</td><td class="text">completed</td><td>2</td>'
            "<td>0.9000</td><td>2/2</td><td>26.00</td><td>32.00</td><td>0.75</td><td>-</td>") in page
    assert "<td>0.7500</td><td>1/1</td><td>17.25</td><td>21.00</td><td>0.25</td><td>-</td>" in page
    assert "<td>0.6000</td><td>1/1</td><td>10.00</td><td>10.00</td><td>0.00</td><td>8.50</td>" in page
    assert "<td>0.8500</td><td>0/0</td><td>-</td><td>-</td><td>-</td><td>-</td>" in page
    assert "Not plotted (no test accuracy or no scored attack job): unattacked." in page


def test_the_scatter_figure_holds_one_labelled_point_per_run(tmp_path, monkeypatch):
    drawn = {}
    original = report_plots._save

    def keep(fig, path):  # noqa: ANN001
        drawn[path.name] = fig
        return original(fig, path)

    monkeypatch.setattr(report_plots, "_save", keep)
    build_report(_sweep(tmp_path), tmp_path / "out" / "sweep.html")
    ax = drawn["privacy_utility.png"].axes[0]
    offsets = [tuple(c.get_offsets()[0]) for c in ax.collections]
    assert [len(c.get_offsets()) for c in ax.collections] == [1, 1, 1]
    assert offsets == [(0.9, 26.0), (0.75, 17.25), (0.6, 10.0)]
    assert [t.get_text() for t in ax.texts] == ["baseline", "pruned", "private"]
    # the leakage plot of the baseline: per job one mean and one best point, both rounds
    leak = drawn["run1_leakage.png"].axes[0]
    mean, best = leak.collections[0].get_offsets(), leak.collections[1].get_offsets()
    assert [tuple(p) for p in mean] == [(1, 31.0), (2, 21.0)] and [tuple(p) for p in best] == [(1, 32.0), (2, 24.0)]


def test_runs_with_the_same_scenario_name_are_labelled_by_folder(tmp_path):
    runs = [make_run(tmp_path / f"seed{i}", name="same", jobs=[_job(1, 0, "geiping", "none", [20.0 + i])])
            for i in range(2)]
    report = build_report(runs, tmp_path / "r.html")
    assert [p.label for p in report.scatter] == ["seed0", "seed1"]
    assert (tmp_path / "r_files" / "privacy_utility.png").is_file()


# ------------------------------------------------------------------ the command

def test_the_command_writes_the_page_and_says_where(tmp_path, capsys):
    runs = _sweep(tmp_path)[:2]
    out = tmp_path / "reports" / "cmp.html"  # a folder that does not exist yet is made
    assert main(["report", *map(str, runs), "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Report: {out} (8 images embedded")
    assert (tmp_path / "reports" / "cmp_files" / "privacy_utility.png").is_file()
    assert main(["report", str(runs[0])]) == 0 and (runs[0] / "report.html").is_file()


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    run = make_run(tmp_path / "run", jobs=None)
    empty = tmp_path / "empty"
    empty.mkdir()
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    corrupt = make_run(tmp_path / "corrupt", jobs=None)
    with open(corrupt / "rounds.jsonl", "a") as fh:
        fh.write('{"round": 4, "test_acc\n')
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    # root writes into a 0o555 folder regardless: use a file system that refuses it instead
    locked = Path("/sys/fedsim-test-report.html") if os.geteuid() == 0 else read_only / "r.html"
    return {
        "not a run directory": ([str(empty)], f"{empty} is not a run directory (no rounds.jsonl, no leakage.jsonl)"),
        "missing": ([str(tmp_path / "nope")], "no such run directory"),
        "a file": ([str(a_file)], "is a file, not a run directory"),
        "corrupt records": ([str(corrupt)], f"{corrupt / 'rounds.jsonl'}: line 4 is not JSON"),
        "out is a folder": ([str(run), "--out", str(tmp_path)], "is a folder; give the HTML file"),
        "out under a file": ([str(run), "--out", str(a_file / "r.html")], "is a file, not a folder"),
        "out not writable": ([str(run), "--out", str(locked)], str(locked)),
        "one bad among good": ([str(run), str(empty)], str(empty)),
    }


@pytest.mark.parametrize("case", ["not a run directory", "missing", "a file", "corrupt records", "out is a folder",
                                  "out under a file", "out not writable", "one bad among good"])
def test_bad_input_is_one_line_and_status_2(tmp_path, capsys, case):
    argv, fragment = _bad_inputs(tmp_path)[case]
    err = _one_line_error(capsys, main(["report", *argv]))
    assert fragment in err


# ------------------------------------------------------------------ fedsim run writes it

def _fake_setup(folder: Path) -> SimpleNamespace:
    scenario = SimpleNamespace(name="small", source="small.toml", attack=SimpleNamespace(recovered_psnr=20.0),
                               federation=SimpleNamespace(rounds=3))
    return SimpleNamespace(scenario=scenario, run_dir=RunDirectory(folder))


def test_fedsim_run_writes_the_report_after_its_tables(tmp_path, capsys, monkeypatch):
    import fedsim.run.simulation as simulation

    folder = make_run(tmp_path / "run", jobs=[_job(1, 0, "geiping", "none", [25.0])])
    monkeypatch.setattr(simulation, "run_scenario", lambda *a, **k: _fake_setup(folder))
    started = time.monotonic()
    assert main(["run", "small.toml", "--quiet"]) == 0
    seconds = time.monotonic() - started
    out = capsys.readouterr().out
    assert out.rstrip().splitlines()[-1] == f"Report: {folder / 'report.html'}"
    assert out.index("Leakage") < out.index("Report:")
    assert len(_data_uris(folder / "report.html")) == 3 and seconds < 20


SINGLE_SHOT = """
name = "single"
seed = 5
[data]
train_examples = 200
test_examples = 100
image_size = 16
examples_per_client = 2
[model]
name = "convnet"
width = 4
[training]
batch_size = 2
max_steps = 1
[attack]
attacks = ["geiping"]
[attack.geiping]
iterations = 20
"""


def test_fedsim_attack_writes_its_summary_and_a_report_without_rounds(tmp_path, capsys):
    scenario = tmp_path / "single.toml"
    scenario.write_text(SINGLE_SHOT)
    folder = tmp_path / "run"
    assert main(["--quiet", "attack", str(scenario), "--out", str(folder)]) == 0
    assert capsys.readouterr().out.rstrip().splitlines()[-1] == f"Report: {folder / 'report.html'}"
    summary = json.loads((folder / "summary.json").read_text())
    assert (summary["status"], summary["attack_jobs"], summary["jobs_recorded"]) == ("completed", 1, 1)
    page = (folder / "report.html").read_text(encoding="utf-8")
    assert "<h3>Leakage</h3>" in page and "<h3>Rounds</h3>" not in page and "attack jobs 1 of 1" in page
    assert len(_data_uris(folder / "report.html")) == 2  # the leakage plot and the one grid


def test_a_stopped_run_still_writes_its_report(tmp_path, capsys, monkeypatch):
    import fedsim.run.simulation as simulation
    from server.stops import RunDiverged

    folder = make_run(tmp_path / "run", accuracies=(0.5, None), jobs=None, status="stopped: round 2 diverged")

    def diverge(*args, **kwargs):  # noqa: ANN002, ANN003
        stop = RunDiverged(2, "non-finite test loss")
        stop.setup = _fake_setup(folder)
        raise stop

    monkeypatch.setattr(simulation, "run_scenario", diverge)
    assert main(["run", "small.toml", "--quiet"]) == 3
    captured = capsys.readouterr()
    assert f"Report: {folder / 'report.html'}" in captured.out and "round 2 diverged" in captured.err
    assert "<td>2</td><td>-</td>" in (folder / "report.html").read_text(encoding="utf-8")


def test_a_report_that_cannot_be_written_does_not_change_the_runs_status(tmp_path, capsys, monkeypatch):
    import fedsim.run.simulation as simulation

    folder = make_run(tmp_path / "run", jobs=None)
    (folder / "report.html").mkdir()  # the page's path is taken by a folder
    monkeypatch.setattr(simulation, "run_scenario", lambda *a, **k: _fake_setup(folder))
    assert main(["run", "small.toml", "--quiet"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedsim: warning: no report written") and "fedsim report" in err[0]


# ------------------------------------------------------------------ in a real browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
# injected into a copy of the page by the test only (the report itself has no script): any
# external resource breaks this policy and shows up as a console message; after load, every
# image's natural size is written into the DOM for --dump-dom
PROBE = ("<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
         "style-src 'unsafe-inline'; script-src 'unsafe-inline'\">"
         "<script>window.addEventListener('load', () => { const p = document.createElement('pre'); "
         "p.id = 'natural-sizes'; p.textContent = Array.from(document.images, "
         "i => i.naturalWidth + 'x' + i.naturalHeight).join(' '); document.body.appendChild(p); });</script>")


def _chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--enable-logging=stderr",
                           "--v=0", "--virtual-time-budget=10000", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_the_page_renders_in_a_headless_browser(tmp_path):
    report = build_report(_sweep(tmp_path), tmp_path / "report.html")
    page = report.html.read_text(encoding="utf-8")
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("<head>", "<head>" + PROBE, 1), encoding="utf-8")

    dom = _chromium("--dump-dom", probe.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    assert console == []
    sizes = re.search(r'<pre id="natural-sizes">([^<]*)</pre>', dom.stdout).group(1).split()
    expected = []
    for png in report.embedded:
        with Image.open(png) as image:
            expected.append("{}x{}".format(*image.size))
    assert len(sizes) == len(report.embedded) == 12 and sizes == expected
    assert all(int(n) > 0 for size in sizes for n in size.split("x"))

    shot = tmp_path / "screenshot.png"
    result = _chromium(f"--screenshot={shot}", "--window-size=1280,2400", report.html.as_uri())
    assert result.returncode == 0 and [line for line in result.stderr.splitlines() if ":CONSOLE" in line] == []
    with Image.open(shot) as image:
        assert image.size == (1280, 2400)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 50  # a page with plots, not a blank one
