"""pumpfleet's shared core: the wire contract, settings, storage schema and local services."""

from pumpfleet import contract

__all__ = ["contract"]
__version__ = "0.1.0"
