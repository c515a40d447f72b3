"""The largest gap between two ticks of a main-thread timer: how long napari froze."""

from __future__ import annotations

import time

from qtpy.QtCore import QTimer


class GapMeter:
    """A ``QTimer`` ticking every ``interval_ms`` on the main thread; ``largest`` is the longest
    time (s) between two ticks since :meth:`start` (the event loop's longest freeze)."""

    def __init__(self, interval_ms: int = 20):
        self.timer = QTimer()
        self.timer.setInterval(interval_ms)
        self.timer.timeout.connect(self._tick)
        self.largest = 0.0
        self._last = 0.0

    def _tick(self) -> None:
        now = time.perf_counter()
        self.largest = max(self.largest, now - self._last)
        self._last = now

    def start(self) -> GapMeter:
        self.largest = 0.0
        self._last = time.perf_counter()
        self.timer.start()
        return self

    def stop(self) -> float:
        self._tick()
        self.timer.stop()
        return self.largest
