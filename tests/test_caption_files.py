"""StableRep's inputs: captions read from a file (row i renders caption i) and a random m of a row's images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import small_config

CAPTIONS = ["a red bicycle leaning on a brick wall", "two dogs running on a wet beach", "",
            "a bowl of ramen on a wooden table", "an old lighthouse under a stormy sky"]


def file_config(path: Path, *more: str):
    return small_config("captions.backend=template", "captions.style=file", f"captions.source={path}",
                        "data.num_captions=4", "eval.enabled=false", *more)


@pytest.fixture
def caption_file(tmp_path: Path) -> Path:
    path = tmp_path / "captions.txt"
    path.write_text("\n".join(CAPTIONS) + "\n")
    return path


def test_row_i_renders_caption_i_of_the_file_with_its_provenance(caption_file: Path):
    from synray.captions.rows import template_captions
    from synray.captions.stage import PlanRows

    rows = template_captions(PlanRows(file_config(caption_file))({"id": np.arange(6)}))
    assert list(rows["prompt"]) == [c for c in CAPTIONS if c]   # blank lines skipped; rows past the end dropped
    assert list(rows["row_id"]) == [0, 1, 2, 3] and set(rows["label"]) == {-1}
    assert set(rows["llm_model"]) == {f"file:{caption_file}"} and set(rows["template"]) == {"file"}
    again = PlanRows(file_config(caption_file))({"id": np.arange(6)})
    assert list(again["caption_id"]) == list(rows["caption_id"])   # regenerable from the row's provenance


def test_a_parquet_caption_file_reads_its_caption_column(tmp_path: Path):
    from synray.captions.files import CaptionFileError, read_caption_file

    pq.write_table(pa.table({"caption": ["one cat", "two cats"], "url": ["a", "b"]}), tmp_path / "c.parquet")
    assert read_caption_file(str(tmp_path / "c.parquet")) == ("one cat", "two cats")
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "d.parquet")
    with pytest.raises(CaptionFileError, match="no 'caption' column"):
        read_caption_file(str(tmp_path / "d.parquet"))


def test_caption_file_settings_are_checked_before_anything_starts(caption_file: Path, tmp_path: Path):
    from synray.captions.files import CaptionFileError
    from synray.config import ConfigError
    from synray.eval.errors import EvalError
    from synray.plan import plan_generation, plan_run
    from synray.train.objectives import TrainSetupError

    with pytest.raises(ConfigError, match="style=file reads its captions from source"):
        small_config("captions.backend=template", "captions.style=file")
    with pytest.raises(CaptionFileError, match="no such file"):
        plan_generation(file_config(tmp_path / "missing.txt"))
    with pytest.raises(CaptionFileError, match="data.num_captions=9, but captions.source=.* holds 4 captions"):
        plan_generation(file_config(caption_file, "data.num_captions=9"))
    with pytest.raises(EvalError, match="carry no class labels.*set eval.dataset"):
        plan_run(file_config(caption_file, "eval.enabled=true"))
    with pytest.raises(TrainSetupError, match="train.loss=supervised learns concept labels"):
        plan_run(file_config(caption_file, "train.loss=supervised"))


def test_images_per_row_draws_a_different_subset_of_each_row_per_read():
    from synray.data.codecs import encode_image
    from synray.train.batches import decode_rows

    row = [encode_image(np.full((8, 8, 3), 20 * i / 255), "png", 8) for i in range(10)]
    batch = {"images": np.asarray([row], dtype=object), "caption_id": np.asarray(["c0"], dtype=object),
             "label": np.asarray([0])}
    first = decode_rows(batch, 6)["images"][0, :, 0, 0, 0].tolist()
    assert first == [0, 20, 40, 60, 80, 100]                      # no generator: the first m
    rng = np.random.default_rng(0)
    draws = [tuple(decode_rows(batch, 6, rng)["images"][0, :, 0, 0, 0].tolist()) for _ in range(5)]
    assert all(len(set(d)) == 6 and set(d) <= {20 * i for i in range(10)} for d in draws)   # 6 distinct images
    assert len(set(draws)) > 1                                     # drawn anew on each read


def test_images_per_row_is_planned_against_the_rows(generated_store):
    from synray.plan import plan_run
    from synray.train.objectives import TrainSetupError

    plan = plan_run(small_config("train.images_per_row=2"), data_dir=generated_store.dir)   # rows hold 3
    assert plan.train.per_caption == 2 and plan.train.draw_images
    assert not plan_run(small_config("train.images_per_row=3"), data_dir=generated_store.dir).train.draw_images
    with pytest.raises(TrainSetupError, match="train.images_per_row=4, but rows hold 3 images"):
        plan_run(small_config("train.images_per_row=4"), data_dir=generated_store.dir)
