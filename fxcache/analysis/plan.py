"""`analyse(gm)`: the read-only description of a graph that the variant passes and the runner work from."""

from __future__ import annotations

import dataclasses

import torch
from torch import fx

from ..errors import UnsupportedGraphError
from .blocks import (DEFAULT_BLOCK_LISTS, Block, find_blocks, nested_block_lists, structural_block_lists,
                     without_token_mixing_lists)
from .inputs import input_paths
from .module_stack import is_param_placeholder
from .timestep import check_named_timestep, find_timestep, resolve_timestep_input, sinusoidal_inputs
from .units import Unit, find_units


@dataclasses.dataclass
class GraphPlan:
    """What the analysis found in one Dynamo graph.

    Attributes:
        blocks: transformer blocks in graph order, each with its units.
        timestep_index: placeholder index (= call argument index) of the timestep input.
        timestep_name: that placeholder's name.
        batch: batch size of the block hidden states.
        last_outputs: outputs of the last block (the head's input; cached for SKIP steps).
        num_placeholders: placeholders of the original graph.
        input_shapes: shapes of the user (non-parameter) inputs, by placeholder name.
        input_paths: placeholder index -> the forward argument it is ("timestep", "added_cond_kwargs.resolution").
        forward_params: the model forward's parameter names, when the backend saw the module.
    """

    blocks: list[Block]
    timestep_index: int | None  # None: a piece of a graph-broken forward, stepped by its model call
    timestep_name: str
    batch: int
    last_outputs: list[fx.Node]
    num_placeholders: int
    input_shapes: dict[str, tuple[int, ...]]
    input_paths: dict[int, str] = dataclasses.field(default_factory=dict)
    forward_params: list[str] | None = None
    timestep_found: str = ""  # how the timestep input was found (for explain)
    blocks_found: str = "by name"  # how the block lists were found (for explain)

    @property
    def units(self) -> list[Unit]:
        return [u for b in self.blocks for u in b.units]

    @property
    def partial_units(self) -> list[Unit]:
        return [u for u in self.units if u.partial]

    def token_counts(self) -> list[int]:
        """Distinct token counts of the partially recomputable units, largest first."""
        return sorted({u.tokens for u in self.partial_units}, reverse=True)

    def cache_bytes(self, kinds_need_final: bool = True) -> int:
        total = 0
        for u in self.units:
            for o in u.outputs:
                v = o.meta["example_value"]
                total += v.numel() * v.element_size()
        if kinds_need_final:
            for o in self.last_outputs:
                v = o.meta["example_value"]
                total += v.numel() * v.element_size()
        return total

    def summary(self) -> str:
        if self.timestep_index is None:
            when = f"no timestep input: {self.timestep_found}"
        else:
            when = (f"timestep input `{self.input_paths.get(self.timestep_index, self.timestep_name)}` (graph input "
                    f"#{self.timestep_index}, `{self.timestep_name}`): {self.timestep_found or 'given'}")
        lines = [
            f"{len(self.blocks)} blocks (found {self.blocks_found}), batch {self.batch}, {when}",
            "inputs: " + ", ".join(f"{k}{list(v)}" for k, v in self.input_shapes.items()),
        ]
        for b in self.blocks:
            parts = []
            for u in b.units:
                shapes = "+".join(str(list(o.meta["example_value"].shape)) for o in u.outputs)
                tag = u.kind
                if u.token_wise:
                    tag += f" {u.tokens} tokens" + (" partial" if u.partial else f" reuse-only ({u.why_not})")
                parts.append(f"{u.name.rsplit('.', 1)[-1]}[{tag}] {shapes}")
            lines.append(f"  {b.name} ({b.cls}, {len(b.nodes)} nodes): " + "; ".join(parts))
            for path, why in b.refused.items():
                lines.append(f"    not cached: {path.rsplit('.', 1)[-1]} ({why})")
        lines.append(
            "head input (last block output): "
            + ", ".join(f"{o.name}{list(o.meta['example_value'].shape)}" for o in self.last_outputs)
        )
        lines.append(f"cache memory per branch: {self.cache_bytes() / 2**20:.2f} MiB")
        return "\n".join(lines)


def _symbolic(value) -> bool:
    return isinstance(value, torch.Tensor) and any(not isinstance(s, int) for s in value.shape)


#: how a graph without a timestep input is stepped
FROM_MODEL_CALL = ("the step comes from the model call around this graph (a piece of a forward that graph-breaks, "
                   "or a block compiled on its own)")


