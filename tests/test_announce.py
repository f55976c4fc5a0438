"""Announcements on the model-updates topic against the real local broker."""
from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Producer

from model.artifact import current_version, list_versions, save_version
from model.config import DataConfig, HRNNConfig
from model.network import HRNN
from stream.announce import Announcement, AnnouncementError, AnnouncementWatcher, announce, latest_announcement
from stream.cli import main as hrnn
from stream.kafka_clients import create_producer, produce_acknowledged, read_all

pytestmark = pytest.mark.broker
CFG = HRNNConfig(hidden_dimension=32)
DEEP = b"[" * 100_000  # nested past json's recursion limit: one producer's record must not stop a watcher


def _topic() -> str:
    return f"hrnn.model-updates-{uuid.uuid4().hex[:8]}"


def _publish(registry: Path, n: int) -> list[str]:
    items = [f"i{k}" for k in range(20)]
    return [save_version(registry, HRNN(len(items), CFG), CFG, DataConfig(), items, ["click"],
                         version=f"v{k:03d}").name for k in range(n)]


def test_value_round_trip_and_malformed_values_are_typed_errors():
    ann = Announcement("v1", "/r/v1", "2026-01-01T00:00:00+00:00", "retrain", "/r")
    assert Announcement.decode(b"/r", ann.value()) == ann
    for raw in (b"not json", b"[]", b'{"version": "v1"}', None):
        with pytest.raises(AnnouncementError):
            Announcement.decode(b"/r", raw)


def test_a_deeply_nested_announcement_is_a_typed_error_not_a_recursion_error():
    with pytest.raises(AnnouncementError, match="RecursionError"):
        Announcement.decode(b"/r", DEEP)


def test_a_share_below_one_announces_a_canary_and_a_record_without_one_a_full_rollout():
    canary = Announcement("v2", "/r/v2", "2026-01-01T00:00:00+00:00", "canary", "/r", 0.25)
    assert Announcement.decode(b"/r", canary.value()).share == 0.25
    assert Announcement.decode(b"/r", b'{"version": "v1", "path": "/r/v1"}').share == 1.0  # written before canaries
    for share in ("0.5", 0, -0.1, 1.5, True, None):
        with pytest.raises(AnnouncementError, match="share"):
            Announcement.decode(b"/r", json.dumps({"version": "v1", "path": "/r/v1", "share": share}).encode())


def test_an_announcement_round_trips_through_the_compacted_topic(broker, tmp_path):
    topic = _topic()
    sent = announce(broker.bootstrap, topic, "v007", tmp_path / "v007", reason="retrain")
    records = read_all(broker.bootstrap, topic, idle_s=1.5)
    assert len(records) == 1 and records[0].partition == 0
    got = Announcement.decode(records[0].key, records[0].value)
    assert got == sent and got.registry_id == str(tmp_path.resolve())
    assert set(json.loads(records[0].value)) == {"version", "path", "announced_at", "reason", "share"}


def test_a_starting_watcher_delivers_only_the_latest_then_every_new_one(broker, tmp_path):
    topic = _topic()
    for v in ("v1", "v2", "v3"):
        announce(broker.bootstrap, topic, v, tmp_path / v)
    got: list[str] = []
    with AnnouncementWatcher(broker.bootstrap, topic, on_announcement=lambda a: got.append(a.version)) as w:
        assert w.wait_caught_up(20)
        assert w.latest.version == "v3"
        announce(broker.bootstrap, topic, "v4", tmp_path / "v4")
        assert w.wait_for("v4", 20) is not None
    assert got == ["v3", "v4"]


def test_a_watcher_of_an_empty_topic_catches_up_with_nothing(broker):
    got: list[str] = []
    with AnnouncementWatcher(broker.bootstrap, _topic(), on_announcement=lambda a: got.append(a.version)) as w:
        assert w.wait_caught_up(20)
        assert w.latest is None and got == []


def test_malformed_records_and_other_registries_are_skipped(broker, tmp_path):
    topic = _topic()
    announce(broker.bootstrap, topic, "v1", tmp_path / "mine" / "v1")
    p = Producer({"bootstrap.servers": broker.bootstrap})
    p.produce(topic, key=str((tmp_path / "mine").resolve()).encode(), value=b"garbage", partition=0)
    p.flush(10)
    announce(broker.bootstrap, topic, "v9", tmp_path / "theirs" / "v9")
    with AnnouncementWatcher(broker.bootstrap, topic, registry_id=str((tmp_path / "mine").resolve())) as w:
        assert w.wait_caught_up(20)
        assert w.latest.version == "v1" and w.malformed == 1 and w.received == 1


