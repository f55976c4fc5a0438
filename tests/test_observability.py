"""Worker metrics, the /metrics + /health endpoint, and JSON-lines logging."""
from __future__ import annotations

import io
import json
import logging
import subprocess
import sys

import pytest

from model.errors import ConfigError
from stream.observability import Health, WorkerMetrics, setup_json_logging, start_http_server
from worker_testkit import http_get


@pytest.fixture
def served():
    metrics, health = WorkerMetrics(), Health(details={"partitions": [0, 1]})
    server = start_http_server(metrics, 0, health, host="127.0.0.1")
    yield metrics, health, server
    server.shutdown()


def test_each_worker_metrics_has_its_own_registry_so_two_can_coexist():
    a, b = WorkerMetrics(), WorkerMetrics()
    a.events_in_total.inc(5)
    assert a.value("hrnn_events_in_total") == 5
    assert b.value("hrnn_events_in_total") == 0


def test_metrics_endpoint_serves_the_worker_counters_on_a_free_port(served):
    metrics, _, server = served
    metrics.events_in_total.inc(7)
    metrics.dlq_total.labels(reason="bad_json").inc(2)
    metrics.event_to_recommendation_seconds.observe(0.003)
    assert server.port > 0
    status, ctype, body = http_get(server.port, "/metrics")
    text = body.decode()
    assert status == 200 and ctype.startswith("text/plain")
    assert "hrnn_events_in_total 7.0" in text
    assert 'hrnn_dlq_total{reason="bad_json"} 2.0' in text
    assert 'hrnn_event_to_recommendation_seconds_bucket{le="0.005"} 1.0' in text
    assert 'hrnn_event_to_recommendation_seconds_bucket{le="0.001"} 0.0' in text
    for name in ("recommendations_out_total", "unknown_items_total", "repartitioned_total", "rebuilt_states_total",
                 "model_swaps_total", "batch_size_bucket", "step_seconds_bucket", "states_stored"):
        assert f"hrnn_{name}" in text, name


def test_the_states_stored_gauge_says_it_is_rocksdbs_estimate_not_a_count_of_users(served):
    """RocksDB's estimate-num-keys counts a state overwritten but not yet compacted again (7 users read 83)."""
    _, _, server = served
    text = http_get(server.port, "/metrics")[2].decode()
    help_line = next(line for line in text.splitlines() if line.startswith("# HELP hrnn_states_stored "))
    assert "RocksDB's estimate" in help_line and "approximate" in help_line


def test_health_is_200_json_while_alive_and_503_when_not(served):
    _, health, server = served
    status, ctype, body = http_get(server.port, "/health")
    assert (status, ctype) == (200, "application/json")
    assert json.loads(body) == {"status": "ok", "partitions": [0, 1]}
    health.update(alive=False, error="poll loop stalled")
    status, _, body = http_get(server.port, "/health")
    assert status == 503
    assert json.loads(body)["status"] != "ok" and json.loads(body)["error"] == "poll loop stalled"
    health.update(alive=True)
    assert http_get(server.port, "/health")[0] == 200


def test_health_turns_503_once_the_expected_heartbeat_is_older_than_its_threshold(served):
    _, health, server = served
    now = [100.0]
    health.clock = lambda: now[0]
    health.expect_beats(30.0)
    now[0] += 29.0
    status, _, body = http_get(server.port, "/health")
    assert status == 200 and json.loads(body)["heartbeat_age_s"] == 29.0
    now[0] += 2.0
    status, _, body = http_get(server.port, "/health")
    assert status == 503 and "stuck" in json.loads(body)["error"]
    health.beat()  # the loop went round again: alive, and the stale error is not left behind
    status, _, body = http_get(server.port, "/health")
    assert status == 200 and "error" not in json.loads(body)


def test_health_without_expected_heartbeats_never_goes_stale(served):
    _, health, server = served
    health.clock = lambda: 1e9  # e.g. the retrainer's endpoint: it has no loop that beats
    assert http_get(server.port, "/health")[0] == 200


def test_a_port_that_cannot_be_bound_is_a_config_error_naming_it(served):
    taken = served[2].port
    with pytest.raises(ConfigError, match=rf"127\.0\.0\.1:{taken}: Address already in use; pick another metrics port"):
        start_http_server(WorkerMetrics(), taken, Health(), host="127.0.0.1")


def test_serve_on_a_taken_metrics_port_exits_2_with_the_reason(served, tmp_path):
    taken = served[2].port
    proc = subprocess.run([sys.executable, "-m", "stream.cli", "serve", "--registry", str(tmp_path / "reg"),
                           "--state-dir", str(tmp_path / "state"), "--metrics-port", str(taken)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"hrnn serve: error: cannot serve /metrics and /health on 0.0.0.0:{taken}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_path_is_404(served):
    assert http_get(served[2].port, "/nope")[0] == 404


def test_model_version_info_reports_only_the_serving_version():
    m = WorkerMetrics()
    m.set_model_versions({"v1": 1.0})
    m.set_model_versions({"v2": 1.0})
    assert m.value("hrnn_model_version_info", {"version": "v2"}) == 1
    assert m.value("hrnn_model_version_info", {"version": "v1"}) is None


def test_model_version_info_reports_each_versions_share_while_a_canary_serves():
    m = WorkerMetrics()
    m.set_model_versions({"v1": 0.9, "v2": 0.1})
    assert m.value("hrnn_model_version_info", {"version": "v1"}) == 0.9
    assert m.value("hrnn_model_version_info", {"version": "v2"}) == 0.1
    m.set_model_versions({"v2": 1.0})  # promoted
    assert m.value("hrnn_model_version_info", {"version": "v2"}) == 1
    assert m.value("hrnn_model_version_info", {"version": "v1"}) is None


def test_lag_of_revoked_partitions_disappears():
    m = WorkerMetrics()
    m.set_lag(0, 12)
    m.set_lag(1, 3)
    m.forget_partitions([0, 7])
    assert m.value("hrnn_consumer_lag", {"partition": "0"}) is None
    assert m.value("hrnn_consumer_lag", {"partition": "1"}) == 3


def test_json_logging_writes_one_object_per_line_with_extra_fields():
    out = io.StringIO()
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    try:
        setup_json_logging("INFO", stream=out)
        log = logging.getLogger("hrnn.test")
        log.info("assigned %d partitions", 3, extra={"group": "g1"})
        log.debug("not shown")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["msg"] == "assigned 3 partitions" and first["group"] == "g1"
    assert first["level"] == "INFO" and first["logger"] == "hrnn.test" and first["ts"].endswith("+00:00")
    assert second["level"] == "ERROR" and "ValueError: boom" in second["exc"]
