"""`hrnn broker` runs the local broker in the foreground and stops cleanly on a signal."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from stream import cli_broker
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


def test_a_log_file_that_cannot_be_opened_is_refused_with_exit_2_and_the_reason(tmp_path):
    proc = subprocess.run([HRNN, "broker", "--log", str(tmp_path / "no-such-dir" / "b.log")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "cannot open the broker log" in proc.stderr and "No such file or directory" in proc.stderr
    assert "Traceback" not in proc.stderr


def _documented_script() -> str:
    """The shell lines the module docstring gives for reading the address, with a check in place of `...`."""
    lines = [ln.strip() for ln in cli_broker.__doc__.splitlines() if ln.startswith("    ")]
    return "\n".join(ln.replace("   ...   ", '\necho "$BOOT"\n') for ln in lines)


@pytest.mark.broker
def test_the_documented_script_usage_reads_the_address_and_goes_on_while_the_broker_runs(tmp_path):
    env = {**os.environ, "PATH": f"{Path(HRNN).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.Popen(["bash", "-ec", _documented_script()], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:  # as `BOOT=$(hrnn broker | head -1)` did: it waits for the broker to end
        os.killpg(proc.pid, signal.SIGTERM)  # the script's brokers too, not just bash
        proc.communicate()
        pytest.fail("the documented usage did not return while the broker runs")
    assert proc.returncode == 0, err
    assert out.strip().startswith("127.0.0.1:")


def test_waiting_for_a_starting_broker_asks_no_kafka_client_before_its_port_listens(capfd):
    """A client asked too early logs each refused connect ("Connection refused" lines in `make demo`'s output);
    the wait first sees the port accept. Here the port listens after 1.5 s and never speaks Kafka."""
    import threading
    import time

    from stream.broker import BrokerError, LocalBroker, free_port

    broker = LocalBroker(port=free_port())
    broker.process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    listener = socket.socket()

    def listen_later() -> None:
        time.sleep(1.5)
        listener.bind(("127.0.0.1", broker.port))
        listener.listen()

    threading.Thread(target=listen_later, daemon=True).start()
    try:
        with pytest.raises(BrokerError, match="did not answer"):
            broker._wait_ready(3.0)
    finally:
        broker.process.kill()
        listener.close()
    assert "Connection refused" not in capfd.readouterr().err


def test_a_program_that_exits_on_sigterm_stops_its_local_broker_with_it(tmp_path):
    """`hrnn demo` and the benches start a LocalBroker in its own session: SIGTERM must unwind the `with`."""
    script = ("import sys, time\n"
              "from stream.broker import LocalBroker\n"
              "from stream.cli_common import exit_on_sigterm\n"
              "exit_on_sigterm()\n"
              "with LocalBroker() as b:\n"
              "    print(b.process.pid, flush=True)\n"
              "    time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    broker_pid = int(proc.stdout.readline())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    try:
        os.kill(broker_pid, 0)
    except ProcessLookupError:
        return
    os.kill(broker_pid, signal.SIGKILL)  # do not leave it behind for the next test
    pytest.fail(f"the broker {broker_pid} outlived the program that started it")


def _gone(pid: int, within_s: float) -> bool:
    import time

    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.broker
def test_a_broker_command_killed_with_sigkill_takes_its_broker_process_with_it():
    """No `finally` runs on SIGKILL (a CI job's hard limit, the OOM killer): the broker must not hold its port on."""
    proc = subprocess.Popen([HRNN, "broker"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    bootstrap = proc.stdout.readline().strip()
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert bootstrap.startswith("127.0.0.1:") and len(children) == 1, (bootstrap, children)
    proc.kill()
    proc.wait(timeout=10)
    if not _gone(int(children[0]), within_s=15):
        os.kill(int(children[0]), signal.SIGKILL)  # do not leave it behind for the next test
        pytest.fail(f"the broker {children[0]} outlived `hrnn broker`, killed with SIGKILL")
    assert _refuses_connections(bootstrap)
