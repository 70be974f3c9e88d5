"""Nothing lost, nothing crashes, seen from the outside: ``python -m gradcomp train`` as a user runs it, its
failures one line on the terminal (exit 2 for a bad input, 1 for a failed worker, 130 for Ctrl-C), the details
in the run directory."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from gradcomp.train.config import Data, Launch, Output, Schedule, TrainConfig
from gradcomp.train.loop import run
from gradcomp.train.rundir import RunDir
from test_data import _idx_bytes, _write_fake_mnist
from test_resume import assert_same_run

#: a real-worker run slow enough (4 ms per collective) to be interrupted mid-run: 2 epochs of 44 steps
SLOW = TrainConfig(data=Data(dataset="digits", batch_size=16, limit_test=100), schedule=Schedule(epochs=2),
                   launch=Launch(workers=2, emulate_latency_ms=4.0), output=Output(checkpoint_every=10, progress=False))


def _args(config):
    """``config`` as ``gradcomp train``'s flags."""
    return ["--dataset", config.data.dataset, "--compressor", config.exchange.method,
            "--workers", str(config.launch.workers), "--epochs", str(config.schedule.epochs),
            "--batch-size", str(config.data.batch_size), "--limit-test", str(config.data.limit_test),
            "--checkpoint-every", str(config.output.checkpoint_every),
            "--emulate-latency-ms", str(config.launch.emulate_latency_ms), "--no-progress"]


def gradcomp(*args, timeout=120, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "gradcomp", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, **kw)


def lines(text):
    return [line for line in text.splitlines() if line.strip()]


def test_a_damaged_label_byte_is_refused_in_one_line_before_anything_is_written(tmp_path):
    arrays = _write_fake_mnist(tmp_path / "data" / "mnist", n_train=64, n_test=16, gz=False)
    labels = arrays["train-labels-idx1-ubyte"].copy()
    labels[5] = 200
    (tmp_path / "data" / "mnist" / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(labels, 2049))
    proc = gradcomp("train", "--dataset", "mnist", "--data-dir", str(tmp_path / "data"), "--simulate", "--workers",
                    "2", "--epochs", "1", "--no-progress", "--run-dir", str(tmp_path / "run"))
    assert proc.returncode == 2, proc.stderr
    assert lines(proc.stderr) == [f"gradcomp train: error: {tmp_path / 'data' / 'mnist' / 'train-labels-idx1-ubyte'}: "
                                  "label 200 at index 5 is not one of the 10 classes of mnist (0-9); 1 bad label(s) "
                                  "in all: the file is damaged"]
    assert not (tmp_path / "run").exists()


def test_ctrl_c_stops_in_one_line_naming_the_step_and_the_resume_command(tmp_path):
    """SIGINT to the whole process group, as a terminal's Ctrl-C sends it (the launcher and every worker)."""
    _interrupt(tmp_path)


def _interrupt(tmp_path):
    """Ctrl-C a 2-worker run once it has a checkpoint; check the one line; the run directory."""
    path = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "gradcomp", "train", *_args(SLOW), "--run-dir", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not RunDir(path).has_checkpoint() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "leaked" not in err, err
    [line] = lines(err)
    found = re.fullmatch(rf"gradcomp train: interrupted at step (\d+); resume with: gradcomp train --resume "
                         rf"{re.escape(str(path))}(?: \(from its checkpoint at step (\d+)\))?", line)
    assert found, line
    saved = RunDir(path).load_checkpoint()["steps"]
    assert int(found[1]) >= saved == int(found[2] or found[1]) and not RunDir(path).summary_path.exists()
    return path


@pytest.mark.slow  # ~12 s more: two more runs; mid-run resumes are bit-identical in test_resume.py
def test_a_run_stopped_by_ctrl_c_resumes_to_the_uninterrupted_result(tmp_path):
    path = _interrupt(tmp_path)
    run(SLOW, resume=str(path), echo=lambda _: None)
    run(SLOW.replace(output={"run_dir": str(tmp_path / "whole")}), echo=lambda _: None)
    assert_same_run(tmp_path / "whole", path)


