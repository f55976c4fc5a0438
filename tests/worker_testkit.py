"""Helpers shared by the worker tests (test_worker*.py): a small real model version, worker
settings on unique topics, a worker running in a thread, and readers for its outputs."""
from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from confluent_kafka import Consumer, Producer, TopicPartition

from model.artifact import latest_version_dir, save_version
from model.config import DataConfig, HRNNConfig
from model.events import Event, encode_event
from model.inference import Filters, Recommender, StepInput
from model.network import HRNN
from model.state import UserState
from stream.kafka_clients import Record, consumer_config, producer_config, read_all, wait_for_count
from stream.settings import WorkerSettings
from stream.store import StateStores
from stream.worker import Worker

N_ITEMS = 300
BASE_MS = 1_767_225_600_000
# Tansu's group join takes about session.timeout.ms / 2.
TEST_CONSUMER = {"session.timeout.ms": "6000", "heartbeat.interval.ms": "500"}


def make_registry(root: Path, *, seed: int = 0, n_items: int = N_ITEMS, hidden: int = 32) -> Path:
    """A model version with random weights of the right shape (serving does not care how they were learned)."""
    torch.manual_seed(seed)
    cfg = HRNNConfig(hidden_dimension=hidden, seed=seed)
    items = [f"item-{i}" for i in range(n_items)]
    save_version(root, HRNN(n_items, cfg).eval(), cfg, DataConfig(), items, ["click", "purchase"])
    return root


def resign(d: Path) -> None:
    """Rewrite a version's manifest so its checksums match its files again: a broken version a publisher of another
    code revision (or a buggy one) signed."""
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["version"] = d.name
    manifest["files"] = {n: hashlib.sha256((d / n).read_bytes()).hexdigest() for n in manifest["files"]}
    (d / "manifest.json").write_text(json.dumps(manifest))


def settings_for(bootstrap: str, registry: Path, state_dir: Path, *, name: str | None = None,
                 partitions: int = 3, **overrides) -> WorkerSettings:
    name = name or uuid.uuid4().hex[:10]
    values = dict(bootstrap_servers=bootstrap, registry=str(registry), state_dir=str(state_dir),
                  input_topic=f"ev-{name}", output_topic=f"rec-{name}", group=f"grp-{name}",
                  availability_topic=f"avail-{name}",
                  partitions=partitions, kafka_consumer=dict(TEST_CONSUMER))
    values.update(overrides)
    return WorkerSettings(**values)


def make_events(n: int, n_users: int, *, seed: int = 1, purchase_every: int = 7, unknown_every: int = 0,
                session_ids: bool = False) -> list[Event]:
    """n events over n_users users, timestamps rising per user with a session gap now and then. With
    `session_ids`, a third of the users send session ids, which change at a gap and now and then within one, and
    leave them out on a fifth of their events."""
    rng = np.random.default_rng(seed)
    out, clock, session = [], {}, {}
    for i in range(n):
        user = f"user-{rng.integers(n_users)}"
        gap = 3_600_000 if rng.random() < 0.15 else int(rng.integers(1_000, 60_000))
        clock[user] = clock.get(user, BASE_MS + int(rng.integers(0, 10**6))) + gap
        item = f"item-{int(rng.zipf(1.3)) % N_ITEMS}"
        if unknown_every and i % unknown_every == 0:
            item = f"new-item-{i}"
        etype = "purchase" if purchase_every and i % purchase_every == 0 else "click"
        sid = None
        if session_ids and int(user.split("-")[1]) % 3 == 0:
            session[user] = session.get(user, 0) + (gap >= 3_600_000 or rng.random() < 0.1)
            sid = f"{user}-s{session[user]}" if rng.random() < 0.8 else None
        out.append(Event(user, item, etype, clock[user], session_id=sid, event_id=f"e{i}"))
    return out


def produce(bootstrap: str, topic: str, events: Iterable[Event | tuple[bytes | None, bytes]], *,
            partition: int | None = None, headers: list[tuple[str, bytes]] | None = None,
            config: dict | None = None) -> int:
    """Produce events keyed by user id (or raw (key, value) pairs as given), each with `headers`; returns how
    many. `config`: more producer settings (message.max.bytes, for a record past librdkafka's 1 MB)."""
    p = Producer({**producer_config(bootstrap), **(config or {})})
    n = 0
    for e in events:
        key, value = (e.user_id.encode(), encode_event(e)) if isinstance(e, Event) else e
        kwargs: dict = {} if partition is None else {"partition": partition}
        if headers:
            kwargs["headers"] = headers
        p.produce(topic, value, key, **kwargs)
        n += 1
    assert p.flush(30) == 0
    return n


