"""The typed sections of a run configuration (ray, concepts, captions, ... eval, tune) and RunConfig."""

from __future__ import annotations

from typing import Any, Literal

import yaml
from pydantic import Field, ValidationInfo, field_validator, model_validator

from synray.config.base import CustomResources, MountedPath, Section, _registered, check_gpu_share
from synray.config.rates import RatesConfig
from synray.config.tracking import TrackingConfig
from synray.config.tune import TuneConfig
from synray.config.workers import MAX_SHORTFALL, WorkerCount, bounds, splitting_rows, step_rows, step_split, too_short

__all__ = ["RayConfig", "TemplateWeights", "RELATIONS", "ConceptsConfig", "SamplingConfig", "EngineConfig",
           "CleanupConfig", "RewriteConfig", "CaptionsConfig", "ImagesConfig", "DataConfig", "BackboneConfig",
           "HeadConfig", "AugmentConfig", "SynCLRConfig", "TextTowerConfig", "TrainConfig", "EvalConfig",
           "RunConfig"]


# ----------------------------------------------------------------------------------------- ray
class RayConfig(Section):
    address: str | None = Field(None, description="Ray address; default: $RAY_ADDRESS, else a local Ray")
    num_cpus: int | None = Field(None, ge=1, description="logical CPUs of a local Ray (default: cores, at least 4)")
    num_gpus: int | None = Field(None, ge=0, description="logical GPUs of a local Ray (default: the ones detected; "
                                 "declared ones simulate a GPU cluster's scheduling, as `synray bench` does)")
    include_dashboard: bool | None = Field(None, description="local Ray: None = Ray's default (on, "
                                           "bound to dashboard_host); the state API needs it")
    dashboard_host: str = Field("127.0.0.1", description="never 0.0.0.0 unless behind a firewall")
    dashboard_port: int = Field(8265, ge=1024, le=65535)
    object_store_memory_mb: int | None = Field(None, ge=64)


# ------------------------------------------------------------------------------------ concepts
class TemplateWeights(Section):
    """SynCLR's template proportions for object concepts (normalised when sampled)."""

    c: float = Field(0.44, ge=0)
    c_bg: float = Field(0.45, ge=0)
    c_rel: float = Field(0.11, ge=0)

    @model_validator(mode="after")
    def _some_weight(self) -> "TemplateWeights":
        if self.c + self.c_bg + self.c_rel <= 0:
            raise ValueError("at least one template weight must be > 0")
        return self


RELATIONS = ("in", "on", "next to", "behind", "in front of", "over", "under", "above", "below", "beside")


class ConceptsConfig(Section):
    bank: str = Field("builtin:everyday", description="builtin:NAME or a .txt/.csv/.json/.parquet file")
    kinds: list[Literal["object", "place", "texture", "shape"]] | None = Field(
        None, description="keep only these kinds (default: all)")
    max_concepts: int | None = Field(None, ge=1, description="use only the first N concepts of the bank")
    template_weights: TemplateWeights = TemplateWeights()
    relations: list[str] = Field(default_factory=lambda: list(RELATIONS), min_length=1)