def test_a_deeply_nested_announcement_is_skipped_and_the_watcher_goes_on(broker, tmp_path):
    topic, key = _topic(), str(tmp_path.resolve())
    announce(broker.bootstrap, topic, "v1", tmp_path / "v1")
    assert produce_acknowledged(create_producer(broker.bootstrap), topic, [(key.encode(), DEEP)]) is None
    announce(broker.bootstrap, topic, "v2", tmp_path / "v2")
    with AnnouncementWatcher(broker.bootstrap, topic, registry_id=key, poll_timeout_s=0.1) as w:
        assert w.wait_caught_up(30), w.error
        assert w.latest.version == "v2" and w.received == 2 and w.malformed == 1 and w.error is None


def test_promote_and_rollback_announce_and_a_watcher_follows(broker, tmp_path):
    reg = tmp_path / "registry"
    v0, v1, v2 = _publish(reg, 3)
    topic = _topic()
    args = ["--bootstrap-servers", broker.bootstrap, "--topic", topic, "--kafka-config", "client.id=hrnn-models"]
    with AnnouncementWatcher(broker.bootstrap, topic) as w:
        assert w.wait_caught_up(20)
        assert hrnn(["models", "promote", str(reg), v1, *args]) == 0
        ann = w.wait_for(v1, 20)
        assert ann is not None and ann.reason == "promote" and Path(ann.path) == (reg / v1).resolve()
        assert hrnn(["models", "rollback", str(reg), *args]) == 0  # v1 -> v2, current before v1 was promoted
        ann = w.wait_for(v2, 20)
        assert ann is not None and ann.reason == "rollback" and current_version(reg) == v2
        assert hrnn(["models", "promote", str(reg), v0, *args]) == 0
        assert w.wait_for(v0, 20) is not None
    assert current_version(reg) == v0


def test_the_models_commands_hand_their_kafka_client_settings_to_the_clients(tmp_path, capsys):
    """A setting the client refuses is named (so it reached it), before the registry changes."""
    reg = tmp_path / "registry"
    v0, v1 = _publish(reg, 2)
    assert hrnn(["models", "promote", str(reg), v0]) == 0
    assert hrnn(["models", "promote", str(reg), v1]) == 0
    capsys.readouterr()
    bad = ["--bootstrap-servers", "127.0.0.1:9", "--kafka-config", "no.such.setting=1"]
    assert hrnn(["models", "list", str(reg), *bad]) == 2
    assert "no.such.setting" in capsys.readouterr().err
    for argv in (["rollback", str(reg)], ["promote", str(reg), v0]):
        assert hrnn(["models", *argv, *bad]) == 2
        assert "no.such.setting" in capsys.readouterr().err and current_version(reg) == v1  # refused before


def test_a_rollback_whose_announcement_failed_says_how_to_announce_it_not_to_roll_back_again(tmp_path, capsys,
                                                                                               monkeypatch):
    import stream.announce
    import stream.compacted

    reg = tmp_path / "registry"
    v0, v1 = _publish(reg, 2)
    assert hrnn(["models", "promote", str(reg), v0]) == 0
    assert hrnn(["models", "promote", str(reg), v1]) == 0
    capsys.readouterr()

    def broker_down(*args, **kwargs):
        raise AnnouncementError("announcing failed: the broker is down")

    # the broker answered before CURRENT moved, and failed the announcement after
    monkeypatch.setattr(stream.compacted, "ensure_table_topic", lambda *args, **kwargs: None)
    monkeypatch.setattr(stream.announce, "announce", broker_down)
    assert hrnn(["models", "rollback", str(reg), "--bootstrap-servers", "127.0.0.1:9", "--topic", "shop.updates"]) == 2
    err = capsys.readouterr().err
    assert current_version(reg) == v0 and "the broker is down" in err
    assert f"announce it with `hrnn models promote {reg} {v0} --topic shop.updates --bootstrap-servers ...`" in err


