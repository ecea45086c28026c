"""Method comparison report: `report.md` (one row per method, like the papers' tables) and a PNG.

A method row carries a flat metrics dict so that it reads and writes as plain JSON:
    "pope/<split>/<name>"  name in acc, precision, recall, f1, yes_ratio (fractions in [0, 1])
    "chair/<name>"         name in chair_s, chair_i, recall (already x100), length (units)
`method_metrics` builds that dict from PopeMetrics / ChairSummary objects.

A row's `deltas` (same keys, evals/bootstrap.py) add a "Δ vs baseline [95% interval]" column
for POPE accuracy and F1 and for CHAIR_s and CHAIR_i; "~" marks a difference within noise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from lvlm_fix.evals.bootstrap import Delta
from lvlm_fix.evals.pope import PopeMetrics
from lvlm_fix.evals.protocols import POOLED_SPLIT

if TYPE_CHECKING:  # CHAIR's word tools (the eval extra) load only when CHAIR runs
    from lvlm_fix.evals.chair import ChairSummary

POPE_COLUMNS = (("acc", "Acc"), ("precision", "Prec"), ("recall", "Rec"), ("f1", "F1"),
                ("yes_ratio", "Yes"))  # fmt: skip
CHAIR_COLUMNS = (("chair_s", "C_S ↓"), ("chair_i", "C_I ↓"), ("recall", "Recall ↑"),
                 ("length", "Len"))  # fmt: skip
_SPLIT_ORDER = ("random", "popular", "adversarial")
POPE_DELTAS = (("acc", "ΔAcc"), ("f1", "ΔF1"))
CHAIR_DELTAS = (("chair_s", "ΔC_S"), ("chair_i", "ΔC_I"))
NOISE_MARK = "~"


class MethodRow(BaseModel):
    """One method's results."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, description='Shown in the tables, e.g. "greedy", "vcd".')
    config_hash: str = Field(description="Hash of the plan/config that produced the numbers.")
    metrics: dict[str, float] = Field(description="Flat keys, see the module docstring.")
    deltas: dict[str, Delta] = Field(
        default_factory=dict, description="Difference to the baseline per metric key, if any."
    )


def method_metrics(
    pope: Mapping[str, PopeMetrics] | None = None, chair: ChairSummary | None = None
) -> dict[str, float]:
    """Flatten per-split POPE metrics and a CHAIR summary into MethodRow.metrics."""
    out: dict[str, float] = {}
    for split, m in (pope or {}).items():
        for key, _ in POPE_COLUMNS:
            out[f"pope/{split}/{key}"] = float(getattr(m, key))
    if chair is not None:
        for key, _ in CHAIR_COLUMNS:
            out[f"chair/{key}"] = float(getattr(chair, key))
    return out


def _check(rows: Sequence[MethodRow]) -> None:
    if not rows:
        raise ValueError("no method rows to report")
    names = [r.name for r in rows]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate method names in {names}")
    pope_keys = {k for k, _ in POPE_COLUMNS}
    chair_keys = {k for k, _ in CHAIR_COLUMNS}
    for row in rows:
        for key in row.metrics:
            parts = key.split("/")
            ok = (len(parts) == 3 and parts[0] == "pope" and parts[2] in pope_keys) or (
                len(parts) == 2 and parts[0] == "chair" and parts[1] in chair_keys
            )
            if not ok:
                raise ValueError(f"method {row.name!r}: unknown metric key {key!r}")
        unreported = sorted(row.deltas.keys() - row.metrics.keys())
        if unreported:
            raise ValueError(f"method {row.name!r}: deltas for unreported metrics {unreported}")


def pope_splits(rows: Sequence[MethodRow]) -> list[str]:
    """Splits present in any row, ordered dataset first, then random/popular/adversarial."""
    splits = {k.split("/")[1] for r in rows for k in r.metrics if k.startswith("pope/")}

    def order(split: str) -> tuple[bool, str, int, str]:
        dataset, _, kind = split.rpartition("_")
        rank = _SPLIT_ORDER.index(kind) if kind in _SPLIT_ORDER else len(_SPLIT_ORDER)
        return (split == POOLED_SPLIT, dataset, rank, split)  # the pooled split last

    return sorted(splits, key=order)


def _has_chair(rows: Sequence[MethodRow]) -> bool:
    return any(k.startswith("chair/") for r in rows for k in r.metrics)


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join(["---", "---"] + ["---:"] * (len(header) - 2)) + "|")
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return lines


def _delta_cell(delta: Delta | None, scale: float, digits: int) -> str:
    """ "+1.50 [-0.50, +3.50] ~" in the table's unit; "–" for the baseline itself."""
    if delta is None:
        return "–"
    d, lo, hi = (scale * v for v in (delta.diff, delta.lo, delta.hi))
    mark = f" {NOISE_MARK}" if delta.within_noise else ""
    return f"{d:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]{mark}"


