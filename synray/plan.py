"""The planning step: a run's config resolved and checked once, and its resources computed, before Ray starts.

`plan_run` resolves every model name (building tiny models on first use), checks every stage
(concepts, captions, images, data, training, evaluation, resume), derives the held-out set and
computes what each stage asks of the cluster. Programs (`synray run`, `train`, `generate`, `rewrite`,
`eval`) read the plan and never re-check the config. Bad input raises a synray error naming the key.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import pyarrow.compute as pc
import pyarrow.parquet as pq

from synray.captions.files import CaptionFileError, read_caption_file
from synray.captions.backends import caption_backend_names, get_caption_backend
from synray.captions.rewrite import check_source, rewrite_fingerprint
from synray.concepts import load_bank
from synray.config import ConfigError, RunConfig, load_config, with_overrides
from synray.data.ledger import ROW_ID
from synray.data.store import ParquetStore, StoreError
from synray.eval.datasets import inspect_dataset
from synray.eval.errors import EvalError
from synray.eval.registry import PROTOCOLS, check_protocols, protocol_names, tune_metrics
from synray.eval.report import EvalPlan, check_request, model_image_size
from synray.generation.pipeline import GenerationPlan, store_fingerprint
from synray.images.registry import RENDERERS, get_renderer, renderer_names
from synray.models.tiny import ModelError, resolve_model
from synray.pipelines import DataPlan, HeldoutPlan, run_stages
from synray.placement import ClusterSpec, Placement, StageResources, pack
from synray.stages import Rate, by_phase
from synray.tracking import tracker_names
from synray.train.engine import check_compatible
from synray.train.objectives import OBJECTIVES, Objective, TrainSetupError, get_objective, objective_names
from synray.train.spec import TrainPlan

__all__ = ["StageResources", "DataPlan", "HeldoutPlan", "RunPlan", "RewritePlan", "registry_choices",
           "load_run_config", "derive_config", "heldout_config", "check_eval_protocols", "check_subset_fills_a_batch",
           "plan_generation", "run_plan_stages", "plan_run", "plan_eval", "plan_rewrite", "model_names"]

log = logging.getLogger(__name__)

#: held-out columns the protocols may read (masks: segmentation; concept: zero-shot class names)
EVAL_COLUMNS = ("caption_id", "caption", "label", "concept", "images", "masks")


# ------------------------------------------------------------------------------------ configs
def registry_choices() -> dict[str, tuple[str, ...]]:
    """The names the registries offer for the config keys that select an implementation."""
    return {"train.loss": objective_names(), "images.backend": renderer_names(),
            "captions.backend": caption_backend_names(), "eval.protocols": protocol_names(),
            "tune.metric": tune_metrics(), "tracking.backend": tracker_names()}


def load_run_config(name_or_path: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    """A built-in config or YAML file with `key.path=value` overrides, validated, registry names included."""
    return load_config(name_or_path, overrides, registry_choices())


def derive_config(cfg: RunConfig, overrides: dict[str, object]) -> RunConfig:
    """A copy of cfg with {"a.b": value} applied and validated like a loaded config."""
    return with_overrides(cfg, overrides, registry_choices())


def heldout_config(cfg: RunConfig) -> RunConfig:
    """The held-out evaluation set: the same generator with another seed and eval.heldout_captions rows."""
    seed = (cfg.seed + cfg.eval.seed_offset) % (2**31 - 1)
    return derive_config(cfg, {"seed": seed, "data.num_captions": cfg.eval.heldout_captions, "data.mode": "stream"})


# -------------------------------------------------------------------------------------- plans
@dataclass(frozen=True)
class RunPlan:
    """Everything `synray run` / `synray train` do, decided before Ray starts."""

    cfg: RunConfig
    data: DataPlan
    train: TrainPlan
    heldout: HeldoutPlan | None
    protocols: tuple[str, ...]
    stages: tuple[StageResources, ...]
    fresh: bool = False                  # never continue an unfinished run of this config

    @property
    def objective(self) -> Objective:
        return get_objective(self.train.objective)

    def phases(self) -> dict[str, tuple[StageResources, ...]]:
        """The stages that hold resources at the same time, per phase (training, then evaluation)."""
        return by_phase(self.stages)

    def place(self, cluster: ClusterSpec) -> list[Placement]:
        """Each phase packed on the cluster's nodes; PlacementError (naming the settings) when one never fits."""
        return [pack(stages, cluster, phase) for phase, stages in self.phases().items()]

    def describe(self) -> list[str]:
        """One line per fact a user checks before paying for a run."""
        lines = [f"data: {self.data.mode}" + (f" ({self.data.store_dir})" if self.data.store_dir else ""),
                 f"training: {self.train.objective}, {self.train.per_caption} images per caption row, "
                 f"{self.cfg.train.steps} steps"]
        lines += [s.describe() for s in self.stages]
        if self.heldout is not None:
            lines.append(f"evaluation: {', '.join(self.protocols)} on "
                         + (self.heldout.dataset or f"{self.cfg.eval.heldout_captions} held-out captions"))
        return lines


