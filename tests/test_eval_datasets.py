"""Tests for evaluation datasets: Parquet / synray store / image-folder readers, extraction through Ray Data, errors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from synray.config import EvalConfig
from synray.eval.errors import EvalError
from synray.eval.datasets import (
    hf_label_names,
    image_folder_batch,
    inspect_dataset,
    normalise_parquet_batch,
    parquet_layout,
    scan_image_folder,
)
from synray.eval.evaluate import collect_rows, model_rows, rows_to_arrays
from synray.eval.feature_pass import extractor_stages
from synray.eval.registry import outputs_for
from synray.stages import build
from synray.eval.features import encode_images
from synray.eval.protocols import run_protocols
from synray.models.backbone import load_backbone

from eval_models import EMBED_DIM, SIZE, save_tiny_image_text
from procs import whole_share


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _image(label: int, k: int, size: int = 24) -> np.ndarray:
    colours = [(220, 40, 40), (40, 200, 60), (50, 80, 230)]
    arr = np.zeros((size, size, 3), np.uint8)
    arr[...] = colours[label]
    arr[: 2 + k % 5, :] = 30
    return arr


def _mask(label: int, size: int = 16) -> np.ndarray:
    m = np.zeros((size, size), np.uint8)
    m[size // 2:, :] = 1 + label
    return m


@pytest.fixture(scope="module")
def model_dir(tiny_models: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> str:
    """An image-text model directory (its backbone alone serves kNN, linear and segmentation)."""
    return str(save_tiny_image_text(tiny_models["text"], tmp_path_factory.mktemp("eval_model")))


def _write_parquet(path: Path, columns: dict, metadata: dict | None = None) -> Path:
    table = pa.table(columns)
    if metadata:
        table = table.replace_schema_metadata(metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


# ------------------------------------------------------------------------------- pure readers
def test_parquet_layouts_and_their_errors() -> None:
    flat = pa.schema([("image", pa.binary()), ("label", pa.int64()), ("mask", pa.binary()),
                      ("class_name", pa.string()), ("split", pa.string())])
    layout = parquet_layout(flat, "x.parquet")
    assert (layout.image, layout.multi, layout.mask, layout.name, layout.split) == ("image", False, "mask",
                                                                                    "class_name", "split")
    store = pa.schema([("images", pa.list_(pa.binary())), ("masks", pa.list_(pa.binary())),
                       ("label", pa.int64()), ("concept", pa.string())])
    layout = parquet_layout(store, "s")
    assert layout.multi and layout.mask == "masks" and layout.name == "concept"
    hf = pa.schema([("img", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("label", pa.int64())])
    assert parquet_layout(hf, "hf").image == "img"
    with pytest.raises(EvalError, match=r"no image column; bad.parquet has the columns \['caption', 'label'\]; "
                                        r"expected image \(bytes\) \+ label"):
        parquet_layout(pa.schema([("caption", pa.string()), ("label", pa.int64())]), "bad.parquet")
    with pytest.raises(EvalError, match="no 'label' column"):
        parquet_layout(pa.schema([("image", pa.binary())]), "nolabel")
    with pytest.raises(EvalError, match="integer class indices"):
        parquet_layout(pa.schema([("image", pa.binary()), ("label", pa.string())]), "strlabel")
    assert parquet_layout(pa.schema([("image", pa.binary()), ("mask", pa.binary())]), "m").label is None


def test_normalise_batches_and_hugging_face_names() -> None:
    hf = pa.schema([("img", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("label", pa.int64())],
                   metadata={b"huggingface": json.dumps({"info": {"features": {"label": {
                       "names": ["cat", "dog"], "_type": "ClassLabel"}}}}).encode()})
    assert hf_label_names(hf) == {0: "cat", 1: "dog"}
    assert hf_label_names(pa.schema([("label", pa.int64())])) is None
    batch = {"img": np.array([{"bytes": b"a", "path": "x"}, {"bytes": b"b", "path": None}], dtype=object),
             "label": np.array([1, 0])}
    out = normalise_parquet_batch(batch, parquet_layout(hf, "hf"))
    assert [list(x) for x in out["images"]] == [[b"a"], [b"b"]] and out["label"].tolist() == [1, 0]
    store = pa.schema([("images", pa.list_(pa.binary())), ("masks", pa.list_(pa.binary())), ("label", pa.int64()),
                       ("concept", pa.string())])
    batch = {"images": np.array([np.array([b"i1", b"i2"], dtype=object)], dtype=object),
             "masks": np.array([np.array([b"m1", b"m2"], dtype=object)], dtype=object),
             "label": np.array([4]), "concept": np.array(["star"], dtype=object)}
    out = normalise_parquet_batch(batch, parquet_layout(store, "s"))
    assert list(out["images"][0]) == [b"i1", b"i2"] and list(out["masks"][0]) == [b"m1", b"m2"]
    assert out["class_name"].tolist() == ["star"]


def test_image_folder_scan(tmp_path: Path) -> None:
    for split, n in (("train", 2), ("test", 1)):
        for name in ("zebra", "ant"):
            d = tmp_path / "split" / split / name
            d.mkdir(parents=True)
            for k in range(n):
                Image.fromarray(_image(0, k)).save(d / f"{k}.png")
    (tmp_path / "split" / "train" / "ant" / "notes.txt").write_text("not an image")
    folder = scan_image_folder(tmp_path / "split")
    assert folder.class_names == ["ant", "zebra"] and folder.split_layout and len(folder.files) == 6
    assert folder.files == sorted(folder.files)
    assert [Path(f).relative_to(tmp_path / "split").parts[:2] for f in folder.files[:3]] == [
        ("test", "ant"), ("test", "zebra"), ("train", "ant")]
    source = inspect_dataset(tmp_path / "split" / "train")
    assert source.kind == "image-folder" and source.class_names == {0: "ant", 1: "zebra"}
    assert not source.folder.split_layout and not source.has_masks and source.has_labels
    batch = {"bytes": np.array([b"x", b"y"], dtype=object),
             "path": np.array([folder.files[0], folder.files[-1]], dtype=object)}
    rows = image_folder_batch(batch, {"ant": 0, "zebra": 1}, split_layout=True)
    assert rows["label"].tolist() == [0, 1] and list(rows["split"]) == ["test", "train"]
    assert list(rows["class_name"]) == ["ant", "zebra"] and [list(x) for x in rows["images"]] == [[b"x"], [b"y"]]
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(EvalError, match="no Parquet files and no class folders with images"):
        inspect_dataset(tmp_path / "empty")
    with pytest.raises(EvalError, match="does not exist"):
        inspect_dataset(tmp_path / "missing")
    (tmp_path / "file.csv").write_text("a,b\n")
    with pytest.raises(EvalError, match="not .parquet"):
        inspect_dataset(tmp_path / "file.csv")


# ---------------------------------------------------------------------- through Ray Data
def extract_arrays(source, model_dir: str, protocols: tuple[str, ...], batch_size: int):
    """A dataset's arrays as the evaluation path (synray.eval.evaluate.evaluate_models) makes them: read by Ray Data,
    a pool of feature actors, collected in input order, flattened for one model."""
    from synray.eval.datasets import source_dataset
    from synray.stages import Stage

    read = Stage((), lambda _: source_dataset(source))
    stages = extractor_stages(EvalConfig(batch_size=batch_size), SIZE, protocols, {"m": model_dir})
    outputs = outputs_for(protocols)
    rows = model_rows(collect_rows(build([read, *stages]), source.path), "m", outputs)
    return rows_to_arrays(rows, SIZE, outputs, source.class_names, source.has_labels)


def test_parquet_with_masks_through_ray(ray_cluster: str, tmp_path: Path, model_dir: str) -> None:
    from synray.models.image_text import load_image_text

    labels = [0, 1, 2, 0, 1, 2, 0, 1]
    images = [_image(lab, k) for k, lab in enumerate(labels)]
    path = _write_parquet(tmp_path / "ds" / "part-0.parquet", {
        "image": [_png(a) for a in images], "label": labels, "mask": [_png(_mask(lab)) for lab in labels],
        "class_name": [["red", "green", "blue"][lab] for lab in labels],
        "split": ["train"] * 5 + ["test"] * 3})
    source = inspect_dataset(path.parent)
    assert source.kind == "parquet" and source.has_masks and source.has_labels
    arrays = extract_arrays(source, model_dir, ("knn", "segmentation", "zeroshot"), batch_size=3)
    assert arrays.labels.tolist() == labels and arrays.groups.tolist() == list(range(8))  # input order kept
    assert arrays.class_names == {0: "red", 1: "green", 2: "blue"}
    assert list(arrays.split) == ["train"] * 5 + ["test"] * 3
    assert arrays.masks.shape == (8, SIZE, SIZE) and set(np.unique(arrays.masks[1])) == {0, 2}
    encoder = load_backbone(model_dir)
    stacked = np.stack(images)
    np.testing.assert_allclose(arrays.features.numpy(), encode_images(encoder, stacked, SIZE)["features"].numpy(),
                               rtol=1e-4, atol=1e-5)
    assert arrays.patch_tokens.shape == (8, 16, EMBED_DIM)
    torch.testing.assert_close(arrays.patch_tokens, encode_images(encoder, stacked, SIZE, outputs=("patch_tokens",))["patch_tokens"],
                               rtol=1e-4, atol=1e-5)
    image_text = load_image_text(model_dir)
    with torch.no_grad():
        expected = image_text[0].image_projection(encode_images(encoder, stacked, SIZE)["features"])
    torch.testing.assert_close(arrays.image_embeds, expected, rtol=1e-4, atol=1e-5)
    cfg = EvalConfig(knn_k=3, linear_epochs=3, segmentation_epochs=2, zeroshot_templates=["a {}."])
    out = run_protocols(arrays, ["knn", "linear", "zeroshot", "segmentation"], cfg, image_text=image_text)
    assert out["split"] == "split column" and out["num_reference"] == 5 and out["num_query"] == 3
    assert out["zeroshot_num_classes"] == 3 and out["segmentation_num_classes"] == 4
    assert whole_share(out["zeroshot_accuracy"], 3)   # a share of the 3 query images
    assert out["segmentation_pixel_accuracy"] * 3 * SIZE * SIZE == pytest.approx(
        round(out["segmentation_pixel_accuracy"] * 3 * SIZE * SIZE), abs=1e-3)   # ... and of their pixels
    present = [v for v in out["segmentation_iou_per_class"] if v is not None]
    assert out["segmentation_miou"] == pytest.approx(sum(present) / len(present), abs=1e-5)
    objects = [v for c, v in enumerate(out["segmentation_iou_per_class"]) if v is not None and c != 0]
    assert out["segmentation_miou_objects"] == pytest.approx(sum(objects) / len(objects), abs=1e-5)


def test_synray_store_through_ray(ray_cluster: str, tmp_path: Path, model_dir: str) -> None:
    from synray.eval.datasets import source_dataset
    from synray.eval.features import FeatureExtractor

    store = tmp_path / "store"
    _write_parquet(store / "shard-a.parquet", {
        "caption_id": ["c0", "c1", "c2"], "label": [2, 0, 2], "concept": ["star", "circle", "star"],
        "images": [[_png(_image(0, k)) for k in range(3)] for _ in range(3)],
        "masks": [[_png(_mask(0)) for _ in range(3)] for _ in range(3)]})
    (store / "_store.json").write_text("{}")
    source = inspect_dataset(store)
    assert source.kind == "synray-store" and source.layout.multi
    # read and normalised by Ray Data; the extractor (an actor in the evaluation path) runs here on the batch
    batch = source_dataset(source).take_batch(batch_size=10, batch_format="numpy")
    assert set(batch) == {"images", "label", "masks", "class_name"}
    out = FeatureExtractor(model_dir, image_size=SIZE, drop_images=True)(batch)
    rows = [{k: v[i] for k, v in out.items()} for i in range(len(out["label"]))]
    arrays = rows_to_arrays(rows, SIZE, ("features",), source.class_names, source.has_labels)
    assert arrays.labels.tolist() == [2, 2, 2, 0, 0, 0, 2, 2, 2]
    assert arrays.groups.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and arrays.features.shape == (9, EMBED_DIM)
    assert arrays.class_names == {0: "circle", 2: "star"} and arrays.masks.shape == (9, SIZE, SIZE)


def test_errors_raised_inside_ray_tasks_are_recognised() -> None:
    from synray.eval.evaluate import _eval_error_in

    text = ("ray::MapWorker(...).submit()\n  File \"datasets.py\", line 104\n"
            "synray.eval.errors.EvalError: an image or mask entry is empty (no encoded bytes)\n"
            "The above exception was the direct cause of the following exception:")
    assert _eval_error_in(RuntimeError(text)) == "an image or mask entry is empty (no encoded bytes)"
    assert _eval_error_in(RuntimeError("something else")) is None


def test_a_generated_held_out_set_is_its_first_rows_by_row_id_in_every_execution(ray_cluster: str) -> None:
    """The held-out stream plans more rows than it keeps (captions.oversample) and limits them; each
    execution must keep the same rows, the first by row id, not the first to finish (two evaluations of
    one network once scored kNN 0.168 and 0.169 on differing sets)."""
    from synray.captions.stage import PlanRows
    from synray.plan import heldout_config, load_run_config, plan_run
    from synray.pipelines import build_heldout

    cfg = load_run_config("shapes", ["eval.heldout_captions=160", "captions.oversample=2.0",
                                     "images.per_caption=2", "images.pool_size=2"])
    plan = plan_run(cfg)
    assert plan.heldout.generation.plan_rows == 320 and plan.heldout.generation.wanted == 160
    planner = PlanRows(heldout_config(cfg))
    first = [planner.plan(i)["caption_id"] for i in range(160)]
    for _ in range(2):
        rows = collect_rows(build_heldout(plan.heldout, plan.cfg), "held-out")
        assert [r["caption_id"] for r in rows] == first


def test_repeated_captions_never_straddle_the_reference_query_split() -> None:
    """Rows of one image each (a Parquet set's layout) whose captions repeat, in other case, spacing and end
    punctuation: after the split every caption lies on one side only, in every protocol (they share the split)."""
    from synray.eval.evaluate import caption_key
    from synray.eval.protocols import fit_validation, reference_query

    rng = np.random.default_rng(0)
    base = [f"a {colour} {shape} on grass" for colour in ("red", "blue", "green", "black") for shape in
            ("circle", "star", "square")]
    variants = (lambda c: c, lambda c: c.upper() + ".", lambda c: "  " + c.replace(" ", "   ") + " !")
    captions = [variants[rng.integers(3)](base[i]) for i in rng.integers(0, len(base), 240)]
    batch = normalise_parquet_batch({"image": [b"x"] * 240, "label": [base.index(caption_key(c)) % 3 for c in captions],
                                     "text": captions}, parquet_layout(pa.schema([("image", pa.binary()),
                                                                                  ("label", pa.int64()),
                                                                                  ("text", pa.string())]), "t"))
    rows = [{k: v[i] for k, v in batch.items()} for i in range(240)]
    for seed in range(5):
        arrays = rows_to_arrays(rows, 8, ())
        ref, query, _ = reference_query(arrays, seed=seed)
        keys = np.asarray([caption_key(c) for c in captions])
        assert not set(keys[ref]) & set(keys[query]) and ref.size and query.size
        fit, val = fit_validation(arrays, ref, 0.2, seed)
        assert not set(keys[fit]) & set(keys[val]) and fit.size and val.size
    assert len(np.unique(arrays.groups)) == len(set(keys)) == len(base)


def _tar(path: Path, samples: list[dict[str, bytes]]) -> Path:
    import tarfile

    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for i, sample in enumerate(samples):
            for ext, data in sample.items():
                info = tarfile.TarInfo(f"sample{i:05d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_webdataset_shards_with_split_folders_through_ray(ray_cluster: str, tmp_path: Path, model_dir: str) -> None:
    """WebDataset tars (jpg/png + cls + txt per sample) in train/ and test/ folders: the folder gives the split,
    cls the label, txt the caption, and the features equal the encoder's on the decoded images."""
    labels = {"train": [0, 1, 2, 0, 1], "test": [2, 0, 1]}
    images = {split: [_image(lab, k) for k, lab in enumerate(labs)] for split, labs in labels.items()}
    for split, labs in labels.items():
        _tar(tmp_path / "wds" / split / "shard-000000.tar",
             [{"png": _png(img), "cls": str(lab).encode(), "txt": f"a shape of class {lab}".encode()}
              for img, lab in zip(images[split], labs)])
    source = inspect_dataset(tmp_path / "wds")
    assert source.kind == "webdataset" and source.has_labels and len(source.files) == 2
    arrays = extract_arrays(source, model_dir, ("knn",), batch_size=3)
    order = sorted(range(8), key=lambda i: (arrays.split[i], i))   # shards may arrive in either order
    assert sorted(arrays.labels.tolist()) == sorted(labels["train"] + labels["test"])
    assert list(arrays.split).count("train") == 5 and list(arrays.split).count("test") == 3
    stacked = np.stack(images["test"] + images["train"])
    expected = encode_images(load_backbone(model_dir), stacked, SIZE)["features"].numpy()
    np.testing.assert_allclose(arrays.features.numpy()[order], expected, rtol=1e-4, atol=1e-5)
    assert len(np.unique(arrays.groups)) == 3   # the three distinct captions
    out = run_protocols(arrays, ["knn"], EvalConfig(knn_k=3))
    assert out["split"] == "split column" and (out["num_reference"], out["num_query"]) == (5, 3)


def test_a_webdataset_without_a_class_index_is_refused_naming_its_keys(tmp_path: Path) -> None:
    _tar(tmp_path / "bad" / "shard-0.tar", [{"jpg": b"x", "json": b"{}"}])
    with pytest.raises(EvalError, match=r"has the keys \['jpg', 'json'\]; expected an image .* and a class index"):
        inspect_dataset(tmp_path / "bad")
