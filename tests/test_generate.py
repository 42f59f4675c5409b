"""End-to-end generation: real vLLM + diffusers through Ray Data into the store; resume, regeneration, bad input."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import small_config
from synray.data.store import ParquetStore, StoreError
from synray.plan import plan_generation
from synray.programs.generate import generate_to_store

pytestmark = pytest.mark.slow


def _rows(store_dir: str) -> list[dict]:
    return [r for s in ParquetStore(store_dir).shards() for r in pq.read_table(s).to_pylist()]


def test_generated_rows_are_complete(generated_store: dict):
    rows = _rows(generated_store["dir"])
    assert len(rows) == 16
    assert len({r["caption_id"] for r in rows}) == 16
    for r in rows:
        assert len(r["images"]) == 3 and len(r["seeds"]) == 3
        for img in r["images"]:
            with Image.open(io.BytesIO(img)) as im:
                assert im.size == (32, 32)
        assert r["caption"] and r["prompt"].rstrip().endswith("=>")
        assert r["llm_model"] == "tiny:llm" and r["t2i_model"] == "tiny:sd"
        assert json.loads(r["llm_sampling"])["temperature"] == 0.8
        assert json.loads(r["t2i_params"])["guidance_scale"] == 2.5
    summary = generated_store["summary"]
    assert summary["rows_written"] == 16
    assert {"plan", "captions", "images", "store"} <= summary["stages"].keys()
    assert json.loads((Path(generated_store["dir"]) / "_summary.json").read_text())["rows_total"] == 16


def test_regenerating_a_row_gives_the_same_image_bytes(generated_store: dict):
    from synray.generation.regenerate import regenerate_images

    row = _rows(generated_store["dir"])[3]
    assert regenerate_images(row) == list(row["images"])


def test_rerun_of_a_finished_store_adds_nothing(generated_store: dict):
    plan = plan_generation(generated_store["cfg"], ParquetStore(generated_store["dir"]))
    assert plan.wanted == 0 and len(plan.skip_ids) == 16
    again = generate_to_store(plan, generated_store["dir"])
    assert again["rows_written"] == 0 and again["rows_total"] == 16


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


def test_store_of_another_config_is_refused(generated_store: dict):
    with pytest.raises(StoreError, match="another config"):
        plan_generation(small_config("images.guidance_scale=4.0"), ParquetStore(generated_store["dir"]))


def test_cli_rejects_bad_image_settings(tmp_path: Path, capsys):
    from synray.cli import main

    for override, needle in (("images.per_caption=0", "images.per_caption"),
                             ("images.resolution=36", "divisible by 8")):
        assert main(["generate", "local", "--out", str(tmp_path / "out"), "--set", override]) == 2
        assert needle in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_samples_grid_cli(generated_store: dict, tmp_path: Path):
    out = tmp_path / "grid.png"
    r = subprocess.run([sys.executable, "-m", "synray.cli", "samples", generated_store["dir"], "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    with Image.open(out) as im:
        assert im.size[0] > 100 and im.size[1] > 100


def test_webdataset_export_of_generated_store(generated_store: dict, tmp_path: Path):
    import tarfile

    from synray.data.store import export_webdataset

    tars = export_webdataset(ParquetStore(generated_store["dir"]), tmp_path / "wds", samples_per_tar=10)
    members = [m.name for t in tars for m in tarfile.open(t).getmembers()]
    assert sum(n.endswith(".png") for n in members) == 16 * 3
