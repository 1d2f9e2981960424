"""The PNG chart: one panel per stage (and peak memory), one bar per contender, min-max whiskers,
each bar labelled with its value and its ratio to the baseline. Needs matplotlib (the `bench` extra)."""

from __future__ import annotations

from pathlib import Path

from benchmarks.report import ROW_NAMES, fmt_bytes, fmt_seconds

COLORS = {"ours": "#d1495b"}  # ours stands out; peers in blues and greys
PEER_COLORS = ("#00798c", "#30638e", "#8d96a3", "#edae49", "#66a182")


def check_available() -> None:
    """Raise ImportError with the install hint before a long run, not after it."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError("--chart needs matplotlib: pip install 'ldm-deploy[bench]'") from None


def panels(results: dict) -> list[tuple[str, str, dict[str, tuple[float, float, float]]]]:
    """(title, unit, {contender: (value, low, high)}) per panel, for measured contenders only."""
    ok = {n: c for n, c in results["contenders"].items() if "error" not in c}
    out = []
    for stage, name in ROW_NAMES.items():
        values = {n: (c["stages"][stage]["median"], c["stages"][stage]["min"], c["stages"][stage]["max"])
                  for n, c in ok.items()}
        out.append((name.format(steps=results["config"]["steps"]), "s", values))
    rss = {n: (c["peak_rss_bytes"],) * 3 for n, c in ok.items() if c.get("peak_rss_bytes")}
    if rss:
        out.append(("peak host RSS", "bytes", rss))
    dev = {n: (c["device_peak_bytes"],) * 3 for n, c in ok.items() if c.get("device_peak_bytes")}
    if dev:
        out.append(("device memory peak", "bytes", dev))
    return out


def write_chart(results: dict, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = results["baseline"]
    data = panels(results)
    cols = 3 if len(data) <= 6 else 4
    rows = -(-len(data) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
    names = [n for n, c in results["contenders"].items() if "error" not in c]
    peer_colors = iter(PEER_COLORS * 3)
    colors = {n: COLORS.get(n) or next(peer_colors) for n in names}
    for ax, (title, unit, values) in zip(axes.flat, data):
        order = [n for n in names if n in values]
        heights = [values[n][0] for n in order]
        scale, label_unit = (2**30, "GiB") if unit == "bytes" else (1.0, "s")
        ax.bar(range(len(order)), [h / scale for h in heights], color=[colors[n] for n in order],
               yerr=[[(values[n][0] - values[n][1]) / scale for n in order],
                     [(values[n][2] - values[n][0]) / scale for n in order]], capsize=3)
        base_value = values.get(base, (None,))[0]
        for i, n in enumerate(order):
            text = fmt_bytes(values[n][0]) if unit == "bytes" else fmt_seconds(values[n][0])
            if base_value and n != base:
                text += f"\n{values[n][0] / base_value:.2f}x"
            ax.annotate(text, (i, values[n][2] / scale), ha="center", va="bottom", fontsize=8,
                        xytext=(0, 2), textcoords="offset points")
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(label_unit)
        ax.set_xticks(range(len(order)), order, rotation=15, fontsize=8)
        ax.margins(y=0.25)
    for ax in list(axes.flat)[len(data):]:
        ax.axis("off")
    cfg = results["config"]
    fig.suptitle(
        f"ldm-bench on {results['machine'].get('gpu') or results['machine'].get('cpu') or 'this machine'}: "
        f"{cfg['width']}x{cfg['height']}, {cfg['steps']} steps, batch {cfg['batch']}, {cfg['device']}"
        f"{', ' + str(cfg['threads']) + ' threads' if cfg['threads'] else ''}; "
        f"ratios vs {base}; median, whiskers min-max", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
