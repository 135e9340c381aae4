"""Machine description printed by every benchmark."""

from __future__ import annotations

import os
import platform


def machine_line() -> str:
    """Cores, torch threads and CPU model in one line."""
    try:
        import torch

        threads = torch.get_num_threads()
    except ImportError:
        threads = "n/a"
    cpu = platform.processor() or platform.machine()
    return f"machine: {os.cpu_count()} cores, torch threads {threads}, {cpu}, python {platform.python_version()}"
