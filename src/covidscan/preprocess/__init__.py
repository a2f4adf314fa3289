"""Preprocessing: CLAHE, lung-region crop (CT and chest X-ray), model-input transforms, preview sheets.

The names in ``__init__.pyi`` load their module on first use, so that reading a preset (which needs only
:mod:`covidscan.preprocess.config`) does not import torch, torchvision and OpenCV.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach_stub(__name__, __file__)
