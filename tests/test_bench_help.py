"""Every benchmark script explains itself: `--help` prints its usage and exits 0 (the README names their flags);
it refuses a count it cannot measure before starting anything, and a SIGTERM stops what it started."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py")))
def test_the_benchmark_prints_its_usage(script):
    proc = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True,
                          timeout=120, cwd=BENCH.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage:")


# Small runs' flags, so that a script that took the bad count anyway ends soon rather than in minutes; a data
# file that is not there, as the refusal comes before the data are read.
NO_DATA = "{tmp}/no-such-log.tsv"
PEEKING_SMALL = ["--data", NO_DATA, "--users", "100", "--png", "{tmp}/p.png"]
TRAIN_SMALL = ["--users", "100", "--items", "100", "--no-warmup", "--out-dir", "{tmp}"]
CANARY_SMALL = ["--events", "200", "--users", "50", "--items", "200", "--hidden", "32", "--batch-size", "50"]
WORKERS_SMALL = ["--workers", "1", "--partitions", "1", "--events", "200", "--items", "200", "--hidden", "32",
                 "--png", "{tmp}/w.png"]
# A flag the swap benches took anyway ran a broker for minutes: beside it a negative seed, which crashed them at
# once (numpy's ValueError), so a bench that lets the flag through fails quickly, not by the timeout.
SWAP_FAST = ["--seed", "-1", "--out-dir", "{tmp}/out"]
STREAM_SMALL = ["--events", "200", "--items", "200", "--hidden", "32", "--latency-seconds", "1",
                "--baseline-events", "10"]


@pytest.mark.parametrize("script, argv, says", [
    ("audit_scale.py", ["--partitions", "0"], "--partitions must be >= 1"),
    ("quality_scale.py", ["--users", "0", "--partitions", "0"], "--partitions >= 1"),
    ("serving_scale.py", ["--batches", ""], "argument --batches: counts must be integers >= 1"),
    ("serving_scale.py", ["--batches", "16,0"], "argument --batches: counts must be integers >= 1"),
    ("serving_scale.py", ["--items", "0"], "argument --items: counts must be integers >= 1"),
    ("serving_scale.py", ["--threads", "-1"], "--threads must be >= 0"),
    ("train_throughput.py", [*TRAIN_SMALL, "--only", "hrnn-init-h128"], "--only: unknown config hrnn-init-h128"),
    ("train_throughput.py", [*TRAIN_SMALL, "--repeats", "0"], "--repeats must be >= 1"),
    ("train_throughput.py", [*TRAIN_SMALL, "--threads", "-1"], "--threads must be >= 0"),
    ("quality_reddit.py", ["--data", NO_DATA, "--quiet", "--out-dir", "{tmp}", "--models", "plian"],
     "--models: unknown network plian"),
    ("quality_reddit.py", ["--data", NO_DATA, "--quiet", "--out-dir", "{tmp}", "--repeat-set", "hiden_dimension=82"],
     "--repeat-set: unknown setting 'hiden_dimension' (did you mean 'hidden_dimension'?)"),
    ("quality_reddit.py", ["--data", NO_DATA, "--quiet", "--out-dir", "{tmp}", "--plain-set", "histroy_length=63"],
     "--plain-set: unknown setting 'histroy_length' (did you mean 'history_length'?)"),
    ("quality_reddit.py", ["--data", NO_DATA, "--quiet", "--out-dir", "{tmp}", "--repeat-set", "epochs12"],
     "argument --repeat-set: expected key=value, got 'epochs12'"),
    ("quality_reddit.py", ["--data", NO_DATA, "--quiet", "--out-dir", "{tmp}", "--repeat-set", "epochs=0"],
     "epochs = 0 is outside its range"),
    ("quality_reddit.py", ["--data", NO_DATA, "--quiet", "--out-dir", "{tmp}", "--plain-set", "session_timeout_s=60"],
     "the networks must split the log alike, but session_timeout_s is 1800.0 for hrnn-repeat and 60.0 for hrnn-init"),
    ("canary.py", [*CANARY_SMALL, "--repeats", "0"], "--repeats must be >= 1"),
    ("canary.py", [*CANARY_SMALL, "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    ("canary.py", [*CANARY_SMALL, "--events", "0"], "--events must be >= 1, got 0"),
    ("canary.py", [*CANARY_SMALL, "--users", "0"], "--users must be >= 1, got 0"),
    ("canary.py", [*CANARY_SMALL, "--items", "0"], "--items must be >= 1, got 0"),
    ("canary.py", [*CANARY_SMALL, "--shares", "0.1,1.5"], "strictly between 0 and 1, got 1.5"),
    ("canary.py", [*CANARY_SMALL, "--hidden", "16"], "--hidden: hidden_dimension = 16 is outside its range"),
    ("canary_peeking.py", [*PEEKING_SMALL, "--looks", "2", "--experiments", "0"],
     "--experiments and --looks must be >= 1"),
    ("canary_peeking.py", [*PEEKING_SMALL, "--experiments", "2", "--looks", "0"],
     "--experiments and --looks must be >= 1"),
    ("canary_peeking.py", [*PEEKING_SMALL, "--early-looks", "-1"], "--early-looks must be >= 0, got -1"),
    ("online_reddit.py", ["--data", NO_DATA, "--train-share", "1.5"],
     "--train-share must lie strictly between 0 and 1"),
    ("online_reddit.py", ["--data", NO_DATA, "--canary-share", "1"],
     "--canary-share must lie strictly between 0 and 1"),
    ("online_reddit.py", ["--data", NO_DATA, "--canary-set", "sed=7"],  # README's A/A test, mistyped
     "--canary-set: unknown setting 'sed' (did you mean 'seed'?)"),
    ("online_reddit.py", ["--data", NO_DATA, "--set", "hiden_dimension=64"],
     "--set: unknown setting 'hiden_dimension' (did you mean 'hidden_dimension'?)"),
    ("online_reddit.py", ["--data", NO_DATA, "--canary-set", "seed"], "argument --canary-set: expected key=value, "
     "got 'seed'"),
    ("online_reddit.py", ["--data", NO_DATA, "--set", "seed=7,,epochs"], "argument --set: expected key=value, "
     "got 'epochs'"),
    ("repeat_explore.py", ["--data", NO_DATA, "--png", "{tmp}/x.txt"], "matplotlib cannot write '.txt' files"),
    ("worker_scaling.py", [*WORKERS_SMALL, "--events", "0"], "--events must be >= 1"),
    ("worker_scaling.py", [*WORKERS_SMALL, "--hidden", "16"],
     "--hidden: hidden_dimension = 16 is outside its range"),
    ("stream_throughput.py", [*STREAM_SMALL, "--events", "0"], "--events and --baseline-events must be >= 1"),
    ("stream_throughput.py", [*STREAM_SMALL, "--baseline-events", "0"],
     "--events and --baseline-events must be >= 1"),
    ("stream_throughput.py", [*STREAM_SMALL, "--hidden", "16"],
     "--hidden: hidden_dimension = 16 is outside its range"),
    ("stream_throughput.py", [*STREAM_SMALL, "--users", "0"], "--users must be >= 1, got 0"),
    ("stream_throughput.py", [*STREAM_SMALL, "--items", "0"], "--items must be >= 1, got 0"),
    ("stream_throughput.py", [*STREAM_SMALL, "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    ("stream_throughput.py", [*STREAM_SMALL, "--partitions", "0"], "--partitions must be >= 1, got 0"),
    ("canary_peeking.py", [*PEEKING_SMALL, "--data", "/proc/x/y"], "--data /proc/x/y: no such file"),
    ("swap.py", ["--out-dir", "{tmp}/out", "--seed", "-1"], "--seed must be >= 0, got -1"),
    ("swap.py", ["--out-dir", "/proc/x/y"], "--out-dir /proc/x/y: cannot create it"),
    ("swap.py", [*SWAP_FAST, "--rate", "-5"], "--rate must be a number >= 0, got -5"),
    ("swap.py", [*SWAP_FAST, "--max-rate", "nan"], "--max-rate must be a number > 0, got nan"),
    ("swap.py", [*SWAP_FAST, "--base-s", "0"], "--base-s must be a number > 0, got 0"),
    ("swap.py", [*SWAP_FAST, "--seconds", "-1"], "--seconds must be a number > 0, got -1"),
    ("swap.py", [*SWAP_FAST, "--settle-s", "-1"], "--settle-s must be a number >= 0, got -1"),
    ("swap.py", [*SWAP_FAST, "--users", "0"], "--users must be >= 1, got 0"),
    ("swap.py", [*SWAP_FAST, "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    ("canary_swap.py", ["--out-dir", "{tmp}/out", "--seed", "-1"], "--seed must be >= 0, got -1"),
    ("canary_swap.py", ["--out-dir", "/proc/x/y"], "--out-dir /proc/x/y: cannot create it"),
    ("canary_swap.py", [*SWAP_FAST, "--rate", "-5"], "--rate must be a number >= 0, got -5"),
    ("canary_swap.py", [*SWAP_FAST, "--canary-s", "0"], "--canary-s must be a number > 0, got 0"),
    ("canary_swap.py", [*SWAP_FAST, "--users", "0"], "--users must be >= 1, got 0"),
])
def test_a_benchmark_refuses_a_count_it_cannot_measure_with_a_usage_error(script, argv, says, tmp_path):
    # exit 2 before any broker starts or model is built: no traceback, and no row measuring nothing. A small
    # run's flags first (argv's win), so a script that takes the count runs briefly rather than for minutes.
    small = ["--devices", "cpu", "--items", "100", "--seconds", "0.1", "--png", str(tmp_path / "s.png")] \
        if script == "serving_scale.py" else []
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(BENCH / script), *small, *argv], capture_output=True, text=True,
                          timeout=120, cwd=BENCH.parent)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr[-2000:]
    assert says in proc.stderr and "Traceback" not in proc.stderr
    assert time.monotonic() - started < 30  # the imports alone: no broker, no data, no training


def test_quality_reddit_refuses_a_misspelt_setting_in_a_config_file_but_takes_a_tune_best_json(tmp_path):
    # its --repeat-config is held as `hrnn train --config` holds one: a typo would train the default and report
    # it as the config asked for; a best.json's `holdout` (the run's, not a setting) is no typo
    typo, best = tmp_path / "typo.json", tmp_path / "best.json"
    typo.write_text('{"hidden_dimensions": 64}')
    best.write_text('{"hidden_dimension": 64, "holdout": "last-session"}')

    def run(config: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(BENCH / "quality_reddit.py"), "--data", str(tmp_path / "none.tsv"),
                               "--quiet", "--out-dir", str(tmp_path), "--repeat-config", str(config)],
                              capture_output=True, text=True, timeout=120, cwd=BENCH.parent)

    proc = run(typo)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (f"config file {typo}: unknown setting 'hidden_dimensions' (did you mean 'hidden_dimension'?)"
            in proc.stderr), proc.stderr[-2000:]
    proc = run(best)  # past the config, to the log that is not there
    assert proc.returncode == 2 and "none.tsv" in proc.stderr and "unknown setting" not in proc.stderr, \
        proc.stderr[-2000:]


def test_repeat_explore_prints_its_figures_before_it_draws_the_chart_that_may_fail(tmp_path):
    # a chart that cannot be written (its folder is a file here) lost the whole scoring run's JSON
    from model.synth import generate

    d = generate(60, 40, seed=3, events_per_user=12)
    log = tmp_path / "log.tsv"
    seconds = (d.ts_ms - d.ts_ms.min()) // 1000  # reddit-jodie's: seconds from the log's start
    log.write_text("".join(f"{u}\t{i}\t{t}\n" for u, i, t in zip(d.user, d.item, seconds)))
    (tmp_path / "a-file").write_text("")
    proc = subprocess.run([sys.executable, str(BENCH / "repeat_explore.py"), "--data", str(log),
                           "--png", str(tmp_path / "a-file" / "chart.png")], capture_output=True, text=True,
                          timeout=300, cwd=BENCH.parent)
    assert proc.returncode != 0
    report = json.loads(proc.stdout)
    assert report["png"] == str(tmp_path / "a-file" / "chart.png") and "user-repeat+session" in report["models"]


# ---- what some benchmarks measure -------------------------------------------------------------------------

def _child_broker(parent: int) -> tuple[int, int] | None:
    """(pid, port) of a local broker (stream.broker.LocalBroker) that process `parent` started, if any."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmd = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
        if ppid == parent and b"--listener-url" in cmd:
            return int(stat.parent.name), int(cmd[cmd.index(b"--listener-url") + 1].rsplit(b":", 1)[1])
    return None


