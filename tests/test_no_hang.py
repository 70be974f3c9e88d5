"""No hang: a rank that dies, stalls or never joins fails the job within a bound derived from ``timeout_s``,
with a message that says which rank and what happened, and leaves no process behind.

Every case runs real gloo processes (gradcomp.launch.spawn).  Start-up of a spawned worker (importing torch)
takes a few seconds on a loaded machine, so the bounds are ``timeout_s`` plus a start-up margin; a rank that
dies must fail the job sooner than ``timeout_s`` (its peers see the closed connection at once).
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import hang_workers as hw
from gradcomp.launch import GRACE_S, WorkerError, spawn

STARTUP = 60.0  # seconds: spawning and importing torch, gradcomp and sklearn in every worker, on a busy machine


def alive(pid):
    """True while ``pid`` runs (a zombie, exited but not reaped, counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def pids(folder):
    return [int(p.read_text()) for p in Path(folder).glob("rank*.pid")]


def run_failing(*args, **kwargs):
    """spawn(*args, **kwargs), which must raise WorkerError: (message, seconds it took, when it raised)."""
    start = time.monotonic()
    with pytest.raises(WorkerError) as info:
        spawn(*args, **kwargs)
    end = time.monotonic()
    return str(info.value), end - start, end


def since_fault(folder, raised_at):
    """Seconds from the fault (the bad rank noted the time just before it) to spawn raising."""
    return raised_at - float((Path(folder) / "fault_at").read_text())


@pytest.mark.parametrize("how, what", [("exit", "exited with code 3"),
                                       ("sigkill", "killed by signal SIGKILL (exit code -9)")])
def test_a_rank_that_dies_in_a_collective_fails_the_job_at_once(tmp_path, how, what):
    timeout_s = 15
    message, took, raised_at = run_failing(hw.die_in_collective, 2, 1, how, str(tmp_path), timeout_s=timeout_s)
    assert since_fault(tmp_path, raised_at) < GRACE_S + 3, "the job waited for the timeout, not for the dead rank"
    assert took < timeout_s + STARTUP
    assert f"rank 1 died during the run without reporting: {what}" in message
    # the survivor's own error is reported: gloo saw the connection close
    assert "rank 0 raised while running" in message and "Connection closed by peer" in message
    assert message.index("rank 1 died") < message.index("rank 0 raised")  # the cause first
    assert len(pids(tmp_path)) == 2 and not any(alive(p) for p in pids(tmp_path))


@pytest.mark.parametrize("worker, also, writes_pids", [
    (hw.stall_in_collective, ["Timed out", "the launcher killed it"], True),
    (hw.dgc_optimizer_then_stall, [], False),  # under the DGC DistributedOptimizer
], ids=["collective", "dgc-distributed-optimizer"])
def test_a_rank_that_stalls_fails_the_job_after_the_timeout(worker, also, writes_pids, tmp_path):
    timeout_s = 4
    message, took, raised_at = run_failing(worker, 2, 1, str(tmp_path), timeout_s=timeout_s)
    assert timeout_s <= since_fault(tmp_path, raised_at) < timeout_s + GRACE_S + 3
    assert took < timeout_s + GRACE_S + STARTUP
    assert "rank 0 raised while running (a peer did not answer within timeout_s=4 s)" in message
    assert "rank 1 did not finish: still running (stalled?)" in message
    assert all(text in message for text in also), message
    if writes_pids:
        assert len(pids(tmp_path)) == 2 and not any(alive(p) for p in pids(tmp_path))


def test_an_error_raised_in_a_future_callback_is_reported_in_one_line():
    """torch wraps an error raised in a future's callback and appends the callbacks' frames ("At:"); the
    launcher's one-line report names the error itself."""
    from gradcomp.launch import _exception_line

    tb = ("Traceback (most recent call last):\n  File \"x.py\", line 1, in f\nRuntimeError: Got the following error "
          "when running the callback: RuntimeError: Application timeout caused pair closure\n\nAt:\n  comm.py(265): "
          "<lambda>\n\n\nAt:\n  comm.py(137): one\n")
    assert _exception_line(tb) == "RuntimeError: Application timeout caused pair closure"
    assert _exception_line("Traceback...\nValueError: bad\n") == "ValueError: bad"
    assert _exception_line("") == "an exception"


def test_a_rank_that_never_joins_fails_the_job_after_the_timeout():
    timeout_s = 4
    message, took, _ = run_failing(hw.quick_all_reduce, 2, timeout_s=timeout_s, before_init=hw.stall_rank_1_before_init)
    assert timeout_s <= took < timeout_s + GRACE_S + STARTUP
    assert "rank 1 never joined the process group" in message
    assert "rank 0 raised while joining the process group (init_process_group)" in message
    assert "1/2 clients joined" in message


def test_a_rank_that_dies_during_dgc_training_through_the_ddp_hook_fails_the_job_at_once(tmp_path):
    timeout_s = 15
    message, took, raised_at = run_failing(hw.dgc_train_then_die, 2, 1, "sigkill", str(tmp_path), timeout_s=timeout_s)
    assert since_fault(tmp_path, raised_at) < GRACE_S + 3
    assert took < timeout_s + STARTUP
    assert "rank 1 died during the run without reporting: killed by signal SIGKILL" in message
    assert "rank 0 raised while running" in message and "Connection closed by peer" in message


def test_every_rank_stalled_outside_collectives_is_stopped_by_the_deadline(tmp_path):
    message, took, _ = run_failing(hw.everyone_stalls, 2, str(tmp_path), timeout_s=60, deadline_s=5)
    assert 5 <= took < 5 + 5
    # (on a busy machine a rank may still be starting when the deadline comes: then it never joined)
    assert all(f"rank {r} did not finish" in message or f"rank {r} never joined" in message for r in (0, 1))
    assert message.count("deadline_s=5 s was reached; the launcher killed it") == 2
    assert not any(alive(p) for p in pids(tmp_path))


def test_callbacks_still_running_at_exit_do_not_abort_the_worker():
    """A timer thread inside a torch future's callbacks when the worker exits: before the workers left with
    os._exit, interpreter finalization aborted them (SIGABRT, "terminate called without an active
    exception") every time, after they had reported their results."""
    assert spawn(hw.callbacks_running_at_exit, 2, timeout_s=20) == [2.0, 2.0]


def test_workers_exit_when_the_parent_dies(tmp_path):
    """No orphan: workers whose launcher was killed leave instead of waiting in a collective."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import hang_workers as hw\n"
            "from gradcomp.launch import spawn\n"
            "if __name__ == '__main__':\n    spawn(hw.stall_in_collective, 2, 1, sys.argv[2], timeout_s=300)\n")
    parent = subprocess.Popen([sys.executable, "-c", code, str(Path(__file__).parent), str(tmp_path)])
    try:
        start = time.monotonic()
        while len(pids(tmp_path)) < 2 and time.monotonic() - start < 60:
            time.sleep(0.1)
        assert len(pids(tmp_path)) == 2, "the workers did not start"
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    start = time.monotonic()
    while any(alive(p) for p in pids(tmp_path)) and time.monotonic() - start < 10:
        time.sleep(0.1)
    left = [p for p in pids(tmp_path) if alive(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert not left, "workers outlived their launcher"


@pytest.mark.parametrize("kwargs, field", [({"timeout_s": 0}, "timeout_s"), ({"timeout_s": float("nan")}, "timeout_s"),
                                           ({"deadline_s": -1}, "deadline_s")])
def test_bad_timeouts_are_rejected(kwargs, field):
    with pytest.raises(ValueError, match=f"{field} must be a finite number of seconds > 0"):
        spawn(hw.quick_all_reduce, 2, **kwargs)
