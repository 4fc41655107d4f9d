"""Per-layer heatmaps: layers (rows, in model order) x step buckets, colour = the bucket's
maximum (so a one-step spike shows), on a log colour scale by default."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from tdiag.report.charts.marks import marks_json
from tdiag.report.charts.model import Chart, Mark
from tdiag.report.summary import numeric_column

__all__ = ["heatmap_chart"]


def heatmap_chart(
    key: str,
    title: str,
    df: pd.DataFrame,
    cols: Sequence[str],
    prefix: str,
    *,
    marks: Sequence[Mark] = (),
    columns: int = 250,
    note: str = "",
    value_label: str = "",
) -> Chart:
    """A heatmap of the columns ``cols`` (rows labelled without ``prefix``).

    Only the history rows that carry at least one of these metrics are bucketed (a
    validation row in between would otherwise make an empty column), by position, into at
    most ``columns`` buckets; each cell is the bucket's largest finite value (null if none).
    """
    steps = df["step"].to_numpy(dtype=np.float64)
    values = []
    for c in cols:
        col = numeric_column(df, c)
        y = col.to_numpy(dtype=np.float64) if col is not None else np.full(len(steps), np.nan)
        values.append(np.where(np.isfinite(y), y, np.nan))
    grid = np.vstack(values) if values else np.empty((0, len(steps)))
    carried = ~np.isnan(grid).all(axis=0)
    grid, steps = grid[:, carried], steps[carried]
    n = len(steps)
    nb = max(1, min(columns, n))
    starts = np.unique(np.linspace(0, n, nb + 1).astype(np.int64)[:-1]) if n else np.empty(0, int)
    if n:
        filled = np.where(np.isnan(grid), -np.inf, grid)
        cells = np.maximum.reduceat(filled, starts, axis=1)
        cells = np.where(np.isfinite(cells), cells, np.nan)
        ends = np.append(starts[1:], n) - 1
        x0, x1 = steps[starts], steps[ends]
    else:
        cells, x0, x1 = np.empty((len(cols), 0)), np.empty(0), np.empty(0)
    positive = cells[np.isfinite(cells) & (cells > 0)]
    spec = {
        "kind": "heatmap",
        "key": key,
        "title": title,
        "rows": [c[len(prefix) :] for c in cols],
        "x0": x0,
        "x1": x1,
        "z": cells.ravel(),
        "ncols": int(cells.shape[1]),
        "log": bool(len(positive)),
        "value": value_label,
        "marks": marks_json(marks),
    }
    return Chart(key=key, title=title, metrics=tuple(cols), spec=spec, note=note)
