"""The tables ``fedsim`` prints: rounds (accuracy, loss, clients, failures) and leakage (one
row per attack job), from the records of the run directory. The cells come from
:func:`rounds_rows` / :func:`leakage_rows`, which ``fedsim report`` shares, so a number reads the
same in the terminal and in the HTML report."""
from __future__ import annotations

ROUNDS_HEADER = ["round", "test_acc", "test_loss", "train_loss", "clients", "failed", "seconds"]
LEAKAGE_HEADER = ["round", "client", "attack", "defense", "status", "psnr", "psnr_best", "ssim", "lpips",
                  "label_acc", "recovered", "images", "iters", "seconds"]


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def fmt(value: object, spec: str = ".4f") -> str:
    """A number as the tables show it; ``-`` for a missing one (null in the records)."""
    return "-" if value is None else format(value, spec)


def rounds_rows(records: list[dict]) -> list[list[object]]:
    """The cells of the rounds table (columns :data:`ROUNDS_HEADER`), one row per round."""
    return [[r["round"], fmt(r["test_accuracy"]), fmt(r["test_loss"]), fmt(r["train_loss"]),
             len(r["clients"]), len(r["failures"]), fmt(r["seconds"], ".1f")] for r in records]


def rounds_columns(records: list[dict]) -> tuple[list[str], list[list[object]]]:
    """Header and cells of the rounds table: :data:`ROUNDS_HEADER`, then the ε columns (this
    round's, cumulative worst case) when the defense is accounted."""
    header, rows = list(ROUNDS_HEADER), rounds_rows(records)
    if any(r.get("epsilon") is not None for r in records):
        header += ["eps_round", "epsilon"]
        rows = [row + [fmt(r.get("epsilon_round"), ".3g"), fmt(r.get("epsilon"), ".3g")]
                for row, r in zip(rows, records)]
    return header, rows


def leakage_rows(records: list[dict]) -> list[list[object]]:
    """The cells of the leakage table (columns :data:`LEAKAGE_HEADER`), one row per attack job."""
    return [[r["round"], r["client"], r["attack"], r["defense"], r["status"], fmt(r["psnr_mean"], ".2f"),
             fmt(r["psnr_best"], ".2f"), fmt(r["ssim_mean"], ".3f"), fmt(r["lpips_mean"], ".3f"),
             fmt(r["label_acc"], ".2f"), fmt(r["recovered_share"], ".2f"), r["num_images"] or "-",
             r["iterations"] or "-", fmt(r["seconds"], ".1f")] for r in records]


def rounds_table(records: list[dict]) -> str:
    header, rows = rounds_columns(records)
    return _table(rows, header)


def sweep_table(rows: list[dict]) -> str:
    """One row per run of a sweep (``fedsim.run.sweep``): what changed, utility, leakage, ε."""
    return _table([[r["setting"], fmt(r["final_test_accuracy"]), fmt(r["psnr_mean"], ".2f"),
                    fmt(r["psnr_best"], ".2f"), fmt(r["recovered_share"], ".2f"), fmt(r["epsilon"], ".3g"),
                    r["status"].split(":")[0]] for r in rows],
                  ["setting", "final_acc", "psnr_mean", "psnr_best", "recovered", "epsilon", "status"])


def leakage_table(records: list[dict]) -> str:
    return _table(leakage_rows(records), LEAKAGE_HEADER)
