"""Tests for the ViT/DINOv2 encoders, their save/load round trip, and the projection head."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModel

from synray.config import BackboneConfig, HeadConfig
from synray.models.backbone import SIZES, Encoder, build_backbone, load_backbone, save_backbone
from synray.models.heads import ContrastiveModel, MLPHead, build_contrastive_model

ARCHS = ["vit", "dinov2"]


def _tiny(arch: str) -> Encoder:
    torch.manual_seed(0)
    return build_backbone(BackboneConfig(arch=arch, size="tiny", image_size=32, patch_size=8)).eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_shapes_and_mask_token(arch: str) -> None:
    enc = _tiny(arch)
    x = torch.rand(3, 3, 32, 32)
    assert enc.embed_dim == SIZES["tiny"][0] and enc.num_patches == 16
    assert enc(x).shape == (3, enc.embed_dim)
    assert enc.patch_tokens(x).shape == (3, 16, enc.embed_dim)
    assert enc.tokens(x).shape == (3, 17, enc.embed_dim)
    assert enc.model.embeddings.mask_token is not None
    masked = torch.zeros(3, 16, dtype=torch.bool)
    masked[:, :4] = True
    with torch.no_grad():
        torch.nn.init.normal_(enc.model.embeddings.mask_token)
        assert not torch.allclose(enc.patch_tokens(x, masked), enc.patch_tokens(x))
    # A smaller crop (e.g. a SynCLR local crop) runs with interpolated position embeddings.
    assert enc(torch.rand(2, 3, 16, 16)).shape == (2, enc.embed_dim)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_and_reload_give_same_outputs(arch: str, tmp_path: Path) -> None:
    enc = _tiny(arch)
    save_backbone(enc, tmp_path / "bb")
    assert (tmp_path / "bb" / "model.safetensors").exists() and (tmp_path / "bb" / "config.json").exists()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = enc(x)
        again = load_backbone(tmp_path / "bb").eval()
        torch.testing.assert_close(again(x), expected)
        torch.testing.assert_close(again.model.embeddings.mask_token, enc.model.embeddings.mask_token)
        plain = AutoModel.from_pretrained(tmp_path / "bb").eval()  # as any user would load it
        torch.testing.assert_close(plain(pixel_values=x).last_hidden_state[:, 0], expected)


def _expected_vit_params(d: int, layers: int, image: int = 224, patch: int = 16, layerscale: bool = False) -> int:
    block = 12 * d * d + 13 * d + (2 * d if layerscale else 0)  # qkv, proj, 4x MLP, 2 LNs (+ LayerScale)
    tokens = (image // patch) ** 2 + 1
    embeddings = 3 * patch * patch * d + d + d + tokens * d + d  # patch conv, CLS, positions, mask token
    return layers * block + embeddings + 2 * d  # final LN


@pytest.mark.parametrize("size,approx_millions", [("small", 21.7), ("base", 85.8), ("large", 303.3)])
@pytest.mark.parametrize("arch", ARCHS)
def test_parameter_counts_on_meta_device(arch: str, size: str, approx_millions: float) -> None:
    cfg = BackboneConfig(arch=arch, size=size, image_size=224, patch_size=16)
    enc = build_backbone(cfg, device="meta")
    assert next(enc.parameters()).device.type == "meta"
    d, layers, _ = SIZES[size]
    n = sum(p.numel() for p in enc.parameters())
    assert n == _expected_vit_params(d, layers, layerscale=arch == "dinov2")
    assert n / 1e6 == pytest.approx(approx_millions, rel=0.01)


def test_mlp_head_structure() -> None:
    head = MLPHead(64, 128, 32, num_layers=3)
    linears = [m for m in head if isinstance(m, nn.Linear)]
    bns = [m for m in head if isinstance(m, nn.BatchNorm1d)]
    assert [lin.out_features for lin in linears] == [128, 128, 32]
    assert len(bns) == 2 and isinstance(list(head)[-1], nn.Linear)
    assert head(torch.randn(5, 64)).shape == (5, 32)
    single = MLPHead(64, 128, 16, num_layers=1)
    assert len(single) == 1 and single(torch.randn(2, 64)).shape == (2, 16)
    with pytest.raises(ValueError):
        MLPHead(4, 4, 4, num_layers=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_contrastive_model(arch: str) -> None:
    torch.manual_seed(0)
    model = build_contrastive_model(BackboneConfig(arch=arch), HeadConfig(hidden_dim=48, out_dim=16))
    assert isinstance(model, ContrastiveModel)
    x = torch.rand(4, 3, 32, 32)
    out = model(x)
    assert out.shape == (4, 16)
    assert model.encoder(x).shape == (4, model.encoder.embed_dim)
    out.pow(2).sum().backward()
    assert model.encoder.model.embeddings.patch_embeddings.projection.weight.grad is not None


@pytest.mark.parametrize("arch", ["vit", "dinov2"])
def test_grad_checkpointing_gives_the_same_gradients(arch: str) -> None:
    """Recomputing blocks in the backward changes no gradient: the same model with and without it, on one batch."""
    import copy

    from synray.config import BackboneConfig, HeadConfig
    from synray.models.backbone import enable_grad_checkpointing
    from synray.models.heads import build_contrastive_model

    torch.manual_seed(0)
    plain = build_contrastive_model(BackboneConfig(arch=arch, image_size=32, patch_size=8),
                                    HeadConfig(hidden_dim=32, out_dim=16))
    checkpointed = copy.deepcopy(plain)
    assert enable_grad_checkpointing(checkpointed) == 1
    assert checkpointed.encoder.model.is_gradient_checkpointing and not plain.encoder.model.is_gradient_checkpointing
    x = torch.randn(4, 3, 32, 32)
    for m in (plain, checkpointed):
        m.train()
        m(x).square().sum().backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
