"""Evaluation datasets read through Ray Data: Parquet files, synray stores, image folders and WebDataset shards, in
the canonical columns every protocol reads."""

from __future__ import annotations

import json
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from synray.data.storage import Location, is_uri
from synray.data.store import META_FILE, ParquetStore
from synray.eval.errors import EvalError

__all__ = ["IMAGE_EXTENSIONS", "ParquetLayout", "EvalSource", "parquet_layout", "hf_label_names",
           "normalise_parquet_batch", "scan_image_folder", "image_folder_batch", "scan_webdataset", "webdataset_batch",
           "inspect_dataset", "source_dataset"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
#: accepted names of the per-row image column(s), in order of preference
IMAGE_COLUMNS = ("image", "img")
NAME_COLUMNS = ("class_name", "concept")
#: accepted names of a caption column: rows with equal (normalised) captions stay on one side of a split
CAPTION_COLUMNS = ("caption", "text")
#: sub-folders of an image folder that hold a reference / query split of class folders
FOLDER_SPLITS = {"train": "train", "test": "test", "val": "val", "validation": "validation"}
EXPECTED = ("image (bytes) + label (int) [+ mask (PNG bytes), class_name, split], or a synray store's "
            "images (list) + label [+ masks, concept]")


# ------------------------------------------------------------------------------------ Parquet
@dataclass(frozen=True)
class ParquetLayout:
    """Which columns of a Parquet dataset hold what; ``multi``: a list of images (and masks) per row."""

    image: str
    multi: bool = False
    label: str | None = "label"
    mask: str | None = None
    name: str | None = None
    split: str | None = None
    caption: str | None = None


def _is_binaryish(t: Any) -> bool:
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return True
    return pa.types.is_struct(t) and t.get_field_index("bytes") >= 0  # Hugging Face Image feature


def _is_list_of_binary(t: Any) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and _is_binaryish(t.value_type)


def parquet_layout(schema: Any, where: str) -> ParquetLayout:
    """The layout of a Parquet schema; EvalError naming the columns found and expected otherwise."""
    names = list(schema.names)
    found = f"{where} has the columns {sorted(names)}; expected {EXPECTED}"
    if "images" in names:
        if not _is_list_of_binary(schema.field("images").type):
            raise EvalError(f"column 'images' must be a list of encoded images; {found}")
        image, multi = "images", True
    else:
        image = next((c for c in IMAGE_COLUMNS if c in names), None)
        if image is None:
            raise EvalError(f"no image column; {found}")
        if not _is_binaryish(schema.field(image).type):
            raise EvalError(f"column {image!r} must hold encoded image bytes, not {schema.field(image).type}; {found}")
        multi = False
    mask_col = ("masks" if multi else "mask") if ("masks" if multi else "mask") in names else None
    label = "label" if "label" in names else None
    if label is not None and not pa.types.is_integer(schema.field(label).type):
        raise EvalError(f"column 'label' must hold integer class indices, not {schema.field(label).type} "
                        f"(put names in a class_name column); {found}")
    if label is None and mask_col is None:
        raise EvalError(f"no 'label' column (and no masks for a segmentation-only dataset); {found}")
    return ParquetLayout(image=image, multi=multi, label=label, mask=mask_col,
                         name=next((c for c in NAME_COLUMNS if c in names), None),
                         split="split" if "split" in names else None,
                         caption=next((c for c in CAPTION_COLUMNS if c in names), None))


def hf_label_names(schema: Any) -> dict[int, str] | None:
    """label -> name from a Hugging Face datasets export's ClassLabel metadata (None without one)."""
    meta = (schema.metadata or {}).get(b"huggingface")
    if not meta:
        return None
    try:
        feature = json.loads(meta)["info"]["features"]["label"]
    except (ValueError, KeyError, TypeError):
        return None
    names = feature.get("names") if isinstance(feature, dict) else None
    return {i: str(n) for i, n in enumerate(names)} if names else None


def _bytes_of(value: Any) -> bytes:
    if isinstance(value, Mapping):  # {"bytes": ..., "path": ...}
        value = value.get("bytes")
    if value is None:
        raise EvalError("an image or mask entry is empty (no encoded bytes)")
    return bytes(value)


def _object_column(values: Sequence[Any]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = list(values) if values else []
    return out


def _strings(values: Any) -> np.ndarray:
    return _object_column([v.decode() if isinstance(v, bytes) else (None if v is None else str(v)) for v in values])


def normalise_parquet_batch(batch: Mapping[str, np.ndarray], layout: ParquetLayout) -> dict[str, np.ndarray]:
    """One Parquet batch -> the canonical columns: ``images`` (list of bytes per row), ``label`` and,
    when the layout has them, ``masks``, ``split``, ``class_name``, ``caption``."""
    n = len(batch[layout.image])
    if layout.multi:
        images = [[_bytes_of(x) for x in (row if row is not None else [])] for row in batch[layout.image]]
    else:
        images = [[_bytes_of(x)] for x in batch[layout.image]]
    out = {"images": _object_column(images),
           "label": (np.asarray(batch[layout.label], dtype=np.int64) if layout.label
                     else np.zeros(n, dtype=np.int64))}
    if layout.mask:
        if layout.multi:
            masks = [[_bytes_of(x) for x in (row if row is not None else [])] for row in batch[layout.mask]]
        else:
            masks = [[_bytes_of(x)] for x in batch[layout.mask]]
        out["masks"] = _object_column(masks)
    if layout.split:
        out["split"] = _strings(batch[layout.split])
    if layout.name:
        out["class_name"] = _strings(batch[layout.name])
    if layout.caption:
        out["caption"] = _strings(batch[layout.caption])
    return out


# ------------------------------------------------------------------------------- image folders
@dataclass(frozen=True)
class ImageFolder:
    """Sorted image files of ``root/<class>/*`` (or ``root/<split>/<class>/*``) and the sorted class names."""

    files: list[str]
    class_names: list[str]
    split_layout: bool


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not p.name.startswith("."))


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_image_folder(root: str | Path) -> ImageFolder:
    """The files of an image-folder tree; labels are the index of the class folder in sorted order.

    With ``train/`` and ``test/`` (or ``val/`` / ``validation/``) sub-folders each holding class
    folders, the sub-folder gives the split and the classes are the union of both sides.
    """
    root = Path(root)
    top = _class_dirs(root)
    split_dirs = [d for d in top if d.name in FOLDER_SPLITS]
    split_layout = bool(split_dirs) and len(split_dirs) == len(top) and any(d.name == "train" for d in top)
    class_roots = [c for d in split_dirs for c in _class_dirs(d)] if split_layout else top
    per_class: dict[str, list[Path]] = {}
    for c in class_roots:
        per_class.setdefault(c.name, []).extend(_images_in(c))
    names = sorted(n for n, files in per_class.items() if files)
    if not names:
        raise EvalError(f"{root} holds no Parquet files and no class folders with images "
                        f"({', '.join(IMAGE_EXTENSIONS)}); expected {root}/<class>/<image> "
                        f"or {root}/train|test/<class>/<image>")
    files = sorted(str(f) for n in names for f in per_class[n])
    return ImageFolder(files=files, class_names=names, split_layout=split_layout)


def image_folder_batch(batch: Mapping[str, np.ndarray], class_to_idx: Mapping[str, int],
                       split_layout: bool) -> dict[str, np.ndarray]:
    """``read_binary_files`` rows (``bytes``, ``path``) -> canonical rows (label from the class folder)."""
    paths = [Path(str(p)) for p in batch["path"]]
    out = {"images": _object_column([[bytes(b)] for b in batch["bytes"]]),
           "label": np.asarray([class_to_idx[p.parent.name] for p in paths], dtype=np.int64),
           "class_name": _object_column([p.parent.name for p in paths])}
    if split_layout:
        out["split"] = _object_column([FOLDER_SPLITS[p.parent.parent.name] for p in paths])
    return out


# --------------------------------------------------------------------------------- WebDataset
#: WebDataset sample keys (file extensions in the tar) read for the image, the class index and the caption
WDS_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
WDS_LABEL_KEYS = ("cls", "label")
WDS_CAPTION_KEYS = ("txt", "caption")


@dataclass(frozen=True)
class WebDatasetShards:
    """The tar shards of a WebDataset (``root/*.tar``, or ``root/<split>/*.tar``) and the keys of its samples."""

    files: list[str]
    split_layout: bool
    label_key: str


def _shard_split(path: str | Path) -> str | None:
    return FOLDER_SPLITS.get(Path(str(path)).parent.name)


def scan_webdataset(root: Path) -> WebDatasetShards | None:
    """The shards under ``root`` (None without any); EvalError when the first sample lacks an image or a label."""
    files = [str(root)] if root.is_file() else sorted(str(p) for p in root.rglob("*.tar") if not p.name.startswith("."))
    if not files:
        return None
    with tarfile.open(files[0]) as tar:
        first = next((m.name for m in tar if m.isfile()), "")
        key = first.rsplit(".", 1)[0] if "." in first else first
        keys = {m.name[len(key) + 1:].lower() for m in tar.getmembers() if m.name.startswith(key + ".")}
    label = next((k for k in WDS_LABEL_KEYS if k in keys), None)
    if not keys & set(WDS_IMAGE_KEYS) or label is None:
        raise EvalError(f"WebDataset {root}: the first sample of {files[0]} has the keys {sorted(keys)}; expected an "
                        f"image ({', '.join(WDS_IMAGE_KEYS)}) and a class index ({', '.join(WDS_LABEL_KEYS)}) "
                        f"[+ a caption: {', '.join(WDS_CAPTION_KEYS)}]")
    splits = [_shard_split(f) for f in files]
    return WebDatasetShards(files, all(splits) and "train" in splits, label)


def webdataset_batch(batch: Mapping[str, np.ndarray], split_layout: bool, label_key: str) -> dict[str, np.ndarray]:
    """``read_webdataset`` rows (undecoded bytes per key) -> canonical rows."""
    n = len(batch["__key__"])
    images = []
    for i in range(n):
        image = next((batch[k][i] for k in WDS_IMAGE_KEYS if k in batch and batch[k][i] is not None), None)
        if image is None:
            raise EvalError(f"WebDataset sample {batch['__key__'][i]} has no image ({', '.join(WDS_IMAGE_KEYS)})")
        images.append([bytes(image)])
    out = {"images": _object_column(images),
           "label": np.asarray([int(bytes(v).decode().strip()) for v in batch[label_key]], dtype=np.int64)}
    caption = next((k for k in WDS_CAPTION_KEYS if k in batch), None)
    if caption:
        out["caption"] = _strings(batch[caption])
    if split_layout:
        out["split"] = _object_column([_shard_split(u) for u in batch["__url__"]])
    return out


# ------------------------------------------------------------------------------------- sources
@dataclass
class EvalSource:
    """What an evaluation dataset is, found without Ray: its kind, files and columns."""

    path: str
    kind: str                               # "synray-store", "parquet", "image-folder" or "webdataset"
    files: list[str]
    layout: ParquetLayout | None = None     # Parquet kinds
    folder: ImageFolder | None = None       # image folders
    class_names: dict[int, str] | None = None
    shards: WebDatasetShards | None = None  # WebDataset tars

    @property
    def has_masks(self) -> bool:
        return self.layout is not None and self.layout.mask is not None

    @property
    def has_labels(self) -> bool:
        return (self.folder is not None or self.shards is not None
                or (self.layout is not None and self.layout.label is not None))


def _parquet_files(root: Path) -> tuple[str, list[str]]:
    if root.is_file():
        return "parquet", [str(root)]
    store = ParquetStore(root)
    if (root / META_FILE).exists() or store.shards():
        return "synray-store", [str(s) for s in store.shards()]
    return "parquet", sorted(str(p) for p in root.rglob("*.parquet") if not p.name.startswith("."))


def _parquet_uri(uri: str) -> EvalSource:
    """A dataset under a cloud URI: a Parquet file, or a directory of them (a synray store included)."""
    where = Location.of(uri)
    store = ParquetStore(where)
    if where.is_file():
        files = [where.uri]
    else:
        files = store.shards() or [f.uri for f in where.walk_files() if f.name.endswith(".parquet")
                                   and not f.name.startswith(".")]
    if not files:
        raise EvalError(f"evaluation dataset {uri} holds no Parquet files (image folders are read from local or "
                        "mounted paths only)")
    schema = pq.read_schema(files[0])
    kind = "synray-store" if store.meta() is not None else "parquet"
    return EvalSource(uri, kind, files, layout=parquet_layout(schema, files[0]), class_names=hf_label_names(schema))


def inspect_dataset(path: str | Path) -> EvalSource:
    """Find out what ``path`` holds: Parquet file(s), a synray store, WebDataset tar shards or an image-folder tree
    (the last two from local or mounted paths)."""
    if is_uri(path):
        return _parquet_uri(str(path))
    root = Path(path)
    if not root.exists():
        raise EvalError(f"evaluation dataset {root} does not exist")
    if root.is_file() and root.suffix == ".tar":
        shards = scan_webdataset(root)
        return EvalSource(str(root), "webdataset", shards.files, shards=shards)
    if root.is_file() and root.suffix != ".parquet":
        raise EvalError(f"evaluation dataset {root} is a file but not .parquet or .tar; expected a Parquet file, "
                        "a directory of Parquet files / a synray store, WebDataset .tar shards, or an image folder "
                        "root/<class>/<image>")
    kind, files = _parquet_files(root)
    if not files:
        if kind == "synray-store":
            raise EvalError(f"synray store {root} holds no shard-*.parquet files yet")
        shards = scan_webdataset(root)
        if shards is not None:
            return EvalSource(str(root), "webdataset", shards.files, shards=shards)
        folder = scan_image_folder(root)
        return EvalSource(str(root), "image-folder", folder.files, folder=folder,
                          class_names=dict(enumerate(folder.class_names)))
    schema = pq.read_schema(files[0])
    layout = parquet_layout(schema, files[0])
    return EvalSource(str(root), kind, files, layout=layout, class_names=hf_label_names(schema))


def source_dataset(source: EvalSource) -> Any:
    """The Ray Dataset of a source, in the canonical columns.

    Those are ``images`` (a list of encoded images per row) and ``label``, plus ``masks``,
    ``split``, ``class_name`` and ``caption`` when the source has them.
    """
    import ray.data

    if source.shards is not None:
        return ray.data.read_webdataset(source.files, decoder=None).map_batches(
            webdataset_batch, batch_format="numpy",
            fn_kwargs={"split_layout": source.shards.split_layout, "label_key": source.shards.label_key})
    if source.folder is not None:
        class_to_idx = {n: i for i, n in enumerate(source.folder.class_names)}
        ds = ray.data.read_binary_files(source.files, include_paths=True)
        return ds.map_batches(image_folder_batch, batch_format="numpy",
                              fn_kwargs={"class_to_idx": class_to_idx, "split_layout": source.folder.split_layout})
    layout = source.layout
    assert layout is not None
    columns = [c for c in (layout.image, layout.label, layout.mask, layout.name, layout.split, layout.caption) if c]
    ds = ray.data.read_parquet(source.files).select_columns(columns)
    return ds.map_batches(normalise_parquet_batch, batch_format="numpy", fn_kwargs={"layout": layout})
