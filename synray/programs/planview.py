"""`synray plan`: what a run will ask for (stages, resources, data flow, storage, nodes), checked, before it starts."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from synray.captions.backends import get_caption_backend
from synray.config import RunConfig, TrainConfig
from synray.config.workers import short_sizes
from synray.data.store import StoreMissingError
from synray.generation.pipeline import generation_stages
from synray.images.registry import get_renderer
from synray.placement import ClusterSpec, Placement, PlacementError, StageResources, load_cluster_file, pack, \
    phase_totals
from synray.models.hub import check_hub_names
from synray.plan import check_eval_protocols, model_names, plan_run, run_plan_stages, with_rates
from synray.programs.errors import EXIT_BAD_INPUT, bad_input_message
from synray.programs.rateview import measured_rates, rate_lines
from synray.programs.session import (address_source, check_reachable, cluster_spec, local_spec, ray_address,
                                     session)
from synray.sharedfs import storage_problems
from synray.tracking import NONE, TrackerError, check_tracking
from synray.train.preprocess import PREPROCESS_STAGE
from synray.stages import TRAINING_WORKERS, by_phase, stage_resources

log = logging.getLogger(__name__)



@dataclass
class PlanView:
    """The printed plan and its verdict: problems refuse the run; inputs are what earlier jobs must make first."""

    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)


def data_flow(cfg: RunConfig, protocols: Sequence[str]) -> str:
    """The path of a row, stage by stage, with the settings that shape it."""
    c, i, d, t = cfg.captions, cfg.images, cfg.data, cfg.train
    steps = []
    if d.mode == "stored":
        steps.append(f"store {d.store_dir}")
    else:
        caption = get_caption_backend(c.backend).describe(c)
        renderer = f"{i.backend} {i.model}" if get_renderer(i.backend).needs_model else i.backend
        steps += [f"concepts {cfg.concepts.bank}", f"captions: {caption}",
                  f"images: {renderer}, {i.per_caption} per caption, actors: {i.pool_size}"]
        if d.mode == "stream+store":
            steps.append(f"tee into store {d.store_dir}")
    steps += [f"preprocessing, actors: {d.preprocess_actors}",
              f"training: {t.loss}, {worker_text(t)} workers x {t.captions_per_worker} captions{elastic_step_text(t)}, "
              f"{t.steps} steps"]
    if protocols:
        steps.append(f"evaluation: {', '.join(protocols)} on "
                     + (cfg.eval.dataset or f"{cfg.eval.heldout_captions} held-out captions"))
    return " -> ".join(steps)


def worker_text(t: TrainConfig) -> str:
    """A training group's size: a count, or an elastic range."""
    return f"{t.min_workers}-{t.max_workers}" if t.elastic else str(t.max_workers)


def elastic_step_text(t: TrainConfig) -> str:
    """The rows a step of an elastic group trains at its sizes ('' for a fixed group)."""
    if not t.elastic:
        return ""
    short = short_sizes(t.captions_per_worker, t.num_workers, t.grad_accum)
    fewer = f"; {min(short)}-{max(short)} workers: {min(short.values())}-{max(short.values())}" if short else ""
    return f" ({t.step_rows} rows a step{fewer})"


def storage_lines(cfg: RunConfig) -> list[str]:
    out = [f"run directories: {cfg.output_root}/{cfg.name}-<UTC time>/ (output_root): config, log, metrics, "
           "checkpoints (train/), backbone/, summary.json"]
    if cfg.data.store_dir and cfg.data.mode != "stream":
        out.append(f"store: {cfg.data.store_dir} (data.store_dir, {cfg.data.mode})")
    if cfg.eval.dataset:
        out.append(f"evaluation dataset: {cfg.eval.dataset}")
    out.append(f"model cache: {cfg.model_cache or '~/.cache/synray (SYNRAY_CACHE)'} (tiny models; hub models: "
               "the Hugging Face cache of each node)")
    return out


def stage_lines(stages: Sequence[StageResources]) -> list[str]:
    out: list[str] = []
    for phase, members in by_phase(stages).items():
        out.append(f"{phase} phase (held at once):")
        out += [f"  {s.describe()}" for s in members]
        totals = phase_totals(members)
        out.append("  total: " + ", ".join(f"{totals[k]:g} {k}" for k in ("CPU", "GPU") if totals.get(k)))
    out.append("memory: not reserved per stage (Ray schedules CPUs and GPUs); each node's object store buffers "
               "the stream (data.stream_buffer_mb caps it)")
    return out


