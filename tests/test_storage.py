"""Writes shared by machines: temporaries named after their writer, cleared by lease and age on the file server's
clock (never by a process id looked up on the wrong machine), one put per file at an fsspec URL."""

from __future__ import annotations

import os

import numpy as np
import pytest

from histoboost import storage

HOUR = 3600


def _aged(path, seconds: float):
    past = path.stat().st_mtime - seconds
    os.utime(path, (past, past))
    return path


def test_another_machines_temporary_is_kept_while_its_lease_is_fresh(tmp_path, monkeypatch):
    monkeypatch.setenv(storage.HOSTNAME_ENV, "machine-b")
    with storage.Lease(tmp_path):
        theirs = storage.temporary_for(tmp_path / "img.npz")
        theirs.write_bytes(b"half")
        _aged(theirs, 2 * HOUR)  # old, but its writer's lease says it is alive
        monkeypatch.setenv(storage.HOSTNAME_ENV, "machine-a")
        assert storage.clear_abandoned(tmp_path) == [] and theirs.exists()
        assert storage.foreign_lease(tmp_path)  # prune leaves such a store alone
    assert not list(tmp_path.glob(".lease.*"))  # a lease ends with its holder


def test_abandoned_temporaries_go_by_age_or_by_a_dead_local_writer(tmp_path, monkeypatch):
    monkeypatch.setenv(storage.HOSTNAME_ENV, "machine-a")
    young = tmp_path / ".a.npz.machine-b.1.0123abcd.tmp"  # another machine, no lease, just written: may be writing
    old = tmp_path / ".b.npz.machine-b.1.0123abcd.tmp"
    dead = tmp_path / ".c.npz.machine-a.999999999.0123abcd.tmp"  # this machine, process gone
    legacy = tmp_path / ".d.123.somehost.tmp.npz"  # named before writers were
    for path in (young, old, dead, legacy):
        path.write_bytes(b"")
    _aged(old, 2 * HOUR)
    _aged(legacy, 2 * HOUR)
    stale_lease = tmp_path / ".lease.machine-b.7.0123abcd"
    stale_lease.write_bytes(b"")
    _aged(stale_lease, 2 * HOUR)
    removed = storage.clear_abandoned(tmp_path)
    assert sorted(removed) == sorted([old.name, dead.name, legacy.name])
    assert young.exists() and not stale_lease.exists()


def test_the_servers_clock_decides_age_not_this_machines(tmp_path, monkeypatch):
    """A machine whose clock runs two hours fast must not take a just-written file for an abandoned one."""
    import time

    monkeypatch.setenv(storage.HOSTNAME_ENV, "machine-a")
    young = tmp_path / ".a.npz.machine-b.1.0123abcd.tmp"
    young.write_bytes(b"")
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 2 * HOUR)
    assert storage.clear_abandoned(tmp_path) == [] and young.exists()


def test_write_bytes_is_whole_or_absent_and_names_the_writer(tmp_path, monkeypatch):
    monkeypatch.setenv(storage.HOSTNAME_ENV, "machine-a")
    target = tmp_path / "x.bin"
    storage.write_bytes(target, b"one")
    assert target.read_bytes() == b"one"
    assert storage.temporary_for(target).name.startswith(f".x.bin.machine-a.{os.getpid()}.")

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as err:
        storage.write_bytes(target, b"two")
    assert err.value.filename == str(target) and target.read_bytes() == b"one" and len(list(tmp_path.iterdir())) == 1


def test_feature_store_at_an_fsspec_url_reads_back_what_the_local_store_holds(tmp_path):
    pytest.importorskip("fsspec")
    from histoboost.backbones import create_backbone
    from histoboost.config import preset
    from histoboost.data import Manifest, load_manifest
    from histoboost.features import FeatureStore, extract_features
    from histoboost.runtime import Runtime

    from conftest import BACH, SMALL, copy_eight

    config = preset("quick").merged(SMALL)
    backbone = create_backbone("efficientnet_lite0")
    manifest, _ = load_manifest(copy_eight(BACH, tmp_path / "data"))
    records = Manifest(manifest.records[:2], manifest.root, manifest.layout)
    local = extract_features(records, config, backbone, Runtime(cache_dir=tmp_path / "cache"))
    remote = extract_features(records, config, backbone, Runtime(cache_dir="memory://histoboost-test/cache"))
    assert remote.computed == local.computed and str(remote.store.root).startswith("memory://")
    again = FeatureStore.open("memory://histoboost-test/cache", config, backbone)
    for record in records:
        ours, theirs = again.load(record.image_id), local.store.load(record.image_id)
        assert np.array_equal(ours.pooled, theirs.pooled) and np.array_equal(ours.whole, theirs.whole)
    assert (
        extract_features(records, config, backbone, Runtime(cache_dir="memory://histoboost-test/cache")).computed == 0
    )


def test_holders_in_one_process_share_one_lease_until_the_last_lets_go(tmp_path):
    with storage.Lease(tmp_path):
        with storage.Lease(tmp_path):  # a second task of the same worker, or the client around its tasks
            pass
        assert len(list(tmp_path.glob(".lease.*"))) == 1  # still held by the first
    assert not list(tmp_path.glob(".lease.*"))


def test_urls_without_their_package_and_folders_given_as_urls_are_one_line():
    with pytest.raises(storage.StorageError, match="nosuchprotocol://x/y: cannot open this URL"):
        storage.exists("nosuchprotocol://x/y")
    with pytest.raises(storage.StorageError, match="need a folder, not a URL"):
        storage.local_folder("s3://bucket/cache", "slide tile caches")


def test_prune_keeps_a_store_another_machine_is_writing_into(tmp_path, monkeypatch):
    import json

    from histoboost.features import prune_stores

    key = "lite0-0123456789abcdef"
    store = tmp_path / "features" / key
    store.mkdir(parents=True)
    (store / "index.json").write_text(json.dumps({"key": key}))
    (store / ".lease.machine-b.7.0123abcd").write_bytes(b"")  # touched just now, on another machine
    monkeypatch.setenv(storage.HOSTNAME_ENV, "machine-a")
    with pytest.warns(UserWarning, match="kept: a run is writing into it"):
        assert prune_stores(tmp_path, everything=True) == []
    assert store.is_dir()
    _aged(store / ".lease.machine-b.7.0123abcd", 2 * HOUR)  # that run is long gone
    assert prune_stores(tmp_path, everything=True) == [key]
