"""Ctrl-C and SIGTERM during training: the first one finishes the current step and saves, a second one aborts."""
from __future__ import annotations

import signal

from .errors import Aborted


class StopOnSignal:
    """Turn the first SIGINT/SIGTERM into a request to stop after the current step; a second one aborts."""

    def __init__(self):
        self.signal_number = 0  # the first signal received, 0 while none
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signal_number:
            raise Aborted(signum)
        self.signal_number = signum
        print(f"\n[sftkit] {signal.Signals(signum).name} received: finishing this step and saving a checkpoint "
              "(send it again to abort without saving)")

    def __enter__(self):
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: signals cannot be caught here
            self._previous = {}
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False
