"""Cache methods, one module each: config, schedule, presets and recipe. Importing this package registers them."""

from .clusca import ClusCaConfig
from .dbcache import DBCacheConfig
from .duca import DuCaConfig
from .fbcache import FBCacheConfig
from .fora import FORAConfig
from .magcache import MagCacheConfig
from .recipe import Recipe, recipe_for, register_recipe
from .schedule import cycle_position
from .taylorseer import TaylorSeerConfig
from .teacache import TeaCacheConfig
from .toca import RATIO_SCHEDULES, ToCaConfig

__all__ = [
    "ClusCaConfig", "DBCacheConfig", "DuCaConfig", "FBCacheConfig", "FORAConfig", "MagCacheConfig", "RATIO_SCHEDULES",
    "Recipe", "TaylorSeerConfig", "TeaCacheConfig", "ToCaConfig",
    "cycle_position", "recipe_for", "register_recipe",
]
