"""Row preprocessing: decoding on CPUs (unit), and the Ray Data stage feeding two worker shards (a caption's m
images arrive together, in one batch, on one worker, each caption once)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from synray.config import ImagesConfig
from synray.data.codecs import decode_image
from synray.data.schema import caption_label_id
from synray.images.procedural import ProceduralRenderer
from synray.train.batches import BatchError, decode_rows, flatten_rows

M = 3
CAPTIONS = ["a red circle", "two blue squares", "a large green triangle", "a yellow star", "a white cross",
            "a pink ring", "a purple diamond", "an orange heart"] * 3


def _rows() -> dict[str, np.ndarray]:
    n = len(CAPTIONS)
    renderer = ProceduralRenderer(ImagesConfig(backend="procedural", per_caption=M, resolution=32, output_size=32),
                                  None, run_seed=5)
    out = renderer({"caption": np.asarray(CAPTIONS, dtype=object),
                    "caption_id": np.asarray([f"{i:03x}" + "0" * 13 for i in range(1, n + 1)], dtype=object),
                    "label": np.arange(n, dtype=np.int64) % 8})
    return {k: out[k] for k in ("caption_id", "label", "caption", "images")}


@pytest.fixture(scope="module")
def rows() -> dict[str, np.ndarray]:
    return _rows()


def test_decode_rows_keeps_each_rows_images_together_in_order(rows):
    out = decode_rows({k: v[:4] for k, v in rows.items()}, M)
    assert out["images"].shape == (4, M, 3, 32, 32) and out["images"].dtype == np.uint8
    for i in range(4):
        for k in range(M):
            assert np.array_equal(out["images"][i, k], decode_image(rows["images"][i][k]).transpose(2, 0, 1))
    assert out["caption_id"].tolist() == [caption_label_id(c) for c in rows["caption_id"][:4]]


def test_decode_rows_uses_the_first_m_and_refuses_rows_with_fewer(rows):
    assert decode_rows({k: v[:2] for k, v in rows.items()}, 2)["images"].shape[1] == 2
    with pytest.raises(BatchError, match="images.per_caption=4"):
        decode_rows({k: v[:2] for k, v in rows.items()}, M + 1)


def test_flatten_rows_is_caption_major():
    tensors = {"images": torch.arange(2 * M * 3 * 2 * 2, dtype=torch.uint8).reshape(2, M, 3, 2, 2),
               "caption_id": torch.tensor([7, 9]), "label": torch.tensor([1, 2])}
    batch = flatten_rows(tensors)
    assert batch.caption_ids.tolist() == [7] * M + [9] * M and batch.labels.tolist() == [1] * M + [2] * M
    assert torch.equal(batch.images[M], tensors["images"][1, 0]) and batch.per_caption == M


def test_the_stage_keeps_each_captions_images_in_one_batch_on_one_worker(ray_cluster: str, rows):
    import ray

    from conftest import small_config
    from synray.train.preprocess import preprocessing_stage
    from synray.train.spec import TrainPlan

    cfg = small_config(f"images.per_caption={M}", "data.preprocess_batch_rows=5", "data.preprocess_actors=1",
                       "data.preprocess_cpus=0.5")
    plan = TrainPlan("stablerep", M, num_classes=8, epochs=False, columns=("caption_id", "label", "caption", "images"))
    items = [{k: (list(v[i]) if k == "images" else v[i]) for k, v in rows.items()} for i in range(len(CAPTIONS))]
    shards = preprocessing_stage(cfg, plan).add(ray.data.from_items(items)).streaming_split(2, equal=True)
    seen: list[list[list[int]]] = [[], []]

    def consume(rank: int) -> None:
        for t in shards[rank].iter_torch_batches(batch_size=4, drop_last=True):
            seen[rank].append(flatten_rows(t).caption_ids.tolist())

    threads = [threading.Thread(target=consume, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected = {caption_label_id(c) for c in rows["caption_id"]}
    batches = [b for rank in seen for b in rank]
    assert all(seen) and all(len(b) == 4 * M for b in batches)
    for b in batches:  # caption-major: each caption's m images consecutive inside its batch
        assert all(b[i * M:(i + 1) * M] == [b[i * M]] * M for i in range(4))
    groups = [g for b in batches for g in b[::M]]
    assert len(groups) == len(set(groups)) and set(groups) <= expected  # each caption once, on one worker
    assert len(groups) >= len(expected) - 2 * 3  # at most a partial batch dropped per worker
