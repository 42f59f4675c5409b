"""Tests for feature extraction, the weighted kNN classifier, group-wise splits and the linear probe."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from synray.config import BackboneConfig, EvalConfig
from synray.eval.evaluate import rows_to_arrays
from synray.eval.features import FeatureExtractor, decode_row_images, encode_images
from synray.eval.knn import knn_accuracy, knn_votes, split_reference_query
from synray.eval.protocols import run_protocols
from synray.eval.registry import check_protocols
from synray.eval.linear import linear_probe, selected_linear_probe
from synray.models.backbone import build_backbone, save_backbone

from eval_models import score_rows

EMBED_DIM = 64  # the tiny backbone's hidden size


def _clusters(n_per_class: int, num_classes: int, dim: int = 16, spread: float = 0.05,
              seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=g) * 3
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    feats = centres[labels] + spread * torch.randn(labels.numel(), dim, generator=g)
    return feats, labels


def _png(color: tuple[int, int, int], size: int = 24) -> bytes:
    buf = io.BytesIO()
    arr = np.zeros((size, size, 3), np.uint8)
    arr[...] = color
    arr[: size // 2, : size // 2] = 255 - np.asarray(color, np.uint8)
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _rows(n: int, per_row: int = 2, num_classes: int = 3, size: int = 24) -> list[dict]:
    rows = []
    for i in range(n):
        label = i % num_classes
        images = [_png(((40 * label + 7 * j) % 256, (90 * i) % 256, 30 * j), size) for j in range(per_row)]
        rows.append({"caption": f"caption {i}", "caption_id": f"{i:016x}", "label": label, "images": images})
    return rows


@pytest.fixture(scope="module")
def tiny_encoder():
    torch.manual_seed(0)
    return build_backbone(BackboneConfig(size="tiny", image_size=32, patch_size=8))


@pytest.fixture(scope="module")
def tiny_model_dir(tiny_encoder, tmp_path_factory) -> Path:
    return save_backbone(tiny_encoder, tmp_path_factory.mktemp("backbone"))


# ------------------------------------------------------------------------------------------ kNN
def test_knn_on_separable_clusters_is_perfect() -> None:
    train, ytr = _clusters(20, 5, seed=0)
    test, yte = _clusters(10, 5, seed=0)  # same centres, fresh noise
    test = test + 0.01 * torch.randn(test.shape, generator=torch.Generator().manual_seed(1))
    assert knn_accuracy(train, ytr, test, yte, k=20, temperature=0.07) == 1.0
    assert knn_accuracy(train.numpy(), ytr.numpy(), test.numpy(), yte.numpy(), k=5, chunk_size=7) == 1.0


def test_knn_on_random_features_is_near_chance() -> None:
    g = torch.Generator().manual_seed(0)
    num_classes = 4
    train, test = torch.randn(2000, 32, generator=g), torch.randn(2000, 32, generator=g)
    ytr = torch.randint(0, num_classes, (2000,), generator=g)
    yte = torch.randint(0, num_classes, (2000,), generator=g)
    acc = knn_accuracy(train, ytr, test, yte, k=20, num_classes=num_classes)
    assert abs(acc - 1 / num_classes) < 0.05


def test_knn_weights_and_k_larger_than_reference() -> None:
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    # k is clipped to the 3 references; the two class-0 neighbours outvote the single class-1 one.
    assert knn_votes(train, labels, torch.tensor([[0.6, 0.4]]), k=50).argmax(1).tolist() == [0]
    # Near class 1 the exp(sim / T) weight of the closest neighbour dominates the vote.
    assert knn_votes(train, labels, torch.tensor([[0.1, 1.0]]), k=3, temperature=0.05).argmax(1).tolist() == [1]
    with pytest.raises(ValueError):
        knn_accuracy(train, labels, torch.zeros(1, 3), torch.zeros(1, dtype=torch.long))


# ---------------------------------------------------------------------------------------- split
@pytest.mark.parametrize("groups_per_label", [[1, 1, 1, 1, 1], [2, 3, 5, 1, 8], [4, 4, 4]])
def test_split_keeps_groups_whole_and_stratifies(groups_per_label: list[int]) -> None:
    labels, groups = [], []
    g = 0
    for label, n_groups in enumerate(groups_per_label):
        for _ in range(n_groups):
            labels += [label] * 3
            groups += [g] * 3
            g += 1
    labels, groups = np.asarray(labels), np.asarray(groups)
    ref, query = split_reference_query(labels, groups, query_fraction=0.5, seed=3)
    assert ref.size and query.size
    assert np.intersect1d(ref, query).size == 0 and np.union1d(ref, query).size == labels.size
    assert not set(groups[ref]) & set(groups[query])
    for label, n_groups in enumerate(groups_per_label):
        if n_groups >= 2:  # stratified: each such label is on both sides
            assert label in labels[ref] and label in labels[query]
    again = split_reference_query(labels, groups, query_fraction=0.5, seed=3)
    assert np.array_equal(again[0], ref) and np.array_equal(again[1], query)


def test_split_rejects_a_single_group() -> None:
    with pytest.raises(ValueError, match="two groups"):
        split_reference_query(np.zeros(4), np.zeros(4))


# --------------------------------------------------------------------------------------- linear
def test_linear_probe_on_separable_features_is_perfect_and_deterministic() -> None:
    train, ytr = _clusters(30, 4, dim=24, spread=0.2, seed=0)
    test, yte = _clusters(10, 4, dim=24, spread=0.2, seed=0)
    out = linear_probe(train, ytr, test, yte, epochs=20, batch_size=32, seed=1)
    assert out["accuracy"] == 1.0 and out["train_accuracy"] == 1.0
    assert out["num_classes"] == 4 and out["steps"] == 20 * 4
    again = linear_probe(train, ytr, test, yte, epochs=20, batch_size=32, seed=1)
    assert again == out
    full = linear_probe(train.numpy(), ytr.numpy(), test.numpy(), yte.numpy(), epochs=30, batch_size=None,
                        use_bn=False, lr=0.5)
    assert full["accuracy"] == 1.0 and full["steps"] == 30


def test_linear_probe_drops_a_trailing_batch_of_one_with_bn() -> None:
    train, ytr = _clusters(11, 3, dim=8, seed=2)  # 33 rows, batches of 16 -> 16, 16 (the 1 is dropped)
    out = linear_probe(train, ytr, train, ytr, epochs=2, batch_size=16)
    assert out["steps"] == 4


# ------------------------------------------------------------------------------------- features
def _dino_topk(ref: np.ndarray, ref_y: np.ndarray, query: np.ndarray, query_y: np.ndarray, k: int, t: float,
               c: int) -> tuple[float, float]:
    """DINO's eval_knn.py knn_classifier written out: cosine similarities, the k nearest vote exp(sim / T) for
    their class, classes sorted by votes; top-1 and top-5 (the first min(5, k) sorted classes) accuracy."""
    ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    query = query / np.linalg.norm(query, axis=1, keepdims=True)
    sim = query @ ref.T
    idx = np.argsort(-sim, axis=1)[:, :k]
    votes = np.zeros((len(query), c))
    for i, nn in enumerate(idx):
        np.add.at(votes[i], ref_y[nn], np.exp(sim[i, nn] / t))
    order = np.argsort(-votes, axis=1)
    correct = order == query_y[:, None]
    return float(correct[:, :1].any(1).mean()), float(correct[:, :min(5, k)].any(1).mean())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_knn_top1_and_top5_equal_dinos_classifier(seed: int) -> None:
    rng = np.random.default_rng(seed)
    c, d = 12, 16
    centres = rng.normal(0, 0.6, (c, d))
    ref_y, query_y = rng.integers(0, c, 600), rng.integers(0, c, 300)
    ref, query = centres[ref_y] + rng.normal(0, 1, (600, d)), centres[query_y] + rng.normal(0, 1, (300, d))
    top1, top5 = _dino_topk(ref, ref_y, query, query_y, k=20, t=0.07, c=c)
    assert 0 < top1 < top5 < 1   # a problem where the two differ
    args = (torch.from_numpy(ref).float(), torch.from_numpy(ref_y), torch.from_numpy(query).float(),
            torch.from_numpy(query_y))
    assert knn_accuracy(*args, k=20, temperature=0.07, num_classes=c) == pytest.approx(top1, abs=1e-6)
    assert knn_accuracy(*args, k=20, temperature=0.07, num_classes=c, top=5) == pytest.approx(top5, abs=1e-6)


def _gaussian_classes(seed: int, n: int, d: int, c: int, sep: float, noise_dims: int):
    """Class means on d - noise_dims informative dimensions, unit noise, per-dimension scales from 0.5 to 3."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, sep, (c, d))
    means[:, d - noise_dims:] = 0
    scales = rng.uniform(0.5, 3, d)

    def draw(m: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, c, m)
        return ((means[y] + rng.normal(0, 1, (m, d))) * scales).astype(np.float32), y
    return draw(n), draw(4000)


