"""The training part of a run's plan: what the driver resolved once and every training worker reads."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TrainPlan"]


@dataclass(frozen=True)
class TrainPlan:
    """Decided on the driver before any worker starts; travels to the workers with the run config."""

    objective: str                   # train.loss: a key of synray.train.objectives.OBJECTIVES
    per_caption: int                 # images per row in the data (m); the objective may use fewer
    num_classes: int                 # concept classes (the supervised objective's outputs)
    epochs: bool                     # loop over the data in epochs (a store) or read it once (a stream)
    columns: tuple[str, ...]         # the row columns workers read
    text_model: str | None = None    # image-text objectives: the resolved text tower (name or directory)
    resume_from: str | None = None   # a checkpoint of an earlier run to start from
    resume_step: int | None = None   # the step that checkpoint holds
    tracks_rows: bool = False        # rows carry row_id: checkpoints record what was trained on (streams, and
                                     # stores written by synray), so a restart skips it
    draw_images: bool = False        # rows hold more images than per_caption: each read draws per_caption of them
