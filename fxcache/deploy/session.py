"""`CachedSession`: runs an exported cached transformer, a drop-in for the transformer in a sampling loop.

It is the compiled runner's own logic (`fxcache.runtime.Runner`: the timestep rule for steps and CFG branches,
FULL while a branch lacks caches, token indices drawn once per step from the config's seed, Taylor scalars,
state cleared at FULL steps) with the variants read from the manifest and executed by onnxruntime or TensorRT,
so an exported loop makes the same choices as `torch.compile(..., backend=fxcache.cache_backend(...))`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
from typing import Callable

import torch

from ..backends import get_format
from ..config import CacheConfig
from ..errors import ConfigError, ExportError
from ..export.manifest import Artifact, Manifest, check_digests, confined, read_manifest
from ..graph_io import GraphValue, dtype_from_name, dtype_name
from ..runtime.attach import CONTEXT_NAME
from ..runtime.dispatch import Dispatcher
from ..runtime.fingerprint import conditioning_inputs, latent_input
from ..runtime.records import records
from ..runtime.requests import Request, RequestScope
from ..runtime.runner import Runner, VariantSource
from ..step_plan import StepPlan
from ..variants import first_plans


@dataclasses.dataclass
class ArtifactVariant:
    """What the runner needs to know of a variant, read from an artifact of the manifest."""

    plan: StepPlan
    inputs: list[GraphValue]
    outputs: list[GraphValue]
    num_outputs: int
    single_output: bool
    flops: int
    tokens: int
    writes: list = dataclasses.field(default_factory=list)


class ArtifactVariants(VariantSource):
    """The session's variants: one per exported artifact, found by its plan, run by its executor."""

    def __init__(self, manifest: Manifest, executors: list[Callable]):
        self.num_steps = manifest.num_steps
        self._by_plan: dict[StepPlan, tuple[ArtifactVariant, Callable]] = {}
        for a, executor in zip(manifest.artifacts, executors):
            v = ArtifactVariant(a.step_plan(), a.extra_inputs(), a.written(), a.num_outputs, a.single_output,
                                a.flops, a.tokens)
            self._by_plan[v.plan] = (v, executor)

    def variant(self, plan: StepPlan) -> ArtifactVariant:
        found = self._by_plan.get(plan)
        if found is None:
            raise ExportError(f"no exported artifact for the {plan.label} plan a step beyond the exported "
                              f"num_steps={self.num_steps} asks for; export again with num_steps covering the "
                              f"sampler's steps")
        return found[0]

    def callable(self, plan: StepPlan, variant, args) -> Callable:
        return self._by_plan[plan][1]


