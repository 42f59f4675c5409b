"""The training objectives, one per `train.loss`: what each needs, how it builds its model and batches, its loss, its export.

Everything the rest of the system asks of a loss goes through an `Objective` here: the planning
step (views per image, images per caption, columns, text tower, checks), the worker (model,
batches, loss, export) and the driver (checkpoint fingerprints). Adding an objective is one entry
in `OBJECTIVES` (a subclass of `Objective`) plus its settings in `TrainConfig`: `train.loss` is checked against the
registry's names, and the registry guard tests and every per-objective test run over all entries.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from synray.config import RunConfig, TrainConfig
from synray.data.schema import TRAIN_COLUMNS
from synray.models.sizes import relative_cost
from synray.models.tiny import localize
from synray.models.tiny_specs import CLIP_MAX_LENGTH
from synray.stages import Rate
from synray.train import schedules
from synray.train.spec import TrainPlan

if TYPE_CHECKING:   # models, losses and batches are imported where they run (on workers): plans read this without torch
    from torch import Tensor, nn

    from synray.models.heads import SynCLRModel
    from synray.train.augment import Augment
    from synray.train.batches import ImageBatch, ImageTextBatch

log = logging.getLogger(__name__)

__all__ = ["OBJECTIVES", "Objective", "ModelParts", "TrainSetupError", "get_objective", "objective_names"]


class TrainSetupError(ValueError):
    """A training setup that cannot work, found before any worker starts."""


@dataclass
class ModelParts:
    """What an objective builds on a worker: the model to train, and what its batches need besides rows."""

    model: nn.Module
    tokenizer: Any = None        # image-text objectives: the text tower's tokenizer
    max_length: int | None = None


class Objective:
    """Base of the training objectives (stateless; one instance per `train.loss` in `OBJECTIVES`)."""

    #: the `train.loss` value
    name: ClassVar[str]
    #: augmented views of each image per step
    views: ClassVar[int] = 1
    #: fewest images per caption row the objective can learn from
    min_images_per_caption: ClassVar[int] = 1
    #: augmentation preset when `train.augment.preset` is unset (the one the method was published with)
    default_augment: ClassVar[str] = "strong"
    #: trains a text tower too; its export then serves zero-shot evaluation
    image_text: ClassVar[bool] = False
    #: learns from the rows' concept labels (rows of a caption file have none)
    needs_labels: ClassVar[bool] = False
    #: gradient-norm clipping when train.grad_clip is unset (0: none)
    default_grad_clip: ClassVar[float] = 1.0

    def grad_clip(self, t: TrainConfig) -> float:
        """The gradient-norm clipping of a run: train.grad_clip, else this objective's default (0: none)."""
        return self.default_grad_clip if t.grad_clip is None else t.grad_clip

    def row_cost(self, t: TrainConfig, per_caption: int) -> float:
        """A row's forward and backward passes, in images of ViT-B/16 at 224 px (the rate reference's unit)."""
        return self.images_per_row(per_caption) * self.views * relative_cost(t.backbone)

    # -------------------------------------------------------------------------- what it needs
    def images_per_row(self, per_caption: int) -> int:
        """Images of one row that enter a step (before views)."""
        return per_caption

    def required_columns(self) -> tuple[str, ...]:
        """Columns stored training data must have."""
        return tuple(TRAIN_COLUMNS)

    def columns(self, available: Collection[str] | None) -> list[str]:
        """The columns workers read, from what a store offers (None: a generation stream, all row columns)."""
        return list(TRAIN_COLUMNS)

    def check(self, cfg: RunConfig, per_caption: int, text_model: str | None) -> None:
        """TrainSetupError for a setup this objective cannot train (nothing is started or loaded)."""
        if self.needs_labels and cfg.captions.style == "file" and cfg.data.mode != "stored":
            raise TrainSetupError(f"train.loss={self.name} learns concept labels, which rows of a caption file "
                                  "(captions.style=file) do not have")
        if per_caption < self.min_images_per_caption:
            raise TrainSetupError(
                f"train.loss={self.name} needs at least {self.min_images_per_caption} images per caption "
                f"(images.per_caption={per_caption}): with one image an anchor has no positive. Use "
                "train.loss=simclr for m=1")

    def fingerprint(self, t: TrainConfig) -> dict[str, Any]:
        """What a checkpoint must agree on to be resumed: the model and the loss."""
        return {"backbone": t.backbone.model_dump(), "head": t.head.model_dump(), "loss": self.name}

    # ---------------------------------------------------------------------------- on a worker
    def build(self, cfg: RunConfig, num_classes: int, text_model: str | None) -> ModelParts:
        """The model at its initial weights (called right after the worker seeds torch)."""
        raise NotImplementedError

    # --------------------------------------------------------------- in Ray Data, on CPUs
    def preprocess_setup(self, cfg: RunConfig, plan: TrainPlan) -> Any:
        """What a preprocessing actor loads once (a tokenizer, ...): by default the generator that draws a row's
        images when it holds more than a step uses (train.images_per_row), fresh on each actor."""
        return np.random.default_rng() if plan.draw_images else None

    def preprocess(self, rows: dict[str, np.ndarray], cfg: RunConfig, plan: TrainPlan,
                   state: Any) -> dict[str, np.ndarray]:
        """Rows -> fixed-shape arrays, one entry per row (so a caption's m images stay together)."""
        from synray.train.batches import decode_rows

        return decode_rows(rows, plan.per_caption, state)

    # ---------------------------------------------------------------------- on the device
    def make_batch(self, tensors: dict[str, Tensor], rng: np.random.Generator) -> ImageBatch | ImageTextBatch:
        """A batch of preprocessed rows (tensors, already on the device) -> the objective's batch."""
        from synray.train.batches import flatten_rows

        return flatten_rows(tensors)

    def augmentation(self, t: TrainConfig) -> nn.Module:
        """The on-device augmentation the loss gets: `train.augment`, at this objective's default preset."""
        from synray.train.augment import build_augment

        return build_augment(t.augment, t.backbone.image_size, self.default_augment)

    def after_engine(self, model: nn.Module) -> None:
        """Called once the training engine wraps the model (and may have cast it), before a checkpoint loads."""

    def loss(self, model: nn.Module, augment: nn.Module, batch: Any, t: TrainConfig,
             step: int) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """This worker's share of the global batch's loss at optimizer step `step` (batch already on the model's
        device; every rank's batch has the same size, so the gathers exchange no sizes); or the loss and its named
        parts, which the training log records beside it (`loss_<part>`, averaged like the loss)."""
        raise NotImplementedError

    def after_update(self, model: nn.Module, step: int, t: TrainConfig) -> None:
        """Called after each optimizer update; `step` counts the updates before it (from 0). The EMA teacher's hook."""

    def export(self, model: nn.Module, directory: Path, parts: ModelParts, t: TrainConfig) -> None:
        """The trained weights in loadable form: the backbone in transformers' format."""
        from synray.models.backbone import save_backbone

        save_backbone(model.encoder, directory)


