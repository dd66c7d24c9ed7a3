"""A local process tree's CPU time, resident memory and open files, read from Linux ``/proc``.

The benches read the server they started through here, and only here. A server started with
``serve --workers N`` is a supervisor whose workers are its child processes, so a server's figures are
its whole tree: the process, its live descendants (found by ``ppid`` in ``/proc/<pid>/stat``), and the
CPU of children that already exited and were reaped (the ``cutime``/``cstime`` the kernel keeps for
the parent). Everything is None where there is no ``/proc`` or no such process. The CPU of the tree's
main threads is kept apart: in a Python asyncio server that is the event loop, the one thread that
every message's Python work shares.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
# Fields of /proc/<pid>/stat after the ")" that ends the command name (proc(5) numbers them from 1 at the pid).
_PPID, _UTIME, _STIME, _CUTIME, _CSTIME, _RSS = 1, 11, 12, 13, 14, 21


@dataclass(frozen=True)
class ProcessStat:
    """One process as ``/proc/<pid>/stat`` describes it."""

    pid: int
    ppid: int
    cpu_s: float  # user + system time of the process and its threads
    reaped_children_cpu_s: float  # user + system time of its children that exited and were waited for
    rss_bytes: float

    @classmethod
    def read(cls, pid: int, tid: int | None = None) -> ProcessStat | None:
        """The process ``pid``; with ``tid``, only that thread of it (``/proc/<pid>/task/<tid>/stat``)."""
        path = PROC / str(pid) / "stat" if tid is None else PROC / str(pid) / "task" / str(tid) / "stat"
        try:
            fields = path.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        tick = os.sysconf("SC_CLK_TCK")
        return cls(
            pid=pid,
            ppid=int(fields[_PPID]),
            cpu_s=(int(fields[_UTIME]) + int(fields[_STIME])) / tick,
            reaped_children_cpu_s=(int(fields[_CUTIME]) + int(fields[_CSTIME])) / tick,
            rss_bytes=float(int(fields[_RSS]) * os.sysconf("SC_PAGE_SIZE")),
        )


def _all() -> list[ProcessStat]:
    try:
        pids = [int(p.name) for p in PROC.iterdir() if p.name.isdigit()]
    except OSError:
        return []
    return [s for s in map(ProcessStat.read, pids) if s is not None]


def process_tree(pid: int) -> list[ProcessStat]:
    """``pid`` and its live descendants (``pid`` first); [] when ``pid`` does not exist."""
    root = ProcessStat.read(pid)
    if root is None:
        return []
    children: dict[int, list[ProcessStat]] = {}
    for s in _all():
        children.setdefault(s.ppid, []).append(s)
    tree, todo = [root], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child.pid != pid:
                tree.append(child)
                todo.append(child.pid)
    return tree


def open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(PROC / str(pid) / "fd"))
    except OSError:
        return None


@dataclass(frozen=True)
class TreeUsage:
    """What a process tree has used: CPU seconds so far (exited children included), RSS and fds now."""

    pids: frozenset[int]  # the live processes of the tree
    cpu_s: float
    # the live processes' main threads alone: where a Python server runs its asyncio event loop (the
    # handlers, and an inline engine); gRPC's own I/O threads are the rest of cpu_s
    main_threads_cpu_s: float
    rss_bytes: float
    open_fds: int | None  # None when any process's fds could not be listed (another user's process)

    @property
    def processes(self) -> int:
        return len(self.pids)


def tree_usage(pid: int | None) -> TreeUsage | None:
    """The usage of ``pid``'s process tree (see the module docstring); None without /proc or such a process."""
    tree = process_tree(pid) if pid is not None else []
    if not tree:
        return None
    fds = [open_fds(s.pid) for s in tree]
    return TreeUsage(
        pids=frozenset(s.pid for s in tree),
        cpu_s=sum(s.cpu_s + s.reaped_children_cpu_s for s in tree),
        main_threads_cpu_s=sum(t.cpu_s for t in (ProcessStat.read(s.pid, s.pid) for s in tree) if t is not None),
        rss_bytes=sum(s.rss_bytes for s in tree),
        open_fds=None if None in fds else sum(f for f in fds if f is not None),
    )