def analyse(
    gm: fx.GraphModule,
    *,
    block_lists: tuple[str, ...] = DEFAULT_BLOCK_LISTS,
    timestep_input: int | str | None = None,
    forward_params: list[str] | None = None,
    follow: bool = False,
) -> GraphPlan:
    """Describe `gm` (read-only). Raises UnsupportedGraphError naming what is missing. `follow`: a graph with
    blocks but no timestep input is accepted (timestep_index None): a piece of a forward Dynamo split, whose
    step comes from its model call."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for n in placeholders:
        v = n.meta.get("example_value")
        if _symbolic(v) or isinstance(v, torch.SymInt):
            raise UnsupportedGraphError(
                "the graph has symbolic shapes (Dynamo traced it with dynamic shapes); fxcache needs static "
                "shapes: pass dynamic=False to torch.compile",
                node=n,
            )
    blocks = find_blocks(gm, block_lists)
    found_by = "by name"
    if tuple(block_lists) == DEFAULT_BLOCK_LISTS:
        # a usual name is a hint: lists whose entries mix no tokens give way to those that do, named or found by
        # structure (a list of per-token MLPs called `layers` next to the real blocks); alone, they stay
        mixing = without_token_mixing_lists(blocks)
        if mixing:
            blocks = mixing
        elif structural := structural_block_lists(gm):
            blocks = find_blocks(gm, tuple(structural))
            found_by = f"by structure: {', '.join(structural)}"
    if not blocks:
        nested = nested_block_lists(gm, block_lists)
        hint = (f"; the model holds {', '.join(nested)} below its root (a wrapper): pass "
                f"block_lists={tuple(nested)!r}" if nested else
                " (pass block_lists=(...) naming the ModuleList that holds the blocks)")
        raise UnsupportedGraphError(
            "no transformer blocks found: no node runs inside a module list named " + ", ".join(block_lists) + hint)
    for b in blocks:
        if any(not isinstance(o.meta.get("example_value"), torch.Tensor) for o in b.outputs):
            raise UnsupportedGraphError("a block output is not a tensor", block=b.name)
    batch = blocks[-1].outputs[0].meta["example_value"].shape[0]
    for i, b in enumerate(blocks):
        b.units = find_units(b, batch)
        for u in b.units:
            u.block = i
    if not any(b.units for b in blocks):
        refused = next(((p, why) for b in blocks for p, why in b.refused.items()), None)
        raise UnsupportedGraphError(
            "blocks found, but no attention or feed-forward children in them that can be cached (units are direct "
            "children whose class name contains 'Attention', or that feed the residual stream without a gate in "
            "between)" + (f"; {refused[0]} is not cached: {refused[1]}" if refused else ""),
            block=blocks[0].name,
        )
    if timestep_input is None:
        paths = input_paths(gm, forward_params)
        found = find_timestep(gm, paths, batch)
        if found is None and follow and not sinusoidal_inputs(gm, paths, batch):
            found = (None, None, FROM_MODEL_CALL)
        if found is None:
            several = sinusoidal_inputs(gm, paths, batch)
            why = (f"several inputs reach a sinusoidal embedding ({', '.join(several)}) and none is named for time"
                   if len(several) > 1 else "no graph input feeds a diffusers `Timesteps` module or reaches a "
                   "sinusoidal embedding (sin and cos of the input times frequencies)")
            raise UnsupportedGraphError(
                f"no timestep input found: {why}; pass timestep_input=<name or index of the forward's timestep "
                "parameter> to cache_backend (e.g. timestep_input='t'), and the timestep as a tensor (a Python "
                "number is baked into the graph as a constant)"
            )
        index, node, how = found
    else:
        found = resolve_timestep_input(gm, timestep_input, forward_params)
        if found is None and follow:
            found = (None, None)
        if found is None:
            users = sorted(set(input_paths(gm, forward_params).values()))
            what = (f"the forward's parameter #{timestep_input} ({', '.join(forward_params or ['unknown'])})"
                    if isinstance(timestep_input, int) else repr(timestep_input))
            raise UnsupportedGraphError(f"timestep_input={timestep_input!r}: {what} is not a tensor input of the "
                                        f"traced graph (a Python number is baked into the graph as a constant: "
                                        f"pass the timestep as a tensor); its tensor inputs are: "
                                        f"{', '.join(users)}")
        index, node = found
        if index is not None:
            check_named_timestep(gm, index, timestep_input, input_paths(gm, forward_params), batch)
        how = (f"timestep_input={timestep_input!r}" if index is not None else
               f"the step comes from the model call's {timestep_input!r} (a piece of a forward that graph-breaks, "
               f"or a block compiled on its own)")
    last = blocks[-1].outputs
    shapes = {
        n.name: tuple(n.meta["example_value"].shape)
        for n in placeholders
        if not is_param_placeholder(n) and isinstance(n.meta.get("example_value"), torch.Tensor)
    }
    return GraphPlan(
        blocks=blocks,
        timestep_index=index,
        timestep_name=node.name if node is not None else "",
        timestep_found=how,
        blocks_found=found_by,
        batch=batch,
        last_outputs=list(last),
        num_placeholders=len(placeholders),
        input_shapes=shapes,
        input_paths=input_paths(gm, forward_params),
        forward_params=forward_params,
    )
