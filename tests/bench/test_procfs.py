"""The bench's /proc reader: a server's CPU is its whole process tree (a ``--workers`` supervisor's
workers included, and children that already exited), not the one pid it started."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from cellserve.client.bench.measure import ServerSnapshot, server_cpu_per_msg
from cellserve.client.bench.procfs import ProcessStat, TreeUsage, process_tree, tree_usage

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux /proc")

CHILD_CPU_S = 0.3
# A child that burns CHILD_CPU_S of CPU, says so in a file, and waits for its stdin to close.
BURN = f"""
import sys, time
while time.process_time() < {CHILD_CPU_S}:
    pass
open(sys.argv[1], "w").close()
sys.stdin.read()
"""
# A parent that starts that child and idles; on a line from the test it reaps the child, then idles again.
PARENT = f"""
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", {BURN!r}, sys.argv[1]], stdin=subprocess.PIPE)
sys.stdin.readline()
child.stdin.close()
child.wait()
print("reaped", flush=True)
sys.stdin.readline()
"""
TICK_S = 0.011  # /proc counts CPU in clock ticks (1/100 s)


def test_a_parents_tree_counts_its_busy_child_live_and_after_it_was_reaped(tmp_path, wait_until):
    burnt = tmp_path / "burnt"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(burnt)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        wait_until(burnt.exists)
        tree = process_tree(parent.pid)
        assert tree[0].pid == parent.pid and len(tree) == 2
        own, child = tree[0].cpu_s, tree[1].cpu_s
        assert tree[1].ppid == parent.pid and child >= CHILD_CPU_S - TICK_S
        assert own < child  # what reading the parent's pid alone would have reported
        usage = tree_usage(parent.pid)
        assert usage is not None
        live = usage.cpu_s
        assert live == pytest.approx(own + child, abs=2 * TICK_S)
        assert parent.stdin and parent.stdout
        parent.stdin.write("\n")
        parent.stdin.flush()
        assert parent.stdout.readline().strip() == "reaped"
        assert [s.pid for s in process_tree(parent.pid)] == [parent.pid]
        reaped = ProcessStat.read(parent.pid)
        assert reaped is not None and reaped.reaped_children_cpu_s >= child - TICK_S
        after = tree_usage(parent.pid)
        assert after is not None and after.cpu_s >= live - TICK_S  # the child's CPU still counts once it is gone
    finally:
        parent.kill()
        parent.wait(10)


def test_nothing_is_read_for_no_pid_or_a_process_that_is_gone():
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(gone.stdout)
    assert process_tree(pid) == [] and tree_usage(pid) is None
    assert tree_usage(None) is None


def test_the_cpu_of_a_workers_server_is_the_supervisor_and_every_worker(spawn_server):
    server = spawn_server("--workers", "2")
    workers = {w["pid"] for w in server.ready_info()["workers"]}
    tree = {s.pid: s for s in process_tree(server.proc.pid)}
    assert workers <= set(tree), (workers, sorted(tree))
    mains = [ProcessStat.read(pid, pid) for pid in (server.proc.pid, *workers)]  # each process's main thread
    snapshot = ServerSnapshot.take(server.proc.pid, None, "tiny")  # what `cellserve bench` reads (later)
    assert snapshot.usage is not None
    assert snapshot.usage.cpu_s >= tree[server.proc.pid].cpu_s + sum(tree[w].cpu_s for w in workers) - TICK_S
    assert all(m is not None for m in mains)
    assert {server.proc.pid, *workers} <= snapshot.usage.pids
    assert snapshot.usage.main_threads_cpu_s >= sum(m.cpu_s for m in mains if m is not None) - TICK_S
    assert snapshot.usage.main_threads_cpu_s <= snapshot.usage.cpu_s
    assert all(tree[w].cpu_s > 0 for w in workers)  # each worker loaded and warmed its engine
    usage = tree_usage(server.proc.pid)
    assert usage is not None and usage.processes >= 3 and usage.rss_bytes > sum(tree[w].rss_bytes for w in workers)


# A process whose main thread idles while a second thread burns CPU_S, then says so and waits for stdin.
THREAD_BURN = f"""
import sys, threading, time
def burn():
    start = time.thread_time()
    while time.thread_time() - start < {CHILD_CPU_S}:
        pass
t = threading.Thread(target=burn)
t.start()
t.join()
open(sys.argv[1], "w").close()
sys.stdin.read()
"""


def test_the_main_thread_is_counted_apart_from_the_other_threads(tmp_path, wait_until):
    """`loop µs/msg` is the tree's main threads alone: a busy worker thread counts in cpu_s, not there."""
    burnt = tmp_path / "burnt"
    proc = subprocess.Popen([sys.executable, "-c", THREAD_BURN, str(burnt)], stdin=subprocess.PIPE)
    try:
        wait_until(burnt.exists)
        usage = tree_usage(proc.pid)
        assert usage is not None and usage.cpu_s >= CHILD_CPU_S - TICK_S
        main = ProcessStat.read(proc.pid, proc.pid)
        assert main is not None and usage.main_threads_cpu_s == pytest.approx(main.cpu_s)
        assert usage.main_threads_cpu_s < usage.cpu_s - CHILD_CPU_S / 2  # the burning thread is not in it
    finally:
        proc.kill()
        proc.wait(10)


def _usage(cpu_s: float, main_s: float, pids: frozenset[int] = frozenset({1})) -> TreeUsage:
    return TreeUsage(pids=pids, cpu_s=cpu_s, main_threads_cpu_s=main_s, rss_bytes=0, open_fds=None)


def test_the_loop_cpu_per_message_never_exceeds_the_servers():
    # Equal ticks summed in another order (0.1 + 0.2 vs 0.3), and a tick that lands on the main thread
    # between the two reads of a snapshot: either way the main threads' delta came out above the tree's.
    for before, after in (
        (_usage(0.1 + 0.2, 0.3), _usage(0.4, 0.4)),
        (_usage(1.0, 0.5), _usage(2.0, 1.51)),
    ):
        assert after.main_threads_cpu_s - before.main_threads_cpu_s > after.cpu_s - before.cpu_s
        server, loop = server_cpu_per_msg(before, after, 80)
        assert loop is not None and loop == server == (after.cpu_s - before.cpu_s) / 80
    server, loop = server_cpu_per_msg(_usage(1.0, 0.5), _usage(2.0, 0.9), 100)
    assert math.isclose(server, 0.01) and math.isclose(loop or 0, 0.004)


def test_the_loop_cpu_is_unknown_when_the_servers_processes_changed():
    server, loop = server_cpu_per_msg(_usage(1.0, 0.5), _usage(2.0, 0.9, frozenset({1, 2})), 100)
    assert math.isclose(server, 0.01) and loop is None
