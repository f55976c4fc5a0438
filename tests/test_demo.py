"""`hrnn demo`, the README's main job, end to end at a small size: its own local broker, RocksDB state,
a trained version, live events with malformed ones among them, a retrain announced and swapped in."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest


def test_the_demo_recommends_every_valid_event_dead_letters_the_bad_and_swaps_in_the_retrained_version(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "stream.cli", "demo", "--out", str(out), "--users", "300",
                           "--items", "120", "--epochs", "2", "--rate", "400"],
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["recommendations_out"] == summary["valid_events"] > 500
    assert summary["dlq"] == 3 and summary["events_in"] == summary["valid_events"] + 3
    assert len(summary["model_versions_seen"]) == 2  # the first version, then the retrained one
    assert summary["new_item_first_recommended_after_s"] is not None  # the retrain learned the new item
    off_sale = summary["off_sale"]  # the most popular item, taken off sale mid-replay
    assert off_sale["recommended_before"] > 0 and off_sale["events_after"] > 100
    assert off_sale["recommended_after"] == 0
    assert 0 < summary["p50_latency_ms"] <= summary["p99_latency_ms"]
    # `hrnn audit` over the stopped worker: every input record committed, each answered exactly once
    assert summary["audit"] == {"kept": True, "records": summary["events_in"], "unanswered": 0, "duplicated": 0}
    # `hrnn quality`: both versions' lists judged by their users' next events, beside the reference
    online = summary["online_recall@20"]
    assert set(online) == {*summary["model_versions_seen"], "recent items (reference)"}
    assert all(0 < r <= 1 for r in online.values())
    assert all((out / name).stat().st_size > 0 for name in ("evaluation.png", "latency.png", "evaluation.json",
                                                            "online_quality.png"))
    assert re.search(r"the worker scores on (cpu|cuda)", proc.stdout)


@pytest.mark.parametrize("flag, value, allowed", [
    ("--live-share", "1.5", "0.01 to 0.9"), ("--live-share", "0", "0.01 to 0.9"), ("--rate", "0", "> 0"),
    ("--rate", "nan", "> 0"), ("--users", "3", "10 to 4,000,000"),
    ("--items", "5", "20 (one per synthetic category) to"),
    ("--epochs", "0", "1 to 1000"), ("--seed", "-1", ">= 0"),
])
def test_an_out_of_range_flag_exits_2_naming_it_before_any_work(tmp_path, flag, value, allowed):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "stream.cli", "demo", "--out", str(out), flag, value],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"hrnn demo: error: {flag} " in proc.stderr and allowed in proc.stderr
    assert not out.exists()  # nothing generated, trained or started


@pytest.mark.parametrize("under", ["", "demo"])
def test_an_out_that_is_a_file_or_under_one_exits_2_naming_it_before_any_work(tmp_path, under):
    a_file = tmp_path / "a-file"
    a_file.write_text("kept\n")
    out = a_file / under if under else a_file
    proc = subprocess.run([sys.executable, "-m", "stream.cli", "demo", "--out", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"hrnn demo: error: --out {out} must be a directory, but it is a file" in proc.stderr
    assert "Traceback" not in proc.stderr and a_file.read_text() == "kept\n"


def test_an_out_that_cannot_be_created_exits_2_naming_it_without_a_traceback():
    out = "/proc/hrnn-demo-out"  # no one may create a directory there, root included
    proc = subprocess.run([sys.executable, "-m", "stream.cli", "demo", "--out", out],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"hrnn demo: error: --out {out}: cannot create it" in proc.stderr and "Traceback" not in proc.stderr


def test_a_failed_retrain_ends_the_replays_wait_for_the_swap_at_once():
    import threading
    import time

    from stream.cli_demo import LiveRun, _wait_for_swap

    run = LiveRun()
    threading.Timer(0.2, lambda: setattr(run, "retrain_error", "the retraining exited with code 2")).start()
    started = time.monotonic()
    _wait_for_swap(run, timeout_s=10)
    assert time.monotonic() - started < 5 and run.swap_at is None


def test_the_retraining_child_ends_with_the_demo_however_it_stops():
    from stream.cli_demo import LiveRun, _ending_retrain

    run = LiveRun()
    with pytest.raises(SystemExit), _ending_retrain(run):  # as SIGTERM unwinds the demo (exit_on_sigterm)
        run.retrain_proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        raise SystemExit(143)
    assert run.retrain_proc.wait(timeout=15) != 0  # terminated, not left training


def test_no_retraining_child_starts_once_the_demo_is_ending():
    from stream.cli_demo import LiveRun, _ending_retrain, _start_retrain

    run = LiveRun()
    with _ending_retrain(run):
        pass  # the demo ended while the retrain thread was still writing its archive
    assert _start_retrain(run, [sys.executable, "-c", "import time; time.sleep(120)"]) is None
    assert run.retrain_proc is None
