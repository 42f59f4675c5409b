"""`synray eval` end to end: a tiny image folder through the CLI (in-process, joining the suite's Ray), and bad
inputs refused before Ray is asked for anything. (`jobs/evaluate.py` runs as its own process in test_train.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from eval_models import tiny_backbone
from PIL import Image

from synray.cli import main
from synray.eval.report import format_table
from synray.models.backbone import save_backbone
from synray.programs.errors import EXIT_BAD_INPUT

COLOURS = {"blue": (50, 80, 230), "green": (40, 200, 60), "red": (220, 40, 40)}


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(save_backbone(tiny_backbone(), tmp_path_factory.mktemp("cli_backbone")))


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for name, colour in COLOURS.items():
        (root / name).mkdir()
        for k in range(4):  # two sizes, PNG and JPEG
            side = 24 + 8 * (k % 2)
            arr = np.clip(np.asarray(colour) + rng.normal(0, 8, (side, side, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / name / f"{k}.{'png' if k < 2 else 'jpg'}")
    return root


def test_cli_eval_knn_and_linear_on_an_image_folder(ray_cluster: str, backbone_dir: str, image_folder: Path,
                                                    tmp_path: Path) -> None:
    from procs import synray_main

    out = tmp_path / "eval"
    proc = synray_main("eval", backbone_dir, "--dataset", str(image_folder), "--protocol", "knn", "--protocol",
                       "linear", "--set", "eval.knn_k=3", "--set", "eval.linear_epochs=20", "--set",
                       "eval.linear_batch_size=8", "--out", str(out))
    assert proc.code == 0, (proc.error, proc.err[-3000:])
    report = json.loads((out / "eval.json").read_text())
    r = report["results"]
    assert report["protocols"] == ["knn", "linear"] and report["dataset_kind"] == "image-folder"
    assert report["num_images"] == 12 and report["image_size"] == 32
    assert r["num_reference"] + r["num_query"] == 12 and r["num_classes"] == 3
    assert r["split"].startswith("stratified")
    # one flat colour per class: a random ViT already separates them
    assert r["knn_accuracy"] == 1.0 and r["linear_accuracy"] == 1.0
    assert report["eval_config"]["knn_k"] == 3
    table = (out / "eval.md").read_text()
    assert table == format_table(report) and "| knn | top-1 accuracy (k=3, T=0.07) | 1.0000 |" in table
    wd = r["linear_weight_decay"]
    assert wd in report["eval_config"]["linear_weight_decay"]   # chosen from the grid, on validation
    assert f"| linear | top-1 accuracy (weight decay {wd:g}, chosen on validation) | 1.0000 |" in proc.out
    assert "| knn | top-5 accuracy | 1.0000 |" in proc.out


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = main(argv)
    return rc, capsys.readouterr().err


def test_cli_eval_bad_inputs_fail_before_ray(backbone_dir: str, image_folder: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    """Every refusal happens while planning: Ray's connection (synray's only one) is replaced by a failure here."""
    import synray.programs.session as session

    def no_ray(*args, **kwargs):
        raise AssertionError("bad input reached Ray")

    monkeypatch.setattr(session, "init", no_ray)
    rc, err = _run(["eval", backbone_dir, "--dataset", str(image_folder), "--protocol", "zeroshot"], capsys)
    assert rc == EXIT_BAD_INPUT and "zeroshot needs an image-text model" in err and "image backbone" in err
    rc, err = _run(["eval", backbone_dir, "--dataset", str(tmp_path / "nope"), "--protocol", "knn"], capsys)
    assert rc == EXIT_BAD_INPUT and "does not exist" in err
    rc, err = _run(["eval", str(tmp_path / "no_model"), "--dataset", str(image_folder)], capsys)
    assert rc == EXIT_BAD_INPUT and "model directory" in err
    rc, err = _run(["eval", backbone_dir, "--dataset", str(image_folder), "--protocol", "segmentation"], capsys)
    assert rc == EXIT_BAD_INPUT and "masks" in err
    pq.write_table(pa.table({"caption": ["a"], "label": [0]}), tmp_path / "bad.parquet")
    rc, err = _run(["eval", backbone_dir, "--dataset", str(tmp_path / "bad.parquet")], capsys)
    assert rc == EXIT_BAD_INPUT and "has the columns ['caption', 'label']" in err and "expected image" in err
    rc, err = _run(["eval", backbone_dir, "--dataset", str(image_folder), "--set", "eval.knn_k=0"], capsys)
    assert rc == EXIT_BAD_INPUT and "eval.knn_k" in err
    with pytest.raises(SystemExit):
        main(["eval", backbone_dir, "--dataset", str(image_folder), "--protocol", "detection"])
    assert not (tmp_path / "eval").exists()
