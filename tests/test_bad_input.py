"""Bad input that has no better home: a Ray address where nothing listens (the README's bad-input table lists
where every other case is tested)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from synray.programs.session import RayAddressError, check_reachable


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_ray_address_is_refused_with_its_source():
    port = _closed_port()
    with pytest.raises(RayAddressError, match=f"cannot reach Ray at 127.0.0.1:{port} \\(from \\$RAY_ADDRESS\\)"):
        check_reachable(f"127.0.0.1:{port}", "$RAY_ADDRESS")
    with pytest.raises(RayAddressError, match="not host:port"):
        check_reachable("nowhere", "ray.address")
    check_reachable("auto", "$RAY_ADDRESS")  # Ray resolves "auto" itself


def test_cli_with_ray_address_pointing_nowhere_exits_2_with_the_address(tmp_path):
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{_closed_port()}"}
    r = subprocess.run([sys.executable, "-m", "synray.cli", "generate", "local", "--out", str(tmp_path / "s"),
                        "--set", "captions.backend=template", "--set", "captions.style=concept_background"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"cannot reach Ray at {env['RAY_ADDRESS']} (from $RAY_ADDRESS)" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.fixture
def small_disk(tmp_path):
    """A 400 KiB tmpfs (skipped where this machine may not mount one)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.slow
def test_a_disk_that_fills_during_generation_stops_with_whole_shards_only(ray_cluster: str, small_disk):
    from synray.data.store import TMP_PREFIX, ParquetStore

    env = {**os.environ, "RAY_ADDRESS": ray_cluster}
    out = small_disk / "store"
    r = subprocess.run([sys.executable, "-m", "synray.cli", "generate", "shapes", "--out", str(out),
                        "--set", "data.num_captions=400", "--set", "data.rows_per_shard=8"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    assert "synray: error: no space left writing a shard" in r.stderr and "run the same command again" in r.stderr
    store = ParquetStore(out)
    assert not list(out.glob(f"{TMP_PREFIX}*"))          # the failed shard's temporary file is gone
    shards = store.check_readable(("caption_id",))        # every shard left is whole
    assert 0 < store.num_rows() < 400 and len(store.existing_ids()) == store.num_rows()
    assert len(shards) == store.num_rows() // 8


@pytest.mark.slow
def test_captions_that_are_all_rejected_fail_the_command_with_the_counts(ray_cluster: str, tmp_path):
    """Every caption rejected (class-name templates are shorter than captions.cleanup.min_words): the
    rejections are counted, and the command fails naming them instead of leaving an empty store."""
    env = {**os.environ, "RAY_ADDRESS": ray_cluster}
    r = subprocess.run([sys.executable, "-m", "synray.cli", "generate", "local", "--out", str(tmp_path / "s"),
                        "--set", "captions.backend=template", "--set", "captions.style=classname",
                        "--set", "data.num_captions=16"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "synray: error: no row passed generation (captions: too_short=20)" in r.stderr


def test_a_run_without_one_batch_fails_naming_the_rejections():
    from synray.programs.run import EmptyStreamError, check_trained

    summary = {"train": {"ended_early": True, "steps": 0}, "rejected": {"captions": {"too_short": 50}, "images": {}}}
    with pytest.raises(EmptyStreamError, match=r"before step 1 \(rows rejected by captions: too_short=50\)"):
        check_trained(summary)
    check_trained({"train": {"ended_early": True, "steps": 3}})   # a short stream that trained is fine