def test_a_failing_worker_is_one_line_with_its_cause_and_the_tracebacks_go_to_the_run_directory(tmp_path):
    """Every rank raises (a huge learning rate makes the gradients non-finite, --nonfinite raise); once restarted
    from the start, it fails again."""
    path = tmp_path / "run"
    proc = gradcomp("train", "--workers", "2", "--lr", "1e30", "--nonfinite", "raise", "--epochs", "1",
                    "--limit-train", "256", "--no-progress", "--max-restarts", "1", "--run-dir", str(path))
    assert proc.returncode == 1, proc.stderr
    log = path / "worker-errors.log"
    cause = (r"2 of 2 workers failed: rank \d raised while running: gradcomp\.guard\.NonFiniteGradientError: rank \d: "
             r"non-finite gradient \(NaN or Inf\) in net\.\d\.\w+, .*; no memory was changed")
    assert re.fullmatch(rf"{cause}; restart 1 of 1 from the start \(no checkpoint yet\) \(tracebacks: "
                        rf"{re.escape(str(log))}\)", lines(proc.stdout)[-1]), proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    [line] = lines(proc.stderr)
    assert re.fullmatch(rf"gradcomp train: error: {cause} \(every rank's report and traceback: "
                        rf"{re.escape(str(log))}\)", line), line
    text = log.read_text()
    assert text.count("=== attempt") == 2 and text.count("Traceback (most recent call last)") == 4
    assert "--- rank 0:" in text and "--- rank 1:" in text and "in nonfinite_in" in text


def test_a_callback_error_after_a_restart_reads_as_its_cause():
    """What a survivor of a killed peer reported: torch wraps the gloo error raised in a future's callback
    ("Unable to cast ... to Tensor"); the one line names the gloo error, not " to Tensor"."""
    from gradcomp.launch import _exception_line

    tb = ('Traceback (most recent call last):\n  File "loop.py", line 617, in train_worker\n    loss.backward()\n'
          "RuntimeError: Unable to cast Got the following error when running the callback: RuntimeError: Got the "
          "following error when running the callback: RuntimeError: [/__w/pytorch/pytorch/third_party/gloo/gloo/"
          "transport/tcp/pair.cc:537] Read error [127.0.0.1]:29620: Connection reset by peer. This is typically "
          "caused by a remote worker hanging or bugs in the application. Check the logs of the remote worker "
          "before reporting an error. GLHF!\n\nAt:\n  comm.py(265): <lambda>\n\n\nAt:\n  comm.py(164): settle\n"
          " to Tensor\n")
    assert _exception_line(tb) == "RuntimeError: Read error [127.0.0.1]:29620: Connection reset by peer."
    chained = ('Traceback (most recent call last):\n  File "a.py", line 1, in f\nKeyError: 3\n\nDuring handling of '
               'the above exception, another exception occurred:\n\nTraceback (most recent call last):\n  File '
               '"a.py", line 2, in f\n    g()\nValueError: first line\nsecond line\n')
    assert _exception_line(chained) == "ValueError: first line"
    stopped = ('Traceback (most recent call last):\n  File "loop.py", line 9, in stop\n'
               "    raise TrainingInterrupted(3)\ngradcomp.train.loop.TrainingInterrupted: interrupted at step 3\n")
    assert _exception_line(stopped) == "gradcomp.train.loop.TrainingInterrupted: interrupted at step 3"


def test_a_worker_that_crashes_in_c_writes_its_stacks_to_the_crash_log_not_the_terminal(tmp_path, capfd):
    import hang_workers as hw
    from gradcomp.launch import WorkerError, spawn

    log = tmp_path / "worker-errors.log"
    with pytest.raises(WorkerError) as info:
        spawn(hw.die_in_collective, 2, 1, "sigsegv", str(tmp_path), timeout_s=15, crash_log=log)
    assert info.value.summary.startswith("2 of 2 workers failed: rank 1 died during the run without reporting: "
                                         "killed by signal SIGSEGV"), info.value.summary
    assert "Fatal Python error: Segmentation fault" in log.read_text()
    assert "Fatal Python error" not in capfd.readouterr().err


def test_ctrl_c_in_a_simulated_run_names_the_step_and_puts_the_handler_back(tmp_path):
    import threading

    from gradcomp.train.loop import TrainingInterrupted

    path = tmp_path / "run"
    before = signal.getsignal(signal.SIGINT)

    def ctrl_c_after_the_first_checkpoint():
        while not RunDir(path).has_checkpoint():
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=ctrl_c_after_the_first_checkpoint, daemon=True).start()
    with pytest.raises(TrainingInterrupted) as info:
        run(TrainConfig(launch=Launch(simulate=True, workers=2), schedule=Schedule(epochs=50),
                        output=Output(checkpoint_every=5, progress=False, run_dir=str(path))), echo=lambda _: None)

    saved = RunDir(path).load_checkpoint()["steps"]
    assert info.value.steps >= saved >= 5 and signal.getsignal(signal.SIGINT) is before
    behind = "" if info.value.steps == saved else f" (from its checkpoint at step {saved})"
    assert info.value.describe() == (f"interrupted at step {info.value.steps}; resume with: gradcomp train --resume "
                                     f"{path}{behind}")
