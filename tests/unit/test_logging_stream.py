"""The JSON log handler writes to the current ``sys.stderr`` (service.app.logging_setup)."""

from __future__ import annotations

import io
import json
import logging
import sys

import pytest

from service.app.logging_setup import configure_logging


def test_a_stream_replaced_and_closed_since_start_up_neither_loses_lines_nor_raises(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    first, second = io.StringIO(), io.StringIO()
    try:
        monkeypatch.setattr(sys, "stderr", first)
        configure_logging("INFO")
        logging.getLogger("mhr.test").info("before the swap")
        first.close()  # what a test runner does with its capture; a redirect does the same
        monkeypatch.setattr(sys, "stderr", second)
        errors: list[logging.LogRecord] = []
        monkeypatch.setattr(logging.Handler, "handleError", lambda self, record: errors.append(record))
        logging.getLogger("mhr.test").info("after the swap")
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
    assert not errors
    assert json.loads(second.getvalue())["msg"] == "after the swap"
