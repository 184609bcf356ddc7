"""The tables ``fedsim`` prints: rounds (accuracy, loss, clients, failures) and leakage (one
row per attack job), from the records of the run directory."""
from __future__ import annotations


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _fmt(value: object, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def rounds_table(records: list[dict]) -> str:
    """One row per round; the ε columns (this round's, cumulative worst case) appear when the
    defense is accounted."""
    header = ["round", "test_acc", "test_loss", "train_loss", "clients", "failed", "seconds"]
    rows = [[r["round"], _fmt(r["test_accuracy"]), _fmt(r["test_loss"]), _fmt(r["train_loss"]),
             len(r["clients"]), len(r["failures"]), _fmt(r["seconds"], ".1f")] for r in records]
    if any(r.get("epsilon") is not None for r in records):
        header += ["eps_round", "epsilon"]
        rows = [row + [_fmt(r.get("epsilon_round"), ".3g"), _fmt(r.get("epsilon"), ".3g")]
                for row, r in zip(rows, records)]
    return _table(rows, header)


def sweep_table(rows: list[dict]) -> str:
    """One row per run of a sweep (``fedsim.run.sweep``): what changed, utility, leakage, ε."""
    return _table([[r["setting"], _fmt(r["final_test_accuracy"]), _fmt(r["psnr_mean"], ".2f"),
                    _fmt(r["psnr_best"], ".2f"), _fmt(r["recovered_share"], ".2f"), _fmt(r["epsilon"], ".3g"),
                    r["status"].split(":")[0]] for r in rows],
                  ["setting", "final_acc", "psnr_mean", "psnr_best", "recovered", "epsilon", "status"])


def leakage_table(records: list[dict]) -> str:
    rows = [[r["round"], r["client"], r["attack"], r["defense"], r["status"], _fmt(r["psnr_mean"], ".2f"),
             _fmt(r["psnr_best"], ".2f"), _fmt(r["ssim_mean"], ".3f"), _fmt(r["lpips_mean"], ".3f"),
             _fmt(r["label_acc"], ".2f"), _fmt(r["recovered_share"], ".2f"), r["num_images"] or "-",
             r["iterations"] or "-", _fmt(r["seconds"], ".1f")] for r in records]
    return _table(rows, ["round", "client", "attack", "defense", "status", "psnr", "psnr_best", "ssim", "lpips",
                         "label_acc", "recovered", "images", "iters", "seconds"])
