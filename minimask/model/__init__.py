"""The RetinaMask detector, assembled from ``minimask.layers``.

>>> from minimask.model import RetinaMask, Config
>>> model = RetinaMask(Config.preset("tiny", num_classes=3))
"""
from minimask.model.config import Config
from minimask.model.retinamask import RetinaMask

__all__ = ["Config", "RetinaMask"]
