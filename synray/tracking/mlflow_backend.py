"""MLflow as synray's experiment tracker: runs in an experiment, a sweep's trials as child runs of the sweep's run,
the exported backbone as a version of a registered model."""

from __future__ import annotations

import base64
import importlib.util
import os
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from synray.config.tracking import TrackingConfig
from synray.tracking.base import RunRef, Tracker, TrackerError, chunks

__all__ = ["MlflowTracker"]

#: MLflow's limits on one log_batch call
MAX_PARAMS, MAX_METRICS, MAX_PARAM_CHARS = 100, 1000, 6000


def _client(uri: str, timeout_s: float) -> Any:
    # one try per call and a bounded wait: synray's own buffer retries (synray.tracking.base.Buffered), so MLflow's
    # client must not sit in its own retries for minutes (its default: 7 with back-off, 120 s each)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, int(timeout_s))))
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _ask_server(url: str, timeout_s: float) -> None:
    """One request to a tracking server's REST API, with the credentials MLflow's client would send (from the
    environment); TrackerError when it does not answer or refuses them."""
    request = urllib.request.Request(f"{url.rstrip('/')}/api/2.0/mlflow/experiments/get-by-name?"
                                     f"experiment_name=synray-check")
    token, user = os.environ.get("MLFLOW_TRACKING_TOKEN"), os.environ.get("MLFLOW_TRACKING_USERNAME")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    elif user:
        pair = f"{user}:{os.environ.get('MLFLOW_TRACKING_PASSWORD', '')}".encode()
        request.add_header("Authorization", f"Basic {base64.b64encode(pair).decode()}")
    try:
        urllib.request.urlopen(request, timeout=timeout_s).close()
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise TrackerError(f"tracking.uri={url}: the tracking server refused synray's credentials (HTTP "
                               f"{e.code}); set MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME and "
                               "MLFLOW_TRACKING_PASSWORD, in the job's environment") from None
        if e.code != 404:   # 404: the server answered (no such experiment)
            raise TrackerError(f"tracking.uri={url}: the tracking server answered HTTP {e.code}") from None
    except OSError as e:
        raise TrackerError(f"tracking.uri={url}: the MLflow tracking server did not answer ({e}); start it, or "
                           "set tracking.backend=none") from None


def _local_store(output_root: str) -> tuple[str, str]:
    """(tracking URI, artifact folder) of the local store beside the run directories."""
    root = Path(output_root).resolve()
    return f"sqlite:///{root / 'mlflow.db'}", str(root / "mlartifacts")


class MlflowTracker(Tracker):
    name = "mlflow"
    has_registry = True

    @classmethod
    def where(cls, cfg: TrackingConfig, output_root: str) -> str:
        if cfg.uri:
            return cfg.uri
        if "://" in output_root:
            raise TrackerError(f"tracking.backend=mlflow with output_root={output_root}: a local MLflow store needs a "
                               "local output_root; set tracking.uri to your tracking server")
        return _local_store(output_root)[0]

    @classmethod
    def check(cls, cfg: TrackingConfig, output_root: str) -> str:
        """A server is asked over HTTP (no MLflow import: `synray plan` stays light); a local SQLite store needs its
        folder and the mlflow package; any other store is asked through MLflow's client."""
        where = cls.where(cfg, output_root)
        if importlib.util.find_spec("mlflow") is None:
            raise TrackerError("tracking.backend=mlflow needs the mlflow package (pip install mlflow)")
        if urlsplit(where).scheme in ("http", "https"):
            _ask_server(where, cfg.timeout_s)
        elif where.startswith("sqlite:///"):
            folder = Path(where.removeprefix("sqlite:///")).parent
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise TrackerError(f"tracking.uri={where}: its folder cannot be made ({e})") from None
        else:
            try:
                _client(where, cfg.timeout_s).search_experiments(max_results=1)
            except Exception as e:
                raise TrackerError(f"tracking.uri={where}: MLflow's store did not answer ({type(e).__name__}: "
                                   f"{str(e)[:300]})") from None
        return where

    @classmethod
    def start(cls, cfg: TrackingConfig, output_root: str, experiment: str, run_name: str, tags: Mapping[str, str],
              parent: RunRef | None = None) -> RunRef:
        where = parent.where if parent else cls.where(cfg, output_root)
        client = _client(where, cfg.timeout_s)
        experiment = parent.experiment if parent else experiment
        found = client.get_experiment_by_name(experiment)
        if found is not None:
            experiment_id = found.experiment_id
        elif where.startswith("sqlite:///") and not cfg.uri:
            experiment_id = client.create_experiment(experiment, artifact_location=_local_store(output_root)[1])
        else:
            experiment_id = client.create_experiment(experiment)
        all_tags = {**cfg.tags, **tags, **({"mlflow.parentRunId": parent.run_id} if parent else {})}
        run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
        return RunRef(cls.name, where, run.info.run_id, experiment, cfg.timeout_s, cfg.retry_s)

    def __init__(self, ref: RunRef) -> None:
        super().__init__(ref)
        self.client = _client(ref.where, ref.timeout_s)

    def log_params(self, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:MAX_PARAM_CHARS]) for k, v in sorted(params.items())]
        for batch in chunks(items, MAX_PARAMS):
            self.client.log_batch(self.ref.run_id, params=batch)

    def log_metrics(self, metrics: Mapping[str, float], step: int, when: float | None = None) -> None:
        from mlflow.entities import Metric

        ms = int(1000 * (when or time.time()))
        items = [Metric(k, float(v), ms, int(step)) for k, v in sorted(metrics.items())]
        for batch in chunks(items, MAX_METRICS):
            self.client.log_batch(self.ref.run_id, metrics=batch)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.ref.run_id, tags=[RunTag(k, str(v)) for k, v in sorted(tags.items())])

    def log_artifact(self, path: Path, folder: str = "") -> None:
        if Path(path).is_dir():
            self.client.log_artifacts(self.ref.run_id, str(path), folder or Path(path).name)
        else:
            self.client.log_artifact(self.ref.run_id, str(path), folder or None)

    def register_model(self, name: str, folder: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name)
        except MlflowException as e:
            if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code):
                raise
        self.client.create_model_version(name, f"runs:/{self.ref.run_id}/{folder}", run_id=self.ref.run_id)

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.ref.run_id, status)

    def refused(self, error: Exception) -> bool:
        from mlflow.exceptions import MlflowException

        if not isinstance(error, MlflowException):
            return False
        status = error.get_http_status_code()
        return 400 <= status < 500 and status not in (408, 429)
