"""autotransfer: search how to transfer a pretrained CNN to your images, and ship the winner as ONNX.

Names are imported on first use (PEP 562), so `autotransfer predict` and `import autotransfer.predict` never
import torch: the GPU inference image ships without it.
"""

from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "Backbone": "backbones", "get_backbone": "backbones", "list_backbones": "backbones",
    "ImageData": "data", "load_data": "data",
    "AutotransferError": "errors", "ConfigError": "errors", "DataError": "errors", "ExportError": "errors",
    "Strategy": "strategy", "suggest_strategy": "strategy", "leaderboard": "report",
}

__all__ = [
    "AutotransferError", "Backbone", "ConfigError", "DataError", "ExportError", "ImageData", "Strategy",
    "__version__", "get_backbone", "leaderboard", "list_backbones", "load_data", "suggest_strategy",
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(f"autotransfer.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'autotransfer' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