class ContrastiveObjective(Objective):
    """An image-only contrastive objective: the backbone with StableRep's projection head."""

    def build(self, cfg: RunConfig, num_classes: int, text_model: str | None) -> ModelParts:
        from synray.models.heads import build_contrastive_model

        return ModelParts(build_contrastive_model(cfg.train.backbone, cfg.train.head))


class StableRep(ContrastiveObjective):
    """StableRep's multi-positive contrastive loss: the m images of a caption are each other's positives."""

    name: ClassVar[str] = "stablerep"
    min_images_per_caption: ClassVar[int] = 2

    def loss(self, model: nn.Module, augment: Augment, batch: ImageBatch, t: TrainConfig, step: int) -> Tensor:
        from synray.train import losses

        return losses.multi_positive_contrastive(model(augment(batch.images)), batch.caption_ids, t.temperature,
                                                 same_size=True)


class SimCLR(ContrastiveObjective):
    """SimCLR's InfoNCE: two augmented views of each image are the only positives."""

    name: ClassVar[str] = "simclr"
    views: ClassVar[int] = 2

    def loss(self, model: nn.Module, augment: Augment, batch: ImageBatch, t: TrainConfig, step: int) -> Tensor:
        from synray.train import losses

        return losses.info_nce(model(augment(batch.images)), model(augment(batch.images)), t.temperature,
                               same_size=True)


