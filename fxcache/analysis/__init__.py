"""Read-only graph analysis: blocks, units, timestep input."""

from .blocks import DEFAULT_BLOCK_LISTS, Block, find_blocks
from .plan import GraphPlan, analyse
from .timestep import find_timestep, find_timestep_input
from .units import ATTN, MLP, XATTN, Unit, find_units, rowwise

__all__ = [
    "ATTN", "MLP", "XATTN", "DEFAULT_BLOCK_LISTS", "Block", "GraphPlan", "Unit",
    "analyse", "find_blocks", "find_timestep", "find_timestep_input", "find_units", "rowwise",
]
