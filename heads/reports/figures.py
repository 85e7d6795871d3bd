"""The figures of the reports, as PNG files: per-epoch EDM and modality order, τ/β curves, robustness.

matplotlib is imported inside each function with the Agg backend, so importing this module (and
the commands that only train) costs nothing and no display is ever needed.
"""
from __future__ import annotations

import statistics
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path, title: str) -> Path:
    """Title, layout, write the PNG and free the figure (pyplot keeps every open figure alive)."""
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _mean_curve(runs: list[list[dict]], column: str) -> tuple[list[int], list[float]]:
    """Mean over seeds of a per-epoch column, over the epochs every seed reached."""
    length = min(len(rows) for rows in runs)
    values = [[float(rows[i][column]) for rows in runs if rows[i].get(column) not in (None, "")] for i in range(length)]
    points = [(i + 1, statistics.mean(v)) for i, v in enumerate(values) if v]
    return [p[0] for p in points], [p[1] for p in points]


def epoch_curves(runs: dict[str, list[list[dict]]], modalities: list[str], path: Path, title: str = "") -> Path:
    """Validation accuracy, EDM and φ_m per epoch (mean over seeds), and the modality order per epoch.

    ``runs`` maps a label to the ``epochs.csv`` rows of each of its seeds. The order panel appears
    when a method logs an ``order`` column (e.g. ``visual>audio``); it shows the first seed's order.
    """
    plt = _pyplot()
    orders = {label: [r.get("order") for r in seeds[0]] for label, seeds in runs.items() if "order" in seeds[0][0]}
    panels = 3 + bool(orders)
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.4), squeeze=False)
    axes = axes[0]
    for label, seeds in runs.items():
        axes[0].plot(*_mean_curve(seeds, "val_acc"), label=label)
        axes[1].plot(*_mean_curve(seeds, "val_edm"), label=label)
        for m, style in zip(modalities, ("-", "--", ":", "-.")):
            if f"val_phi_{m}" in seeds[0][0]:
                axes[2].plot(*_mean_curve(seeds, f"val_phi_{m}"), style, label=f"{label} φ {m}" if len(runs) > 1 else f"φ {m}")
    for ax, name in zip(axes, ("validation accuracy (%)", "validation EDM", "validation Shapley φ_m")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    if orders:
        names = sorted({o for seq in orders.values() for o in seq if o})
        for label, seq in orders.items():
            axes[3].step(range(1, len(seq) + 1), [names.index(o) if o else None for o in seq], where="post", label=label)
        axes[3].set_yticks(range(len(names)), names)
        axes[3].set_xlabel("epoch")
        axes[3].set_ylabel("chain order")
        axes[3].grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[2].legend(fontsize=7)
    return _save(plt, fig, path, title)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def grid_curves(summary: list[dict], selected: str, path: Path, title: str = "") -> Path:
    """Validation and test accuracy (mean ± std over seeds) against the swept axis: the τ / β curves.

    One panel per stage of a staged protocol. The first axis that varies is the x axis; other varying
    axes make one line per combination. The selected config is starred.
    """
    plt = _pyplot()
    stages = sorted({row.get("stage") or 0 for row in summary})
    fig, axes = plt.subplots(1, len(stages), figsize=(5.5 * len(stages), 3.8), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        rows = [r for r in summary if (r.get("stage") or 0) == stage]
        varying = [k for k in rows[0]["values"] if len({str(r["values"][k]) for r in rows}) > 1]
        x_axis = varying[0] if varying else None
        lines: dict[str, list[dict]] = {}
        for r in rows:
            key = ", ".join(f"{k}={r['values'][k]}" for k in varying[1:])
            lines.setdefault(key, []).append(r)
        categories = [] if x_axis is None else list(dict.fromkeys(str(r["values"][x_axis]) for r in rows))
        numeric = x_axis is not None and all(_is_number(r["values"][x_axis]) for r in rows)
        for key, points in lines.items():
            xs = [(r["values"][x_axis] if numeric else categories.index(str(r["values"][x_axis]))) if x_axis else 0
                  for r in points]
            suffix = f" ({key})" if key else ""
            ax.errorbar(xs, [r["val_acc"] for r in points], [r["val_acc_std"] for r in points], marker="o", capsize=3,
                        label=f"validation{suffix}")
            ax.errorbar(xs, [r["test_acc"] for r in points], [r["test_acc_std"] for r in points], marker="s", capsize=3,
                        linestyle="--", label=f"test{suffix}")
            for x, r in zip(xs, points):
                if r["config"] == selected:
                    ax.plot([x], [r["val_acc"]], "*", markersize=16, color="gold", markeredgecolor="black", zorder=5)
                if r.get("stopped_at") is not None:
                    ax.annotate(f"stop@{r['stopped_at']}", (x, r["val_acc"]), fontsize=6, alpha=0.7)
        if x_axis is not None and not numeric:
            ax.set_xticks(range(len(categories)), categories, rotation=30)
        ax.set_xlabel(x_axis or "config")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"stage {stage}" if stage else (title or "grid"), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(plt, fig, path, "")  # the title is already on the panels


def robustness_curves(summary: list[dict], path: Path, title: str = "") -> Path:
    """Test accuracy (mean ± std over seeds) against the missing rate, one line per method and one
    panel per protocol."""
    plt = _pyplot()
    protocols = list(dict.fromkeys(r["protocol"] for r in summary))
    fig, axes = plt.subplots(1, len(protocols), figsize=(5 * len(protocols), 3.8), squeeze=False, sharey=True)
    for ax, protocol in zip(axes[0], protocols):
        rows = [r for r in summary if r["protocol"] == protocol]
        for method in dict.fromkeys(r["method"] for r in rows):
            points = sorted((r for r in rows if r["method"] == method), key=lambda r: r["rate"])
            ax.errorbar([100 * r["rate"] for r in points], [r["test_acc"] for r in points],
                        [r["test_acc_std"] for r in points], marker="o", capsize=3, label=method)
        ax.set_title({"mla": "masked in train, val and test (MLA)", "test-only": "masked at test only (EDM Table VI)"}
                     .get(protocol, protocol), fontsize=10)
        ax.set_xlabel("missing rate η (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("test accuracy (%)")
    return _save(plt, fig, path, title)
