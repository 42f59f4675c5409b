"""Session fixtures shared by the whole suite."""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture(scope="session", autouse=True)
def synray_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A per-session model cache ($SYNRAY_CACHE), so tests never touch the user's ~/.cache/synray."""
    path = str(tmp_path_factory.mktemp("synray_cache"))
    old = os.environ.get("SYNRAY_CACHE")
    os.environ["SYNRAY_CACHE"] = path
    yield path
    if old is None:
        os.environ.pop("SYNRAY_CACHE", None)
    else:
        os.environ["SYNRAY_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_models(synray_cache: str) -> dict[str, str]:
    """The tiny models, built once per session: {"llm": dir, "sd": dir, "text": dir}.

    They are built through resolve_model into the session cache, so code under test that
    resolves `tiny:*` names gets these same directories without building again.
    """
    from synray.models.tiny import TINY_NAMES, resolve_model

    return {name.split(":", 1)[1]: resolve_model(name, cache_dir=synray_cache) for name in TINY_NAMES}


#: logical CPUs of the suite's one local Ray (stage actors and training workers time-share 2 cores)
RAY_TEST_CPUS = 8


#: the bucket of the suite's local S3 server
S3_BUCKET = "synray-test"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict[str, str]]:
    """A local S3 endpoint (moto) with one bucket, for the whole session. Its endpoint and fake credentials are
    in the environment before the suite's Ray starts, so Ray workers reach it as a cluster's nodes reach S3."""
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3

    boto3.client("s3").create_bucket(Bucket=S3_BUCKET)
    yield env
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster(tiny_models: dict[str, str], s3_server: dict[str, str]) -> Iterator[str]:
    """One local Ray for the whole suite; yields its address (subprocesses join it via RAY_ADDRESS)."""
    import ray

    from synray.config import RayConfig
    from synray.programs.session import init

    init(RayConfig(num_cpus=RAY_TEST_CPUS))
    address = ray.get_runtime_context().gcs_address
    yield address
    ray.shutdown()


def small_config(*overrides: str):
    """The built-in `local` config shrunk for tests (more overrides may follow), validated as programs do."""
    from synray.plan import load_run_config

    base = ["data.num_captions=16", "images.per_caption=2", "images.steps=2", "train.steps=4",
            "train.captions_per_worker=2", "train.log_every=1", "train.checkpoint_every=2",
            "eval.heldout_captions=12"]
    return load_run_config("local", base + list(overrides))


@pytest.fixture(scope="session")
def vllm_engine(tiny_models: dict[str, str]) -> Iterator[Any]:
    """One offline vLLM engine over the tiny LLM with the caption stage's settings, shared by the suite."""
    from vllm import LLM

    from synray.captions.llm import engine_kwargs

    start = time.monotonic()
    llm = LLM(model=tiny_models["llm"], seed=0, **engine_kwargs(small_config().captions))
    print(f"vLLM engine start: {time.monotonic() - start:.1f} s")
    yield llm
    client = getattr(llm.llm_engine, "engine_core", None)
    if client is not None and hasattr(client, "shutdown"):
        client.shutdown()
    del llm
    gc.collect()


@pytest.fixture(scope="session")
def generated_store(ray_cluster: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One small dataset generated for real (tiny vLLM -> tiny diffusers -> Parquet), shared by the suite."""
    from synray.data.store import ParquetStore
    from synray.plan import plan_generation
    from synray.programs.generate import generate_to_store

    out = tmp_path_factory.mktemp("store") / "local"
    cfg = small_config("data.num_captions=16", "images.per_caption=3")
    summary = generate_to_store(plan_generation(cfg, ParquetStore(out)), str(out))
    return {"dir": str(out), "cfg": cfg, "summary": summary}
