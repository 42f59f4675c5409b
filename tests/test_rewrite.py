"""LaCLIP rewrite mode: Parquet and WebDataset sources, k rewrites per caption through vLLM, images untouched."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import small_config
from synray.language.prompts import LACLIP_HEADER

CAPTIONS = ["a red bicycle leaning on a brick wall", "two dogs playing in the snow",
            "a bowl of soup on a wooden table", "a lighthouse at dusk", "a cat asleep on a sofa",
            "a blue kite over the beach"]


def _png(i: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 30 * i, dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


def test_laclip_requests_have_the_paper_prompt():
    from synray.captions.rewrite import explode

    cfg = small_config("captions.rewrite.num_rewrites=3")
    out = explode(cfg)({"source_key": np.asarray(["00ab", "00cd"], dtype=object),
                        "caption": np.asarray(CAPTIONS[:2], dtype=object)})
    assert list(out["rewrite_index"]) == [0, 1, 2, 0, 1, 2]
    for prompt, cap in zip(out["prompt"], [CAPTIONS[0]] * 3 + [CAPTIONS[1]] * 3):
        lines = prompt.split("\n")
        assert lines[0] == LACLIP_HEADER and lines[-1] == f"{cap} =>" and len(lines) == 5
    assert len(set(out["prompt_seed"])) == 6


def test_webdataset_source_is_read(ray_cluster, tmp_path: Path):
    from synray.captions.rewrite import read_image_text

    tar_path = tmp_path / "000000.tar"
    with tarfile.open(tar_path, "w") as tar:
        for i, cap in enumerate(CAPTIONS[:3]):
            for name, data in ((f"s{i}.png", _png(i)), (f"s{i}.txt", cap.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    rows = read_image_text(str(tmp_path)).take_all()
    assert sorted(r["caption"] for r in rows) == sorted(CAPTIONS[:3])
    assert {bytes(r["image"]) for r in rows} == {_png(i) for i in range(3)}


def test_synray_rewrite_adds_k_rewrites_per_caption_through_vllm(ray_cluster, tmp_path: Path):
    """`synray rewrite local --source SRC --out OUT` (in-process, on the suite's Ray): each caption gets its 2
    rewrites from the engine, or a counted rejection; images and captions come through untouched."""
    from procs import sets, synray_main

    from synray.captions.rewrite import RewriteError
    from synray.data.store import ParquetStore
    from synray.plan import plan_rewrite

    src = tmp_path / "src"
    src.mkdir()
    pq.write_table(pa.table({"image": [_png(i) for i in range(6)], "caption": CAPTIONS}), src / "part.parquet")
    r = synray_main("rewrite", "local", "--source", str(src), "--out", str(tmp_path / "out"),
                    *sets("captions.rewrite.num_rewrites=2"))
    assert r.code == 0 and "rows: 6 with 2 rewrites each" in r.out, (r.error, r.err[-3000:])
    rows = [r for s in ParquetStore(tmp_path / "out").shards() for r in pq.read_table(s).to_pylist()]
    by_caption = {r["caption"]: r for r in rows}
    assert set(by_caption) == set(CAPTIONS) and len(rows) == 6
    for i, cap in enumerate(CAPTIONS):
        assert by_caption[cap]["image"] == _png(i)  # images untouched
        assert len(by_caption[cap]["rewrites"]) == 2
    produced = sum(bool(t) for r in rows for t in r["rewrites"])
    summary = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert summary["rows"] == 6 and produced + sum(summary["rejected"].values()) == 12
    with pytest.raises(RewriteError, match="does not exist"):  # refused by the plan, before Ray work
        plan_rewrite(small_config(), str(tmp_path / "nope"), str(tmp_path / "out2"))
