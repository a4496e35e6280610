"""CPU accounting from Linux ``/proc``, to tell a clean run from a disturbed one.

On a 2-core machine the load generator, the server and anything else running share the
same cores. Per level we report the cores used by the server's process tree, by this
client, by the host as a whole, and the rest ("other"): a non-trivial "other" or
"steal" means the numbers of that level were taken on a busy machine. Off Linux every
reading is None and the run goes on without it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_PROC = Path("/proc")
_TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat_fields(pid: int | str) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (which may hold spaces)."""
    try:
        raw = (_PROC / str(pid) / "stat").read_text(errors="replace")
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def process_tree_cpu_seconds(root_pid: int) -> float | None:
    """User + system CPU seconds of ``root_pid`` and its live descendants (None if gone).

    Descendants matter: vLLM runs its engine in a child process, uvicorn may fork workers.
    """
    if _stat_fields(root_pid) is None:
        return None
    children: dict[int, list[int]] = {}
    for entry in _PROC.iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(entry.name)
            if fields is not None and len(fields) > 1:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    total_ticks = 0
    pending = [root_pid]
    while pending:
        pid = pending.pop()
        fields = _stat_fields(pid)
        if fields is not None and len(fields) > 12:
            total_ticks += int(fields[11]) + int(fields[12])  # utime, stime
        pending.extend(children.get(pid, ()))
    return total_ticks / _TICKS_PER_S


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU counters at one instant; two of them give the cores used in between."""

    wall: float
    client: float
    server: float | None
    host_busy: float | None
    host_steal: float | None

    @classmethod
    def take(cls, server_pid: int | None) -> CpuSnapshot:
        busy = steal = None
        try:
            with (_PROC / "stat").open() as f:
                jiffies = [int(x) for x in f.readline().split()[1:9]]
            # user nice system idle iowait irq softirq steal: busy is all but idle + iowait.
            busy = (sum(jiffies) - jiffies[3] - jiffies[4]) / _TICKS_PER_S
            steal = jiffies[7] / _TICKS_PER_S if len(jiffies) > 7 else 0.0
        except (OSError, ValueError, IndexError):
            pass
        server = process_tree_cpu_seconds(server_pid) if server_pid else None
        return cls(time.perf_counter(), time.process_time(), server, busy, steal)

    def cores_since(self, before: CpuSnapshot) -> dict[str, Any]:
        """Average cores used between ``before`` and this snapshot, by whom."""
        wall = self.wall - before.wall

        def rate(now: float | None, then: float | None) -> float | None:
            if now is None or then is None or wall <= 0:
                return None
            return round((now - then) / wall, 3)

        server = rate(self.server, before.server)
        client = rate(self.client, before.client)
        host = rate(self.host_busy, before.host_busy)
        other = None
        if host is not None and server is not None and client is not None:
            other = round(max(0.0, host - server - client), 3)
        return {
            "server_cpu_s": (
                round(self.server - before.server, 3)
                if self.server is not None and before.server is not None
                else None
            ),
            "server_cpu_cores": server,
            "client_cpu_cores": client,
            "host_busy_cores": host,
            "host_steal_cores": rate(self.host_steal, before.host_steal),
            "other_cpu_cores": other,
        }