# ------------------------------------------------------------------------------------ captions
class SamplingConfig(Section):
    temperature: float = Field(0.8, ge=0.0, le=5.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    max_tokens: int = Field(100, ge=1, le=4096)


class EngineConfig(Section):
    """vLLM engine pool: fixed size; each engine gets its own placement-group bundle."""

    pool_size: int = Field(1, ge=1, description="number of vLLM engine replicas")
    batch_size: int = Field(32, ge=1, description="prompts per Ray Data batch sent to an engine")
    max_model_len: int = Field(1024, ge=64)
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0,
                                          description="CPU backend: fraction of CPU memory for the KV cache")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    enable_prefix_caching: bool = True
    kv_cache_memory_mb: int | None = Field(None, ge=16, description="fixed KV-cache size (CPU backend: "
                                           "skips the memory probe that gpu_memory_utilization needs)")
    enforce_eager: bool = Field(False, description="skip graph compilation (faster start, slower decode)")
    num_cpus: float = Field(1.0, gt=0, description="CPUs per engine bundle")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per engine (0 on CPU machines)")
    resources: CustomResources
    max_concurrent_batches: int = Field(4, ge=1)
    batch_invariant: bool = Field(False, description="vLLM's batch-invariant mode (VLLM_BATCH_INVARIANT=1, CUDA "
                                  "engines): a seeded caption no longer depends on the requests batched with it")
    extra: dict[str, Any] = Field(default_factory=dict, description="further vLLM engine kwargs")

    _gpu_share = field_validator("num_gpus")(check_gpu_share)

    @model_validator(mode="after")
    def _invariance_needs_cuda(self) -> "EngineConfig":
        if self.batch_invariant and self.num_gpus == 0:
            raise ValueError("batch_invariant needs GPU engines (num_gpus > 0): vLLM's batch-invariant kernels are "
                             "CUDA-only; on the CPU backend a seeded caption was measured independent of its "
                             "batch already (docs/failures.md: Reproducibility)")
        return self


class CleanupConfig(Section):
    min_words: int = Field(3, ge=1)
    max_words: int = Field(60, ge=1)
    min_chars: int = Field(8, ge=1)
    max_chars: int = Field(400, ge=8)
    max_repeat_fraction: float = Field(0.5, gt=0, le=1,
                                       description="reject when one word is more than this share of the words")
    dedupe: bool = True


class RewriteConfig(Section):
    """LaCLIP: k rewrites per caption of an existing image-text dataset."""

    enabled: bool = False
    source: MountedPath | None = Field(None, description="Parquet dir/file or WebDataset tar(s) with image+caption")
    num_rewrites: int = Field(4, ge=1, le=16)
    sampling: SamplingConfig = SamplingConfig(temperature=0.9, top_p=0.95, max_tokens=77)


class CaptionsConfig(Section):
    backend: str = Field("vllm", description="an entry of synray.captions.backends (an unknown one is "
                         "refused naming them)")
    model: str = Field("tiny:llm", description="tiny:llm, a HF model name or a local directory")
    style: Literal["synclr", "classname", "clip_templates", "concept_background", "shapes", "file"] = Field(
        "synclr", description="synclr needs the vllm backend; the others are model-free templates; file: the "
        "captions of captions.source, in order (StableRep on CC12M-style captions)")
    source: MountedPath | None = Field(None, description="style=file: a text file (one caption per line) or "
                                       "Parquet with a caption column; row i gets caption i")
    num_examples: int = Field(3, ge=0, le=16, description="in-context examples per prompt")
    sampling: SamplingConfig = SamplingConfig()
    engine: EngineConfig = EngineConfig()
    cleanup: CleanupConfig = CleanupConfig()
    rewrite: RewriteConfig = RewriteConfig()
    trust_remote_code: bool = False
    oversample: float = Field(1.25, ge=1.0, le=10.0,
                              description="prompts per wanted caption, to make up for rejected captions")

    @field_validator("backend")
    @classmethod
    def _backend_registered(cls, v: str, info: ValidationInfo) -> str:
        return _registered("captions.backend", v, info)

    @model_validator(mode="after")
    def _file_has_a_source(self) -> "CaptionsConfig":
        if (self.style == "file") != (self.source is not None):
            raise ValueError("style 'file' and source go together: style=file reads its captions from source")
        return self


