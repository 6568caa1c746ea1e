"""m3bind: bind medical modalities into one embedding space through text.

The library reads files (:func:`m3bind.io.load`), preprocesses them per modality, embeds them
with a :class:`~m3bind.model.BoundModel` and classifies them zero-shot. It imports nothing from
``train``, ``app`` or ``data_registry``.
"""

from m3bind.errors import M3BindError
from m3bind.modalities import MODALITIES

__version__ = "0.1.0"
__all__ = ["MODALITIES", "M3BindError", "__version__", "load_model"]


def load_model(path, **kwargs):
    """Load a model directory; see :func:`m3bind.model.load_model`."""
    from m3bind.model import load_model as _load

    return _load(path, **kwargs)
