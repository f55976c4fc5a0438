"""`hrnn items`: bad input is refused with exit 2 before any broker is asked, and a listing only reads."""
from __future__ import annotations

import uuid

import pytest

from stream.cli import main as hrnn

NO_BROKER = ["--bootstrap-servers", "127.0.0.1:9"]


@pytest.mark.parametrize("argv, says", [
    (["unavailable", "caf\udce9"], "is not UTF-8 text"),  # a Latin-1 byte in the terminal's argument
    (["unavailable", "sku-1", "--timeout-s", "nan"], "--timeout-s"),
    (["list", "--timeout-s", "inf"], "--timeout-s"),
    (["unavailable", "--from-file", "/tmp/" + "A" * 300], "cannot be read (File name too long)"),
])
def test_bad_items_input_exits_2_with_the_reason(argv, says, capsys):
    assert hrnn(["items", *argv, *NO_BROKER]) == 2
    assert says in capsys.readouterr().err


@pytest.mark.broker
def test_listing_a_topic_that_does_not_exist_exits_2_saying_so_and_does_not_create_it(broker, capsys):
    from stream.compacted import ensure_table_topic
    from stream.kafka_clients import admin_client
    from stream.topics import partition_counts

    topic = f"avail-typo-{uuid.uuid4().hex[:8]}"
    assert hrnn(["items", "list", "--bootstrap-servers", broker.bootstrap, "--topic", topic]) == 2
    assert f"topic {topic!r} does not exist" in capsys.readouterr().err
    assert topic not in partition_counts(admin_client(broker.bootstrap))
    ensure_table_topic(broker.bootstrap, topic)  # once there, empty: nothing is off sale
    assert hrnn(["items", "list", "--bootstrap-servers", broker.bootstrap, "--topic", topic]) == 0
    assert "0 item(s) off sale" in capsys.readouterr().err
