import pytest
import torch

import interpreted_runs
import mmseg_vil  # noqa: F401  (applies the compat fixes and registers the models before any test imports mmseg)


@pytest.hookimpl(trylast=True)  # after -k and -m deselected tests
def pytest_collection_modifyitems(session, config, items):
    """Start the interpreter runs of the selected tests that will run (tests/interpreted_runs.py); not in
    pytest-xdist's workers, each of which collects every test: there a test starts its run when it runs."""
    if hasattr(config, 'workerinput'):
        return
    interpreted_runs.start(item.name for item in items if item.name in interpreted_runs.RUNS
                           and not any(mark.args and mark.args[0] for mark in item.iter_markers('skipif')))


def pytest_sessionfinish(session, exitstatus):
    interpreted_runs.stop()


@pytest.fixture(scope='session', autouse=True)
def one_thread():
    """Tiny test models are dominated by per-op overhead, which OpenMP threads on a busy 2-core machine multiply."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)



@pytest.fixture(autouse=True)
def fresh_compiler_caches():
    """Each test compiles from scratch: Dynamo otherwise remembers earlier tests' shapes of the same code and marks
    them dynamic (automatic dynamic shapes), so a test's outcome would depend on the tests before it."""
    yield
    torch._dynamo.reset()