def test_canary_announces_a_share_and_leaves_the_registry_current_alone(broker, tmp_path, capsys):
    reg = tmp_path / "registry"
    v0, v1 = _publish(reg, 2)
    assert hrnn(["models", "promote", str(reg), v0]) == 0
    topic = _topic()
    args = ["--bootstrap-servers", broker.bootstrap, "--topic", topic]
    assert hrnn(["models", "canary", str(reg), v1, "--share", "0.1", *args]) == 0
    assert "10.0% of the users" in capsys.readouterr().out
    (record,) = read_all(broker.bootstrap, topic, idle_s=1.5)
    ann = Announcement.decode(record.key, record.value)
    assert (ann.version, ann.reason, ann.share) == (v1, "canary", 0.1) and current_version(reg) == v0
    assert hrnn(["models", "list", str(reg), *args]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed[0].startswith(f"* {v0}") and listed[1].startswith(f"~ {v1}")
    assert listed[1].endswith("canary: 10.0% of the users") and "canary" not in listed[0]
    for share, why in (("1", "strictly between 0 and 1"), ("0", "strictly between 0 and 1")):
        assert hrnn(["models", "canary", str(reg), v1, "--share", share, *args]) == 2
        assert why in capsys.readouterr().err
    assert hrnn(["models", "canary", str(reg), "v999", "--share", "0.5", *args]) == 2
    assert "no version 'v999'" in capsys.readouterr().err
    assert hrnn(["models", "canary", str(reg), v0, "--share", "0.5", *args]) == 2  # it serves everyone already
    assert f"{v0} is already the current version" in capsys.readouterr().err
    assert len(read_all(broker.bootstrap, topic, idle_s=1.5)) == 1  # nothing more announced
    assert hrnn(["models", "promote", str(reg), v1, *args]) == 0  # the canary promoted: no canary left
    capsys.readouterr()
    assert hrnn(["models", "list", str(reg), *args]) == 0
    assert [line[:2] for line in capsys.readouterr().out.splitlines()] == ["  ", "* "]


def test_prune_keeps_a_canary_serving_now_when_it_reads_the_announcements(broker, tmp_path, capsys):
    reg = tmp_path / "registry"
    v0, v1, v2, v3 = _publish(reg, 4)
    assert hrnn(["models", "promote", str(reg), v3]) == 0
    topic = _topic()
    args = ["--bootstrap-servers", broker.bootstrap, "--topic", topic]
    assert hrnn(["models", "canary", str(reg), v1, "--share", "0.2", *args]) == 0
    capsys.readouterr()
    assert hrnn(["models", "prune", str(reg), "--keep", "1", *args]) == 0
    # v2 stays too: it was current before v3, so a rollback returns to it
    assert f"removed 1 version(s): {v0}; kept the canary {v1}" in capsys.readouterr().out
    assert [v.version for v in list_versions(reg)] == [v1, v2, v3]
    assert hrnn(["models", "prune", str(reg), "--keep", "1"]) == 0  # without the announcements it cannot know
    out, err = capsys.readouterr()
    assert f"removed 1 version(s): {v1}" in out and "a canary serving now was not looked for" in err


def test_promote_of_an_unknown_version_fails_without_announcing(broker, tmp_path, capsys):
    reg = tmp_path / "registry"
    _publish(reg, 1)
    topic = _topic()
    assert hrnn(["models", "promote", str(reg), "v999", "--bootstrap-servers", broker.bootstrap,
                 "--topic", topic]) == 2
    assert "no version 'v999'" in capsys.readouterr().err
    assert read_all(broker.bootstrap, topic, idle_s=1.5) == []


def test_a_tombstone_on_a_registrys_key_retires_its_announcement_and_one_on_another_key_does_not(broker, tmp_path):
    from stream.announce import latest_canary

    topic, mine, theirs = _topic(), str((tmp_path / "mine").resolve()), str((tmp_path / "theirs").resolve())

    def tombstone(key: str) -> None:
        assert produce_acknowledged(create_producer(broker.bootstrap), topic, [(key.encode(), None)]) is None

    announce(broker.bootstrap, topic, "v1", tmp_path / "mine" / "v1", reason="canary", share=0.5)
    announce(broker.bootstrap, topic, "v9", tmp_path / "theirs" / "v9")
    tombstone(theirs)
    assert latest_announcement(broker.bootstrap, topic, theirs) is None
    assert latest_canary(broker.bootstrap, topic, mine).version == "v1"
    tombstone(mine)
    assert latest_canary(broker.bootstrap, topic, mine) is None
    got: list[str] = []
    with AnnouncementWatcher(broker.bootstrap, topic, registry_id=mine,
                             on_announcement=lambda a: got.append(a.version)) as w:
        assert w.wait_caught_up(20), w.error
        assert w.latest is None and got == [] and w.malformed == 0  # a starting worker serves CURRENT
        announce(broker.bootstrap, topic, "v2", tmp_path / "mine" / "v2")
        assert w.wait_for("v2", 20) is not None
        tombstone(mine)
        deadline = time.monotonic() + 20
        while w.latest is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert w.latest is None and got == ["v2"]  # a running worker is told nothing: it keeps what it serves