@dataclass(frozen=True)
class RewritePlan:
    """A checked LaCLIP rewrite request (`synray rewrite`)."""

    cfg: RunConfig
    source: str
    out: str
    model_path: str
    fingerprint: str


# --------------------------------------------------------------------------------- generation
def plan_generation(cfg: RunConfig, store: ParquetStore | None = None, build_models: bool = True) -> GenerationPlan:
    """Check the generation stages and resolve their models (`build_models` off: tiny ones are named, not built);
    with a store, read what it already holds."""
    load_bank(cfg.concepts.bank, cfg.concepts.kinds, cfg.concepts.max_concepts)
    if cfg.captions.style == "file":
        held = len(read_caption_file(cfg.captions.source))
        if cfg.data.num_captions > held:
            raise CaptionFileError(f"data.num_captions={cfg.data.num_captions}, but captions.source="
                                   f"{cfg.captions.source} holds {held} captions (row i renders caption i)")
    backend = get_caption_backend(cfg.captions.backend)
    try:
        backend.check(cfg.captions)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    renderer = get_renderer(cfg.images.backend)
    renderer.check(cfg.images)
    llm = resolve_model(cfg.captions.model, cfg.model_cache, build=build_models) if backend.needs_model else None
    t2i = resolve_model(cfg.images.model, cfg.model_cache, build=build_models) if renderer.needs_model else None
    plan = GenerationPlan(cfg, llm, t2i, renderer, wanted=cfg.data.num_captions)
    if store is not None and store.check_writable(store_fingerprint(cfg)):
        plan.skip_ids = store.existing_ids()
        plan.existing_captions = store.existing_captions()
        plan.wanted = max(0, cfg.data.num_captions - len(plan.skip_ids))
    return plan


def run_plan_stages(cfg: RunConfig, protocols: tuple[str, ...], tracks_rows: bool = True) -> tuple[StageResources, ...]:
    """What a run holds at once while training, then while evaluating: `synray.pipelines.run_stages` of the run's
    config and its held-out set's (from the config alone, so that `synray plan` shows it before the inputs of a run
    exist)."""
    heldout = heldout_config(cfg) if protocols and not cfg.eval.dataset else None
    configured = {k: v for k, v in cfg.rates.model_dump().items() if v}
    return with_rates(run_stages(cfg, heldout, protocols, tracks_rows), configured, "config: rates.{key}")


def with_rates(stages: Sequence[StageResources], rates: Mapping[str, float], source: str) -> tuple[StageResources, ...]:
    """The stages with the given rates (keys of the `rates` section; `source` may name {key}) in place of their
    reference figures."""
    out = []
    for s in stages:
        key = s.rate_key.removeprefix("rates.")
        out.append(replace(s, rate=Rate(rates[key], source.format(key=key))) if s.rate_key and key in rates else s)
    return tuple(out)


# ---------------------------------------------------------------------------------------- run
def plan_run(cfg: RunConfig, data_dir: str | None = None, fresh: bool = False, build_models: bool = True) -> RunPlan:
    """Resolve and check a whole run (`data_dir`: train from that store instead of generating; `build_models` off,
    as `synray plan` does: tiny models are named, not built).

    The cheap checks come first; models are resolved (tiny ones built) only for a run that passed them.
    Unless `fresh`, an unfinished run of the same config (its driver died) is continued; `data_dir` becomes
    part of the config (data.mode=stored, data.store_dir), so the run directory records where its data came
    from and a run on another store is never continued.
    """
    if data_dir is not None:
        cfg = derive_config(cfg, {"data.mode": "stored", "data.store_dir": str(data_dir)})
    objective = get_objective(cfg.train.loss)
    protocols = check_eval_protocols(cfg)
    stored = data_dir is not None or cfg.data.mode == "stored"
    if not stored:
        _check_stream_size(cfg)
    num_classes = len(load_bank(cfg.concepts.bank, cfg.concepts.kinds, cfg.concepts.max_concepts))
    if stored:
        store_dir, columns, per_caption = _plan_store(cfg, objective, data_dir)
    else:
        store_dir, columns, per_caption = _plan_stream(cfg, objective)
    text_model = _resolve_text(cfg, build_models) if objective.image_text else None
    objective.check(cfg, per_caption, text_model)
    resume_step = check_compatible(cfg.train.resume_from, objective.fingerprint(cfg.train)) \
        if cfg.train.resume_from else None
    tracks = not stored or _store_has_row_ids(store_dir)
    max_row_id, subset_shards = _subset(cfg, store_dir, tracks) if stored else (None, ())
    first_images = cfg.data.first_images if stored else None
    if first_images is not None and per_caption < first_images:
        raise StoreError(f"data.first_images={first_images}, but rows of {store_dir} hold as few as {per_caption} "
                         "images")
    per_caption = first_images or per_caption
    draw = cfg.train.images_per_row is not None and cfg.train.images_per_row < per_caption
    if cfg.train.images_per_row is not None:
        if cfg.train.images_per_row > per_caption:
            raise TrainSetupError(f"train.images_per_row={cfg.train.images_per_row}, but rows hold {per_caption} "
                                  "images")
        per_caption = cfg.train.images_per_row
    generation = None if stored else plan_generation(cfg, None, build_models)
    data = DataPlan("stored" if stored else cfg.data.mode, store_dir, generation, max_row_id, first_images,
                    _subset_passes(cfg) if max_row_id is not None else 1, subset_shards)
    heldout = _plan_heldout(cfg, build_models) if protocols else None
    train = TrainPlan(objective.name, per_caption, num_classes, epochs=stored, columns=columns,
                      text_model=text_model, resume_from=cfg.train.resume_from, resume_step=resume_step,
                      tracks_rows=tracks, draw_images=draw)
    return RunPlan(cfg, data, train, heldout, protocols, run_plan_stages(cfg, protocols, tracks), fresh)


