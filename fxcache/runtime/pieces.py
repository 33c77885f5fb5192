"""The runner of a graph that is a piece of a forward Dynamo split (`analysis/pieces.py`): its step and CFG branch
come from its model call (`calls.py`), shared by every piece of that call; its blocks are placed in the whole
model, so its plans are the whole model's plans, cut to its blocks."""

from __future__ import annotations

import sys
import threading
import weakref

import torch

from ..analysis.pieces import coordinates, entry_of, module_block_lists, module_calls, module_path, owns
from ..step_plan import GraphView
from ..config import StepKind
from .attach import attach
from .calls import CallState, find_model_call, misnamed_timestep
from .dispatch import Dispatcher
from .runner import _CALLS, Runner, locate, observe
from .state import GraphState


def _compiled_root(model):
    """The module `torch.compile` wrapped (an `OptimizedModule` on the stack) when it holds `model`, else None."""
    for wrapper, _ in module_calls(sys._getframe(2)):
        inner = getattr(wrapper, "_orig_mod", None)
        if isinstance(inner, torch.nn.Module) and (inner is model or any(m is model for m in inner.modules())):
            return inner
    return None


class RecentBlocks:
    """Per thread and model, the token counts of each block's recomputable units (by the block's path in the
    model) as the latest call ran them. A model call runs its blocks in order in one thread, so the blocks before a
    piece were run by the call in hand, at its size: where the piece's rows of a step's token draw start does not
    depend on the sizes compiled before."""

    def __init__(self):
        self._local = threading.local()

    def _of(self, model) -> dict:
        recent = getattr(self._local, "models", None)
        if recent is None:
            recent = self._local.models = weakref.WeakKeyDictionary()
        blocks = recent.get(model)
        if blocks is None:
            blocks = recent[model] = {}
        return blocks

    def note(self, model, blocks: dict[str, list[int]]) -> None:
        self._of(model).update(blocks)

    def get(self, model, name: str) -> list[int] | None:
        return self._of(model).get(name)


class PieceInfo:
    """What a piece learns of its model on its state's first call: the model, its dispatcher there, and the token
    counts of its blocks under their paths in the model."""

    def __init__(self, model, dispatcher: Dispatcher | None, blocks: dict[str, list[int]] | None = None):
        self.model_ref = weakref.ref(model) if model is not None else None
        self.dispatcher = dispatcher
        self.blocks = blocks or {}
        self.seq = -1  # the model call whose dropped / new branches this state applied
        self.shared = False  # called twice in one model call: runs uncached


