"""Shared fixtures. Real services (the broker) start once per session."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
REDDIT = SHARED_DATA / "reddit-jodie" / "reddit.tsv"


@pytest.fixture(scope="session")
def reddit_path() -> Path:
    if not REDDIT.exists():
        pytest.skip(f"real data not found at {REDDIT} (CI has ../shared/data)")
    return REDDIT


@pytest.fixture(scope="session")
def broker():
    """A real Kafka-compatible broker (Tansu) on a free loopback port, for the whole test session."""
    from stream.broker import LocalBroker

    b = LocalBroker().start()
    yield b
    b.stop()
