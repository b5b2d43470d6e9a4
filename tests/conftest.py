import pytest
import torch

import mmseg_vil  # noqa: F401  (applies the compat fixes and registers the models before any test imports mmseg)


@pytest.fixture(scope='session', autouse=True)
def one_thread():
    """Tiny test models are dominated by per-op overhead, which OpenMP threads on a busy 2-core machine multiply."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def isolated_default_scope():
    """Forget the MMEngine default scopes a test created (a Runner makes its own current), so that a later test
    building from MMPretrain's registries is not sent to MMSegmentation's."""
    from mmengine.registry import DefaultScope
    before = set(DefaultScope._instance_dict)
    yield
    for name in set(DefaultScope._instance_dict) - before:
        DefaultScope._instance_dict.pop(name)
