"""Progress of a run on stderr: a tqdm bar on a terminal, else one line per group (logs, CI)."""

from __future__ import annotations

import sys


class Progress:
    """A tqdm bar on stderr when it is a terminal (and tqdm is installed), else one line per group."""

    def __init__(self, total: int, enabled: bool, name: str = "attnkit bench") -> None:
        self.bar = None
        self.enabled, self.name = enabled, name
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, file=sys.stderr, unit="row", desc=name, dynamic_ncols=True)
            except ImportError:
                pass

    def group(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description(text)
        elif self.enabled:
            print(f"{self.name}: {text}", file=sys.stderr)

    def step(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)

    def add(self, n: int) -> None:
        if self.bar is not None:
            self.bar.total += n
            self.bar.refresh()

    def write(self, text: str) -> None:
        """A message that is always shown (above the bar when there is one)."""
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