class CachedSession:
    """Run an export folder: `session(**transformer_kwargs)` like the transformer, one call per model evaluation.

    Args:
        folder: written by `fxcache.export` (`manifest.json` + one artifact per variant).
        providers: onnxruntime providers (default CPU; e.g. ["CUDAExecutionProvider", "CPUExecutionProvider"]).

    For diffusers pipelines it offers `config` (the transformer's config), `dtype`, `device` and a no-op
    `cache_context` (its name is the CFG branch); `reset()` frees every request's caches; `stats()` has one record per
    call. `trust_remote_code=True` is needed to load `format="tensorrt"` folders (their programs are unpickled).
    """

    def __init__(self, folder: str, providers: list[str] | None = None, *, trust_remote_code: bool = False,
                 max_branches: int = 3, max_records: int = 100_000):
        from ..api import _check_bool

        _check_bool("trust_remote_code", trust_remote_code)  # "False" or 1 must never count as consent
        for name, value in (("max_branches", max_branches), ("max_records", max_records)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
        providers = _check_providers(providers)
        self.folder = folder
        self.manifest = read_manifest(folder)
        m = self.manifest
        try:
            self.cache_config = CacheConfig.from_dict(m.config)
        except Exception as exc:  # an unknown method or option from another fxcache version
            raise ExportError(f"the manifest's cache config cannot be read: {exc}") from None
        self.dispatcher = Dispatcher(self.cache_config, m.graph_view())
        _check_config(m, self.cache_config, self.dispatcher)
        if m.format == "onnx" and providers is not None:
            _check_provider_names(providers)
        self.providers = providers
        self.trust_remote_code = trust_remote_code
        self.scope = RequestScope(max_branches=max_branches, max_records=max_records)
        self.config = _model_config(m.model_config)
        self.dtype = dtype_from_name(m.user_inputs[0].dtype) if m.user_inputs else torch.float32
        names = [p if isinstance(p, str) else p[0] for p in providers or ()]
        self.device = torch.device("cuda" if any("CUDA" in p or "Tensorrt" in p for p in names)
                                   else "cpu") if m.format == "onnx" else torch.device("cuda")
        if m.format == "tensorrt" and not trust_remote_code:
            raise ExportError(
                f"{folder!r} holds TensorRT programs (.ep files), which torch.export.load unpickles: a crafted file "
                "can run any code on this machine. Load only folders you made or trust, with "
                "CachedSession(folder, trust_remote_code=True)")
        # load every artifact now: a broken or foreign file is an error here, not in the middle of a generation
        executors = [self._executor(a, f"artifacts[{i}]") for i, a in enumerate(m.artifacts)]
        if m.format == "onnx":
            timestep = m.user_inputs[m.timestep_input].name
            full = executors[next(i for i, a in enumerate(m.artifacts) if a.kind == "full")]
            if all(name != timestep for _, name in full.feed):
                raise ExportError(f"manifest field timestep_input names {timestep!r}, which the full artifact does "
                                  f"not take")
        paths = {i: t.name for i, t in enumerate(m.user_inputs)}
        self._runner = Runner(backend=self, graph_id=0, dispatcher=self.dispatcher,
                              source=ArtifactVariants(m, executors), timestep_index=m.timestep_input,
                              conditioning=conditioning_inputs(m.timestep_input, paths), param_indices=[],
                              latents=latent_input(m.timestep_input, paths))

    def _executor(self, artifact: Artifact, where: str):
        path = confined(self.folder, artifact.file)
        check_digests(self.folder, artifact, where)  # before a TensorRT program is unpickled, too
        if self.manifest.format == "onnx":
            return get_format("onnx").executor(path, artifact.inputs, artifact.outputs, self.providers)
        return get_format("tensorrt").executor(path, artifact.inputs, artifact.outputs)

    # -- the runner's backend interface ----------------------------------------------------------------------
    def _warn_once(self, message: str, key: str | None = None) -> None:
        self.scope.warn_once(message, key)

    @property
    def records(self):
        return self.scope.records

    # -- user interface --------------------------------------------------------------------------------------
    def __call__(self, *args, return_dict: bool = True, **kwargs):
        if args:  # diffusers transformers take hidden_states first
            if "hidden_states" in kwargs or len(args) > 1:
                raise ConfigError("pass the transformer inputs as keyword arguments (hidden_states=..., ...)")
            kwargs["hidden_states"] = args[0]
        self._refuse_unexported(kwargs)
        inputs = [self._input(spec, kwargs, i == self.manifest.timestep_input)
                  for i, spec in enumerate(self.manifest.user_inputs)]
        with torch.no_grad():
            out = self._runner(*inputs)
        outs = [out] if isinstance(out, torch.Tensor) else list(out)
        structure = self.manifest.output_structure
        if structure == "tensor":
            return outs[0]
        if return_dict and structure == "model_output":
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=outs[0])
        return tuple(outs)

    forward = __call__

    def _refuse_unexported(self, kwargs: dict) -> None:
        """An argument that carries data (not None, not a dict of None) but is no input of the export: the
        artifacts would run as if it were not given (an attention mask ignored), so it is refused."""
        names = {t.name for t in self.manifest.user_inputs}
        found, todo, seen = [], [("", kwargs)], set()
        while todo:  # without recursion: nested dicts (added_cond_kwargs) name their inputs by path
            prefix, values = todo.pop()
            if id(values) in seen:
                continue
            seen.add(id(values))
            for key, value in values.items():
                path = f"{prefix}{key}"
                if value is None or path in names:
                    continue
                if isinstance(value, dict):
                    todo.append((path + ".", value))
                else:
                    found.append(path)
        if found:
            shown = ", ".join(repr(p) for p in sorted(found))
            takes = ", ".join(t.name for t in self.manifest.user_inputs)
            raise ConfigError(f"the export has no input {shown} (it takes {takes}), so the artifacts would run as if "
                              f"it were not given: leave it out (or pass None), or export again with it in "
                              f"example_inputs")

    def _input(self, spec, kwargs, is_timestep: bool) -> torch.Tensor:
        value = kwargs
        for part in spec.name.split("."):
            if not isinstance(value, dict) or part not in value:
                given = ", ".join(sorted(kwargs))
                raise ConfigError(f"missing input {spec.name!r}; the export takes "
                                  f"{', '.join(s.name for s in self.manifest.user_inputs)} (given: {given})")
            value = value[part]
        value = _as_tensor(spec.name, value, is_timestep)
        want = dtype_from_name(spec.dtype)
        if is_timestep:  # pipelines pass t as a scalar, a 0-d or a (B,) tensor, in their scheduler's dtype
            if value.is_floating_point():  # NaN would derail the step rule; huge values overflow an int cast
                ok = torch.isfinite(value) if want.is_floating_point else value.abs() < 2**62
                if not bool(ok.all()):
                    raise ConfigError(f"input {spec.name!r} (the timestep) must be a finite number"
                                      f"{'' if want.is_floating_point else ' below 2**62'}, got "
                                      f"{value.reshape(-1)[:4].tolist()}")
            if value.numel() == 1:
                value = value.reshape(1).expand(spec.shape)
            if list(value.shape) == list(spec.shape) and value.dtype != want:
                cast = value.to(want)
                if not torch.equal(cast.to(value.dtype), value):  # t=900.5 would run as 900
                    raise ConfigError(f"input {spec.name!r} (the timestep) is {dtype_name(value.dtype)} "
                                      f"{value.reshape(-1)[:4].tolist()}, which would change to "
                                      f"{cast.reshape(-1)[:4].tolist()} in the export's input: the export takes "
                                      f"{spec.dtype}. Pass the timestep as {spec.dtype}, or export again with a "
                                      f"timestep of the dtype the sampler uses")
                value = cast
        if list(value.shape) != list(spec.shape):
            raise ConfigError(f"input {spec.name!r} has shape {tuple(value.shape)}, but {self.folder!r} was exported "
                              f"for {tuple(spec.shape)}; shapes are static: export again with inputs of this shape")
        if value.dtype != want:
            raise ConfigError(f"input {spec.name!r} has dtype {value.dtype}, the export takes {want}")
        return value

    def reset(self) -> None:
        """Free the caches of every request; the next call starts a new generation."""
        self.scope.reset()

    def _reset_stateful_cache(self, *args, **kwargs) -> None:
        """diffusers pipelines call this at the end of every `__call__`: the caller's request ends there."""
        self.scope.end_current()

    def request(self) -> Request:
        """A new request: `with session.request(): ...` (see `fxcache.request`)."""
        return Request((self.scope,))

    def stats(self) -> list[dict]:
        return records(self.scope.records)

    def cache_bytes(self) -> int:
        return self.scope.cache_bytes()

    def step(self, index: int, branch: int = 0):
        """Calls inside run as step `index` of CFG branch `branch` (for samplers whose timesteps repeat)."""
        from ..api import _check_step

        _check_step(index, branch)
        return self.scope.step(index, branch)

    @contextlib.contextmanager
    def cache_context(self, name: str, **kwargs):
        """diffusers pipelines wrap each call in `transformer.cache_context("cond" / "uncond")`: the CFG branch."""
        token = CONTEXT_NAME.set(name if isinstance(name, str) else None)
        try:
            yield
        finally:
            CONTEXT_NAME.reset(token)

    def __repr__(self) -> str:
        kinds = ", ".join(a.step_plan().label for a in self.manifest.artifacts)
        return f"CachedSession({self.folder!r}, {self.manifest.method}, {self.manifest.format}: {kinds})"


