"""The retraining service's schedule, its training child's lifetime and the settings it refuses at start."""
from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from model.artifact import save_version
from model.config import DataConfig, HRNNConfig
from model.errors import ConfigError
from model.network import HRNN
from stream.retrain_job import RetrainOutcome, RetrainSpec

REPO = Path(__file__).resolve().parents[1]
HOUR = 3600.0


def _offline_service(tmp_path: Path, monkeypatch, **settings):
    """A RetrainerService with no broker behind it, its schedule driven directly and its runs counted, not run."""
    import stream.retrainer as retrainer

    monkeypatch.setattr(retrainer.RetrainerService, "_admin", None)
    svc = retrainer.RetrainerService(retrainer.RetrainerSettings(
        bootstrap_servers="127.0.0.1:9", registry=str(tmp_path / "registry"), archive=str(tmp_path / "archive"),
        **settings))
    svc.ran = []

    async def counted() -> RetrainOutcome:
        svc.ran.append(time.time())
        return RetrainOutcome("skipped", "counted")

    svc.retrain_now = counted
    return svc


def _look(svc) -> bool:
    """One look of the interval schedule on the leader; whether it ran."""
    return asyncio.run(svc.retrain_if_due()) is not None


def _recorded(tmp_path: Path) -> float:
    return json.loads((tmp_path / "registry" / ".last-run").read_text())["started_at"]


def _record(tmp_path: Path, started_at: float) -> None:
    from stream.retrainer import record_run_start

    record_run_start(tmp_path / "registry", started_at)


# --- the interval schedule: one run per interval across the group, kept across failover and restarts ---

def test_the_interval_schedule_runs_at_its_first_look_when_the_registry_records_no_run(tmp_path, monkeypatch):
    svc = _offline_service(tmp_path, monkeypatch, interval_s=HOUR)
    before = time.time()
    assert _look(svc) and len(svc.ran) == 1
    assert before <= _recorded(tmp_path) <= svc.ran[0]  # recorded before the run starts
    assert not _look(svc), "ran again within the interval"


def test_an_instance_taking_the_schedule_over_counts_the_interval_from_the_last_run_of_any_instance(tmp_path,
                                                                                                   monkeypatch):
    a = _offline_service(tmp_path, monkeypatch, interval_s=HOUR)
    b = _offline_service(tmp_path, monkeypatch, interval_s=HOUR)
    assert _look(a)  # the leader runs, then goes away
    assert not _look(b), "the new leader ran again right after the old leader's run"
    _record(tmp_path, _recorded(tmp_path) - HOUR)  # an hour later
    assert _look(b) and len(b.ran) == 1
    assert not _look(b)


@pytest.mark.parametrize("ago_s, runs", [(HOUR + 1, True), (HOUR / 2, False)])
def test_a_restarted_service_runs_when_the_interval_since_the_recorded_run_has_passed(tmp_path, monkeypatch,
                                                                                      ago_s, runs):
    """Not a full interval after its own start: restarted more often than the interval, it would never run."""
    _record(tmp_path, time.time() - ago_s)
    assert _look(_offline_service(tmp_path, monkeypatch, interval_s=HOUR)) is runs


@pytest.mark.parametrize("record, runs", [
    ("not json", True),
    ('{"started_at": NaN}', True),
    ("ahead by two intervals", True),  # a clock stepped back: not waited out
    ("ahead by a minute", False),  # another host's clock a little ahead: no second run
])
def test_a_broken_or_future_record_does_not_stop_the_schedule(tmp_path, monkeypatch, record, runs):
    reg = tmp_path / "registry"
    reg.mkdir()
    ahead = {"ahead by two intervals": 2 * HOUR, "ahead by a minute": 60.0}
    if record in ahead:
        _record(tmp_path, time.time() + ahead[record])
    else:
        (reg / ".last-run").write_text(record)
    assert _look(_offline_service(tmp_path, monkeypatch, interval_s=HOUR)) is runs


