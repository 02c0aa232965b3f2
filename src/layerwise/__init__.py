"""layerwise: measure how much every layer and sublayer of a transformer LM matters."""

from .data import Windows, windows
from .errors import LayerwiseError
from .loading import LoadedModel, load
from .probe import ProbeResult, probe
from .profile import Profile, profile
from .version import __version__

__all__ = [
    "LayerwiseError",
    "LoadedModel",
    "ProbeResult",
    "Profile",
    "Windows",
    "load",
    "probe",
    "profile",
    "windows",
    "__version__",
]