# -------------------------------------------------------------------------------------- images
class ImagesConfig(Section):
    backend: str = Field("diffusers", description="an entry of synray.images.registry (an unknown one is "
                         "refused naming them)")
    model: str = Field("tiny:sd", description="tiny:sd, a HF model name or a local diffusers directory")
    per_caption: int = Field(4, ge=1, le=64, description="m: images rendered per caption")
    guidance_scale: float = Field(2.5, ge=0.0, le=30.0)
    steps: int = Field(50, ge=1, le=1000)
    scheduler: Literal["ddim", "pndm", "euler", "dpm", "default"] = "ddim"
    resolution: int = Field(512, ge=8, le=2048, description="generation size in pixels (multiple of 8)")
    output_size: int = Field(256, ge=8, le=2048, description="saved size in pixels")
    image_format: Literal["png", "jpeg", "webp"] = "png"
    jpeg_quality: int = Field(95, ge=1, le=100)
    safety_checker: bool = Field(True, description="run the pipeline's NSFW safety checker, when the model has one "
                                 "(batched on the images' device; flagged images are dropped and replaced)")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: Literal["cpu", "cuda"] = "cpu"
    compile: bool = Field(False, description="torch.compile the UNet (GPU only)")
    pool_size: int = Field(1, ge=1, description="fixed number of diffusion actors")
    batch_size: int = Field(4, ge=1, description="captions per actor call (batched mode: per pipeline call)")
    batch_mode: Literal["batched", "per_caption"] = Field(
        "batched", description="batched: batch_size captions (x per_caption images) in one pipeline call, padded "
        "to one shape; a row regenerates exactly by re-rendering its call (render_group). per_caption: one call "
        "per caption; every row regenerates on its own, at lower GPU throughput")
    num_cpus: float = Field(1.0, gt=0)
    num_gpus: float = Field(0.0, ge=0, description="GPUs per diffusion actor; a fraction shares a GPU (with "
                            "training workers when train.gpus_per_worker is a fraction too)")
    resources: CustomResources
    negative_prompt: str | None = None

    _gpu_share = field_validator("num_gpus")(check_gpu_share)

    @field_validator("backend")
    @classmethod
    def _backend_registered(cls, v: str, info: ValidationInfo) -> str:
        return _registered("images.backend", v, info)

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError(f"must be divisible by 8 (the VAE downsamples by 8); got {v}")
        return v

    @model_validator(mode="after")
    def _gpu_settings(self) -> "ImagesConfig":
        if self.device == "cpu" and self.dtype != "float32":
            raise ValueError(f"dtype {self.dtype!r} needs device 'cuda'; use float32 on the CPU")
        if self.device == "cpu" and self.compile:
            raise ValueError("compile=true needs device 'cuda'")
        if self.device == "cuda" and self.num_gpus == 0:
            raise ValueError("device 'cuda' needs num_gpus > 0: Ray hides every GPU from an actor that asks for none "
                             "(CUDA_VISIBLE_DEVICES is empty there)")
        if self.output_size > self.resolution:
            raise ValueError(f"output_size {self.output_size} is larger than resolution {self.resolution}")
        return self


# ---------------------------------------------------------------------------------------- data
class DataConfig(Section):
    num_captions: int = Field(128, ge=1, description="captions (rows) to generate")
    mode: Literal["stream", "stored", "stream+store"] = "stream"
    store_dir: str | None = Field(None, description="Parquet store (stored / stream+store modes): a directory "
                                  "every node sees, or a cloud URI (s3://bucket/path, gs://...)")
    rows_per_shard: int = Field(64, ge=1)
    shuffle_buffer_rows: int = Field(0, ge=0, description="local shuffle buffer for stored mode")
    preprocess_actors: int = Field(2, ge=1, description="CPU actors that decode rows into training tensors "
                                   "(a Ray Data stage before the trainer)")
    preprocess_cpus: float = Field(1.0, gt=0, description="CPUs per preprocessing actor")
    preprocess_resources: CustomResources
    preprocess_batch_rows: int = Field(16, ge=1, description="rows per preprocessing call")
    stream_buffer_mb: float | None = Field(
        None, gt=0, description="object-store MiB the training dataset's stages may hold ahead of the trainer "
        "(Ray Data's resource limit; a slow trainer then pauses generation); null: Ray Data's default share")
    first_rows: int | None = Field(None, ge=1, description="stored mode: train on the store's first N rows in "
                                   "plan-row order (nested subsets: a smaller N's rows are among a larger one's)")
    first_images: int | None = Field(None, ge=1, description="stored mode: train on the first m images of each row")
    replay: int = Field(1, ge=1, description="stream modes: uses of each streamed row, drawn from a buffer on the "
                        "worker's device (each use freshly augmented), so that training works while diffusion "
                        "fills the stream; 1: each row once")
    replay_buffer_rows: int | None = Field(None, ge=1, description="rows each worker's replay buffer holds; default: "
                                           "4 x replay x train.captions_per_worker")

    @model_validator(mode="after")
    def _subsets_read_stores(self) -> "DataConfig":
        if (self.first_rows or self.first_images) and self.mode != "stored":
            raise ValueError("first_rows and first_images select from a store: they need mode=stored")
        if self.replay > 1 and self.mode == "stored":
            raise ValueError(f"replay={self.replay} reuses streamed rows: it needs mode=stream or stream+store (a "
                             "store is read in epochs instead)")
        return self


