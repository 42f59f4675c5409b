"""Generation: the suite's generated store (real vLLM + diffusers through Ray Data into Parquet, made by the generate
drill in runs.py) holds complete rows; a finished store is not regenerated; bad input fails before the pipeline."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import small_config
from runs import GENERATED_ROWS
from synray.data.store import ParquetStore, StoreError
from synray.plan import plan_generation
from synray.programs.generate import generate_to_store


def _rows(store_dir: str) -> list[dict]:
    return [r for s in ParquetStore(store_dir).shards() for r in pq.read_table(s).to_pylist()]


def test_generated_rows_are_complete_with_their_provenance(generated_store):
    rows = _rows(generated_store.dir)
    assert len(rows) == GENERATED_ROWS and len({r["caption_id"] for r in rows}) == GENERATED_ROWS
    assert sorted(r["row_id"] for r in rows) == sorted(set(r["row_id"] for r in rows))
    for r in rows:
        assert len(r["images"]) == 3 and len(r["seeds"]) == 3
        for img in r["images"]:
            with Image.open(io.BytesIO(img)) as im:
                assert im.size == (32, 32) and im.format == "PNG"
        assert r["caption"] and r["prompt"].rstrip().endswith("=>")
        assert r["llm_model"] == "tiny:llm" and r["t2i_model"] == "tiny:sd"
        assert json.loads(r["llm_sampling"])["temperature"] == 0.8
        assert json.loads(r["t2i_params"])["guidance_scale"] == 2.5
    summary = generated_store.summary   # the resubmitted job's: what it found, wrote and now holds
    assert summary["rows_before"] == generated_store.rows_before
    assert summary["rows_written"] == GENERATED_ROWS - generated_store.rows_before
    assert summary["rows_total"] == GENERATED_ROWS and summary["images_per_row"] == 3
    assert {"plan", "captions", "images", "store"} <= summary["stages"].keys()
    assert summary["stages"]["store"]["rows"] == summary["rows_written"]


def test_the_resubmitted_generate_job_prints_what_it_wrote_and_exits_0(generated_store):
    out = generated_store.rerun.stdout
    before, written = generated_store.rows_before, GENERATED_ROWS - generated_store.rows_before
    assert f"rows written: {written} (store now holds {GENERATED_ROWS} of {GENERATED_ROWS} wanted, " \
           f"{before} were there before)" in out
    assert f"summary: {generated_store.store / '_summary.json'}" in out


def test_rerun_of_a_finished_store_adds_nothing(generated_store):
    plan = plan_generation(generated_store.cfg, ParquetStore(generated_store.dir))
    assert plan.wanted == 0 and len(plan.skip_ids) == GENERATED_ROWS
    shards = {p.name: p.stat().st_mtime_ns for p in generated_store.store.glob("shard-*.parquet")}
    again = generate_to_store(plan, generated_store.dir)
    assert again["rows_written"] == 0 and again["rows_total"] == GENERATED_ROWS
    assert {p.name: p.stat().st_mtime_ns for p in generated_store.store.glob("shard-*.parquet")} == shards


@pytest.mark.parametrize("overrides, needle", [
    (["concepts.bank=EMPTY"], "empty"),
    (["concepts.bank=/no/such/concepts.txt"], "/no/such/concepts.txt"),
    (["images.model=/no/such/model"], "path does not exist"),
    (["images.model=LLM"], "not a diffusers pipeline"),
])
def test_bad_generation_input_fails_before_the_pipeline(overrides, needle, tmp_path: Path, tiny_models):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing here\n\n")
    overrides = [o.replace("EMPTY", str(empty)).replace("LLM", tiny_models["llm"]) for o in overrides]
    with pytest.raises(ValueError, match=needle):
        plan_generation(small_config(*overrides), ParquetStore(tmp_path / "out"))
    assert not (tmp_path / "out").exists()  # planning writes nothing


def test_store_of_another_config_is_refused(generated_store):
    with pytest.raises(StoreError, match="another config"):
        plan_generation(small_config("images.guidance_scale=4.0"), ParquetStore(generated_store.dir))


def test_cli_rejects_bad_image_settings(tmp_path: Path, capsys):
    from synray.cli import main

    for override, needle in (("images.per_caption=0", "images.per_caption"),
                             ("images.resolution=36", "divisible by 8")):
        assert main(["generate", "local", "--out", str(tmp_path / "out"), "--set", override]) == 2
        assert needle in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_samples_cli_draws_the_first_rows_of_a_store(generated_store, tmp_path: Path, capsys):
    from synray.cli import main

    sizes = {}
    for rows in (2, 4):
        out = tmp_path / f"grid{rows}.png"
        assert main(["samples", generated_store.dir, "--out", str(out), "--rows", str(rows)]) == 0
        assert capsys.readouterr().out.strip() == str(out)
        with Image.open(out) as im:
            assert im.format == "PNG"
            sizes[rows] = im.size
    assert sizes[4][1] > sizes[2][1] and sizes[4][0] == sizes[2][0]   # one strip of images per caption


def test_webdataset_export_holds_every_image_with_its_caption(generated_store, tmp_path: Path):
    from synray.data.store import export_webdataset

    tars = export_webdataset(ParquetStore(generated_store.dir), tmp_path / "wds", samples_per_tar=10)
    members = {}
    for t in tars:
        with tarfile.open(t) as tar:
            for m in tar.getmembers():
                members[m.name] = tar.extractfile(m).read()
    rows = {r["caption_id"]: r for r in _rows(generated_store.dir)}
    images = [n for n in members if n.endswith(".png")]
    assert len(images) == GENERATED_ROWS * 3 and len(tars) == -(-GENERATED_ROWS * 3 // 10)
    for name in images:   # {caption_id}_{i}.png, with its caption and provenance beside it
        key = name[:-len(".png")]
        cid, i = key.rsplit("_", 1)
        meta = json.loads(members[f"{key}.json"])
        assert members[name] == rows[cid]["images"][int(i)] and meta["seed"] == rows[cid]["seeds"][int(i)]
        assert members[f"{key}.txt"].decode() == rows[cid]["caption"] == meta["caption"]
