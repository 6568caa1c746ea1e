"""Let ``torchvision`` (needed by timm and open_clip) import beside a CPU-only torch wheel.

PyPI's torchvision wheels are built against CUDA torch; beside the CPU wheel their C extension
(``_C.so``) cannot load. torchvision then still imports its pure-Python parts (transforms,
``ops.misc``, which is all timm and open_clip use) except that ``_meta_registrations`` registers
fake kernels for ``torchvision::nms``/``qnms`` without checking that the ops exist, and raises.
When, and only when, the extension cannot load, we declare those two op schemas (without any
kernel) so that the import succeeds; calling them still fails with torch's "no kernel" error.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)
_LIB = None  # keeps the torch.library fragment alive


def ensure_torchvision_importable() -> bool:
    """Make ``import torchvision`` work when its C extension cannot load.

    Returns:
        True when torchvision's C extension loaded (nothing done) or torchvision is absent;
        False when the Python-only fallback was installed.
    """
    global _LIB
    if "torchvision" in sys.modules or _LIB is not None:
        return True
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True
    import torch

    libs = sorted(Path(next(iter(spec.submodule_search_locations))).glob("_C*.so"))
    try:
        if not libs:
            raise OSError("no _C extension")
        torch.ops.load_library(str(libs[0]))
        return True
    except (OSError, RuntimeError) as e:
        log.debug("torchvision C extension unavailable (%s); using its Python parts only", e)
    _LIB = torch.library.Library("torchvision", "FRAGMENT")
    for op in ("nms", "qnms"):
        try:
            _LIB.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        except RuntimeError:  # already defined by someone else
            pass
    return False