def _plan_store(cfg: RunConfig, objective: Objective, data_dir: str | None) -> tuple[str, tuple[str, ...], int]:
    """A store to train from: its directory, the columns training reads, the fewest images of a row."""
    root = data_dir or cfg.data.store_dir
    if not root:
        raise StoreError("data.mode=stored needs data.store_dir (or `synray train CONFIG --data DIR`)")
    shards = ParquetStore(root).check_readable(objective.required_columns())
    columns = tuple(objective.columns(pq.read_schema(shards[0]).names))
    return root, columns, stored_per_caption(shards[0]) if "images" in columns else 1


def _plan_stream(cfg: RunConfig, objective: Objective) -> tuple[str | None, tuple[str, ...], int]:
    """A live stream (teed into data.store_dir in stream+store mode): store, columns, images per caption."""
    if cfg.data.mode == "stream+store":
        if not cfg.data.store_dir:
            raise StoreError("data.mode=stream+store needs data.store_dir")
        ParquetStore(cfg.data.store_dir).check_writable(store_fingerprint(cfg))
    return cfg.data.store_dir if cfg.data.mode == "stream+store" else None, tuple(objective.columns(None)), \
        cfg.images.per_caption


def check_subset_fills_a_batch(cfg: RunConfig) -> None:
    """A store's first data.first_rows rows must fill one global batch (each epoch drops its partial batch)."""
    t, n = cfg.train, cfg.data.first_rows
    if n is not None and n < t.captions_per_worker * t.max_workers:
        raise TrainSetupError(f"data.first_rows={n} cannot fill one global batch of train.captions_per_worker="
                              f"{t.captions_per_worker} x {t.max_workers} workers (train.num_workers) rows")


def _subset_passes(cfg: RunConfig) -> int:
    """How many times a subset of data.first_rows rows is read so that one execution covers train.steps."""
    t = cfg.train
    return max(1, math.ceil(t.steps * t.step_rows / cfg.data.first_rows))


def _subset(cfg: RunConfig, store_dir: str, has_row_ids: bool) -> tuple[int | None, tuple[str, ...]]:
    """A nested subset of a store (data.first_rows, data.first_images): the plan row up to which its first rows
    go (they need row ids) and the shards to read; (None, ()) when the whole store is read."""
    store = ParquetStore(store_dir)
    if not cfg.data.first_rows:
        return None, tuple(str(s) for s in store.shards()) if cfg.data.first_images else ()
    check_subset_fills_a_batch(cfg)
    if not has_row_ids:
        raise StoreError(f"data.first_rows needs a store whose rows carry {ROW_ID} (plan-row order); {store_dir} "
                         "has none")
    bound, shards = store.first_rows(cfg.data.first_rows)
    return bound, tuple(str(s) for s in shards)


def _store_has_row_ids(store_dir: str) -> bool:
    """Whether a store's rows carry the plan-row id (synray stores do; imported image-text stores may not)."""
    return ROW_ID in pq.read_schema(ParquetStore(store_dir).shards()[0]).names


def stored_per_caption(shard: str) -> int:
    """The fewest images a row of a stored shard holds."""
    lengths = pc.list_value_length(pq.read_table(shard, columns=["images"]).column("images"))
    return int(pc.min(lengths).as_py() or 0)