def _running(pid: int) -> bool:
    try:  # a zombie is gone too: only its exit status is left for its parent
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _accepting(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1.0)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_a_benchmark_stopped_with_sigterm_stops_its_broker_and_removes_its_temporary_folder(tmp_path):
    # `timeout`, a CI job's limit and `kill PID` send SIGTERM. The broker runs in its own session, so only the
    # bench's own clean-up (`with LocalBroker()`, TemporaryDirectory) stops it and removes the folder.
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    with open(tmp_path / "stderr", "w") as err:
        proc = subprocess.Popen([sys.executable, str(BENCH / "stream_throughput.py"), *STREAM_SMALL,
                                 "--events", "100000"], stdout=subprocess.DEVNULL, stderr=err, cwd=BENCH.parent,
                                env={**os.environ, "TMPDIR": str(tmp)})
    broker = None
    try:
        deadline = time.monotonic() + 60
        while (broker is None or not _accepting(broker[1])) and time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "stderr").read_text()[-2000:]
            broker = broker or _child_broker(proc.pid)
            time.sleep(0.1)
        assert broker is not None, "the bench started no broker within 60 s"
        time.sleep(1.0)  # the broker answers: LocalBroker.start has returned, the run is under way
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(timeout=120)
        assert not _running(broker[0]), "the broker outlived the bench"
        assert not _accepting(broker[1])
        assert list(tmp.iterdir()) == [], "the bench's temporary folder was left behind"
        assert status == 143, (tmp_path / "stderr").read_text()[-2000:]  # 128 + SIGTERM, as a shell reports it
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if broker is not None and _running(broker[0]):
            os.kill(broker[0], signal.SIGKILL)  # the broker this test's bench started, left running