def _as_tensor(name: str, value, is_timestep: bool) -> torch.Tensor:
    """A call input as a tensor: tensors as they are; numbers and lists of numbers (a pipeline's scalar timestep)
    converted; anything else a ConfigError naming the input."""
    accepted = "a tensor or a number" if is_timestep else "a tensor"
    if isinstance(value, torch.Tensor):
        return value
    if value is None or isinstance(value, (bool, str, bytes, dict)):
        raise ConfigError(f"input {name!r} must be {accepted}, got {type(value).__name__} {value!r}"[:300])
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise ConfigError(f"input {name!r} must be {accepted}, got {type(value).__name__}, which torch cannot "
                          f"convert: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def _check_providers(providers) -> list | None:
    """None, or a list of onnxruntime providers: names, or (name, options dict) pairs as onnxruntime takes them."""
    accepted = ("a non-empty list of onnxruntime execution provider names (or (name, options) pairs), e.g. "
                "['CUDAExecutionProvider', 'CPUExecutionProvider'], or None for the CPU")
    if providers is None:
        return None
    if not isinstance(providers, (list, tuple)) or not providers:  # a str would be read as a list of letters
        raise ConfigError(f"providers must be {accepted}; got {providers!r}")
    for p in providers:
        name = p[0] if isinstance(p, tuple) and len(p) == 2 and isinstance(p[1], dict) else p
        if not isinstance(name, str) or not name:
            raise ConfigError(f"providers must be {accepted}; got the entry {p!r}")
    return list(providers)


def _check_provider_names(providers: list) -> None:
    """Names onnxruntime knows (it would silently fall back to the CPU for a misspelt one); a known provider this
    build lacks still falls back, as onnxruntime does, so one providers list serves CPU and GPU machines."""
    from ..backends import require
    from ..backends.onnx import INSTALL

    ort = require("onnxruntime", INSTALL, "running ONNX artifacts")
    known = ort.get_all_providers()
    for p in providers:
        name = p if isinstance(p, str) else p[0]
        if name not in known:
            raise ConfigError(f"unknown onnxruntime provider {name!r}; onnxruntime knows {', '.join(known)}")


def _check_config(manifest: Manifest, config: CacheConfig, dispatcher: Dispatcher) -> None:
    """The manifest's config against its artifacts, before any call: the plan the config gives each exported step
    is the plan of the artifact the schedule names, the FULL plan has its artifact, no artifact is one the config
    never runs, and each artifact's runtime-made inputs are what the config implies (the recipe's `check_io`), so
    a mismatch is an ExportError naming the field now, not an error mid-generation."""
    if config.method != manifest.method:
        raise ExportError(f"manifest field config.method is {config.method!r} but method is {manifest.method!r}")
    plans = [a.step_plan() for a in manifest.artifacts]
    if len(set(plans)) != len(plans):
        raise ExportError("manifest field artifacts has two artifacts of one plan")
    if dispatcher.full not in plans:
        raise ExportError(f"manifest field artifacts has no artifact of the {dispatcher.full.label} plan its config "
                          f"{config!r} runs while caches are missing; export the model again with this config")
    expected = set(first_plans(config, dispatcher.view))
    for step, j in enumerate(manifest.schedule):
        want = dispatcher.scheduled(step)
        expected.add(want)
        if plans[j] != want:
            raise ExportError(f"manifest field schedule[{step}] runs artifacts[{j}], a {plans[j].describe()} plan, "
                              f"but its config {config!r} plans {want.describe()} for step {step}: the artifacts "
                              f"were exported with another config")
    recipe = dispatcher.recipe
    for i, (a, plan) in enumerate(zip(manifest.artifacts, plans)):
        if plan not in expected:
            raise ExportError(f"manifest field artifacts[{i}] is a {plan.label} plan, which its config {config!r} "
                              f"never runs: the artifacts were exported with another config")
        problem = recipe.check_io(plan, dispatcher.view, a.extra_inputs())
        if problem:
            raise ExportError(f"manifest field artifacts[{i}].inputs: {problem}: the artifacts were exported with "
                              f"another config than {config!r}")


def _model_config(data: dict):
    try:
        from diffusers.configuration_utils import FrozenDict

        return FrozenDict(data)
    except ImportError:  # attribute access without diffusers
        return types.SimpleNamespace(**data)
