"""Tests for the PNG plots: loss curves and caption/image sample grids (also read from a Parquet store)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from synray.viz import loss_curve, sample_grid, sample_grid_from_store


def _png(seed: int, size: int = 32) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _rows(n: int, per_row: int = 3) -> list[dict]:
    return [{"caption": f"a photo number {i} of a small red bicycle leaning on a wooden fence near a river "
                        f"at sunset, with long shadows",
             "images": [_png(10 * i + j) for j in range(per_row)]} for i in range(n)]


def _png_size(path: Path) -> tuple[int, int]:
    assert path.exists() and path.stat().st_size > 1000
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.size


def test_loss_curve_with_and_without_extra_panels(tmp_path: Path) -> None:
    metrics = [{"step": s, "loss": 5.0 / (1 + s), "lr": 1e-3 * (1 - s / 20), "data_wait_fraction": 0.1 + 0.01 * s}
               for s in range(20)]
    metrics.insert(5, {"event": "worker_failure", "ranks": [1]})
    full = loss_curve(metrics, tmp_path / "plots" / "loss.png")
    w_full, h_full = _png_size(full)
    assert w_full == 700 and h_full > 400
    plain = loss_curve([{"loss": 3.0}, {"loss": 2.0}, {"loss": float("nan")}], tmp_path / "plain.png")
    w, h = _png_size(plain)
    assert w == 700 and h < h_full
    with pytest.raises(ValueError, match="loss"):
        loss_curve([{"step": 1, "lr": 0.1}], tmp_path / "none.png")


def test_sample_grid_limits_rows_and_images(tmp_path: Path) -> None:
    path = sample_grid(_rows(10, per_row=4), tmp_path / "grid.png", max_rows=3, max_images=2)
    w3, h3 = _png_size(path)
    path5 = sample_grid(_rows(5, per_row=4), tmp_path / "grid5.png", max_rows=8)
    w5, h5 = _png_size(path5)
    assert h5 > h3 and w5 >= w3
    # Rows may hold fewer images than others, or decoded arrays instead of bytes.
    uneven = [{"caption": "one", "images": [_png(1)]},
              {"caption": "two", "images": [np.zeros((16, 16, 3), np.uint8)] * 3}]
    _png_size(sample_grid(uneven, tmp_path / "uneven.png"))
    with pytest.raises(ValueError):
        sample_grid([], tmp_path / "empty.png")


def test_sample_grid_from_store(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    rows = _rows(5, per_row=2)
    schema = pa.schema([("caption", pa.string()), ("images", pa.list_(pa.binary())), ("label", pa.int64())])
    for k, chunk in enumerate([rows[:2], rows[2:]]):
        table = pa.Table.from_pylist([{**r, "label": i} for i, r in enumerate(chunk)], schema=schema)
        pq.write_table(table, store / f"shard-{k:05d}.parquet")
    (store / "_store.json").write_text("{}")
    out = sample_grid_from_store(store, tmp_path / "store.png", rows=4)
    _, h4 = _png_size(out)
    _, h2 = _png_size(sample_grid_from_store(store, tmp_path / "store2.png", rows=2))
    assert h4 > h2
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="shard"):
        sample_grid_from_store(empty, tmp_path / "x.png")
    with pytest.raises(ValueError, match="does not exist"):
        sample_grid_from_store(tmp_path / "missing", tmp_path / "x.png")


def test_compare_bars_draws_present_metrics(tmp_path):
    from PIL import Image

    from synray.viz import compare_bars

    results = {"m=4": {"trained": {"knn_accuracy": 0.4, "segmentation_miou": 0.3}, "init": {"knn_accuracy": 0.15}},
               "CE": {"trained": {"knn_accuracy": 0.5}, "init": {"knn_accuracy": 0.15}}}
    path = compare_bars(results, {"knn_accuracy": "kNN", "linear_accuracy": "linear", "segmentation_miou": "mIoU"},
                        tmp_path / "c.png", chance=0.11)
    with Image.open(path) as img:
        assert img.size[0] > img.size[1] > 100
    with pytest.raises(ValueError, match="nothing to plot"):
        compare_bars(results, {"zeroshot_accuracy": "zero-shot"}, tmp_path / "d.png")