# --------------------------------------------------------------------------------------- train
class BackboneConfig(Section):
    arch: Literal["vit", "dinov2"] = "vit"
    size: Literal["tiny", "mini", "small", "base", "large"] = "tiny"
    image_size: int = Field(32, ge=16, le=1024)
    patch_size: int = Field(8, ge=2, le=32)

    @model_validator(mode="after")
    def _patches(self) -> "BackboneConfig":
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be divisible by patch_size {self.patch_size}")
        return self


class HeadConfig(Section):
    hidden_dim: int = Field(4096, ge=1)
    out_dim: int = Field(256, ge=1)
    num_layers: int = Field(3, ge=1, le=8)


class AugmentConfig(Section):
    preset: Literal["strong", "crop", "none"] | None = Field(
        None, description="default: the objective's own (crop for clip, as LaCLIP; strong, as SimCLR/StableRep, "
        "otherwise)")
    crop_scale_min: float | None = Field(
        None, gt=0, le=1, description="smallest random-resized-crop area; default: 0.08 (strong), 0.5 (crop, LaCLIP); "
        "loss=synclr crops by train.synclr's scales instead")


class SynCLRConfig(Section):
    """train.loss=synclr: the EMA teacher, multi-crop and iBOT masked image modelling (SynCLR's published defaults).

    The contrastive temperature is train.temperature (SynCLR: 0.08-0.1) and the query/key projection is
    train.head; the predictor, prototype head and teacher are configured here."""

    ema_momentum: float = Field(0.994, ge=0, le=1, description="the teacher's EMA momentum at step 0 (SynCLR's "
                                "0.994: an averaging horizon of about 1 / (1 - 0.994) = 167 steps)")
    ema_horizon: float | None = Field(None, gt=0, le=1, description="the teacher's averaging horizon at step 0 as a "
                                      "share of train.steps, instead of ema_momentum: momentum = 1 - 1 / (share x "
                                      "train.steps), the same schedule at any run length")
    ema_momentum_final: float = Field(1.0, ge=0, le=1, description="its value at train.steps (cosine schedule)")
    local_crops: int = Field(4, ge=0, le=16, description="local crops per image besides the one global crop")
    local_own_key: bool = Field(True, description="a local crop's query keeps its own image's teacher key as a "
                                "positive, as the published code's default run does (only the global crop leaves "
                                "its own key out); false: the published --avoid_local_global_same")
    local_size: int | None = Field(None, ge=8, description="local crop side in pixels (a multiple of the patch "
                                   "size); default: 96/224 of train.backbone.image_size, rounded to patches")
    global_crop_scale: tuple[float, float] = Field((0.32, 1.0), description="area range of the global crop")
    local_crop_scale: tuple[float, float] = Field((0.08, 0.32), description="area range of the local crops")
    predictor_hidden_dim: int = Field(4096, ge=1, description="the student's 2-layer predictor on the projection")
    predictor_layers: int = Field(2, ge=1, le=8)
    mask_image_share: float = Field(0.5, ge=0, le=1, description="share of the global crops that get masked")
    mask_patch_share: float = Field(0.5, ge=0, le=1, description="share of a masked crop's patch tokens replaced "
                                    "by the mask token")
    prototypes: int = Field(8192, ge=2, description="iBOT prototypes (SynCLR: 8192-65536)")
    prototype_hidden_dim: int = Field(2048, ge=1, description="hidden width of the prototype head's MLP")
    prototype_bottleneck_dim: int = Field(256, ge=1)
    prototype_norm: Literal["trainable", "fixed"] = Field("trainable", description="the prototype layer's weight "
                                                          "norm: trainable, one per prototype from 1 (the published "
                                                          "weight_norm layer), or fixed at 1 (DINO's "
                                                          "norm_last_layer)")
    head_norm: Literal["ln", "bn"] = Field("bn", description="the projection and predictor MLPs: StableRep's "
                                           "BatchNorm and ReLU (train.head), or the published SynCLR head: "
                                           "LayerNorm and GELU, the last layer without bias and followed by a "
                                           "LayerNorm without affine parameters (kept off by default until the "
                                           "shapes ablation decides: on an 8-step fixed batch its contrastive term "
                                           "fell 4% against 31%)")
    head_init: Literal["trunc_normal", "torch"] = Field("trunc_normal", description="initial weights of the heads' "
                                                        "linear layers: truncated normal (std 0.02, zero bias) as "
                                                        "published, or torch's default")
    ibot_weight: float = Field(1.0, ge=0, description="weight of the iBOT loss beside the contrastive one")
    sinkhorn_iterations: int = Field(3, ge=1, le=100)
    student_temperature: float = Field(0.1, gt=0)
    teacher_temperature: float = Field(0.04, gt=0, description="the teacher's prototype temperature at step 0")
    teacher_temperature_final: float = Field(0.07, gt=0, description="its value after the warm-up")
    teacher_temperature_warmup: float = Field(0.05, ge=0, le=1, description="warm-up length, a share of "
                                              "train.steps (SynCLR: 4,000 iterations of 85,000, about 5%)")
    teacher_temperature_warmup_steps: int | None = Field(None, ge=0, description="warm-up length in steps, instead "
                                                         "of the share (SynCLR's published value: 4000)")
    export: Literal["teacher", "student"] = Field("teacher", description="the backbone a run exports and evaluates: "
                                                  "the EMA teacher's (SynCLR's), or the student's")

    @model_validator(mode="after")
    def _ranges(self) -> "SynCLRConfig":
        for key in ("global_crop_scale", "local_crop_scale"):
            lo, hi = getattr(self, key)
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"{key} must be (low, high) with 0 < low <= high <= 1; got {(lo, hi)}")
        if self.ema_momentum_final < self.ema_momentum:
            raise ValueError(f"ema_momentum_final={self.ema_momentum_final} is below ema_momentum="
                             f"{self.ema_momentum}: the teacher's momentum only rises")
        return self

    def momentum_at_start(self, steps: int) -> float:
        """The teacher's momentum at step 0: from ema_horizon (a share of the run) where set, else ema_momentum."""
        if self.ema_horizon is None:
            return self.ema_momentum
        return min(max(1.0 - 1.0 / (self.ema_horizon * steps), 0.0), self.ema_momentum_final)

    def temperature_warmup_steps(self, steps: int) -> int:
        """The teacher temperature's warm-up in steps: teacher_temperature_warmup_steps, or its share of the run."""
        if self.teacher_temperature_warmup_steps is not None:
            return self.teacher_temperature_warmup_steps
        return round(self.teacher_temperature_warmup * steps)

    def local_crop_size(self, backbone: BackboneConfig) -> int:
        """The local crops' side: local_size, or 96/224 of the image side rounded to whole patches."""
        if self.local_size is not None:
            return self.local_size
        patches = max(1, round(backbone.image_size * 96 / 224 / backbone.patch_size))
        return patches * backbone.patch_size