def test_the_schedule_keeps_to_its_own_last_run_when_the_registry_cannot_record_it(tmp_path, monkeypatch, caplog):
    import stream.retrainer as retrainer

    def refuse(registry, started_at):
        raise OSError("read-only file system")

    monkeypatch.setattr(retrainer, "record_run_start", refuse)
    svc = _offline_service(tmp_path, monkeypatch, interval_s=HOUR)
    assert _look(svc) and not _look(svc)
    assert "cannot record the run's start" in caplog.text


# --- the training child dies with the service ---

def _fake_job(tmp_path: Path, body: str) -> Path:
    """A folder whose stream.retrain_job is `body`: a child started there runs it instead of a training."""
    pkg = tmp_path / "fake" / "stream"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "retrain_job.py").write_text(body)
    return pkg.parent


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie is dead, only not yet reaped (PID 1 of a container may never)


def _read_line(proc: subprocess.Popen, timeout_s: float) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    assert ready, f"no line within {timeout_s:g} s"
    return proc.stdout.readline()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_training_child_dies_with_the_service_when_the_service_is_killed(tmp_path):
    """SIGKILL or an OOM kill of the service: an orphan would hold the registry lock, then publish unannounced."""
    fake = _fake_job(tmp_path, "import os, time\nprint(os.getpid(), flush=True)\ntime.sleep(600)\n")
    service = ("import asyncio, os, sys\n"
               "from stream.retrainer import run_job\n"
               "from stream.retrain_job import RetrainSpec\n"
               "os.chdir(sys.argv[1])  # the child finds the fake stream.retrain_job first\n"
               "asyncio.run(run_job(RetrainSpec(registry='r', archive='a'), 600))\n")
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # the killed service cannot remove its run's temporary folder
    proc = subprocess.Popen([sys.executable, "-c", service, str(fake)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env=env)
    child = 0
    try:
        child = int(_read_line(proc, 60))
        assert _alive(child)
        proc.kill()
        proc.wait(10)
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child), "the training child outlived the killed service"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if child and _alive(child):
            os.kill(child, signal.SIGKILL)
        proc.stdout.close()


