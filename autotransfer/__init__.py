"""autotransfer: search how to transfer a pretrained CNN to your images, and ship the winner as ONNX."""

__version__ = "0.1.0"

from autotransfer.backbones import Backbone, get_backbone, list_backbones  # noqa: E402
from autotransfer.data import ImageData, load_data  # noqa: E402
from autotransfer.errors import AutotransferError, ConfigError, DataError, ExportError  # noqa: E402
from autotransfer.report import leaderboard  # noqa: E402
from autotransfer.strategy import Strategy, suggest_strategy  # noqa: E402

__all__ = [
    "AutotransferError", "Backbone", "ConfigError", "DataError", "ExportError", "ImageData", "Strategy",
    "__version__", "get_backbone", "leaderboard", "list_backbones", "load_data", "suggest_strategy",
]
