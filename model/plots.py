"""PNG charts of evaluation results and training progress (matplotlib, headless Agg backend)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.backend_bases import FigureCanvasBase  # noqa: E402

from model.errors import ConfigError  # noqa: E402
from model.evaluate import EvalResult  # noqa: E402

EVAL_METRICS = ("recall@20", "mrr@20", "ndcg@20")


def writable_formats() -> list[str]:
    """The file extensions matplotlib's savefig can write here (png, pdf, svg, ...)."""
    return sorted(FigureCanvasBase.get_supported_filetypes())  # what savefig consults, without making a figure


def check_format(path: str | Path, flag: str) -> None:
    """Refuse a chart path whose extension savefig cannot write, before the work whose result it charts;
    a path without one would be written under another name (`out` becomes `out.png`)."""
    suffix = Path(path).suffix.lower().lstrip(".")
    formats = writable_formats()
    if suffix not in formats:
        problem = f"matplotlib cannot write {Path(path).suffix!r} files" if suffix else "no extension names the format"
        raise ConfigError(f"{flag} {path}: {problem} (it writes {', '.join('.' + f for f in formats)})")


def save_figure(fig, path: str | Path, dpi: int | None = None) -> Path:
    """Lay the figure out, write it as a PNG (creating the folder) and free it: every chart ends here."""
    path = Path(path)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_eval_table(result: EvalResult, path: str | Path, metrics: tuple[str, ...] = EVAL_METRICS) -> Path:
    """Grouped bars: one group per model, one bar per metric, value printed on each bar."""
    path = Path(path)
    names = list(result.models)
    metrics = tuple(m for m in metrics if any(m in result.models[n] for n in names)) or metrics
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(names) + 2.5), 4.5), dpi=120)
    x = np.arange(len(names))
    width = 0.8 / max(1, len(metrics))
    for j, m in enumerate(metrics):
        vals = [result.models[n].get(m, np.nan) for n in names]
        bars = ax.bar(x + (j - (len(metrics) - 1) / 2) * width, vals, width, label=m)
        ax.bar_label(bars, fmt="%.3f", fontsize=6, padding=1, rotation=90)
    ax.set_xticks(x, names, rotation=25, ha="right", fontsize=8)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("score")
    ax.set_title(f"{result.protocol}: {result.n_test_events} test events", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", ncols=len(metrics))
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def plot_training_curve(history: list[dict], path: str | Path, metric: str = "val_mrr@20",
                        refit: list[dict] | None = None, calibrated: tuple[float, float] | None = None) -> Path:
    """Training loss (left axis) and a validation metric (right axis) per epoch; entries lacking a value are
    skipped. `refit`: the refit run's history, its loss drawn dashed on the same axis. `calibrated`: (window
    offset, the metric with it), a dotted level on the metric's axis."""
    path = Path(path)
    epochs = [h.get("epoch", i + 1) for i, h in enumerate(history)]
    fig, ax = plt.subplots(figsize=(6.5, 4.0), dpi=120)
    loss = [(e, h["loss"]) for e, h in zip(epochs, history) if h.get("loss") is not None]
    if loss:
        ax.plot(*zip(*loss), "o-", color="tab:blue", label="train loss")
    again = [(h.get("epoch", i + 1), h["loss"]) for i, h in enumerate(refit or []) if h.get("loss") is not None]
    if again:
        ax.plot(*zip(*again), "x--", color="tab:blue", alpha=0.6, label="refit loss (validation sessions too)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss", color="tab:blue")
    ax.grid(alpha=0.3)
    val = [(e, h[metric]) for e, h in zip(epochs, history) if h.get(metric) is not None]
    handles, labels = ax.get_legend_handles_labels()
    if val:
        ax2 = ax.twinx()
        ax2.plot(*zip(*val), "s-", color="tab:orange", label=metric)
        if calibrated is not None:
            ax2.axhline(calibrated[1], ls=":", color="tab:red", label=f"{metric} calibrated (window offset {calibrated[0]:g})")
        ax2.set_ylabel(metric, color="tab:orange")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    speed = [h["events_per_s"] for h in history if h.get("events_per_s")]
    title = "training"
    if speed:
        title += f" ({np.mean(speed):,.0f} events/s)"
    ax.set_title(title, fontsize=10)
    if handles:
        ax.legend(handles, labels, fontsize=8, loc="best")
    if epochs:
        ax.set_xticks(sorted(set(int(e) for e in epochs)))
    return save_figure(fig, path)
