"""Security defaults: safetensors only, no remote code unless configured, no secrets forwarded, a local dashboard."""

from __future__ import annotations

from synray.captions.llm import engine_kwargs
from synray.config import CaptionsConfig, RayConfig, load_config
from synray.programs.session import local_init_kwargs, runtime_env


def test_remote_code_is_off_unless_configured():
    assert engine_kwargs(CaptionsConfig())["trust_remote_code"] is False
    cfg = load_config("local", ["captions.trust_remote_code=true"])
    assert engine_kwargs(cfg.captions)["trust_remote_code"] is True


def test_the_local_dashboard_listens_on_loopback_only():
    assert RayConfig().dashboard_host == "127.0.0.1"
    assert local_init_kwargs(RayConfig())["dashboard_host"] == "127.0.0.1"


def test_secrets_and_ray_auth_settings_are_not_forwarded_to_workers(monkeypatch):
    for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "AWS_SECRET_ACCESS_KEY", "GOOGLE_APPLICATION_CREDENTIALS"):
        monkeypatch.setenv(key, "secret-value")
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    env = runtime_env()["env_vars"]
    assert "secret-value" not in env.values() and "RAY_AUTH_MODE" not in env