def cluster_lines(stages: Sequence[StageResources], cluster: ClusterSpec,
                  cfg: RunConfig | None = None) -> tuple[list[str], list[str]]:
    """The nodes each phase needs on the cluster's node types, and the phases that can never be placed; with `cfg`,
    the paths a plan on several nodes keeps where not every node sees them."""
    lines, problems = [f"nodes on {cluster.source}:"], []
    placements: list[Placement] = []
    for phase, members in by_phase(stages).items():
        placed, smallest, note = elastic_placements(members, cluster, phase)
        if placed is None and smallest is None:
            problems.append(note)
            continue
        placements += [p for p in (placed, smallest) if p is not None]
        lines += [f"  {p.phase}: {p.describe()}" for p in (placed, smallest) if p is not None]
        lines += [f"  note: {note}"] if note else []
        lines += [f"  note: {n}" for n in [drain_note(placed, members)] if n]
    if placements:
        peak: dict[str, int] = {}
        for p in placements:
            for name, n in p.nodes.items():
                peak[name] = max(peak.get(name, 0), n)
        lines.append("  at most: " + ", ".join(f"{name} x{n}" for name, n in peak.items()))
        running = [f"{t.name} x{t.existing}" for t in cluster.node_types if t.existing]
        grows = [t.name for t in cluster.node_types if not t.existing]
        lines.append("  to start: " + (", ".join(running) or "nothing") + (
            f"; {', '.join(grows)} are added on demand" if grows else "; a fixed cluster, nothing is added"))
        nodes = max(sum(p.nodes.values()) for p in placements)
        if cfg is not None and cluster.shared_paths is not None and nodes > 1:
            problems += storage_problems(cfg, cluster.shared_paths, cluster.source, nodes)
            lines.append(f"  shared storage: {', '.join(cluster.shared_paths) or 'none'} (mounted on every node)")
    return lines, problems


def drain_note(placed: Placement | None, members: Sequence[StageResources]) -> str:
    """A training group on several nodes fed by a one-actor preprocessing pool: a drained node (a spot reclaim) that
    holds the actor stops every worker's rows, since Ray Data sends no work to actors on a draining node."""
    pool = next((s for s in members if s.stage == PREPROCESS_STAGE), None)
    if placed is None or pool is None or pool.actors > 1:
        return ""
    spans = [placed.nodes[name] for name, names in placed.stages_on.items() if TRAINING_WORKERS in names]
    if sum(spans) < 2:
        return ""
    return (f"data.preprocess_actors={pool.actors} feeds training workers on {sum(spans)} nodes: if the node that "
            "holds it is drained (a spot reclaim), Ray Data sends it no more work and every worker waits for rows "
            "until the node goes, with no checkpoint at the notice; 2 or more actors are spread over the nodes")


def elastic_placements(members: Sequence[StageResources], cluster: ClusterSpec,
                       phase: str) -> tuple[Placement | None, Placement | None, str]:
    """A phase packed at its largest, and, with an elastic stage, at its smallest too (what an elastic group needs to
    start, or to go on after losing nodes); a refusal when even the smallest cannot be placed, a note when only the
    largest cannot (the group then never grows to its maximum there)."""
    elastic = [s for s in members if s.min_actors is not None]
    try:
        largest: Placement | None = pack(members, cluster, phase)
        refused = ""
    except PlacementError as e:
        largest, refused = None, str(e)
    if not elastic:
        return largest, None, refused
    sizes = ", ".join(f"{s.stage}: {s.min_actors}" for s in elastic)
    try:
        smallest = pack([s.smallest() for s in members], cluster, f"{phase}, at its smallest ({sizes})")
    except PlacementError:
        return None, None, refused
    note = "" if largest else f"the {phase} phase only fits below its largest size here: {refused}"
    return largest, smallest, note


#: the phase of `synray generate` in a plan that trains from a store yet to be made
GENERATE_PHASE = "generation job"


def generation_job_stages(cfg: RunConfig) -> tuple[StageResources, ...]:
    """What `synray generate` holds at once for `cfg` (its stages, with the store's writer)."""
    return tuple(stage_resources(generation_stages(cfg, None, store=cfg.data.store_dir or "store", passthrough=False,
                                                   phase=GENERATE_PHASE)))


def sweep_view(cfg: RunConfig) -> tuple[list[str], list[str], tuple[StageResources, ...]]:
    """A sweep's plan (`synray sweep` decides it before Ray starts): its search, pools, held-out set and trials,
    the problems that refuse it, and what its concurrent trials hold at once (the largest trial's stages, times
    tune.max_concurrent_trials, else one)."""
    from synray.sweep.planning import plan_sweep

    try:
        sweep = plan_sweep(cfg)
    except Exception as e:  # noqa: BLE001 - bad input is a problem to print; anything else is a bug
        if bad_input_message(e) is None:
            raise
        return [], [str(e)], ()
    at_once = cfg.tune.max_concurrent_trials or 1
    trial = max(sweep.trials, key=lambda t: (t.data.num_captions, t.images.per_caption))
    stages = tuple(replace(s, actors=s.actors * at_once, phase=f"{at_once} trial(s) at once: {s.phase}")
                   for s in run_plan_stages(trial, check_eval_protocols(trial)))
    lines = ["sweep:"] + [f"  {line}" for line in sweep.describe()]
    lines += [f"  the largest trial ({trial.data.num_captions} captions; tune.max_concurrent_trials={at_once} "
              "at once):"] + [f"    {line}" for line in stage_lines(stages)[:-1]]
    return lines, [], stages


