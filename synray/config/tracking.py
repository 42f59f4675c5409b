"""The `tracking` section: which experiment tracker a run, a sweep and a benchmark log to (MLflow, TensorBoard, W&B)."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from pydantic import Field, ValidationInfo, field_validator, model_validator

from synray.config.base import Section, _registered

__all__ = ["TrackingConfig"]

#: environment variables a tracker reads its credentials from (never a config key: configs, logs and runs hold none)
SECRET_ENV = ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_USERNAME", "WANDB_API_KEY")


class TrackingConfig(Section):
    """An experiment tracker. `backend: none` (the default) logs nowhere but the run directory."""

    backend: str = Field("none", description="none, mlflow, tensorboard or wandb (synray.tracking's registry)")
    uri: str | None = Field(None, description="mlflow: the tracking server (http://host:5000) or store "
                            "(sqlite:///path/mlflow.db); tensorboard: the folder event files go to; wandb: the W&B "
                            "server (https://api.wandb.ai), or a folder for offline runs. Default: a local store "
                            "beside the run directories (output_root/mlflow.db, output_root/tensorboard, "
                            "output_root/wandb: W&B offline, for `wandb sync`)")
    experiment: str | None = Field(None, description="the experiment's name (default: the config's name)")
    tags: dict[str, str] = Field(default_factory=dict, description="tags set on every run, e.g. {team: vision}")
    retry_s: float = Field(30.0, gt=0, description="a tracker that stops answering mid-run is asked again after "
                           "this long; the run goes on and logs what it could not send once it answers")
    timeout_s: float = Field(10.0, gt=0, description="how long one request to the tracker may take")

    @field_validator("backend")
    @classmethod
    def _backend_registered(cls, v: str, info: ValidationInfo) -> str:
        return _registered("tracking.backend", v, info)

    @field_validator("uri")
    @classmethod
    def _no_credentials(cls, v: str | None) -> str | None:
        if v and "://" in v and (urlsplit(v).username or urlsplit(v).password):
            raise ValueError("holds credentials; give the tracking server's token or password through the "
                             f"environment ({', '.join(SECRET_ENV)}), never in a config")
        return v

    @field_validator("tags")
    @classmethod
    def _tag_names(cls, v: dict[str, str]) -> dict[str, str]:
        bad = [k for k in v if not re.fullmatch(r"[A-Za-z0-9_.\-/ ]{1,250}", k)]
        if bad:
            raise ValueError(f"tag names {bad} are not allowed: letters, digits, _ . - / and spaces")
        return v

    @model_validator(mode="after")
    def _uri_fits_backend(self) -> "TrackingConfig":
        if self.backend == "none" and self.uri:
            raise ValueError(f"tracking.uri={self.uri} with tracking.backend=none; name the backend (mlflow, "
                             "tensorboard or wandb)")
        return self
