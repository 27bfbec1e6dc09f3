"""The bench's table, printed, and its plot: time over the floor against size."""

from __future__ import annotations

import pathlib
from typing import Any

COLUMNS = """\
Columns: median ms, the median time of one donated step (update + apply_updates);
floor ms, the minimal traffic of the case (words per parameter x 4 bytes x
parameters) over the bandwidth measured in this process; x floor, their ratio;
x ref, this row's time over the reference row's (named in "reference"), timed
interleaved A B A B in this process ("?": quartiles wider than 10%% of the median);
peak/(p+s+g), XLA's peak memory over parameters + state + gradients."""


def print_table(rows: list[dict[str, Any]]) -> None:
    print(COLUMNS.replace("%%", "%"))
    header = (
        f"{'case':42s} {'params':>7s} {'dtype':>8s} {'median ms':>10s}"
        f" {'floor ms':>9s} {'x floor':>8s} {'x ref':>6s} {'reference':34s}"
        f" {'peak/(p+s+g)':>12s}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        references = r.get("references") or [{}]
        for index, reference in enumerate(references):
            ratio = reference.get("ratio")
            ref = f"{ratio:.2f}" if ratio is not None else ""
            if reference.get("conclusive") is False:
                ref += "?"
            if index:  # a further reference of the same row
                print(f"{'':89s} {ref:>6s} {reference['case']}")
                continue
            peak = f"{r['peak_over_p_s_g']:.2f}" if r.get("peak_over_p_s_g") else ""
            print(
                f"{r['case']:42s} {r['parameters'] / 2**20:6.0f}M "
                f"{r['dtype']:>8s} {r['median_ms']:10.1f} {r['floor_ms']:9.1f} "
                f"{r['over_floor']:8.2f} {ref:>6s} {reference.get('case', ''):34s}"
                f" {peak:>12s}"
            )


def draw(rows: list[dict[str, Any]], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtype = (
        "float32" if any(r["dtype"] == "float32" for r in rows) else rows[0]["dtype"]
    )
    names = sorted(
        {r["case"] for r in rows}, key=lambda n: [r["case"] for r in rows].index(n)
    )
    figure, axis = plt.subplots(figsize=(10, 5))
    colors = plt.get_cmap("tab20").colors
    for index, name in enumerate(names):
        mine = [r for r in rows if r["case"] == name and r["dtype"] == dtype]
        if mine:  # one size gives one marker per case
            mine.sort(key=lambda r: r["parameters"])
            axis.plot(
                [r["parameters"] / 2**20 for r in mine],
                [r["over_floor"] for r in mine],
                "o-" if name.startswith("adamax_optax") else "s--",
                color=colors[index % len(colors)],
                label=name,
            )
    axis.set(
        xscale="log",
        yscale="log",
        xlabel=f"parameters (millions, {dtype})",
        ylabel="median time / bandwidth floor",
        title="Update time over the floor",
    )
    axis.axhline(1.0, color="k", lw=0.8)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def print_compile_times(rows: list[dict[str, Any]]) -> None:
    """One line per row of :func:`cases.compile_times`."""
    for row in rows:
        print(
            f"compile, {row['leaves']} leaves, {row['case']:20s} adamax_optax "
            f"{row['adamax_optax_compile_s']:5.1f} s, optax "
            f"{row['optax_compile_s']:5.1f} s"
        )