def test_the_input_rate_a_benchmark_reports_leaves_out_the_producers_start_up(broker):
    # librdkafka holds every record until the (idempotent) producer has its producer id, up to ~0.5 s after
    # it starts: a rate timed from the start reported 2,000 records "written at 3,944/s".
    from bench.stream_throughput import produce_records
    from stream.kafka_clients import admin_client
    from stream.topics import TopicSpec, ensure_topics

    topic = f"rate-{uuid.uuid4().hex[:8]}"
    ensure_topics(admin_client(broker.bootstrap), [TopicSpec(topic, 8)])
    records = [(f"user-{i}".encode(), b"{}") for i in range(1000)]
    assert len(records) / produce_records(broker.bootstrap, topic, records) < 0.25  # seconds; ~0.01 s here


def test_audit_scale_leaves_exactly_missing_records_unanswered_even_where_a_stepped_walk_would_cycle():
    # --records 15838 --partitions 2 --missing 3: a walk of step 7919 over 7919 offsets met 2 pairs only, forever
    from bench.audit_scale import unanswered

    skip = unanswered(2, 7919, 3)
    assert len(skip) == 3 and all(0 <= p < 2 and 0 <= o < 7919 for p, o in skip)
    assert unanswered(2, 7919, 3) == skip  # the same records every run
    assert unanswered(1, 5, 5) == {(0, o) for o in range(5)}  # every record, where --missing takes them all
    assert len(unanswered(4, 50_000, 7)) == 7


