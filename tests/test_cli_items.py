"""`hrnn items`: bad input is refused with exit 2 before any broker is asked."""
from __future__ import annotations

import pytest

from stream.cli import main as hrnn

NO_BROKER = ["--bootstrap-servers", "127.0.0.1:9"]


@pytest.mark.parametrize("argv, says", [
    (["unavailable", "caf\udce9"], "is not UTF-8 text"),  # a Latin-1 byte in the terminal's argument
    (["unavailable", "sku-1", "--timeout-s", "nan"], "--timeout-s"),
    (["list", "--timeout-s", "inf"], "--timeout-s"),
])
def test_bad_items_input_exits_2_with_the_reason(argv, says, capsys):
    assert hrnn(["items", *argv, *NO_BROKER]) == 2
    assert says in capsys.readouterr().err
