"""Print a JSON report as a short table: the GPU suite's view of reports it does not own
(e.g. the attention kernels' `attention.json`).

    python -m benchmarks.suite_summary attention.json

A list of flat records (or the first such list inside a dict) becomes a table, at most
MAX_ROWS rows; top-level scalars become `key: value` lines.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks.report import format_table

MAX_ROWS = 24


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "x".join(fmt(v) for v in value) if all(isinstance(v, (int, float)) for v in value) else str(value)
    return str(value)


def records(data) -> list[dict] | None:
    if isinstance(data, list) and data and all(isinstance(r, dict) for r in data):
        return data
    if isinstance(data, dict):
        for value in data.values():
            found = records(value)
            if found:
                return found
    return None


def summarize_json(data) -> str:
    lines = []
    if isinstance(data, dict):
        lines += [f"{k}: {fmt(v)}" for k, v in data.items() if not isinstance(v, (dict, list))]
    rows = records(data)
    if rows:
        keys = [k for k in rows[0] if not isinstance(rows[0][k], (dict, list)) or
                all(isinstance(v, (int, float)) for v in rows[0][k])]
        table = [[fmt(r.get(k, "")) for k in keys] for r in rows[:MAX_ROWS]]
        lines += ["", format_table(keys, table)]
        if len(rows) > MAX_ROWS:
            lines.append(f"... {len(rows) - MAX_ROWS} more rows in the file")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    try:
        data = json.loads(Path(argv[0]).read_text())
    except (OSError, ValueError) as e:
        print(f"cannot read {argv[0]}: {e}")
        return 1
    print(summarize_json(data))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