def plan_view(cfg: RunConfig, cluster_file: str | None, address: str | None,
              rates_from: str | None = None, address_from: str = "--address") -> PlanView:
    # the cheap checks first, before any model is resolved (built or fetched): the address answers, the file reads
    if address:
        check_reachable(address, address_from)
    cluster = load_cluster_file(cluster_file) if cluster_file else None
    view = PlanView()
    if cfg.tune.space:   # a sweep: its trials, not the base config's run
        lines, view.problems, stages = sweep_view(cfg)
        view.lines += [f"plan: {cfg.name}" + (f" - {cfg.description}" if cfg.description else ""), *lines]
        view.lines += ["storage:"] + [f"  {line}" for line in storage_lines(cfg)]
        return placement_view(view, cfg, stages, cluster, address)
    protocols = check_eval_protocols(cfg)
    stages = run_plan_stages(cfg, protocols)
    if rates_from:
        stages = with_rates(stages, measured_rates(rates_from), f"measured by {rates_from}")
    view.lines += [f"plan: {cfg.name}" + (f" - {cfg.description}" if cfg.description else ""),
                   f"data flow: {data_flow(cfg, protocols)}", "stages:"]
    view.lines += [f"  {line}" for line in stage_lines(stages)]
    view.lines += rate_lines(cfg, stages)
    view.lines += ["storage:"] + [f"  {line}" for line in storage_lines(cfg)]
    models = model_names(cfg)
    hub = check_hub_names(models)
    view.lines += ["models:"] + [f"  {key}: {name}" for key, name in models.items()] + [
        f"  note: {note}" for note in hub.notes]
    view.problems += hub.problems
    view.lines += tracking_lines(cfg, view.problems)
    try:
        plan_run(cfg, build_models=False)   # models are built (tiny) or fetched by the run, not its plan
    except StoreMissingError as e:
        view.inputs.append(str(e))
        if cfg.data.mode == "stored":   # its placement is checked with the run's: generated first, then trained on
            generate = generation_job_stages(cfg)
            view.lines += ["the job that writes the store first (`synray generate CONFIG`):"]
            view.lines += [f"  {line}" for line in stage_lines(generate)[:-1]]
            stages = (*generate, *stages)
    except Exception as e:  # noqa: BLE001 - bad input is a problem to print; anything else is a bug
        if bad_input_message(e) is None:
            raise
        view.problems.append(str(e))
    return placement_view(view, cfg, stages, cluster, address)


def tracking_lines(cfg: RunConfig, problems: list[str]) -> list[str]:
    """Where the run's tracker logs, once it answered; an unreachable one is a problem (the run would refuse it)."""
    t = cfg.tracking
    if t.backend == NONE:
        return []
    try:
        where = check_tracking(t, cfg.output_root)
    except TrackerError as e:
        problems.append(str(e))
        return [f"tracking: {t.backend} (unreachable)"]
    return [f"tracking: {t.backend} at {where}, experiment {t.experiment or cfg.name} (checked)"]


def placement_view(view: PlanView, cfg: RunConfig, stages: Sequence[StageResources], cluster: ClusterSpec | None,
                   address: str | None) -> PlanView:
    """`view` with the nodes each phase needs on the cluster file's node types, the running cluster (already known
    to answer), or this machine."""
    if cluster is not None:
        lines, problems = cluster_lines(stages, cluster, cfg)
        view.lines += lines
        view.problems += problems
    if address:
        with session(cfg.ray.model_copy(update={"address": address})):
            lines, problems = cluster_lines(stages, cluster_spec())
        view.lines += lines
        view.problems += problems
    if cluster is None and not address:   # the run would start a local Ray here
        spec = local_spec(cfg.ray, count_gpus=any(s.gpus for s in stages))
        lines, problems = cluster_lines(stages, spec, cfg)
        view.lines += lines
        view.problems += problems
    return view


def plan_command(cfg: RunConfig, cluster_file: str | None = None, address: str | None = None,
                 rates_from: str | None = None) -> int:
    """Print the plan; exit 2 when it can never run as configured (bad input, or a phase that cannot be placed)."""
    address_from = "--address" if address else address_source(cfg.ray)
    address = address or ray_address(cfg.ray)
    view = plan_view(cfg, cluster_file, address, rates_from, address_from)
    print("\n".join(view.lines))
    for line in view.inputs:
        print(f"to make first: {line} (an earlier job writes it: `synray generate` or `synray rewrite`)")
    for line in view.problems:
        print(f"refused: {line}")
    if not view.problems:
        print("checks: ok")
    return EXIT_BAD_INPUT if view.problems else 0
