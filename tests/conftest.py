"""Shared fixtures. Real services (the broker) start once per session."""
from __future__ import annotations

from pathlib import Path

import pytest

from model.network import available_devices

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
REDDIT = SHARED_DATA / "reddit-jodie" / "reddit.tsv"


@pytest.fixture(params=available_devices())
def device(request) -> str:
    """Run a test once per device here, so the serving contracts are checked on a GPU wherever there is one."""
    return request.param


@pytest.fixture(scope="session")
def reddit_path() -> Path:
    if not REDDIT.exists():
        pytest.skip(f"real data not found at {REDDIT} (CI has ../shared/data)")
    return REDDIT


def pytest_terminal_summary(terminalreporter) -> None:
    # A clone without ../shared/data passes with the real-data cases skipped; say so where it is seen.
    if not REDDIT.exists():
        terminalreporter.write_line(f"real-data tests skipped: {REDDIT} not found (CI has ../shared/data)",
                                    yellow=True, bold=True)


@pytest.fixture(scope="session")
def broker():
    """A real Kafka-compatible broker (Tansu) on a free loopback port, for the whole test session."""
    from stream.broker import LocalBroker

    b = LocalBroker().start()
    yield b
    b.stop()
