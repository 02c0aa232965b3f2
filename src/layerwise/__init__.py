"""layerwise: measure how much every layer and sublayer of a transformer LM matters."""

__version__ = "0.1.0"

from .data import Windows, windows  # noqa: E402
from .errors import LayerwiseError  # noqa: E402
from .loading import LoadedModel, load  # noqa: E402
from .probe import ProbeResult, probe  # noqa: E402
from .profile import Profile, profile  # noqa: E402

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
