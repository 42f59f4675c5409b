"""Bad input that has no better home: a Ray address where nothing listens, a disk that fills, captions that are all
rejected, a stream without one batch (the README's bad-input table lists where every other case is tested)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from procs import ROOT, cli, free_port, sets, synray_main

from synray.programs.session import RayAddressError, check_reachable


def test_an_unreachable_ray_address_is_refused_with_its_source():
    port = free_port()
    with pytest.raises(RayAddressError, match=f"cannot reach Ray at 127.0.0.1:{port} \\(from \\$RAY_ADDRESS\\)"):
        check_reachable(f"127.0.0.1:{port}", "$RAY_ADDRESS")
    with pytest.raises(RayAddressError, match="not host:port"):
        check_reachable("nowhere", "ray.address")
    check_reachable("auto", "$RAY_ADDRESS")  # Ray resolves "auto" itself


def test_cli_with_ray_address_pointing_nowhere_exits_2_with_the_address(tmp_path):
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{free_port()}"}
    r = subprocess.run([sys.executable, "-m", "synray.cli", "generate", "local", "--out", str(tmp_path / "s"),
                        "--set", "captions.backend=template", "--set", "captions.style=concept_background"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"cannot reach Ray at {env['RAY_ADDRESS']} (from $RAY_ADDRESS)" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("given", ["--address", "ray.address", "$RAY_ADDRESS"])
def test_an_unreachable_address_names_the_flag_key_or_variable_it_came_from(given, monkeypatch):
    address = f"127.0.0.1:{free_port()}"
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    args = {"--address": ["--address", address], "ray.address": sets(f"ray.address={address}"), "$RAY_ADDRESS": []}
    if given == "$RAY_ADDRESS":
        monkeypatch.setenv("RAY_ADDRESS", address)
    r = synray_main("plan", "local", "--cluster", str(ROOT / "cluster.yaml"), *args[given])
    assert r.code == 2, (r.error, r.err)
    (line,) = r.err.strip().splitlines()   # one line, before any model is resolved
    assert line.startswith(f"synray: error: cannot reach Ray at {address} (from {given}): "), line


@pytest.mark.parametrize("given", ["--source", "captions.rewrite.source"])
def test_a_rewrite_source_that_is_missing_or_empty_is_one_line_naming_the_flag_or_key(given, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for source, says in ((tmp_path / "nope", "does not exist"), (empty, "holds no .parquet or .tar files")):
        args = ["--source", str(source)] if given == "--source" else sets(f"captions.rewrite.source={source}")
        r = synray_main("rewrite", "local", "--out", str(tmp_path / "out"), *args)
        assert r.code == 2, (r.error, r.err)
        assert r.err.strip().splitlines()[-1] == f"synray: error: {given}: {source} {says}", r.err
        assert "Traceback" not in r.err


DISK_KIB = 400
#: the exit status of the namespace's shell when it cannot mount the tmpfs either
NO_SMALL_DISK = 97


def _mount_tmpfs(mnt: Path) -> str | None:
    """Mount a small tmpfs at `mnt` (as root); None when this machine refuses, with its reason."""
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_KIB}k", "tmpfs", str(mnt)], capture_output=True,
                       text=True)
    return None if r.returncode == 0 else (r.stderr.strip() or f"mount exited {r.returncode}")


def _store_facts(out: str) -> dict:
    """What a store holds after the disk filled: temporary files left, rows, distinct caption ids, whole shards."""
    from synray.data.store import TMP_PREFIX, ParquetStore

    store = ParquetStore(out)
    shards = store.check_readable(("caption_id",))   # every shard readable, or the shard is named
    return {"tmp_files": len(list(Path(out).glob(f"{TMP_PREFIX}*"))), "rows": store.num_rows(),
            "ids": len(store.existing_ids()), "shards": len(shards)}


def _generate_on_a_small_disk(out: Path) -> tuple[int, str, dict]:
    """`synray generate shapes --out OUT` where OUT lies on a 400 KiB filesystem, and the store's facts read while
    that filesystem is there: a tmpfs mounted here when this machine lets the suite mount one (the command then
    joins the suite's Ray, whose store writer sees the mount); otherwise in a user and mount namespace of its own,
    where a shell mounts the tmpfs, the command starts a local Ray inside the namespace, and the facts are read
    there too."""
    args = ["generate", "shapes", "--out", str(out), *sets("data.num_captions=400", "data.rows_per_shard=8")]
    out.parent.mkdir(parents=True, exist_ok=True)
    refused = _mount_tmpfs(out.parent)
    if refused is None:
        try:
            r = synray_main(*args)
            assert r.error is None, r.error
            return r.code, r.err, _store_facts(str(out))
        finally:
            subprocess.run(["umount", str(out.parent)], check=False)
    facts = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
             f"from test_bad_input import _store_facts; print(json.dumps(_store_facts({str(out)!r})))")
    script = (f"mount -t tmpfs -o size={DISK_KIB}k tmpfs {shlex.quote(str(out.parent))} || exit {NO_SMALL_DISK}; "
              f"{shlex.join(cli(*args))}; rc=$?; {shlex.quote(sys.executable)} -c {shlex.quote(facts)}; exit $rc")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode != NO_SMALL_DISK, f"no way to make a small disk here: {refused}; then {r.stderr[-500:]}"
    return r.returncode, r.stderr, json.loads(r.stdout.strip().splitlines()[-1])


def test_a_disk_that_fills_during_generation_stops_with_whole_shards_only(ray_cluster: str, tmp_path: Path):
    code, err, facts = _generate_on_a_small_disk(tmp_path / "disk" / "store")
    assert code == 2, err[-3000:]
    assert "synray: error: no space left writing a shard" in err and "run the same command again" in err
    assert facts["tmp_files"] == 0                                  # the failed shard's temporary file is gone
    assert 0 < facts["rows"] < 400 and facts["ids"] == facts["rows"]  # each caption id once
    assert facts["shards"] == facts["rows"] // 8                     # whole shards of 8 rows only


def test_captions_that_are_all_rejected_fail_the_command_with_the_counts(ray_cluster: str, tmp_path: Path):
    """Every caption rejected (class-name templates are shorter than captions.cleanup.min_words): the
    rejections are counted, and the command fails naming them instead of leaving an empty store."""
    r = synray_main("generate", "local", "--out", str(tmp_path / "s"), *sets(
        "captions.backend=template", "captions.style=classname", "data.num_captions=16"))
    assert r.code == 2, (r.error, r.err[-3000:])
    assert "synray: error: no row passed generation (captions: too_short=20)" in r.err


def test_a_run_without_one_batch_fails_naming_the_rejections():
    from synray.programs.run import EmptyStreamError, check_trained

    rejected = {"captions": {"too_short": 50}, "images": {}}
    with pytest.raises(EmptyStreamError, match=r"before step 1 \(rows rejected by captions: too_short=50\)"):
        check_trained({"ended_early": True, "steps": 0}, rejected)
    check_trained({"ended_early": True, "steps": 3}, {})   # a short stream that trained is fine


def test_a_missing_store_or_cluster_file_is_one_line_naming_it(tmp_path: Path):
    """`synray samples` of a folder that is not a store, and `synray plan --cluster` of a file that is missing or
    not YAML: exit 2 with one line that names the path (and the flag), no traceback."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("available_node_types:\n  head: {resources: {CPU: 4}\n  x: [\n")
    cases = [(("samples", str(tmp_path / "nope"), "--out", str(tmp_path / "g.png")),
              f"store directory {tmp_path / 'nope'} does not exist"),
             (("samples", str(tmp_path), "--out", str(tmp_path / "g.png")), "holds no shard-*.parquet files"),
             (("plan", "local", "--cluster", str(tmp_path / "nope.yaml")),
              f"cluster file {tmp_path / 'nope.yaml'} (--cluster) does not exist"),
             (("plan", "local", "--cluster", str(bad)), f"cluster file {bad} is not valid YAML (line 3")]
    for args, message in cases:
        r = synray_main(*args)
        assert r.code == 2 and r.error is None, (args, r.error, r.trace[-2000:])
        (line,) = [x for x in r.err.splitlines() if x.startswith("synray")]
        assert message in line and "Traceback" not in r.err, (args, r.err)
