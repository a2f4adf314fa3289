"""Models of the two papers: pretrained CNN backbones + published heads, and the BPNN pixel baseline.

All models return logits for ``covidscan.CLASSES``; see :mod:`covidscan.models.heads` for why no softmax.

The names in ``__init__.pyi`` load their module on first use, so that reading a preset (which needs only
:mod:`covidscan.models.config`) does not import torchvision and timm: seconds in every light command.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach_stub(__name__, __file__)
