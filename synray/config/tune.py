"""The `tune` section: a sweep's search space (keyed by config paths), its variants, search, scheduler and budget."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from synray.config.base import Section, _registered

__all__ = ["SpaceSpec", "TuneConfig", "UnitCosts", "SPACE_KINDS", "LOSS_METRIC"]

SPACE_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
#: the metric every trial reports while it trains; the other values of tune.metric are the probe figures that
#: synray.eval.registry marks tunable (checked against it when a config is loaded, see `validate`)
LOSS_METRIC = "loss"


class SpaceSpec(Section):
    """One swept config path: exactly one of grid/choice (values) or uniform/loguniform/randint ([low, high])."""

    grid: list[Any] | None = Field(None, description="every value, each in its own trial(s)")
    choice: list[Any] | None = Field(None, description="one value drawn per trial")
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = Field(None, description="an integer in [low, high], both included")

    @model_validator(mode="after")
    def _one_kind(self) -> "SpaceSpec":
        given = [k for k in SPACE_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(SPACE_KINDS)} (got {', '.join(given) or 'none'})")
        kind, values = self.kind()
        if kind in ("grid", "choice") and not values:
            raise ValueError(f"{kind} needs at least one value")
        if kind in ("uniform", "loguniform", "randint") and not values[0] < values[1]:
            raise ValueError(f"{kind} needs low < high, got {list(values)}")
        if kind == "loguniform" and values[0] <= 0:
            raise ValueError("loguniform needs low > 0")
        return self

    def kind(self) -> tuple[str, list[Any]]:
        for k in SPACE_KINDS:
            v = getattr(self, k)
            if v is not None:
                return k, list(v)
        raise ValueError("empty search dimension")


class UnitCosts(Section):
    """Device-seconds of each unit of work, declared for the cluster a sweep's allocation is for (e.g. GPU figures
    measured elsewhere); without them the report uses what the sweep itself measured."""

    caption_s: float = Field(gt=0, description="device-seconds per caption generated")
    image_s: float = Field(gt=0, description="device-seconds per image rendered")
    view_s: float = Field(gt=0, description="device-seconds per image (augmented view) trained on")
    device: str = Field("GPU", description="what a device-second is of, as the report labels it")


class TuneConfig(Section):
    space: dict[str, SpaceSpec] = Field(default_factory=dict, description="config path -> distribution, e.g. "
                                        "train.temperature: {grid: [0.05, 0.1]}")
    variants: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="named groups of config-path overrides swept together (methods, e.g. "
        "SimCLR: {train.loss: simclr, images.per_caption: 1}); crossed with the space")
    num_samples: int = Field(1, ge=1, description="trials per grid point (random search: values drawn)")
    metric: str = Field("knn_accuracy", description="what trials are ranked and fitted by: a probe figure, or loss")
    mode: Literal["max", "min"] = "max"
    scheduler: Literal["none", "asha"] = Field("none", description="asha: stop trials early on their training "
                                               "loss at the same step (comparable within one objective only)")
    asha_grace_steps: int = Field(100, ge=1)
    asha_reduction_factor: float = Field(3.0, gt=1)
    budget: Literal["steps", "epochs"] = Field("steps", description="steps: train.steps at every data scale "
                                               "(the same compute); epochs: tune.epochs passes over each subset")
    epochs: float = Field(1.0, gt=0)
    scale: Literal["images", "captions"] = Field("images", description="the data scale of fits and plots: "
                                                 "captions x images per caption, or captions")
    pool_captions: int | None = Field(None, ge=1, description="captions per data pool (default: the largest "
                                      "data.num_captions a trial can ask for)")
    max_concurrent_trials: int | None = Field(None, ge=1, description="default: as many as the cluster holds")
    max_trial_failures: int = Field(1, ge=0, description="restarts of a failed trial (from its checkpoints)")
    storage: str | None = Field(None, description="the sweep directory, or a cloud URI (default "
                                "<output_root>/sweeps/<name>)")
    trial_cpus: float = Field(0.25, gt=0, description="CPUs of each trial's driver (the Tune function)")
    driver_resource: str | None = Field(None, description="a custom resource only CPU nodes declare: trial "
                                        "drivers then stay off the GPU workers")
    costs: UnitCosts | None = Field(None, description="declared device-seconds per caption, image and trained view "
                                    "for the allocation report (default: measured by the sweep)")
    budgets: list[float] = Field(default_factory=list, description="device-second budgets the allocation report "
                                 "splits (default: the cheapest, the median and the dearest trial's cost)")

    @field_validator("metric")
    @classmethod
    def _metric_registered(cls, v: str, info: ValidationInfo) -> str:
        return _registered("tune.metric", v, info)

    @model_validator(mode="after")
    def _metric_mode(self) -> "TuneConfig":
        if (self.metric == LOSS_METRIC) != (self.mode == "min"):
            raise ValueError(f"metric {self.metric} is ranked with mode="
                             f"{'min' if self.metric == LOSS_METRIC else 'max'}")
        return self
