"""Plots written as PNG files (matplotlib's Agg canvas, no pyplot): training curves and caption/image sample grids."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter

from synray.data.codecs import decode_image
from synray.data.store import StoreError

__all__ = ["loss_curve", "sample_grid", "sample_grid_from_store", "compare_bars", "scaling_plot", "allocation_plot"]

#: secondary panels of loss_curve, drawn when the metrics hold them: key -> axis label
EXTRA_SERIES = {"lr": "learning rate", "data_wait_fraction": "data-wait fraction"}


def _figure(figsize: tuple[float, float]) -> Any:
    """A pyplot-free figure (no global state, no GUI): saved through the Agg canvas."""
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _series(metrics: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the rows holding a finite number under ``key``; rows without a step use their index."""
    xs, ys = [], []
    for i, m in enumerate(metrics):
        v = m.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
            continue
        step = m.get("step", i)
        xs.append(float(step if isinstance(step, (int, float)) else i))
        ys.append(float(v))
    return xs, ys


def _save(fig: Any, path: str | Path, dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path


def loss_curve(metrics: Sequence[Mapping[str, Any]], path: str | Path, title: str | None = None,
               dpi: int = 100) -> Path:
    """Loss against step, with learning rate and data-wait fraction in panels below when present.

    ``metrics`` are report rows (e.g. the lines of ``metrics.jsonl``); rows without a numeric
    ``loss`` (events) are skipped for the loss panel. ValueError when no row has a loss.
    """
    steps, losses = _series(metrics, "loss")
    if not losses:
        raise ValueError("no metrics row holds a numeric 'loss'; nothing to plot")
    extras = [(key, label, *_series(metrics, key)) for key, label in EXTRA_SERIES.items()]
    extras = [e for e in extras if e[3]]
    n = 1 + len(extras)
    fig = _figure((7, 3 + 1.6 * (n - 1)))
    axes = fig.subplots(n, 1, sharex=True, squeeze=False, gridspec_kw={"height_ratios": [2.5] + [1] * (n - 1)})
    ax = axes[0, 0]
    ax.plot(steps, losses, marker="." if len(losses) < 50 else None, color="tab:blue")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.set_title(title or f"training loss ({len(losses)} reports, last {losses[-1]:.4g})")
    colors = ["tab:orange", "tab:green"]
    for i, (key, label, xs, ys) in enumerate(extras, start=1):
        a = axes[i, 0]
        a.plot(xs, ys, color=colors[(i - 1) % len(colors)])
        a.set_ylabel(label)
        a.grid(alpha=0.3)
        if key == "data_wait_fraction":
            a.set_ylim(0.0, 1.0)
        elif key == "lr":
            a.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    return _save(fig, path, dpi)


def _decode(data: Any) -> np.ndarray:
    if isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 3:
        return data
    return decode_image(data)


def _images_of(row: Mapping[str, Any]) -> list[Any]:
    images = row.get("images")
    return [] if images is None else list(images)


def sample_grid(rows: Sequence[Mapping[str, Any]], path: str | Path, max_rows: int = 8,
                max_images: int | None = None, wrap: int = 60, cell: float = 1.6, dpi: int = 100) -> Path:
    """One line per caption: its images side by side under the wrapped caption text.

    ``rows`` hold ``images`` (encoded PNG/JPEG bytes, or uint8 [H, W, 3] arrays) and ``caption``.
    At most ``max_rows`` rows and ``max_images`` images per row are drawn.
    """
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    chosen = list(rows)[:max_rows]
    if not chosen:
        raise ValueError("no rows to draw")
    decoded = [[_decode(d) for d in _images_of(r)[:max_images]] for r in chosen]
    ncols = max(1, max(len(d) for d in decoded))
    captions = [textwrap.fill(str(r.get("caption", "")), width=max(20, wrap)) for r in chosen]
    heights = [cell + 0.18 * (c.count("\n") + 1) for c in captions]
    width = max(cell * ncols, 4.0)
    fig = _figure((width, sum(heights)))
    subfigs = np.atleast_1d(fig.subfigures(len(chosen), 1, height_ratios=heights))
    for sub, imgs, caption in zip(subfigs, decoded, captions):
        sub.suptitle(caption, fontsize=8, y=0.99, va="top")
        axes = np.atleast_1d(sub.subplots(1, ncols))
        for j, ax in enumerate(axes):
            ax.set_axis_off()
            if j < len(imgs):
                ax.imshow(imgs[j])
        sub.subplots_adjust(left=0.01, right=0.99, bottom=0.02, wspace=0.04,
                            top=max(0.5, 1.0 - 0.18 * (caption.count("\n") + 1.4) / (cell + 0.5)))
    return _save(fig, path, dpi)


def sample_grid_from_store(store_dir: str | Path, out_path: str | Path, rows: int = 8,
                           max_images: int | None = None) -> Path:
    """A :func:`sample_grid` of the first ``rows`` rows of a Parquet store's ``shard-*.parquet`` files."""
    store = Path(store_dir)
    if not store.is_dir():
        raise StoreError(f"store directory {store} does not exist")
    shards = sorted(store.glob("shard-*.parquet"))
    if not shards:
        raise StoreError(f"store directory {store} holds no shard-*.parquet files (a store `synray generate` wrote)")
    picked: list[dict[str, Any]] = []
    for shard in shards:
        pf = pq.ParquetFile(shard)
        missing = [c for c in ("caption", "images") if c not in pf.schema_arrow.names]
        if missing:
            raise StoreError(f"shard {shard} lacks the columns {missing}")
        for batch in pf.iter_batches(batch_size=max(1, rows), columns=["caption", "images"]):
            picked.extend(batch.to_pylist()[:rows - len(picked)])
            if len(picked) >= rows:
                break
        if len(picked) >= rows:
            break
    if not picked:
        raise StoreError(f"the shards of {store} hold no rows")
    return sample_grid(picked, out_path, max_rows=rows, max_images=max_images)


def compare_bars(results: Mapping[str, Mapping[str, Mapping[str, float]]], metrics: Mapping[str, str],
                 path: str | Path, title: str = "", chance: float | None = None, dpi: int = 100) -> Path:
    """Grouped bars: one group per metric, one bar per variant (trained), with its init value as a tick.

    ``results``: variant -> {"trained": {metric: value}, "init": {...}}; ``metrics``: key -> axis label.
    A dotted line marks ``chance`` (for accuracies) when given.
    """
    variants = list(results)
    keys = [k for k in metrics if any(k in results[v]["trained"] for v in variants)]
    if not variants or not keys:
        raise ValueError("nothing to plot: no variant holds any of the metrics")
    fig = _figure((1.6 + 2.2 * len(keys), 3.8))
    ax = fig.subplots()
    width = 0.8 / len(variants)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:cyan"]
    for i, v in enumerate(variants):
        xs = [j + (i - (len(variants) - 1) / 2) * width for j in range(len(keys))]
        trained = [results[v]["trained"].get(k, np.nan) for k in keys]
        init = [results[v].get("init", {}).get(k, np.nan) for k in keys]
        ax.bar(xs, trained, width * 0.92, label=v, color=colors[i % len(colors)])
        ax.scatter(xs, init, marker="_", s=300, color="black", zorder=3,
                   label="same network at initialisation" if i == 0 else None)
        for x, t in zip(xs, trained):
            if np.isfinite(t):
                ax.annotate(f"{t:.2f}", (x, t), ha="center", va="bottom", fontsize=7)
    if chance is not None:
        ax.axhline(chance, color="gray", linestyle=":", linewidth=1, label=f"chance accuracy ({chance:.2f})")
    ax.set_xticks(range(len(keys)), [metrics[k] for k in keys])
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path, dpi)