def test_serving_scale_reports_the_processs_peak_resident_memory_with_each_row(tmp_path):
    # the README quotes a peak RSS for `--stored` runs: each row carries the process's peak so far
    proc = subprocess.run([sys.executable, str(BENCH / "serving_scale.py"), "--devices", "cpu", "--threads", "1",
                           "--items", "100", "--batches", "2,4", "--seconds", "0.05", "--stored",
                           "--png", str(tmp_path / "s.png")], capture_output=True, text=True, timeout=300,
                          cwd=BENCH.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    peaks = [row["peak_rss_mb"] for row in json.loads(proc.stdout)["rows"]]
    assert len(peaks) == 2 and peaks[0] > 10 and peaks == sorted(peaks)


def test_canary_peeking_gives_a_user_one_judged_list_per_event_but_the_last(tmp_path):
    # a list is judged by the user's next event: a user with n events in the judged part has n - 1 judged
    # lists, one with a single event none (README's online row: 20,581 judged lists, 6,317 awaiting one)
    from bench.canary_peeking import lists_per_user

    log = tmp_path / "log.tsv"
    rows = [(1, 0)] + [(2, t) for t in (1, 2)] + [(3, t) for t in range(3, 8)]
    log.write_text("".join(f"{user}\t7\t{t}\n" for user, t in rows))
    assert sorted(lists_per_user(log, live_share=1.0).tolist()) == [1, 4]


def test_a_sigterm_that_a_kafka_callback_turns_into_another_error_still_ends_the_command_with_its_status(
        monkeypatch):
    """SIGTERM's handler raises SystemExit wherever the main thread is: inside a confluent-kafka callback (a
    producer's log line while the broker starts) the library re-raised it as a SystemError, and the bench exited 1
    with a traceback instead of 143 (its clean-up still unwound)."""
    import model.errors
    from model.errors import exit_status
    from stream.cli_common import SIGTERM_STATUS, _exit_143

    monkeypatch.setattr(model.errors, "_stopping_status", None)
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # leave pytest's own SIGTERM handling alone

    def bench(told_to_stop: bool) -> int:
        try:
            if told_to_stop:
                _exit_143(signal.SIGTERM, None)
        except SystemExit:
            pass
        raise SystemError("_PyErr_SetObject: exception <class 'int'> is not a BaseException subclass")

    with pytest.raises(SystemError):  # an error of its own is not taken for a stop
        exit_status(lambda: bench(False), "bench")
    assert exit_status(lambda: bench(True), "bench") == SIGTERM_STATUS
