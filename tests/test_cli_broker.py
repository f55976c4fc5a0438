"""`hrnn broker` runs the local broker in the foreground and stops cleanly on a signal."""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from stream.kafka_clients import admin_client
from stream.topics import partition_counts

HRNN = str(Path(sys.executable).with_name("hrnn"))


def _refuses_connections(bootstrap: str) -> bool:
    host, port = bootstrap.rsplit(":", 1)
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, int(port))) != 0


@pytest.mark.broker
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_broker_prints_its_address_serves_and_stops_on_signal(sig):
    proc = subprocess.Popen([HRNN, "broker"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        bootstrap = proc.stdout.readline().strip()  # printed (and flushed) once the broker answers
        assert bootstrap.startswith("127.0.0.1:"), proc.stderr.read() if proc.poll() is not None else bootstrap
        assert isinstance(partition_counts(admin_client(bootstrap), timeout_s=10), dict)
        proc.send_signal(sig)
        assert proc.wait(timeout=20) == 0
        assert "stopped" in proc.stderr.read()
        assert _refuses_connections(bootstrap)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
