"""A dependency-free progress line: fraction done, running loss and images per second."""

from __future__ import annotations

import sys
import time


class Progress:
    """Redraws one line in a terminal; elsewhere (logs, pytest) prints one line when done."""

    def __init__(self, total: int, label: str, *, enabled: bool = True, stream=None):
        self.total = max(int(total), 1)
        self.label = label
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stdout
        self.interactive = enabled and getattr(self.stream, "isatty", lambda: False)()
        self.done = 0
        self.images = 0
        self.loss_sum = 0.0
        self.start = time.perf_counter()

    def update(self, images: int, loss: float) -> None:
        self.done += 1
        self.images += images
        self.loss_sum += loss
        if not self.enabled:
            return
        if self.interactive or self.done == self.total:
            self._draw(final=self.done == self.total)

    @property
    def images_per_second(self) -> float:
        return self.images / max(time.perf_counter() - self.start, 1e-9)

    def _draw(self, final: bool) -> None:
        width = 20
        filled = width * self.done // self.total
        bar = "#" * filled + "." * (width - filled)
        line = (
            f"{self.label} [{bar}] {100 * self.done // self.total:3d}% "
            f"loss {self.loss_sum / self.done:.4f} {self.images_per_second:.1f} img/s"
        )
        if self.interactive:
            self.stream.write("\r" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