def recommendations(bootstrap: str, topic: str, n: int, timeout_s: float = 90.0) -> list[dict]:
    return [json.loads(r.value) for r in wait_for_count(bootstrap, topic, n, timeout_s)]


def records_of(bootstrap: str, topic: str, idle_s: float = 1.5) -> list[Record]:
    """Everything in `topic` now. The idle clock of read_all starts before the first fetch answers,
    so a short idle_s can read nothing on a busy machine."""
    return read_all(bootstrap, topic, idle_s=idle_s)


@contextmanager
def running(settings: WorkerSettings, *, wait_assigned: bool = True, **kwargs) -> Iterator[Worker]:
    """A worker running in a thread; stopped (drained) and joined on exit, its error re-raised.

    By default it waits for the first assignment, so topics exist with the asked partition
    count before a test produces (a producer would auto-create them otherwise)."""
    worker = Worker(settings, **kwargs)
    stop, errors = threading.Event(), []

    def target() -> None:
        try:
            worker.run(stop)
        except BaseException as exc:  # re-raised in the test thread
            errors.append(exc)

    thread = threading.Thread(target=target, name="worker-under-test", daemon=True)
    thread.start()
    try:
        if wait_assigned:
            wait_until(lambda: worker.assigned.is_set() or errors, 60, message="first assignment")
        if errors:
            raise errors[0]
        yield worker
    finally:
        stop.set()
        thread.join(timeout=60)
        assert not thread.is_alive(), "worker did not stop within 60 s"
    if errors:
        raise errors[0]


def wait_until(condition, timeout_s: float = 60.0, interval_s: float = 0.1, message: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"{message} not reached within {timeout_s:g} s")


def stored_states(settings: WorkerSettings, partitions: Iterable[int]) -> dict[str, UserState]:
    """Every user state in the worker's RocksDB files (the worker must be stopped)."""
    stores = StateStores(settings.state_dir, settings.group, settings.input_topic)
    try:
        out: dict[str, UserState] = {}
        for p in partitions:
            store = stores.open(p)
            out.update(store.get_many(store.user_ids()))
        return out
    finally:
        stores.close_all()


def offline(registry: Path, events_in_order: list[Event], *, k: int = 25,
            filters: Filters = Filters()) -> tuple[list[list[tuple[str, float]]], dict[str, UserState]]:
    """The offline inference API over the same events, in one call."""
    rec = Recommender.load(latest_version_dir(registry), "cpu")
    out = rec.recommend({}, [StepInput(e.user_id, e.item_id, e.event_type, e.timestamp_ms, e.session_id)
                             for e in events_in_order], k=k, filters=filters)
    return out.items, out.states


def commit_offsets(settings: WorkerSettings, offsets: dict[int, int]) -> None:
    """Set the group's committed input offsets (the worker must be stopped), e.g. to force a replay."""
    c = Consumer(consumer_config(settings.bootstrap_servers, settings.group, settings.consumer_kafka))
    try:
        c.commit(offsets=[TopicPartition(settings.input_topic, p, o) for p, o in offsets.items()],
                 asynchronous=False)
    finally:
        c.close()


def same_state(a: UserState, b: UserState, atol: float = 1e-5) -> bool:
    return (a.n_events == b.n_events and a.session_id == b.session_id and a.last_event_ms == b.last_event_ms
            and a.session_length == b.session_length
            and [(h.item_id, h.ts_ms, h.event_type, h.new_session) for h in a.history]
            == [(h.item_id, h.ts_ms, h.event_type, h.new_session) for h in b.history]
            and np.allclose(a.session_hidden, b.session_hidden, atol=atol)
            and np.allclose(a.user_hidden, b.user_hidden, atol=atol))


def http_get(port: int, path: str) -> tuple[int, str, bytes]:
    """(status, content type, body) of GET http://127.0.0.1:port/path; an error status is an answer too."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read()


def health_of(port: int) -> tuple[int, dict]:
    """(status, JSON body) of a /health endpoint."""
    status, _, body = http_get(port, "/health")
    return status, json.loads(body)
