"""Ctrl-C during a run stops it even when Python swallowed the KeyboardInterrupt (precompute/interrupt.py)."""

from __future__ import annotations

import signal

import pytest

from precompute import interrupt


def test_a_swallowed_ctrl_c_still_stops_the_run():
    # As in a terminal: Ctrl-C handled by Python's default handler. A test run started in the
    # background inherits an ignored SIGINT, which `watched()` rightly leaves ignored.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with interrupt.watched():
            interrupt.check()  # nothing pressed yet
            try:  # what Python does when the signal lands in a weakref callback: the exception is dropped
                signal.raise_signal(signal.SIGINT)
            except KeyboardInterrupt:
                pass
            with pytest.raises(KeyboardInterrupt):
                interrupt.check()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the caller's handler is back
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_an_ignored_ctrl_c_stays_ignored():
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as under nohup
    try:
        with interrupt.watched():
            signal.raise_signal(signal.SIGINT)
            interrupt.check()  # nothing recorded, nothing raised
    finally:
        signal.signal(signal.SIGINT, before)
