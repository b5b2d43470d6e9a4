# Copyright (c) mmseg-vil contributors. Licensed under the Apache License, Version 2.0.
"""Packaging beyond setup.cfg: ``mmseg_vil_mmcv_ops.pth``, which installs the ``mmcv.ops`` stand-in for mmcv-lite at
interpreter start (see ``mmseg_vil_mmcv_ops.py``).

A ``.pth`` file only acts from site-packages itself, which setuptools reaches (in wheels and editable installs alike)
only through ``data_files``, whose paths are relative to the installation prefix.
"""
import os
import sysconfig

from setuptools import setup

SITE_PACKAGES = os.path.relpath(sysconfig.get_path('purelib'), sysconfig.get_path('data'))

setup(data_files=[(SITE_PACKAGES, ['mmseg_vil_mmcv_ops.pth'])])
