"""The kernel test files that re-run themselves under ``TRITON_INTERPRET=1`` on a machine without a GPU, as
subprocesses started when the session's tests are collected and run one after another in a background thread.

Why: the interpreter runs are single-threaded and took 7.8 of the suite's 15.8 minutes run in turn (2-core VM,
2026-12-08); the rest of the suite runs on one thread too (conftest.py), so the runs use the second core meanwhile. A
test that finds its run not started (e.g. run alone without this module's hook) starts it itself and waits.
"""
import os
import re
import subprocess
import sys
import threading
from typing import Dict, Iterable, List

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

# pytest's last line when every selected test passed and none was skipped
NONE_SKIPPED = r'\d+ passed(, \d+ deselected)?(, \d+ warnings?)? in .*'
# test name -> (test file, pytest arguments after it, timeout in seconds, what pytest's last line must match)
RUNS = {
    'test_mixer_kernels_under_triton_interpreter': (
        'test_mixer_ops.py', ['-k', 'match_reference or mixer_core'], 600, NONE_SKIPPED),
    'test_fused_backend_under_triton_interpreter': (
        'test_mlstm_backends.py',
        ['-k', 'test_fused_backend_matches_reference or test_fused_kernels_ or (test_backbone_ and fused)'], 600,
        NONE_SKIPPED),
    'test_kernels_under_triton_interpreter': (
        'test_mlstm_fused_chunkwise.py', ['-k', 'test_kernel_'], 900, NONE_SKIPPED),
    # the whole file: the test that starts this run is skipped there
    'test_layer_norm_kernels_under_triton_interpreter': (
        'test_norm_ops.py', [], 600, r'\d+ passed(, \d+ skipped)?(, \d+ warnings?)? in .*'),
}

_results: Dict[str, subprocess.CompletedProcess] = {}
_done: Dict[str, threading.Event] = {}
_running: List[subprocess.Popen] = []
_stopped = threading.Event()


def _command(name: str) -> List[str]:
    file, args, _, _ = RUNS[name]
    return [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', os.path.join(TESTS_DIR, file), *args]


def _run(name: str) -> None:
    """One run to its end (or its timeout, or the session's end), its outcome kept for :func:`result`."""
    try:
        if _stopped.is_set():
            return
        process = subprocess.Popen(_command(name), env={**os.environ, 'TRITON_INTERPRET': '1'},
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _running.append(process)
        try:
            stdout, stderr = process.communicate(timeout=RUNS[name][2])
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
            stderr += f'\n{name}: the interpreted run passed its {RUNS[name][2]} s timeout and was stopped'
        finally:
            _running.remove(process)
        _results[name] = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    finally:
        _done[name].set()


def start(names: Iterable[str]) -> None:
    """Start the runs of ``names`` (keys of RUNS), one after another, in a background thread."""
    names = [name for name in names if name not in _done]
    for name in names:
        _done[name] = threading.Event()
    if names:
        threading.Thread(target=lambda: [_run(name) for name in names], daemon=True).start()


def result(name: str) -> subprocess.CompletedProcess:
    """The finished run of ``name``, started here if :func:`start` did not."""
    if name not in _done:
        _done[name] = threading.Event()
        _run(name)
    _done[name].wait()
    if name not in _results:
        raise RuntimeError(f'the interpreted run of {name} was stopped before it finished (the session ended)')
    return _results[name]


def stop() -> None:
    """End the runs still going (the session is over)."""
    _stopped.set()
    for process in list(_running):
        process.kill()


def check(name: str) -> None:
    """Assert that the run of ``name`` passed and that pytest's last line, e.g. '12 passed, 3 deselected in 100.00s',
    matches the run's pattern in RUNS (e.g. no skipped tests)."""
    run = result(name)
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-2000:]
    lines = run.stdout.strip().splitlines()
    summary = lines[-1] if lines else ''
    assert re.fullmatch(RUNS[name][3], summary), summary