def test_a_child_whose_service_is_gone_before_it_is_tied_to_it_exits_at_once(tmp_path):
    from stream.retrainer import _CHILD_MAIN

    fake = _fake_job(tmp_path, "raise SystemExit('the job ran')\n")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    res = subprocess.run([sys.executable, "-c", _CHILD_MAIN, gone.stdout.strip(), "spec", "out"], cwd=fake,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "exited before its run started" in res.stderr and "the job ran" not in res.stderr


@pytest.mark.parametrize("ctypes_stub", ["raise ImportError('no ctypes here')\n",
                                         "class CDLL:\n    def __init__(self, *a, **k): pass\n"])  # no prctl
def test_a_run_goes_on_where_the_child_cannot_be_tied_to_the_service(tmp_path, monkeypatch, ctypes_stub):
    """Not Linux (no prctl), or no ctypes: the child runs untied, as before."""
    from stream.retrainer import run_job

    fake = _fake_job(tmp_path, "import json, sys\n"
                               "json.dump({'status': 'skipped', 'reason': 'fake job ran'}, open(sys.argv[2], 'w'))\n")
    (fake / "ctypes.py").write_text(ctypes_stub)
    monkeypatch.chdir(fake)
    out = asyncio.run(run_job(RetrainSpec(registry="r", archive="a"), 60))
    assert (out.status, out.reason) == ("skipped", "fake job ran")


# --- bad settings refused at start, before any run ---

def _settings(tmp_path: Path, **kw):
    from stream.retrainer import RetrainerSettings

    return RetrainerSettings(bootstrap_servers="127.0.0.1:9", registry=str(tmp_path / "registry"),
                             archive=str(tmp_path / "archive"), **kw)


@pytest.mark.parametrize("setting, named", [
    ({"metric": "mrr@5"}, "--metric 'mrr@5' is not one the comparison computes"),
    ({"job_timeout_s": 0.0}, "--job-timeout-s must be above 0"),
    ({"job_timeout_s": float("nan")}, "--job-timeout-s must be above 0"),
    ({"min_events": -1}, "--min-events must be at least 0"),
    ({"hrnn": {"hidden_dimension": "abc"}}, "setting hidden_dimension: cannot read 'abc' as int"),
    ({"hrnn": {"epochs": "0"}}, "epochs = 0 is outside its range"),
    ({"data": {"session_timeout_s": "0"}}, "session_timeout_s = 0.0 is outside its range"),
])
def test_the_service_refuses_a_metric_hyperparameter_or_timeout_no_run_could_use(tmp_path, setting, named):
    with pytest.raises(ConfigError, match="^(hyperparameter flags \\(or --config\\): )?" + named.replace("(", "\\(")):
        _settings(tmp_path, **setting).validate()


def test_every_metric_the_comparison_computes_is_accepted(tmp_path):
    from stream.retrainer import GATE_METRICS

    assert {"mrr@20", "recall@10", "ndcg@20", "first/recall@20"} <= GATE_METRICS
    for metric in GATE_METRICS:
        _settings(tmp_path, metric=metric).validate()


def test_hyperparameter_overrides_are_checked_over_the_serving_versions_settings_as_a_run_reads_them(tmp_path):
    """Tying the embeddings needs embedding_dimension == hidden_dimension: true of the serving version's 64, not of
    the default 43. A run would train with it, so the start must not refuse it."""
    tied = {"tied_embeddings": "true", "embedding_dimension": "64"}
    with pytest.raises(ConfigError, match="tied_embeddings"):
        _settings(tmp_path, hrnn=tied).validate()  # no serving version: over the defaults
    config = HRNNConfig(hidden_dimension=64)
    save_version(tmp_path / "registry", HRNN(3, config), config, DataConfig(), ["a", "b", "c"], ["click"])
    _settings(tmp_path, hrnn=tied).validate()


@pytest.mark.parametrize("flag, value, named", [
    ("--metric", "mrr@5", "--metric 'mrr@5'"),
    ("--job-timeout-s", "0", "--job-timeout-s"),
    ("--min-events", "-1", "--min-events"),
    ("--hidden-dimension", "abc", "hidden_dimension"),
    ("--hidden-dimension", "-5", "hidden_dimension = -5 is outside its range"),
])
def test_once_refuses_a_bad_metric_hyperparameter_or_timeout_before_any_work(tmp_path, monkeypatch, capsys,
                                                                          flag, value, named):
    import stream.observability
    from stream.cli import main as hrnn

    monkeypatch.setattr(stream.observability, "setup_json_logging", lambda level: None)
    (tmp_path / "archive").mkdir()
    rc = hrnn(["retrainer", "--once", "--registry", str(tmp_path / "registry"), "--archive", str(tmp_path / "archive"),
               "--min-events", "0", flag, value])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("hrnn retrainer: error: ") and named in err and "Traceback" not in err
    assert not (tmp_path / "registry").exists()  # no run: not even its lock was taken


def test_the_service_exits_2_with_one_line_naming_the_servers_when_the_broker_cannot_be_reached(tmp_path):
    """Faust would give up after 15 s too, exit 1, with a traceback and a warning that the topic was not created."""
    res = subprocess.run([str(Path(sys.executable).with_name("hrnn")), "retrainer", "--bootstrap-servers",
                          "127.0.0.1:1", "--registry", str(tmp_path / "registry"), "--archive",
                          str(tmp_path / "archive")], cwd=REPO, capture_output=True, text=True, timeout=120)
    lines = res.stderr.splitlines()
    assert res.returncode == 2, res.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("hrnn retrainer: error: cannot list topics on 127.0.0.1:1 "), lines
    assert "--bootstrap-servers" in lines[0] and "Traceback" not in res.stdout + res.stderr