class Supervised(Objective):
    """Cross-entropy over the concept labels (the supervised baseline)."""

    name: ClassVar[str] = "supervised"
    needs_labels: ClassVar[bool] = True

    def build(self, cfg: RunConfig, num_classes: int, text_model: str | None) -> ModelParts:
        from synray.models.heads import build_classifier

        return ModelParts(build_classifier(cfg.train.backbone, num_classes))

    def loss(self, model: nn.Module, augment: Augment, batch: ImageBatch, t: TrainConfig, step: int) -> Tensor:
        from synray.train import losses

        return losses.supervised_ce(model(augment(batch.images)), batch.labels)


class Clip(Objective):
    """CLIP's symmetric image-text loss with a learnable logit scale; LaCLIP's caption picks among rewrites."""

    name: ClassVar[str] = "clip"
    default_augment: ClassVar[str] = "crop"
    image_text: ClassVar[bool] = True

    def images_per_row(self, per_caption: int) -> int:
        return 1  # one (image, caption) pair per row

    def row_cost(self, t: TrainConfig, per_caption: int) -> float:
        """The image, and a caption through a CLIP ViT-B text tower (12 layers of 512 over 77 tokens: ~0.17 of a
        ViT-B/16 image)."""
        return relative_cost(t.backbone) + TEXT_TOWER_COST

    def required_columns(self) -> tuple[str, ...]:
        return ("caption",)

    def columns(self, available: Collection[str] | None) -> list[str]:
        if available is None:
            return ["caption", "images"]
        image = next((c for c in ("image", "images") if c in available), None)
        if image is None:
            raise TrainSetupError(f"image-text training needs an image or images column (the data has "
                                  f"{sorted(available)})")
        return ["caption", image] + (["rewrites"] if "rewrites" in available else [])

    def check(self, cfg: RunConfig, per_caption: int, text_model: str | None) -> None:
        """train.text.model must be a CLIP text model with a projection (its config only is read)."""
        name = str(text_model or cfg.train.text.model)
        if name == "tiny:text":   # not built yet (a plan): its positions are declared
            positions = CLIP_MAX_LENGTH
        else:
            from synray.models.image_text import TextTowerError, text_tower_config

            try:
                positions = text_tower_config(name).max_position_embeddings
            except TextTowerError as e:
                raise TrainSetupError(f"train.text.model={cfg.train.text.model!r}: {e}") from e
        if cfg.train.text.max_length > positions:
            raise TrainSetupError(f"train.text.max_length={cfg.train.text.max_length} exceeds the text tower's "
                                  f"{positions} positions")

    def fingerprint(self, t: TrainConfig) -> dict[str, Any]:
        return {**super().fingerprint(t), "text": t.text.model_dump()}

    def build(self, cfg: RunConfig, num_classes: int, text_model: str | None) -> ModelParts:
        from synray.models.backbone import build_backbone
        from synray.models.image_text import ImageTextModel, load_text_tower

        t = cfg.train
        path = localize(t.text.model, text_model or t.text.model, cfg.model_cache)
        text, tokenizer = load_text_tower(path)
        model = ImageTextModel(build_backbone(t.backbone), text, init_temperature=t.temperature)
        return ModelParts(model, tokenizer, t.text.max_length)

    def preprocess_setup(self, cfg: RunConfig, plan: TrainPlan) -> Any:
        from synray.models.image_text import load_tokenizer

        return load_tokenizer(localize(cfg.train.text.model, plan.text_model or cfg.train.text.model,
                                       cfg.model_cache))

    def preprocess(self, rows: dict[str, np.ndarray], cfg: RunConfig, plan: TrainPlan,
                   state: Any) -> dict[str, np.ndarray]:
        from synray.train.batches import image_text_rows

        return image_text_rows(rows, cfg.train.backbone.image_size, state, cfg.train.text.max_length)

    def make_batch(self, tensors: dict[str, Tensor], rng: np.random.Generator) -> ImageTextBatch:
        from synray.train.batches import pick_pairs

        return pick_pairs(tensors, rng)

    def loss(self, model: nn.Module, augment: Augment, batch: ImageTextBatch, t: TrainConfig, step: int) -> Tensor:
        from synray.train import losses

        image_features, text_features, scale = model(augment(batch.images), batch.input_ids)
        return losses.clip_loss(image_features, text_features, logit_scale=scale, same_size=True)

    def export(self, model: nn.Module, directory: Path, parts: ModelParts, t: TrainConfig) -> None:
        """The backbone (AutoModel loads it), plus text/ and the projection for zero-shot evaluation."""
        from synray.models.image_text import save_image_text

        save_image_text(model, parts.tokenizer, directory, t.text.max_length)


