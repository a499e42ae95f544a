"""What every benchmark script shares: the device, the machine it ran on, plain tables."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from generator.errors import PatchAtlasError


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when present), ``cpu`` or ``cuda``; CUDA asked for where there is none is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise PatchAtlasError("device 'cuda': CUDA is not available here; use --device cpu or auto")
    return torch.device(name)


def sync(device: torch.device | str) -> None:
    """Wait for the device's queued work, so that a timer stopped next measures it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """The command as typed at the repository root: benchmarks/README.md's tables name it."""
    return shlex.join(["python", f"benchmarks/{Path(script).name}", *(sys.argv[1:] if argv is None else argv)])


def machine_info(device: torch.device, command: str | None = None, **versions: str) -> dict:
    """The machine, the command run, the library versions given (``pyarrow=pa.__version__``, …) and
    how busy it was."""
    return {"command": command,
        "cpu": cpu_model(), "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__, **versions, "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        # Other processes on the machine slow every measurement: the load says how busy it was.
        "load_average_start": list(os.getloadavg()),
    }


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """Plain aligned columns: the first ``left`` columns to the left, the rest to the right."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "  ".join(str(c).ljust(w) if i < left else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])
