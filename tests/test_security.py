"""Security defaults: no remote code unless configured, no secrets forwarded, a local dashboard on loopback
(safetensors only: test_models_tiny.py; secrets in a cluster's environment reaching no output: test_jobs.py)."""

from __future__ import annotations

from synray.captions.llm import engine_kwargs
from synray.config import CaptionsConfig, RayConfig, load_config
from synray.programs.session import local_init_kwargs, runtime_env


def test_remote_code_is_off_unless_configured():
    assert engine_kwargs(CaptionsConfig())["trust_remote_code"] is False
    cfg = load_config("local", ["captions.trust_remote_code=true"])
    assert engine_kwargs(cfg.captions)["trust_remote_code"] is True


def test_a_local_ray_is_started_with_its_dashboard_on_loopback():
    assert RayConfig().dashboard_host == "127.0.0.1"
    assert local_init_kwargs(RayConfig())["dashboard_host"] == "127.0.0.1"


def test_the_local_rays_dashboard_listens_on_loopback_only(ray_cluster: str):
    """The suite's Ray is a local Ray that synray started (conftest): its dashboard's listening sockets, as the
    kernel lists them, are bound to 127.0.0.1 and to no other address."""
    import psutil
    import ray

    url = ray._private.worker.global_worker.node.address_info["webui_url"]
    port = int(url.rsplit(":", 1)[1])
    listening = {c.laddr.ip for c in psutil.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
    assert listening == {"127.0.0.1"}, (url, listening)


def test_secrets_and_ray_auth_settings_are_not_forwarded_to_workers(monkeypatch):
    for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "AWS_SECRET_ACCESS_KEY", "GOOGLE_APPLICATION_CREDENTIALS"):
        monkeypatch.setenv(key, "secret-value")
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    env = runtime_env()["env_vars"]
    assert "secret-value" not in env.values() and "RAY_AUTH_MODE" not in env
