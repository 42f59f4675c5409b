"""Model names checked against a Hugging Face hub: a stand-in hub on 127.0.0.1 that answers huggingface_hub's own
client as the hub does (a model's info, 404 RepoNotFound, 401 GatedRepo), and a hub that does not answer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from procs import ROOT, free_port, sets
from synray.models.hub import check_hub_names

PUBLIC, GATED = "acme/public-lm", "acme/gated-lm"


class FakeHub(BaseHTTPRequestHandler):
    """GET /api/models/<owner>/<name>[/revision/<rev>] as the hub answers it."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        repo = "/".join(self.path.split("?")[0].removeprefix("/api/models/").split("/")[:2])
        if repo == PUBLIC:
            self._answer(200, {"id": repo, "modelId": repo, "sha": "0" * 40, "siblings": [], "private": False})
        elif repo == GATED:
            self._answer(401, {"error": f"Access to model {repo} is restricted."}, "GatedRepo")
        else:
            self._answer(404, {"error": "Repository not found"}, "RepoNotFound")

    def _answer(self, status: int, body: dict, error_code: str | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if error_code:
            self.send_header("X-Error-Code", error_code)
            self.send_header("X-Error-Message", body["error"])
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def hub() -> str:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_name_the_hub_lacks_is_a_problem_a_gated_one_a_note_and_local_names_are_not_asked(hub, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    found = check_hub_names({"captions.model": PUBLIC, "images.model": "acme/no-such-model",
                             "train.text.model": GATED, "other": "tiny:sd"}, endpoint=hub)
    assert found.problems == ["images.model: acme/no-such-model is not a model on the Hugging Face hub (a private one "
                              "needs HF_TOKEN here too)"]
    (note,) = found.notes
    assert note.startswith(f"train.text.model: {GATED} is gated on the hub: every node needs HF_TOKEN")


def test_an_unreachable_or_offline_hub_leaves_the_names_unchecked_with_a_note(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    found = check_hub_names({"captions.model": PUBLIC}, endpoint=f"http://127.0.0.1:{free_port()}", timeout_s=2)
    assert not found.problems and found.notes[0].startswith("hub names not checked: the Hugging Face hub did not")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    found = check_hub_names({"captions.model": PUBLIC})
    assert not found.problems and found.notes == [f"hub names not checked (HF_HUB_OFFLINE is set): {PUBLIC}"]


def test_synray_plan_refuses_a_model_name_the_hub_does_not_have(hub):
    """The CLI's real process, with huggingface_hub pointed at the stand-in hub through HF_ENDPOINT."""
    env = {**os.environ, "HF_ENDPOINT": hub}
    env.pop("HF_HUB_OFFLINE", None)
    base = [sys.executable, "-m", "synray.cli", "plan", "one-gpu", *sets("ray.num_gpus=1", "ray.num_cpus=16")]
    bad = subprocess.run([*base, *sets("captions.model=acme/no-such-model", f"images.model={PUBLIC}")], env=env,
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert bad.returncode == 2, bad.stdout[-2000:] + bad.stderr[-2000:]
    assert "refused: captions.model: acme/no-such-model is not a model on the Hugging Face hub" in bad.stdout
    good = subprocess.run([*base, *sets(f"captions.model={GATED}", f"images.model={PUBLIC}")], env=env,
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert good.returncode == 0 and "checks: ok" in good.stdout, good.stdout[-2000:] + good.stderr[-2000:]
    assert f"note: captions.model: {GATED} is gated on the hub" in good.stdout