@pytest.mark.filterwarnings("ignore::FutureWarning")   # scikit-learn's notice about LogisticRegressionCV's attributes
@pytest.mark.parametrize("seed,n,d,c,sep,noise_dims", [(0, 1000, 64, 10, 0.35, 32), (4, 1200, 256, 8, 0.25, 200),
                                                       (5, 600, 128, 6, 0.3, 100), (2, 800, 32, 4, 0.3, 8)])
def test_the_validated_linear_probe_scores_as_cross_validated_logistic_regression(seed, n, d, c, sep, noise_dims):
    """scikit-learn's multinomial logistic regression on standardised features, its L2 strength chosen by
    5-fold cross-validation on the training side, against the probe whose weight decay is chosen on a validation
    fifth (the default grid): within one point of test accuracy on problems where regularisation matters."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    (x, y), (xt, yt) = _gaussian_classes(seed, n, d, c, sep, noise_dims)
    reference = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=np.logspace(-4, 4, 17), cv=5, max_iter=5000))
    expected = float((reference.fit(x, y).predict(xt) == yt).mean())
    fit, val = split_reference_query(y, np.arange(n), query_fraction=EvalConfig().val_fraction, seed=1)
    got = selected_linear_probe((x[fit], y[fit]), (x[val], y[val]), (x, y), (xt, yt),
                                EvalConfig().linear_weight_decay, epochs=100, lr=0.1, batch_size=256, num_classes=c)
    assert got["accuracy"] == pytest.approx(expected, abs=0.01)
    assert set(got["val_accuracies"]) == set(EvalConfig().linear_weight_decay)
    assert got["val_accuracy"] == max(got["val_accuracies"].values())


def _images(rows: list[dict]) -> np.ndarray:
    return np.stack([a for r in rows for a in decode_row_images(r["images"])])


def test_encode_images_shapes_and_layouts(tiny_encoder) -> None:
    images = _images(_rows(3, per_row=2))
    tiny_encoder.train()
    feats = encode_images(tiny_encoder, images, image_size=32, batch_size=4)["features"]
    assert feats.shape == (6, EMBED_DIM) and feats.dtype == torch.float32
    assert tiny_encoder.training  # the caller's mode is restored
    nchw = torch.from_numpy(images).permute(0, 3, 1, 2)
    torch.testing.assert_close(encode_images(tiny_encoder, nchw, image_size=32, batch_size=256)["features"], feats)
    assert encode_images(tiny_encoder, images[:0], image_size=32)["features"].shape == (0, EMBED_DIM)
    with pytest.raises(ValueError):
        encode_images(tiny_encoder, images.transpose(0, 3, 1, 2), image_size=32)


def test_feature_extractor_adds_a_features_column(tiny_encoder, tiny_model_dir: Path) -> None:
    rows = _rows(3, per_row=2)
    batch = {"caption": np.array([r["caption"] for r in rows], dtype=object),
             "label": np.array([r["label"] for r in rows]),
             "images": np.array([r["images"] for r in rows], dtype=object)}
    fx = FeatureExtractor(tiny_model_dir, image_size=32, batch_size=4)
    out = fx(batch)
    assert set(out) == {"caption", "label", "images", "features"}
    assert out["features"].shape == (3, 2, EMBED_DIM) and out["features"].dtype == np.float32
    expected = encode_images(tiny_encoder, _images(rows), image_size=32)["features"].numpy()
    np.testing.assert_allclose(out["features"].reshape(6, EMBED_DIM), expected, rtol=1e-4, atol=1e-5)
    # Rows with different numbers of images get one [m_i, D] array each.
    ragged = {"images": np.array([rows[0]["images"], rows[1]["images"][:1], []], dtype=object)}
    out = FeatureExtractor(tiny_model_dir, image_size=32, drop_images=True)(ragged)
    assert "images" not in out
    assert [f.shape for f in out["features"]] == [(2, EMBED_DIM), (1, EMBED_DIM), (0, EMBED_DIM)]


# ------------------------------------------------------------------------------------- evaluate
def test_the_protocols_score_each_query_image_once(tiny_model_dir) -> None:
    rows = _rows(12, per_row=2, num_classes=3)
    cfg = EvalConfig(protocols=["knn", "linear"], knn_k=5, linear_epochs=5)
    out = score_rows(tiny_model_dir, rows, ["knn", "linear"], cfg)
    assert set(out) >= {"knn_accuracy", "linear_accuracy", "num_reference", "num_query", "num_classes", "chance"}
    assert out["num_reference"] + out["num_query"] == 24 and out["num_query"] % 2 == 0
    assert out["num_classes"] == 3 and out["chance"] == pytest.approx(1 / 3)
    for key in ("knn_accuracy", "linear_accuracy"):   # each a whole number of the query images
        assert out[key] * out["num_query"] == pytest.approx(round(out[key] * out["num_query"]), abs=1e-6), key
    only_knn = score_rows(tiny_model_dir, rows, ["knn"], cfg)
    assert "linear_accuracy" not in only_knn and only_knn["knn_accuracy"] == out["knn_accuracy"]


def test_unknown_protocols_and_zeroshot_without_a_text_tower_are_refused(tiny_model_dir) -> None:
    with pytest.raises(ValueError, match="supported: knn, linear, zeroshot, segmentation"):
        check_protocols(["retrieval"])
    rows = _rows(4)
    batch = {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}
    extracted = FeatureExtractor(tiny_model_dir, image_size=32)(batch)
    arrays = rows_to_arrays([{k: v[i] for k, v in extracted.items()} for i in range(4)], 32, ("features",))
    with pytest.raises(ValueError, match="image-text model"):
        run_protocols(arrays, ["knn", "zeroshot"], EvalConfig())
