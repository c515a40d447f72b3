"""`Progress`: the one progress event that every long-running generator in the package yields.

Long work (`affine`, `pipeline`, `finetune`, `train`) is written as generators that yield
:class:`Progress` events and *return* their result (``StopIteration.value``). The widget wraps
them in a napari worker, the CLI drains them with a progress bar; neither is imported here.
"""

from __future__ import annotations

from dataclasses import dataclass

#: send this into a running fine-tuning or refinement generator (``gen.send(STOP)``, or a napari
#: worker's ``send``) to end the optimisation at once and keep the field reached so far
STOP = "stop"


@dataclass
class Progress:
    """``step`` of ``total`` done, with a human-readable ``message``.

    ``stage`` names the phase (e.g. ``"rigid"``), ``loss`` is the latest objective value where
    there is one, and ``preview`` holds optional arrays for a live display (name -> array).
    """

    step: int
    total: int
    message: str
    stage: str = ""
    loss: float | None = None
    preview: dict | None = None

    @property
    def fraction(self) -> float:
        """Completed fraction in ``[0, 1]`` (``0`` when ``total`` is unknown)."""
        return min(max(self.step / self.total, 0.0), 1.0) if self.total > 0 else 0.0


def stop_reason(command, plateau: Plateau, loss: float, watch: bool) -> str | None:
    """Why an optimisation loop should stop after this step: ``"user"`` when :data:`STOP` was
    sent in, ``"plateau"`` when ``watch`` is on (the last level) and the loss has stopped
    improving, else None. Shared by fine-tuning and field refinement."""
    if command == STOP:
        return "user"
    if watch and plateau.update(loss):
        return "plateau"
    return None


class Plateau:
    """Early stop: :meth:`update` turns True once the loss has not improved by ``min_delta``
    (relative to the best so far) for ``patience`` consecutive steps."""

    def __init__(self, patience: int, min_delta: float):
        self.patience, self.min_delta = patience, min_delta
        self.best, self.waited = float("inf"), 0

    def update(self, value: float) -> bool:
        # The first value is the best so far (inf - min_delta * inf would be NaN: never better).
        if self.best == float("inf") or value < self.best - self.min_delta * abs(self.best):
            self.best, self.waited = value, 0
        else:
            self.waited += 1
        return self.waited >= self.patience
