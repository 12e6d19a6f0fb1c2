"""What machine a run happened on, said the same way in summaries, model cards, reports and benchmarks."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU model name as the kernel reports it (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """``"<cpu>, <n> cores"``."""
    return f"{cpu_name()}, {os.cpu_count()} cores"
