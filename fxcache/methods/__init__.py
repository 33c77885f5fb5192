"""Cache methods; importing this package registers each of them."""

from .clusca import ClusCaConfig
from .duca import DuCaConfig
from .fora import FORAConfig
from .schedule import cycle_position
from .taylorseer import TaylorSeerConfig
from .toca import RATIO_SCHEDULES, ToCaConfig

__all__ = [
    "ClusCaConfig", "DuCaConfig", "FORAConfig", "RATIO_SCHEDULES", "TaylorSeerConfig", "ToCaConfig", "cycle_position",
]