def scaling_plot(fits: Mapping[str, Any], path: str | Path, error: str, unit: str, title: str = "",
                 reference: float | None = None, dpi: int = 100) -> Path:
    """Error against data scale on log axes, one colour per method: its trials as points and its fitted power
    law as a line, labelled with the exponent k and its interval.

    ``fits``: method -> a fit with ``scales``, ``errors``, ``law`` (callable, with ``k``), ``form``, ``k_low``
    and ``k_high`` (`synray.sweep.fit.ScalingFit`).
    """
    if not fits:
        raise ValueError("nothing to plot: no fitted method")
    fig = _figure((6.0, 4.2))
    ax = fig.subplots()
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    for i, (name, fit) in enumerate(fits.items()):
        color = colors[i % len(colors)]
        ns = np.asarray(fit.scales, dtype=float)
        ax.scatter(ns, fit.errors, color=color, s=18, zorder=3)
        grid = np.geomspace(ns.min(), ns.max(), 100)
        ax.plot(grid, fit.law(grid), color=color, linewidth=1.2,
                label=f"{name}: k = {fit.law.k:.2f} [{fit.k_low:.2f}, {fit.k_high:.2f}], {fit.form}")
    if reference is not None:
        ax.axhline(reference, color="gray", linestyle=":", linewidth=1,
                   label=f"same network at initialisation ({reference:.3f})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%.2f"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%.2f"))
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_xlabel(f"data scale ({'captions x images per caption' if unit == 'images' else 'captions'})")
    ax.set_ylabel(f"error ({error})")
    ax.grid(which="both", alpha=0.3)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path, dpi)


