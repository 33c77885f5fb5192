"""Cache methods; importing this package registers each of them."""

from .duca import DuCaConfig
from .fora import FORAConfig
from .schedule import cycle_position

__all__ = ["DuCaConfig", "FORAConfig", "cycle_position"]
