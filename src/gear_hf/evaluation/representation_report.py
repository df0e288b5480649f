"""Presentation of a representation-analysis report (`representation.build_report`): a Figure-5-style plot of
the AR layers and a Table-4-style text table of the tokenizer features."""

from __future__ import annotations

import os

# (key, title) of Figure 5's panels (a)-(f), in its 2 x 3 layout.
FIGURE_PANELS = (
    ("cknna_image", "(a) CKNNA, image level"),
    ("cka_image", "(b) CKA, image level"),
    ("morans_i", "(c) Moran's I"),
    ("cknna_patch", "(d) CKNNA, patch level"),
    ("cka_patch", "(e) CKA, patch level"),
    ("hf_ratio", "(f) FFT high-frequency ratio"),
)
TABLE_ROWS = (("cknna", "image"), ("cknna", "patch"), ("cka", "image"), ("cka", "patch"))


def plot_representation(report: dict, path: str | os.PathLike, align_layer: int | None = None) -> None:
    """One panel per metric, one curve (mean ± 1 std band) per model over its AR layers (0 = embeddings); the
    teacher's own Moran's I / high-frequency ratio as a grey dashed line; the REPA layer as a grey band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    teacher_name = report["config"].get("teacher", "teacher")
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), constrained_layout=True)
    for ax, (metric, title) in zip(axes.flat, FIGURE_PANELS, strict=True):
        for name, entry in report["models"].items():
            stats = entry.get("ar", {}).get(metric)
            if not stats:
                continue
            layers = entry["ar"]["layers"]
            mean = [float("nan") if v is None else v for v in stats["mean"]]
            (line,) = ax.plot(layers, mean, marker="o", markersize=3, label=name)
            if stats["std"] is not None:
                std = [0.0 if v is None else v for v in stats["std"]]
                ax.fill_between(layers, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                color=line.get_color(), alpha=0.2, linewidth=0)
        if metric in report["teacher"] and report["teacher"][metric]["mean"] is not None:
            ax.axhline(report["teacher"][metric]["mean"], color="gray", linestyle="--", label=teacher_name)
        if align_layer is not None:
            ax.axvspan(align_layer - 0.5, align_layer + 0.5, color="gray", alpha=0.15, linewidth=0)
        ax.set_title(title)
        ax.set_xlabel("AR layer (0 = embeddings)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    legend = {}  # one entry per label across panels (models in every panel, the teacher in two)
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    fig.legend(legend.values(), legend.keys(), loc="outside lower center", ncols=max(1, len(legend)))
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


def format_table4(report: dict) -> str:
    """The tokenizer features' CKNNA / CKA to the teacher, pre and post quantization, per model (means)."""
    names = list(report["models"])
    columns = [(feature, name) for feature in ("pre", "post") for name in names]
    header = ["metric", "level"] + [f"{feature}:{name}" for feature, name in columns]
    rows = [header]
    for metric, level in TABLE_ROWS:
        row = [metric.upper(), level]
        for feature, name in columns:
            stats = report["models"][name]["tokenizer"][feature][f"{metric}_{level}"]
            value = None if stats is None else stats["mean"]
            row.append("n/a" if value is None else f"{value:.4f}")
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
    return "Tokenizer-feature alignment to the teacher (paper Table 4)\n" + "\n".join(lines)