def allocation_plot(fit: Any, trials: Sequence[Mapping[str, Any]], plans: Mapping[float, Sequence[Any]],
                    iso_cost: Mapping[float, tuple[Sequence[float], Sequence[float]]], path: str | Path, error: str,
                    device: str, title: str = "", dpi: int = 100) -> Path:
    """The fitted error(N, m) as filled contours over captions N and images per caption m (log axes), the trials as
    points labelled with their measured error, one iso-cost curve per budget and its best split as a star.

    ``fit``: callable (n, m) -> error (`synray.sweep.allocation.AllocationFit`); ``trials``: dicts with captions,
    images_per_caption and error; ``plans``: budget -> splits (with captions, per_caption), best first;
    ``iso_cost``: budget -> (m values, the captions that budget pays for at each)."""
    n_pts = np.array([t["captions"] for t in trials], dtype=float)
    m_pts = np.array([t["images_per_caption"] for t in trials], dtype=float)
    best = [s[0] for s in plans.values() if s]
    n_all = np.concatenate([n_pts, [s.captions for s in best]])
    ns = np.geomspace(n_all.min() / 1.5, n_all.max() * 1.5, 120)
    ms = np.geomspace(m_pts.min() / 1.2, m_pts.max() * 1.2, 80)
    grid_n, grid_m = np.meshgrid(ns, ms)
    fig = _figure((6.4, 5.0))
    ax = fig.subplots()
    filled = ax.contourf(grid_n, grid_m, fit(grid_n, grid_m), levels=14, cmap="viridis_r", alpha=0.85)
    fig.colorbar(filled, ax=ax, label=f"predicted error ({error})")
    ax.scatter(n_pts, m_pts, c="white", edgecolors="black", s=28, zorder=4, label="trials (measured error)")
    for t in trials:
        ax.annotate(f"{t['error']:.3f}", (t["captions"], t["images_per_caption"]), fontsize=6,
                    xytext=(3, 3), textcoords="offset points")
    for i, (budget, (m_curve, n_curve)) in enumerate(iso_cost.items()):
        color = f"C{i % 10}"
        ax.plot(n_curve, m_curve, color=color, linewidth=1.4, label=f"{budget:g} {device}-s")
        splits = plans.get(budget)
        if splits:
            ax.scatter([splits[0].captions], [splits[0].per_caption], marker="*", s=160, color=color,
                       edgecolors="black", zorder=5)
    ax.set_xscale("log")
    ax.set_yscale("log", base=2)
    ax.set_xlim(ns[0], ns[-1])
    ax.set_ylim(ms[0], ms[-1])
    ax.set_xlabel("captions N")
    ax.set_ylabel("images per caption m")
    ax.set_yticks(sorted(set(m_pts)), [f"{v:g}" for v in sorted(set(m_pts))])
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=4, frameon=False,
              title="iso-cost curves (star: the best split of that budget)", title_fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path, dpi)