class PieceRunner(Runner):
    """`root_cls`: the class of the module whose forward the graph was traced from; `block_root`: the block path
    the graph was read as (a block's own forward), or None (a graph rooted at the model)."""

    def __init__(self, *, root_cls: type, block_root: str | None, **kw):
        super().__init__(**kw)
        self.root_cls, self.block_root = root_cls, block_root
        self._dispatchers: dict[tuple, Dispatcher] = {}

    def _device(self, args):
        first = self._param_indices[0] if self._param_indices else 0
        return args[first].device

    # -- which model, and where its blocks sit ------------------------------------------------------------------
    def _discover(self, args) -> PieceInfo:
        """The module instance this call runs in (the graph's root, told by its parameters), the model call
        around it, and the view of this piece's blocks in that model."""
        param = args[self._param_indices[0]] if self._param_indices else None
        root = None

        def accepts(module):
            nonlocal root
            if root is None:
                if isinstance(module, self.root_cls) and (param is None or owns(module, param)):
                    root = module
                    return self.block_root is None  # a block is never its own model call
                return False
            return True

        call = find_model_call(accepts, self.backend.timestep_input)
        if call is None or root is None:
            return PieceInfo(None, None)
        model = call.model
        where = module_path(model, root)
        if where is None:
            return PieceInfo(None, None)
        attach(model, self.backend)
        named = _compiled_root(model)  # unit names (draw seeds) as the whole compiled module's graph has them
        outer = module_path(named, model) if named is not None else ""
        outer = f"{outer}." if outer else ""
        prefix = f"{where}." if where else ""
        names = [b.name for b in self.plan.blocks]
        if self.block_root is not None:
            where = entry_of(model, where)  # the block-list entry the graph's root is (or lies in)
            if where is None:
                return PieceInfo(None, None)
        full = [where if self.block_root is not None else prefix + n for n in names]
        coords = coordinates(model, full)
        if any(n not in coords for n in full):
            return PieceInfo(None, None)
        view = GraphView.of(self.plan, {n: coords[f] for n, f in zip(names, full)})
        blocks = {n: outer + f for n, f in zip(names, full)}
        offsets = self._row_offsets(model, full[0], coords[full[0]]) if full else {}
        key = (view, tuple(sorted(blocks.items())), tuple(sorted(offsets.items())))
        dispatcher = self._dispatchers.get(key)
        if dispatcher is None:
            dispatcher = self._dispatchers.setdefault(key, Dispatcher(self.config, view, blocks, offsets))
        return PieceInfo(model, dispatcher, {f: self._block_tokens[n] for n, f in zip(names, full)})

    def _row_offsets(self, model, first: str, where: tuple[int, int, int]) -> dict[int, int]:
        """Token count -> the recomputable units of that stream in the model's blocks before `first` (in list
        order, then layer): where this piece's rows start in a step's token draw of the whole model (DuCa draws
        one row per unit). A block's units are those the call in hand ran it with (`RecentBlocks`), else those of
        the graph that holds it (an earlier piece, the graph of the model's start), else those of a graph traced
        from a block of its class."""
        recent = self.backend.recent_blocks
        by_name, by_class = {}, {}
        for runner in list(self.backend.runners):
            plan = getattr(runner, "plan", None)
            if plan is None:
                continue
            root = getattr(runner, "block_root", None)
            for block in plan.blocks:
                tokens = [u.tokens for u in block.units if u.partial]
                by_class.setdefault(block.cls, tokens)
                if root is None and not isinstance(runner, PieceRunner):
                    by_name[block.name] = tokens
        layer, _, list_index = where
        counts: dict[int, int] = {}
        for li, lst in enumerate(module_block_lists(model)):
            if li > list_index:
                break
            entries = model.get_submodule(lst)
            for i, entry in enumerate(entries):
                if li == list_index and i >= layer:
                    break
                name = f"{lst}.{i}"
                tokens = recent.get(model, name)
                if tokens is None:
                    tokens = by_name.get(name, by_class.get(type(entry).__name__, []))
                for t in tokens:
                    counts[t] = counts.get(t, 0) + 1
        return counts

    def _info(self, state: GraphState, args) -> PieceInfo:
        info = getattr(state, "piece", None)
        if info is None or (info.model_ref is not None and info.model_ref() is None):
            info = state.piece = self._discover(args)
        return info

    def _dispatcher_of(self, state: GraphState) -> Dispatcher:
        return state.piece.dispatcher

    # -- the step, from the model call ----------------------------------------------------------------------------
    def _locate(self, state: GraphState, request, args):
        info = self._info(state, args)
        model = info.model_ref() if info.model_ref is not None else None
        call = find_model_call(None, self.backend.timestep_input, model=model) if model is not None else None
        if call is None:
            why = misnamed_timestep(self.backend.timestep_input) or (
                f"graph {self.graph_id} holds transformer blocks but no timestep input found: it is a piece of a "
                f"forward that graph-breaks (or a block compiled on its own), and no module around it takes the "
                f"timestep as a tensor (a forward parameter named timestep, t, sigma, ...); pass "
                f"timestep_input=<name or index of the model forward's timestep parameter> to cache_backend")
            if self.backend.strict:
                from ..errors import UnsupportedGraphError

                raise UnsupportedGraphError(why)
            self.backend._warn_once(f"fxcache: running graph {self.graph_id} uncached: {why}",
                                    key=f"piece-{self.graph_id}")
            return None
        calls = request.state(self.backend.call_keeper, id(model),
                              lambda: CallState(self.scope, continue_unmatched=not request.implicit))
        if not calls.same_call(call.marker):
            self._locate_call(calls, call)
        pos = calls.position
        if info.seq == calls.seq or info.shared:  # a second call in one model call: a block used twice (shared)
            if not info.shared:
                info.shared = True
                self.backend._warn_once(
                    f"fxcache: graph {self.graph_id}: one block runs more than once per model call (its weights "
                    f"are shared between positions): it runs uncached", key=f"shared-{self.graph_id}")
            return None
        info.seq = calls.seq  # this state's first call in this model call: the call's dropped / new branches
        self.backend.recent_blocks.note(model, info.blocks)
        for slot in pos.dropped:
            state.drop(slot)
        if pos.new:
            state.restart(pos.branch)
        state.call_state = calls
        return pos, calls.t

    def _locate_call(self, calls: CallState, call) -> None:
        """The position of a new model call (one host read of its timestep and conditioning)."""
        t, fingerprint, sample = observe(call.timestep, call.conditioning, call.latents)
        calls.marker, calls.t = call.marker, t
        calls.seq += 1
        calls.position = locate(self.scope, calls.tracker, t, fingerprint, sample)

    def _run_alone(self, args):
        """Run the FULL variant and keep nothing: a call whose step cannot be known."""
        plan = self.dispatcher.full
        variant = self.source.variant(plan)
        full_args = list(args)
        if variant.inputs:  # FULL of a forecasting method takes per-step inputs: give it a fresh state's
            from .state import GraphState

            scratch = GraphState(self)
            given = self.dispatcher.step_inputs(scratch, variant, plan, 0, 0, self._device(args))
            full_args += scratch.store.inputs(0, variant.inputs, given, self._device(args))
        fn = self.source.callable(plan, variant, full_args)
        result = fn(*full_args)
        n = variant.num_outputs
        self.scope.record(graph=self.graph_id, call=next(_CALLS), step=-1, branch=0, kind=StepKind.FULL.value,
                          plan=None, tokens=None, flops=None, t=None, cached=False,
                          request=self.scope.current().id, cache_bytes=0)
        outs = result[:n]
        return outs[0] if variant.single_output else tuple(outs)

    def _forget(self, state: GraphState, branch: int) -> None:
        calls = getattr(state, "call_state", None)
        if calls is not None:
            calls.tracker.forget(branch)


def piece_runner(backend, graph_id: int, gm, graph, variants: dict, *, root_cls: type, block_root: str | None,
                 mode=None, options=None) -> PieceRunner:
    """The runner of a graph with blocks but no timestep input (`analyse(..., follow=True)`)."""
    from .fingerprint import parameter_inputs
    from .runner import GraphVariants

    cudagraphs = mode == "reduce-overhead" or bool((options or {}).get("triton.cudagraphs"))
    inplace = cudagraphs if backend.inplace is None else bool(backend.inplace)
    source = GraphVariants(gm, graph, backend.config, variants, lowering=backend.lowering, mode=mode,
                           options=options, inplace=inplace)
    return PieceRunner(backend=backend, graph_id=graph_id, dispatcher=Dispatcher(backend.config, GraphView.of(graph)),
                       source=source, timestep_index=None, conditioning=[], param_indices=parameter_inputs(gm),
                       inplace=inplace, cudagraphs=cudagraphs, plan=graph,
                       keep_example_args=backend.keep_example_inputs, root_cls=root_cls, block_root=block_root)
