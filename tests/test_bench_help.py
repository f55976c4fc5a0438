"""Every benchmark script explains itself: `--help` prints its usage and exits 0 (the README names their flags)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py")))
def test_the_benchmark_prints_its_usage(script):
    proc = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True,
                          timeout=120, cwd=BENCH.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage:")


@pytest.mark.parametrize("script, argv, says", [
    ("audit_scale.py", ["--partitions", "0"], "--partitions must be >= 1"),
    ("quality_scale.py", ["--users", "0", "--partitions", "0"], "--partitions >= 1"),
    ("serving_scale.py", ["--batches", ""], "argument --batches: counts must be integers >= 1"),
    ("serving_scale.py", ["--batches", "16,0"], "argument --batches: counts must be integers >= 1"),
    ("serving_scale.py", ["--items", "0"], "argument --items: counts must be integers >= 1"),
])
def test_a_benchmark_refuses_a_count_it_cannot_measure_with_a_usage_error(script, argv, says, tmp_path):
    # exit 2 before any broker starts or model is built: no traceback, and no row measuring nothing. A small
    # run's flags first (argv's win), so a script that takes the count runs briefly rather than for minutes.
    small = ["--devices", "cpu", "--items", "100", "--seconds", "0.1", "--png", str(tmp_path / "s.png")] \
        if script == "serving_scale.py" else []
    proc = subprocess.run([sys.executable, str(BENCH / script), *small, *argv], capture_output=True, text=True,
                          timeout=120, cwd=BENCH.parent)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr[-2000:]
    assert says in proc.stderr and "Traceback" not in proc.stderr