class TextTowerConfig(Section):
    """The text tower of image-text (train.loss=clip) training: a CLIPTextModelWithProjection."""

    model: str = Field("tiny:text", description="tiny:text, a local directory or a hub id (safetensors)")
    max_length: int = Field(77, ge=4, le=512, description="tokens per caption (padded/truncated)")


class TrainConfig(Section):
    steps: int = Field(200, ge=1, description="optimizer step budget")
    loss: str = Field("stablerep", description="an entry of synray.train.objectives (an unknown one is "
                      "refused naming them)")
    temperature: float = Field(0.1, gt=0, le=10, description="contrastive temperature; for loss=clip the "
                               "initial value of the learnable one (CLIP: 0.07)")
    num_workers: WorkerCount = Field(2, description="training workers: a count, or an elastic range [min, max] "
                                     "(Ray Train starts as many as fit, then grows or shrinks the group; every size "
                                     "trains the same global batch, synray.config.workers)")
    use_gpu: bool = False
    gpus_per_worker: float = Field(1.0, gt=0, description="GPUs per worker when use_gpu; a fraction (0.5) lets "
                                   "one worker share its GPU with diffusion actors (num_workers=1 only: NCCL "
                                   "refuses two ranks on one device)")
    cpus_per_worker: float = Field(0.5, gt=0)
    resources: CustomResources
    captions_per_worker: int = Field(8, ge=1, description="n: rows (captions) per worker micro-batch")
    images_per_row: int | None = Field(None, ge=1, description="images of each row a step uses, drawn anew among "
                                       "the row's images each time it is read (StableRep: 6 of 10); default: all")
    grad_accum: int = Field(1, ge=1)
    lr: float | None = Field(None, gt=0, description="default: base_lr x images per step / 256")
    base_lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = Field(10, ge=0)
    grad_clip: float | None = Field(None, ge=0, description="gradient-norm clipping (0: none); default: the "
                                    "objective's own, 1.0, or none for synclr (its published code does not clip)")
    zero_stage: int = Field(1, ge=0, le=2, description="DeepSpeed ZeRO stage (0-2: weights stay whole on every rank)")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="bf16 on GPUs (with zero_stage >= 1); "
                                                       "fp16's loss scaling reads an overflow flag every step")
    grad_checkpointing: bool = Field(False, description="recompute each transformer block in the backward pass "
                                     "(the image encoder's, and the text tower's for loss=clip): about a third "
                                     "more compute for the activations of one block instead of all")
    backbone: BackboneConfig = BackboneConfig()
    head: HeadConfig = HeadConfig()
    augment: AugmentConfig = AugmentConfig()
    text: TextTowerConfig = TextTowerConfig()
    synclr: SynCLRConfig = SynCLRConfig()
    prefetch_batches: int = Field(4, ge=0, description="ready batches each worker keeps in flight")
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(100, ge=1)
    max_failures: int = Field(2, ge=0, description="worker-group restarts from the latest checkpoint")
    max_preemptions: int = Field(-1, ge=-1, description="restarts after a node of the group was preempted (drained "
                                 "with notice; its workers save a checkpoint first), counted apart from "
                                 "max_failures; -1: no limit")
    resize_check_s: float = Field(60.0, gt=0, description="an elastic group (num_workers: [min, max]): how often Ray "
                                  "Train looks for room to grow it; each resize restarts it from its latest "
                                  "checkpoint")
    resume_from: MountedPath | None = Field(None, description="a checkpoint directory of an earlier run to start from")
    fail_at_step: int | None = Field(None, ge=1, description="fault drill: the last worker dies at this step "
                                     "unless it was restarted from a checkpoint")

    @field_validator("loss")
    @classmethod
    def _loss_registered(cls, v: str, info: ValidationInfo) -> str:
        return _registered("train.loss", v, info)

    @field_validator("num_workers")
    @classmethod
    def _worker_count(cls, v: WorkerCount) -> WorkerCount:
        lo, hi = bounds(v)
        if lo < 1 or hi < lo:
            raise ValueError(f"{list(v) if isinstance(v, tuple) else v} is not a worker count: a number >= 1, or a "
                             "range [min, max] with 1 <= min <= max")
        return lo if lo == hi else (lo, hi)

    @property
    def min_workers(self) -> int:
        return bounds(self.num_workers)[0]

    @property
    def max_workers(self) -> int:
        return bounds(self.num_workers)[1]

    @property
    def elastic(self) -> bool:
        return self.min_workers < self.max_workers

    def at_size(self, world: int) -> "TrainConfig":
        """This config as a group of `world` workers trains it: the step's rows split over them, as near the
        configured step as the size allows (synray.config.workers)."""
        micro, accum = step_split(self.captions_per_worker, self.max_workers, self.grad_accum, world)
        return self.model_copy(update={"captions_per_worker": micro, "grad_accum": accum, "num_workers": world})

    @property
    def step_rows(self) -> int:
        """Rows (captions) of one optimizer step, at any group size."""
        return step_rows(self.captions_per_worker, self.max_workers, self.grad_accum)

    _gpu_share = field_validator("gpus_per_worker")(check_gpu_share)

    @model_validator(mode="after")
    def _checks(self) -> "TrainConfig":
        if self.precision != "fp32" and not self.use_gpu:
            raise ValueError(f"precision {self.precision!r} needs use_gpu=true; use fp32 on the CPU")
        if "gpus_per_worker" in self.model_fields_set and self.gpus_per_worker != 1 and not self.use_gpu:
            raise ValueError(f"gpus_per_worker={self.gpus_per_worker:g} needs use_gpu=true")
        if self.use_gpu and self.gpus_per_worker < 1 and self.max_workers > 1:
            raise ValueError(f"gpus_per_worker={self.gpus_per_worker:g} with num_workers={self.num_workers}: Ray may "
                             "place two workers on one GPU, and NCCL refuses two ranks on one device. Training "
                             "workers take whole GPUs (gpus_per_worker=1); only a single worker (num_workers=1) "
                             "may share its GPU with diffusion actors")
        if self.precision == "bf16" and self.zero_stage == 0:
            raise ValueError("precision 'bf16' with zero_stage=0 runs DeepSpeed's BF16_Optimizer, which reads an "
                             "overflow flag of every gradient on the host each step; use zero_stage=1 (the same "
                             "weights on every rank, the optimizer state partitioned)")
        short = too_short(self.captions_per_worker, self.num_workers, self.grad_accum)
        if short:
            rows = splitting_rows(self.captions_per_worker, self.num_workers, self.grad_accum)
            hint = (f"captions_per_worker={rows} splits its step over every size of the range" if rows else
                    "narrow the range")
            sizes = ", ".join(f"{w} workers {r}" for w, r in short.items())
            raise ValueError(
                f"num_workers=[{self.min_workers}, {self.max_workers}]: a step of {self.step_rows} rows "
                f"(captions_per_worker={self.captions_per_worker} x {self.max_workers} workers x grad_accum="
                f"{self.grad_accum}) splits evenly over {sizes} rows only, more than {MAX_SHORTFALL:.0%} short of "
                f"it; {hint}")
        if self.fail_at_step is not None and self.fail_at_step <= self.checkpoint_every:
            raise ValueError(f"train.fail_at_step={self.fail_at_step} must be after the first checkpoint "
                             f"(train.checkpoint_every={self.checkpoint_every}): a restart before it has no "
                             "checkpoint to resume and would fail again")
        if self.fail_at_step is not None and self.fail_at_step > self.steps:
            raise ValueError(f"train.fail_at_step={self.fail_at_step} is past train.steps={self.steps}")
        return self


