"""cryosift: single-particle cryo-EM 2D images, simulated with ground truth, cleaned, screened,
classified and measured."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cryosift")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
