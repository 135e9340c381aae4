"""Output helpers shared by the commands: failed rows on stderr, and the one-JSON-line stdout rule."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TextIO


def print_failures(failures: Sequence[Mapping[str, Any]], limit: int) -> None:
    """Name up to ``limit`` failed rows on stderr (``id: [stage] error: message``), then how many more."""
    for failure in failures[:limit]:
        stage = f"{failure['stage']} " if failure.get("stage") else ""
        print(f"{failure['id']}: {stage}{failure['error']}: {str(failure['message'])[:200]}", file=sys.stderr)
    if len(failures) > limit:
        print(f"... and {len(failures) - limit} more failed rows (--failures N, or --json, to list them)",
              file=sys.stderr)


@contextlib.contextmanager
def stdout_for_json(json_mode: bool) -> Iterator[TextIO]:
    """Yield the real stdout; with ``json_mode`` everything else printed to stdout inside goes to stderr.

    A command with ``--json`` prints exactly one JSON line on stdout: libraries that print (progress,
    PEFT's parameter counts) are sent to stderr.
    """
    stdout = sys.stdout
    if not json_mode:
        yield stdout
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield stdout
