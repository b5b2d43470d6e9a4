"""The mmcv.ops stand-in for mmcv-lite (mmseg_vil_mmcv_ops) behaves like a module, and MMSeg / MMPretrain work with it.

With mmcv-lite, MMSegmentation's own modules import a few ops unconditionally; the stand-in must make them import
whether or not ``mmseg_vil`` was imported first (the ``.pth`` file installs it at interpreter start), while every op
it lacks answers ``hasattr``/``getattr`` normally and fails, when used, with the full-mmcv hint.
"""
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
from e2e_helpers import ROOT

from mmseg_vil import compat

pytestmark = pytest.mark.skipif(compat.has_mmcv_ext(), reason='full mmcv installed: the stand-in is not used')
HINT = 'needs the compiled ops of full mmcv'


def test_is_a_package_with_a_spec():
    import mmcv.ops

    spec = importlib.util.find_spec('mmcv.ops')
    assert spec is mmcv.ops.__spec__ and spec.submodule_search_locations == [] and mmcv.ops.__path__ == []
    with pytest.raises(ModuleNotFoundError, match=HINT):
        importlib.util.find_spec('mmcv.ops.nms')
    with pytest.raises(ModuleNotFoundError, match=HINT):
        import mmcv.ops.nms  # noqa: F401


def test_missing_ops_answer_hasattr_and_getattr():
    import mmcv.ops

    assert hasattr(mmcv.ops, 'point_sample') and not hasattr(mmcv.ops, 'nms')
    assert getattr(mmcv.ops, 'DeformConv2d', None) is None
    with pytest.raises(AttributeError, match=HINT):
        mmcv.ops.nms
    with pytest.raises(ModuleNotFoundError, match=HINT):
        from mmcv.ops import DeformConv2d  # noqa: F401


def test_dcn_in_a_config_gets_the_hint():
    from mmengine.registry import DefaultScope
    from mmseg.registry import MODELS

    backbone = dict(type='ResNetV1c', depth=50, dcn=dict(type='DCN', deform_groups=1, fallback_on_stride=False),
                    stage_with_dcn=(False, False, True, True))
    with DefaultScope.overwrite_default_scope('mmseg'), pytest.raises(ModuleNotFoundError, match=f'DCN: .*{HINT}'):
        MODELS.build(backbone)
    from mmcv.cnn import build_conv_layer
    with pytest.raises(ModuleNotFoundError, match=f'DCNv2: .*{HINT}'):
        build_conv_layer(dict(type='DCNv2'), 3, 8, 3)


def _python(code: str, site_dir: str, tmp_path) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter that processes ``site_dir`` like site-packages (its .pth files run)."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    prelude = f'import site; site.addsitedir({site_dir!r})\n'
    return subprocess.run([sys.executable, '-c', prelude + code], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)


def test_documented_mmseg_apis_work_when_imported_first(tmp_path):
    """The installed .pth makes `from mmseg.apis import MMSegInferencer` work without importing mmseg_vil."""
    site_dir = tmp_path / 'site'
    site_dir.mkdir()
    shutil.copy(os.path.join(ROOT, 'mmseg_vil_mmcv_ops.pth'), site_dir)
    code = ('from mmseg.apis import MMSegInferencer, inference_model, init_model\n'
            'import mmseg.models, sys\n'
            'assert "mmseg_vil" not in sys.modules\n'
            'import mmcv.ops; assert mmcv.ops.MMSEG_VIL_FALLBACK\n'
            'print("imported")\n')
    proc = _python(code, str(site_dir), tmp_path)
    assert proc.returncode == 0 and 'imported' in proc.stdout, proc.stdout[-3000:]


# Modules that need optional packages absent from the pinned stack, whichever mmcv is installed (MMPretrain's
# multimodal models register placeholders for them, and a second import of those modules fails by design).
OPTIONAL = ('mmpretrain.models.multimodal', )
WALK = '''
import importlib, pkgutil, sys
{first}
failed = {{}}

def walk(package):
    module = importlib.import_module(package)
    for info in pkgutil.iter_modules(getattr(module, '__path__', []), package + '.'):
        if info.name.startswith({optional!r}):
            continue
        try:
            walk(info.name) if info.ispkg else importlib.import_module(info.name)
        except Exception as error:
            failed[info.name] = repr(error)

walk('mmseg')
walk('mmpretrain')
print('FAILED', failed)
'''


@pytest.mark.parametrize('first', ['', 'import mmseg_vil'])
def test_every_mmseg_and_mmpretrain_module_imports(tmp_path, first):
    """MMSeg 1.2.2 and MMPretrain 1.2.0 import completely through the stand-in, with or without mmseg_vil."""
    site_dir = tmp_path / 'site'
    site_dir.mkdir()
    shutil.copy(os.path.join(ROOT, 'mmseg_vil_mmcv_ops.pth'), site_dir)
    proc = _python(WALK.format(first=first, optional=OPTIONAL), str(site_dir), tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:]
    failed = eval(proc.stdout[proc.stdout.rindex('FAILED ') + len('FAILED '):].strip())
    # Allowed: optional third-party packages outside the pinned stack (pycocotools, transformers, ...).
    assert {name: error for name, error in failed.items() if 'mmcv' in error or 'No module named' not in error} == {}
    assert len(failed) < 10


def test_the_environment_runs_the_stand_in_at_interpreter_start():
    """`make env` put the .pth into this interpreter's site-packages: a fresh interpreter imports mmseg.apis."""
    result = subprocess.run([sys.executable, '-c', 'from mmseg.apis import MMSegInferencer'], cwd=tempfile.gettempdir(),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
