"""napari-ssl-seg: human-in-the-loop semi-supervised segmentation of 3D volumes.

Importing the package is cheap: it loads neither torch nor Qt. The core modules
(``store``, ``labels``, ``io``, ``engine``, ``inference``, ``methods``) are headless;
only ``_widget`` imports Qt and napari.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
