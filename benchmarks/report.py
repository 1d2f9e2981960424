"""The terminal table: stages down, contenders across, then each contender's ratio to the baseline."""

from __future__ import annotations

ROW_NAMES = {
    "text": "tokenize + text encoder",
    "unet_step": "unet step",
    "loop": "loop ({steps} steps)",
    "vae_decode": "vae decode",
    "end_to_end": "end to end",
}


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if abs(s) < 1:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


def fmt_bytes(b: float | None) -> str:
    return "-" if b is None else f"{b / 2**30:.2f} GiB"


def fmt_stat(stat: dict | None) -> str:
    """A stage: median ±half-range in percent of the median."""
    if not stat:
        return "-"
    return f"{fmt_seconds(stat['median'])} ±{stat['spread'] * 100:.0f}%"


def fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def fmt_rate(flops_per_s: float | None) -> str:
    if flops_per_s is None:
        return "-"
    if flops_per_s >= 1e12:
        return f"{flops_per_s / 1e12:.1f} TFLOP/s"
    return f"{flops_per_s / 1e9:.3g} GFLOP/s"


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns, two spaces apart; a rule under the header."""
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def line(r: list[str]) -> str:
        return "  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def contender_cells(c: dict, cfg: dict) -> dict[str, str]:
    """Every row's cell for one contender."""
    if "error" in c:
        return {}
    ov = c["overhead"]
    util = c.get("utilisation") or {}
    frac = util.get("fraction_of_ceiling")
    cells = {s: fmt_stat(c["stages"].get(s)) for s in ROW_NAMES}
    cells.update({
        "overhead": f"{fmt_seconds(ov['seconds']['median'])} ({ov['fraction']['median'] * 100:.1f}%)",
        "images_per_s": f"{c['images_per_s']:.3g}",
        "load_s": fmt_seconds(c.get("load_s")),
        "peak_rss_bytes": fmt_bytes(c.get("peak_rss_bytes")),
        "device_peak_bytes": fmt_bytes(c.get("device_peak_bytes")),
        "utilisation": fmt_rate(util.get("unet_flops_per_s")) + (f" ({frac * 100:.2g}%)" if frac else ""),
        "checks": fmt_checks(c.get("checks")),
        "compile_s": fmt_seconds(c.get("compile_s")),
    })
    return cells


def fmt_checks(checks: dict | None) -> str:
    if not checks:
        return "-"
    worst = max(v["rel_err"] if v["finite"] else float("inf") for v in checks.values())
    return f"max {worst:.1e} " + ("ok" if all(v["ok"] for v in checks.values()) else "FAILED")


def render(results: dict) -> str:
    """The whole report: a title, the headline ratios, the table, and any failed contender."""
    cfg, base = results["config"], results["baseline"]
    contenders = results["contenders"]
    ok = [n for n, c in contenders.items() if "error" not in c]
    others = [n for n in ok if n != base and n in results["ratios"]]
    threads = f"{cfg['threads']} threads" if cfg["threads"] else "default threads"
    title = (f"ldm-bench: {cfg['width']}x{cfg['height']}, {cfg['steps']} steps, guidance {cfg['guidance']}, "
             f"{cfg['sampler']}, batch {cfg['batch']}, {cfg['device']}, {threads}; "
             f"median of {cfg['repeats']} (± half-range)")
    lines = [title]
    for n in ok:
        lines.append(f"  {n}: {contenders[n]['label']}")
    for n in others:
        r = results["ratios"][n]
        e2e = r.get("end_to_end")
        if e2e:
            lines.append(f"{n} vs {base}: end to end {e2e:.2f}x the time ({1 / e2e:.2f}x as fast), "
                         f"peak RSS {fmt_ratio(r.get('peak_rss_bytes'))}")
    rows_spec = [(k, v.format(steps=cfg["steps"])) for k, v in ROW_NAMES.items()] + [
        ("overhead", "runtime overhead"), ("images_per_s", "images/s"), ("load_s", "load"),
        ("peak_rss_bytes", "peak RSS"), ("device_peak_bytes", "device memory peak"),
        ("utilisation", "U-Net FLOP/s (of matmul peak)"), ("compile_s", "compile (first call)"),
        ("checks", "rel err vs fp32"),
    ]
    cells = {n: contender_cells(contenders[n], cfg) for n in ok}
    header = ["stage"] + ok + [f"{n}/{base}" for n in others]
    rows = []
    for key, name in rows_spec:
        row = [name] + [cells[n][key] for n in ok]
        if all(cell == "-" for cell in row[1:]):
            continue
        row += [fmt_ratio(results["ratios"][n].get(key)) if key in results["ratios"][n] else "" for n in others]
        rows.append(row)
    lines += ["", format_table(header, rows)] if ok else []
    for n, c in contenders.items():
        if "error" in c:
            lines.append(f"{n}: not measured: {c['error']}")
    return "\n".join(lines)


def one_line(name: str, c: dict) -> str:
    """A contender's headline numbers on one line, for logs that may be cut short."""
    if "error" in c:
        return f"{name}: not measured: {c['error']}"
    st = c["stages"]
    parts = [f"unet step {fmt_seconds(st['unet_step']['median'])}", f"end to end {fmt_seconds(st['end_to_end']['median'])}",
             f"peak RSS {fmt_bytes(c.get('peak_rss_bytes'))}"]
    if c.get("device_peak_bytes"):
        parts.append(f"device peak {fmt_bytes(c['device_peak_bytes'])}")
    if c.get("compile_s") is not None:
        parts.append(f"compile {fmt_seconds(c['compile_s'])}")
    if c.get("checks"):
        parts.append(f"rel err vs fp32 {fmt_checks(c['checks'])}")
    return f"{name}: " + ", ".join(parts)