def _section(rows, prefix, columns, deltas, scale: float, digits: int) -> list[str]:
    """One table: a row per method, metric columns, then Δ columns if any row has deltas."""
    keys = [f"{prefix}{k}" for k, _ in deltas]
    shown = [(k, label) for k, (_, label) in zip(keys, deltas, strict=True)
             if any(k in r.deltas for r in rows)]  # fmt: skip
    header = ["Method", "Config"] + [label for _, label in columns]
    header += [f"{label} [95% CI]" for _, label in shown]
    body = []
    for r in rows:
        vals = [r.metrics.get(f"{prefix}{k}") for k, _ in columns]
        cells = ["–" if v is None else f"{scale * v:.{digits}f}" for v in vals]
        cells += [_delta_cell(r.deltas.get(k), scale, digits) for k, _ in shown]
        body.append([r.name, f"`{r.config_hash}`", *cells])
    return _table(header, body) + [""]


def _noise_note(unit: str, resamples: int | None) -> list[str]:
    times = f"{resamples} " if resamples else ""
    return [
        f"Δ: difference to the baseline, with a paired bootstrap 95% interval ({times}resamples "
        f"of the {unit}, the same resample for both rows). {NOISE_MARK} marks a difference whose "
        "interval contains 0: within noise.",
        "",
    ]


def markdown_report(
    rows: Sequence[MethodRow], title: str = "Evaluation", resamples: int | None = None
) -> str:
    """POPE: one table per split (values in %, 2 decimals). CHAIR: one table (1 decimal).

    `resamples` is only quoted in the note under tables that show differences.
    """
    _check(rows)
    has_deltas = any(r.deltas for r in rows)
    lines = [f"# {title}", ""]
    for split in pope_splits(rows):
        lines += [f"## POPE: {split}", ""]
        lines += _section(rows, f"pope/{split}/", POPE_COLUMNS, POPE_DELTAS, 100.0, 2)
        if has_deltas:
            lines += _noise_note("questions of this split", resamples)
    if _has_chair(rows):
        lines += ["## CHAIR", ""]
        lines += _section(rows, "chair/", CHAIR_COLUMNS, CHAIR_DELTAS, 1.0, 1)
        if has_deltas:
            lines += _noise_note("images", resamples)
    return "\n".join(lines)


def _panels(rows: Sequence[MethodRow]) -> list[tuple[str, list[str], list[list[float]]]]:
    """(title, metric labels, values[method][metric]) per plot panel, all on a 0-100 scale."""
    panels = []
    for split in pope_splits(rows):
        labels = [label for _, label in POPE_COLUMNS]
        values = [
            [100 * r.metrics.get(f"pope/{split}/{k}", float("nan")) for k, _ in POPE_COLUMNS]
            for r in rows
        ]
        panels.append((f"POPE {split}", labels, values))
    if _has_chair(rows):
        keys = CHAIR_COLUMNS[:3]  # Len is a count, not a percentage: table only
        values = [[r.metrics.get(f"chair/{k}", float("nan")) for k, _ in keys] for r in rows]
        panels.append(("CHAIR", [label for _, label in keys], values))
    return panels


def plot_methods(rows: Sequence[MethodRow], path: str | Path) -> Path:
    """Grouped bar chart, one panel per POPE split plus one for CHAIR, bars per method."""
    _check(rows)
    # Object-oriented matplotlib with an explicit Agg canvas: no pyplot, no global backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = _panels(rows)
    if not panels:
        raise ValueError("no POPE or CHAIR metrics to plot")
    fig = Figure(figsize=(4.5 * len(panels), 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    width = 0.8 / len(rows)
    for ax, (title, labels, values) in zip(axes, panels, strict=True):
        for i, (row, vals) in enumerate(zip(rows, values, strict=True)):
            xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(labels))]
            ax.bar(xs, vals, width=width, label=row.name)
        ax.set_xticks(range(len(labels)), labels)
        ax.set_title(title)
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("%")
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside upper center", ncols=min(len(rows), 6))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def write_report(
    rows: Sequence[MethodRow],
    out_dir: str | Path,
    title: str = "Evaluation",
    resamples: int | None = None,
) -> tuple[Path, Path]:
    """Write `report.md` and `report.png` into out_dir; return both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot_methods(rows, out_dir / "report.png")
    md = out_dir / "report.md"
    text = markdown_report(rows, title, resamples) + f"\n![methods]({png.name})\n"
    md.write_text(text, encoding="utf-8")
    return md, png
