"""/health of a running worker: the loop's heartbeat tells a stuck worker from an idle one, and a stopped
worker is not alive. No broker: the worker's Kafka clients are fakes, time is a fake clock the fakes move."""
from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import pytest

from model.artifact import latest_version_dir
from model.inference import Recommender
from stream import worker
from stream.observability import Health, start_http_server
from stream.settings import WorkerSettings
from stream.worker import Worker, liveness_timeout_s
from worker_testkit import health_of, make_registry

STALE_AFTER_S = 1.0


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class IdleConsumer:
    """An input topic with nothing on it: each consume() answers nothing once its timeout passed on the
    clock. After `hang` is set, the next consume() does not return until `release`, as a call stuck in
    librdkafka (or anywhere in the loop) would not."""

    def __init__(self, clock: Clock) -> None:
        self.clock, self.calls = clock, 0
        self.hang, self.hung, self.release = threading.Event(), threading.Event(), threading.Event()

    def consume(self, num_messages=1, timeout=-1):
        self.calls += 1
        if self.hang.is_set():
            self.hung.set()
            self.release.wait(30)
            return []
        self.clock.now += max(timeout, 0.05)
        return []

    def position(self, tps):
        return []

    def close(self):
        pass


class QuietProducer:
    def flush(self, timeout=None):
        return 0


class NoChangelog:
    def close(self):
        pass


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    return make_registry(tmp_path_factory.mktemp("registry"))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def idle_worker(registry, tmp_path, clock, monkeypatch) -> Worker:
    monkeypatch.setattr(worker, "liveness_timeout_s", lambda settings: STALE_AFTER_S)
    s = WorkerSettings(registry=str(registry), state_dir=str(tmp_path / "state"), input_topic="ev",
                       output_topic="rec", group="g", device="cpu", follow_updates=False, follow_availability=False)
    w = Worker(s, recommender=Recommender.load(latest_version_dir(registry), "cpu"), health=Health(clock=clock))
    w._consumer, w._producer, w._restorer = IdleConsumer(clock), QuietProducer(), NoChangelog()
    return w


@contextlib.contextmanager
def looping(w: Worker) -> Iterator[None]:
    """w.run() on a thread; stopped (and a hung consume() released) on the way out."""
    consumer, stop = w._consumer, threading.Event()
    thread = threading.Thread(target=w.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield
    finally:
        consumer.release.set()
        stop.set()
        thread.join(30)
        assert not thread.is_alive(), "the worker loop did not stop"


def wait_for(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_an_idle_worker_whose_polls_return_nothing_stays_alive_far_past_the_threshold(idle_worker, clock):
    consumer = idle_worker._consumer
    with looping(idle_worker):
        samples = []
        while consumer.calls < 400:  # ~30 s of empty polls on the clock, 30x the threshold
            samples.append(idle_worker.health.report()[0])
            time.sleep(0.001)
        assert clock.now > 20 * STALE_AFTER_S
        assert all(samples)


def test_a_loop_that_stops_going_round_turns_health_503_for_the_liveness_probe(idle_worker, clock):
    consumer = idle_worker._consumer
    with looping(idle_worker), start_http_server(idle_worker.metrics, 0, idle_worker.health,
                                                 host="127.0.0.1") as server:
        wait_for(lambda: consumer.calls > 10)
        assert health_of(server.port)[0] == 200
        consumer.hang.set()
        wait_for(consumer.hung.is_set)
        clock.now += STALE_AFTER_S / 2
        assert health_of(server.port)[0] == 200  # a pause shorter than the threshold is no hang
        clock.now += STALE_AFTER_S
        status, body = health_of(server.port)
        assert status == 503 and body["status"] == "unavailable"
        assert "stuck" in body["error"] and body["heartbeat_age_s"] == pytest.approx(1.5 * STALE_AFTER_S, abs=0.2)


def test_a_cleanly_stopped_worker_is_not_alive(idle_worker):
    consumer = idle_worker._consumer
    with looping(idle_worker):
        wait_for(lambda: consumer.calls > 3)
    alive, details = idle_worker.health.report()
    assert not alive and details["state"] == "stopped"


def test_a_failed_worker_keeps_its_reason_after_closing(idle_worker):
    def broken(num_messages=1, timeout=-1):
        raise RuntimeError("librdkafka gave up")

    idle_worker._consumer.consume = broken
    with pytest.raises(RuntimeError):
        idle_worker.run(threading.Event())
    alive, details = idle_worker.health.report()
    assert not alive and details["state"] == "failed" and details["error"] == "librdkafka gave up"


def test_the_liveness_timeout_outlasts_a_restore_and_the_client_calls_around_it():
    default = WorkerSettings()
    assert liveness_timeout_s(default) >= default.restore_timeout_s + 4 * worker._CLIENT_TIMEOUT_S
    slower = WorkerSettings(restore_timeout_s=600.0, batch_timeout_s=5.0)
    assert liveness_timeout_s(slower) - liveness_timeout_s(default) == pytest.approx(480.0 + 5.0 - 0.01)