class SynCLR(Objective):
    """SynCLR: multi-positive contrastive between student queries of every crop and the EMA teacher's keys, plus
    iBOT masked image modelling on the global crop; the teacher's backbone is the export."""

    name: ClassVar[str] = "synclr"
    min_images_per_caption: ClassVar[int] = 2
    default_grad_clip: ClassVar[float] = 0.0   # the published code does not clip

    def row_cost(self, t: TrainConfig, per_caption: int) -> float:
        """Each image's global crop through the student (forward and backward) and the teacher (forward: a third),
        and its local crops through the student."""
        local = relative_cost(t.backbone, t.synclr.local_crop_size(t.backbone))
        return self.images_per_row(per_caption) * (relative_cost(t.backbone) * 4 / 3 + t.synclr.local_crops * local)

    def check(self, cfg: RunConfig, per_caption: int, text_model: str | None) -> None:
        """Besides the base checks: the local crops must be whole patches and no larger than the image; schedules
        and prototypes that cannot work at this run's length and batch are logged (`synclr_warnings`)."""
        super().check(cfg, per_caption, text_model)
        for warning in synclr_warnings(cfg, per_caption):
            log.warning("%s", warning)
        t = cfg.train
        local = t.synclr.local_crop_size(t.backbone)
        if t.synclr.local_crops and (local % t.backbone.patch_size or local > t.backbone.image_size):
            raise TrainSetupError(f"train.synclr.local_size={local} must be a multiple of train.backbone.patch_size="
                                  f"{t.backbone.patch_size} and at most train.backbone.image_size="
                                  f"{t.backbone.image_size}")

    def fingerprint(self, t: TrainConfig) -> dict[str, Any]:
        s = t.synclr
        shape = {k: getattr(s, k) for k in ("predictor_hidden_dim", "predictor_layers", "prototypes",
                                              "prototype_hidden_dim", "prototype_bottleneck_dim", "prototype_norm",
                                              "head_norm")}
        return {**super().fingerprint(t), "synclr": shape}

    def build(self, cfg: RunConfig, num_classes: int, text_model: str | None) -> ModelParts:
        from synray.models.heads import build_synclr_model

        t = cfg.train
        return ModelParts(build_synclr_model(t.backbone, t.head, t.synclr))

    def augmentation(self, t: TrainConfig) -> nn.Module:
        from synray.train import synclr

        s = t.synclr
        return synclr.MultiCrop(t.backbone.image_size, s.local_crop_size(t.backbone), s.local_crops,
                                s.global_crop_scale, s.local_crop_scale, t.augment.preset or self.default_augment)

    def after_engine(self, model: nn.Module) -> None:
        _synclr_model(model).keep_teacher_fp32()

    def loss(self, model: nn.Module, augment: nn.Module, batch: ImageBatch, t: TrainConfig,
             step: int) -> tuple[Tensor, dict[str, Tensor]]:
        import torch

        from synray.train import synclr

        s = t.synclr
        global_view, local_views = augment(batch.images)
        b, patches = global_view.shape[0], (global_view.shape[-1] // t.backbone.patch_size) ** 2
        masks = synclr.mim_masks(b, patches, s.mask_image_share, s.mask_patch_share, device=global_view.device)
        positions = synclr.masked_positions(masks, synclr.mim_count(b, patches, s.mask_image_share,
                                                                     s.mask_patch_share))
        out = model(global_view, torch.cat(local_views) if local_views else None, masks, positions)
        teacher_temp = synclr.teacher_temperature(step, s.temperature_warmup_steps(t.steps), s.teacher_temperature,
                                                  s.teacher_temperature_final)
        return synclr.synclr_loss(out, batch.caption_ids, t.temperature, teacher_temp, s.student_temperature,
                                  s.sinkhorn_iterations, s.ibot_weight, s.local_own_key)

    def export(self, model: nn.Module, directory: Path, parts: ModelParts, t: TrainConfig) -> None:
        """The teacher's backbone (the one SynCLR evaluates), or the student's (train.synclr.export)."""
        from synray.models.backbone import save_backbone

        m = _synclr_model(model)
        save_backbone(m.teacher.encoder if t.synclr.export == "teacher" else m.student.encoder, directory)

    def after_update(self, model: nn.Module, step: int, t: TrainConfig) -> None:
        from synray.train import synclr

        m = _synclr_model(model)
        synclr.ema_update(m.teacher, m.student, synclr.ema_momentum(step, t.steps, t.synclr.momentum_at_start(t.steps),
                                                                    t.synclr.ema_momentum_final))


#: a caption through CLIP ViT-B's text tower, in forward-backward passes of a ViT-B/16 224-px image
TEXT_TOWER_COST = 0.17
#: one H100 trains ViT-B/16 at 224 px in bf16 on ~1,650 images/s (synray's step on in-GPU tensors, measured)
REFERENCE_TRAIN_IMAGES_PER_S = 1650.0


def training_rate(cfg: RunConfig) -> Rate | None:
    """Rows one training worker trains on per second on a GPU: the reference over the row's cost (its images and
    views through the configured backbone, +1/3 with gradient checkpointing) and the worker's GPU share."""
    t = cfg.train
    if not t.use_gpu:
        return None
    cost = get_objective(t.loss).row_cost(t, t.images_per_row or cfg.images.per_caption)
    cost *= 4 / 3 if t.grad_checkpointing else 1.0
    return Rate(REFERENCE_TRAIN_IMAGES_PER_S * min(1.0, t.gpus_per_worker) / cost,
                f"reference: ViT-B/16 at 224 px in bf16 on one H100, {REFERENCE_TRAIN_IMAGES_PER_S:,.0f} images/s "
                f"(measured with synray), a row costing {cost:.2f} such images ({t.loss}, {t.backbone.size}/"
                f"{t.backbone.patch_size} at {t.backbone.image_size} px)")


#: a teacher whose averaging horizon at step 0 exceeds this share of the run is warned about
HORIZON_WARN_SHARE = 0.1


def synclr_warnings(cfg: RunConfig, per_caption: int) -> list[str]:
    """What makes SynCLR's schedules or targets meaningless at this run's length and batch, naming the keys: a
    teacher that averages over a large share of the run (much of it still the random initialisation early on),
    and more prototypes than masked tokens a step (Sinkhorn-Knopp then spreads every target over several)."""
    t, s = cfg.train, cfg.train.synclr
    out = []
    momentum = s.momentum_at_start(t.steps)
    horizon = 1.0 / max(1.0 - momentum, 1e-12)
    if horizon > HORIZON_WARN_SHARE * t.steps:
        tenth = max(1, t.steps // 10)
        initial = math.prod(schedules.ema_momentum(k, t.steps, momentum, s.ema_momentum_final) for k in range(tenth))
        out.append(f"train.synclr.ema_momentum={momentum:g} averages the teacher over about {horizon:.0f} steps, "
                   f"{100 * horizon / t.steps:.0f}% of train.steps={t.steps}: after {tenth} steps {100 * initial:.0f}% "
                   "of the teacher is still its random initialisation; state the horizon as a share of the run "
                   "(train.synclr.ema_horizon, e.g. 0.02) or lower train.synclr.ema_momentum")
    images = t.step_rows * SynCLR().images_per_row(per_caption)
    patches = (t.backbone.image_size // t.backbone.patch_size) ** 2
    masked = schedules.mim_count(images, patches, s.mask_image_share, s.mask_patch_share)
    if s.prototypes > masked:
        out.append(f"train.synclr.prototypes={s.prototypes} outnumber the {masked} masked tokens of a step ({images} "
                   f"global crops x train.synclr.mask_image_share={s.mask_image_share} x {patches} patches x "
                   f"mask_patch_share={s.mask_patch_share}): Sinkhorn-Knopp balances the targets over the "
                   f"prototypes, so each target spreads over at least {s.prototypes / max(masked, 1):.0f} of them "
                   "whatever the teacher says; use fewer prototypes or a larger batch")
    return out


def _synclr_model(model: nn.Module) -> SynCLRModel:
    """The SynCLR model inside a training engine (or the model itself)."""
    return getattr(model, "module", model)


#: train.loss -> objective
OBJECTIVES: dict[str, Objective] = {o.name: o for o in (StableRep(), SimCLR(), SynCLR(), Clip(), Supervised())}


def objective_names() -> tuple[str, ...]:
    return tuple(OBJECTIVES)


def get_objective(name: str) -> Objective:
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise TrainSetupError(f"train.loss {name!r} is not an objective; allowed: {', '.join(OBJECTIVES)}") from None