def model_names(cfg: RunConfig) -> dict[str, str]:
    """The models a run loads, by config key (those its caption backend, renderer and objective need)."""
    names = {}
    if get_caption_backend(cfg.captions.backend).needs_model:
        names["captions.model"] = cfg.captions.model
    if get_renderer(cfg.images.backend).needs_model:
        names["images.model"] = cfg.images.model
    if get_objective(cfg.train.loss).image_text:
        names["train.text.model"] = cfg.train.text.model
    return names


def _resolve_text(cfg: RunConfig, build: bool = True) -> str:
    try:
        return resolve_model(cfg.train.text.model, cfg.model_cache, build=build)
    except ModelError as e:
        raise TrainSetupError(f"train.text.model={cfg.train.text.model!r}: {e}") from e


def _check_stream_size(cfg: RunConfig) -> None:
    """A stream must fill at least one global batch; fewer captions than the step budget needs is only logged."""
    t = cfg.train
    rows_per_step = t.step_rows
    if cfg.data.num_captions < t.captions_per_worker * t.max_workers:
        raise TrainSetupError(f"data.num_captions={cfg.data.num_captions} cannot fill one global batch of "
                              f"train.captions_per_worker={t.captions_per_worker} x {t.max_workers} workers "
                              "(train.num_workers) rows")
    uses = cfg.data.num_captions * cfg.data.replay
    if uses < t.steps * rows_per_step:
        log.warning("stream mode: %d captions used up to %d times feed at most %d of the %d steps (each step takes "
                    "%d rows)", cfg.data.num_captions, cfg.data.replay, uses // rows_per_step, t.steps, rows_per_step)


def check_eval_protocols(cfg: RunConfig) -> tuple[str, ...]:
    """The protocols a run evaluates (none when eval.enabled is off), after checking the run can feed them."""
    if not cfg.eval.enabled:
        return ()
    todo = check_protocols(cfg.eval.protocols)
    if cfg.captions.style == "file" and not cfg.eval.dataset:
        raise EvalError("captions.style=file: rows of a caption file carry no class labels, so there is no held-out "
                        "set to generate; set eval.dataset (a labelled set, e.g. ImageNet val as Parquet) or "
                        "eval.enabled=false")
    for p in (PROTOCOLS[name] for name in todo):
        if p.image_text and not get_objective(cfg.train.loss).image_text:
            names = "/".join(o.name for o in OBJECTIVES.values() if o.image_text)
            raise EvalError(f"eval.protocols has {p.name}, which needs an image-text model (train.loss={names}); "
                            f"train.loss is {cfg.train.loss}")
        if p.masks and cfg.eval.dataset is None and not get_renderer(cfg.images.backend).writes_masks:
            names = "/".join(r.name for r in RENDERERS.values() if r.writes_masks)
            raise EvalError(f"eval.protocols has {p.name}, which needs class masks: the held-out set has them "
                            f"with images.backend={names}, or give eval.dataset with a masks column")
    return tuple(todo)


def _plan_heldout(cfg: RunConfig, build_models: bool = True) -> HeldoutPlan:
    """The rows evaluation scores: eval.dataset, or a held-out set generated with another seed."""
    if cfg.eval.dataset:
        shards = ParquetStore(cfg.eval.dataset).check_readable(("caption", "label", "images"))
        names = set(pq.read_schema(shards[0]).names)
        return HeldoutPlan(None, cfg.eval.dataset, tuple(c for c in EVAL_COLUMNS if c in names))
    masks = get_renderer(cfg.images.backend).writes_masks
    columns = tuple(c for c in EVAL_COLUMNS if c != "masks" or masks)
    return HeldoutPlan(plan_generation(heldout_config(cfg), None, build_models), None, columns)


# ----------------------------------------------------------------------------- eval, rewrite
def plan_eval(cfg: RunConfig, model_dir: str, dataset: str, protocols: list[str] | None = None) -> EvalPlan:
    """Check an evaluation request (`synray eval`): the model, the dataset and what the protocols need."""
    todo = check_protocols(list(cfg.eval.protocols if not protocols else protocols))
    image_size = model_image_size(model_dir)
    source = inspect_dataset(dataset)
    check_request(model_dir, todo, source)
    return EvalPlan(str(model_dir), str(dataset), tuple(todo), image_size, source)


def plan_rewrite(cfg: RunConfig, source: str | None, out: str) -> RewritePlan:
    """Check a LaCLIP rewrite request (`synray rewrite`) and resolve its caption model."""
    given = "--source" if source else "captions.rewrite.source"
    source = source or cfg.captions.rewrite.source
    if not source:
        raise ConfigError("rewrite needs --source or captions.rewrite.source")
    check_source(source, given)   # cheap checks first: the model may be built or fetched
    model = resolve_model(cfg.captions.model, cfg.model_cache)
    fingerprint = rewrite_fingerprint(cfg)
    ParquetStore(out).check_writable(fingerprint)
    return RewritePlan(cfg, source, out, model, fingerprint)
