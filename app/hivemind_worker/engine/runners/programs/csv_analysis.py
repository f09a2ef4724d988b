"""csv_analysis: schema, summary statistics, missing values, group-by aggregates, correlations.

Input: one CSV (or Parquet) file. Writes summary.json, describe.csv, groupby.csv,
correlations.csv and summary.txt under results/. Needs pandas.
"""

from __future__ import annotations

import os
import sys
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "_hivemind"))
import hivemind_runner as hr
import pandas as pd
import tables


def kind_of(series: pd.Series) -> str:
    if pd.api.types.is_bool_dtype(series):
        return "boolean"
    if pd.api.types.is_integer_dtype(series):
        return "integer"
    if pd.api.types.is_float_dtype(series):
        return "float"
    if pd.api.types.is_datetime64_any_dtype(series):
        return "datetime"
    return "text"


def main(p: dict[str, Any]) -> None:
    opts = p["options"]
    name = p["input_path"]
    frame = tables.read_table(hr.input_path(name), name, opts["delimiter"])
    hr.progress(1, 4, "stage", stage="read")
    numeric = [c for c in frame.columns if kind_of(frame[c]) in ("integer", "float")]
    schema = [
        {
            "column": str(c),
            "type": kind_of(frame[c]),
            "non_null": int(frame[c].notna().sum()),
            "missing": int(frame[c].isna().sum()),
            "missing_fraction": round(float(frame[c].isna().mean()), 6) if len(frame) else 0.0,
            "distinct": int(frame[c].nunique(dropna=True)),
        }
        for c in frame.columns
    ]
    stats: dict[str, dict[str, Any]] = {}
    for c in frame.columns:
        col = frame[c]
        if c in numeric:
            values = col.dropna().astype(float)
            stats[str(c)] = {
                "count": int(values.count()),
                "mean": values.mean() if len(values) else None,
                "std": values.std() if len(values) > 1 else None,
                "min": values.min() if len(values) else None,
                "25%": values.quantile(0.25) if len(values) else None,
                "50%": values.median() if len(values) else None,
                "75%": values.quantile(0.75) if len(values) else None,
                "max": values.max() if len(values) else None,
                "sum": values.sum(),
            }
        else:
            counts = col.dropna().astype(str).value_counts()
            stats[str(c)] = {
                "count": int(col.notna().sum()),
                "distinct": int(counts.size),
                "top": str(counts.index[0]) if counts.size else None,
                "top_count": int(counts.iloc[0]) if counts.size else 0,
            }
    hr.progress(2, 4, "stage", stage="statistics")
    groups: list[dict[str, Any]] = []
    group_by = list(opts["group_by"])
    if group_by:
        tables.require_columns(frame, group_by, name, "data.csv.group_by")
        aggregate = list(opts["aggregate"]) or [c for c in numeric if c not in group_by]
        tables.require_columns(frame, aggregate, name, "data.csv.aggregate")
        for column in aggregate:
            if column not in numeric:
                line = tables.first_bad_row(frame[column])
                raise hr.RunnerError(
                    f"data.csv.aggregate: column {column!r} of {name} is not numeric "
                    f"(line {line} holds {str(frame[column].iloc[line - 2])[:40]!r})"
                )
        table = frame.groupby(group_by, dropna=False)[aggregate].agg(list(opts["aggregations"]))
        table.columns = [f"{col}_{agg}" for col, agg in table.columns]
        table = table.reset_index()
        table.to_csv(hr.results_dir() / "groupby.csv", index=False)
        groups = table.to_dict(orient="records")
    hr.progress(3, 4, "stage", stage="group-by")
    correlations: dict[str, dict[str, Any]] = {}
    method = opts["correlation"]
    if method != "none" and len(numeric) >= 2:
        corr = frame[numeric].astype(float).corr(method=method)
        corr.to_csv(hr.results_dir() / "correlations.csv")
        correlations = {str(k): dict(v) for k, v in corr.to_dict().items()}
    describe = pd.DataFrame(stats).T
    describe.index.name = "column"
    describe.to_csv(hr.results_dir() / "describe.csv")
    summary = {
        "file": name,
        "rows": len(frame),
        "columns": len(frame.columns),
        "schema": schema,
        "statistics": stats,
        "missing": {s["column"]: s["missing"] for s in schema},
        "group_by": group_by,
        "groups": groups,
        "correlation_method": method,
        "correlations": correlations,
    }
    hr.write_json("summary.json", summary)
    missing = sum(s["missing"] for s in schema)
    hr.write_text(
        "summary.txt",
        f"{name}: {len(frame)} rows, {len(frame.columns)} columns ({len(numeric)} numeric), "
        f"{missing} missing values"
        + (f"; {len(groups)} groups by {', '.join(group_by)}" if group_by else "")
        + "\n",
    )
    hr.progress(4, 4, "stage", stage="done")


if __name__ == "__main__":
    hr.run(main)
