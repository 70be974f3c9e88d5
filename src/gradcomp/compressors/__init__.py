"""Every compressor family; importing this package registers them all."""

from . import dense, powersgd, quantize, sparse  # noqa: F401  (registration)
from .base import Compressor, Exchange, Exchanged, Payload, available, get, register

__all__ = ["Compressor", "Exchange", "Exchanged", "Payload", "available", "get", "register"]