# ---------------------------------------------------------------------------------------- eval

class EvalConfig(Section):
    enabled: bool = True
    protocols: list[str] = Field(default_factory=lambda: ["knn"], description="entries of synray.eval.registry "
                                 "(an unknown one is refused naming them)")
    heldout_captions: int = Field(64, ge=1, description="rows of the held-out set (rendered with other seeds)")
    seed_offset: int = Field(1_000_003, ge=1, description="added to the run seed for the held-out set")
    knn_k: int = Field(20, ge=1)
    knn_temperature: float = Field(0.07, gt=0)
    linear_epochs: int = Field(90, ge=1)
    linear_lr: float = Field(0.1, gt=0, description="peak SGD learning rate (cosine to 0)")
    linear_batch_size: int = Field(256, ge=2)
    linear_weight_decay: list[float] = Field(
        default_factory=lambda: [0.0, 1e-4, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0], min_length=1,
        description="the probe's weight decays: each is trained on the fit part of the reference side, the one "
                    "scoring best on its validation part is refit on all of it and scored once on the query side")
    linear_bn: bool = Field(True, description="StableRep/MAE's non-affine BatchNorm before the linear layer")
    zeroshot_templates: list[str] = Field(
        default_factory=lambda: ["a photo of a {}.", "a photo of the small {}.", "a photo of the large {}.",
                                 "a drawing of a {}.", "a rendering of a {}.", "a blurry photo of a {}.",
                                 "itap of a {}."],
        min_length=1, description="CLIP-style prompts; {} is replaced by the class name")
    segmentation_epochs: int = Field(30, ge=1)
    segmentation_lr: float = Field(1e-2, gt=0, description="peak AdamW learning rate (cosine to 0)")
    segmentation_batch_size: int = Field(16, ge=2, description="images per step")
    segmentation_bn: bool = Field(True, description="non-affine BatchNorm over patch tokens before the 1x1 conv")
    segmentation_num_classes: int | None = Field(
        None, ge=2, description="mask classes (default: largest mask value + 1, ignore_index excluded)")
    segmentation_ignore_index: int | None = Field(255, ge=0, description="mask value left out of loss and mIoU")
    segmentation_background: int | None = Field(
        0, ge=0, description="mask class of the background: segmentation_miou_objects leaves it out")
    query_fraction: float = Field(0.5, gt=0, lt=1, description="query share of a split made without a split column")
    val_fraction: float = Field(
        0.2, gt=0, lt=1, description="validation share of the reference side's captions (split whole): the "
                                     "linear probe's weight decay is chosen there, and the val_* figures scored")
    batch_size: int = Field(256, ge=1, description="images per encoder forward when extracting features")
    feature_actors: int = Field(1, ge=1, description="`synray eval`: Ray Data feature-extraction actors")
    use_gpu: bool = Field(False, description="`synray eval`: one GPU per feature-extraction actor")
    resources: CustomResources
    dataset: str | None = Field(None, description="evaluate on this dataset instead of a held-out set")

    @field_validator("protocols")
    @classmethod
    def _protocols_registered(cls, v: list[str], info: ValidationInfo) -> list[str]:
        return [_registered("eval.protocols", p, info) for p in v]

    @field_validator("linear_weight_decay", mode="before")
    @classmethod
    def _one_weight_decay_is_a_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, (int, float)) else v

    @field_validator("linear_weight_decay")
    @classmethod
    def _weight_decays_not_negative(cls, v: list[float]) -> list[float]:
        if any(w < 0 for w in v):
            raise ValueError(f"weight decays must be >= 0, not {v}")
        return v

    @field_validator("zeroshot_templates")
    @classmethod
    def _templates_have_a_slot(cls, v: list[str]) -> list[str]:
        bad = [t for t in v if t.count("{}") != 1]
        if bad:
            raise ValueError(f"each template needs exactly one {{}} for the class name; not {bad}")
        return v


# ----------------------------------------------------------------------------------------- run
class RunConfig(Section):
    name: str = Field("run", pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    seed: int = Field(0, ge=0, le=2**31 - 1)
    output_root: str = Field("runs", description="run directories go under this folder: a directory, or a cloud URI "
                             "(the driver stages its files locally and uploads them; checkpoints go straight there)")
    model_cache: MountedPath | None = Field(None, description="where tiny:* models are built (default ~/.cache/synray)")
    ray: RayConfig = RayConfig()
    concepts: ConceptsConfig = ConceptsConfig()
    captions: CaptionsConfig = CaptionsConfig()
    images: ImagesConfig = ImagesConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    tune: TuneConfig = TuneConfig()
    rates: RatesConfig = RatesConfig()
    tracking: TrackingConfig = TrackingConfig()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)
