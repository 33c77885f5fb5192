"""`CachedSession`: runs an exported cached transformer, a drop-in for the transformer in a sampling loop.

It is the compiled runner's own logic (`fxcache.runtime.Runner`: the timestep rule for steps and CFG branches,
FULL while a branch lacks caches, token indices drawn once per step from the config's seed, Taylor scalars,
state cleared at FULL steps) with the variants read from the manifest and executed by onnxruntime or TensorRT,
so an exported loop makes the same choices as `torch.compile(..., backend=fxcache.cache_backend(...))`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import types
from typing import Callable

import torch

from ..config import CacheConfig, StepKind
from ..errors import ConfigError, ExportError
from ..export.graph import dtype_from_name
from ..export.manifest import Artifact, Manifest, confined, read_manifest
from ..runtime.requests import CONTEXT_NAME, Request, RequestScope
from ..runtime.runner import Runner
from ..variants import ExtraInput, schedule_key

@dataclasses.dataclass
class VariantSpec:
    """What the runner needs to know of a variant, read from an artifact of the manifest."""

    kind: StepKind
    extra_inputs: list[ExtraInput]
    extra_outputs: list[str]
    num_outputs: int
    single_output: bool
    flops: int
    tokens: int
    artifact: Artifact

    @classmethod
    def of(cls, a: Artifact) -> "VariantSpec":
        extras = []
        for t in a.inputs:
            if t.role.startswith("extra:"):
                _, kind, key = t.role.split(":", 2)
                extras.append(ExtraInput(kind, key, tuple(t.shape), dtype_from_name(t.dtype)))
        caches = [t.role.split(":", 1)[1] for t in a.outputs if t.role.startswith("cache:")]
        return cls(StepKind(a.kind), extras, caches, a.num_outputs, a.single_output, a.flops, a.tokens, a)


class _SessionRunner(Runner):
    """The compiled runner with variants from the manifest and executors instead of lowerings."""

    def __init__(self, session: "CachedSession", manifest: Manifest, config: CacheConfig,
                 executors: dict[tuple[str, int], Callable]):
        specs = {}
        first = schedule_key(config, config.warmup)
        for a in manifest.artifacts:
            kind = StepKind(a.kind)
            if kind is not StepKind.PARTIAL or a.schedule_key == first or kind not in specs:
                specs[kind] = VariantSpec.of(a)
        plan = types.SimpleNamespace(timestep_index=manifest.timestep_input, forward_params=None,
                                     input_paths={i: t.name for i, t in enumerate(manifest.user_inputs)})
        super().__init__(backend=session, graph_id=0, plan=plan, config=config, variants=specs, lowering="eager")
        self.manifest = manifest
        self.executors = executors
        self._specs: dict[tuple[StepKind, int], VariantSpec] = {}

    def _variant(self, kind: StepKind, step: int):
        key = schedule_key(self.config, step) if kind is StepKind.PARTIAL else 0
        spec = self._specs.get((kind, key))
        if spec is None:
            spec = self._specs[(kind, key)] = VariantSpec.of(self.manifest.artifact(kind.value, key))
            self._state_keys |= {e.key for e in spec.extra_inputs if e.kind == "state"}
        return spec, key

    def _lowered(self, kind: StepKind, key: int, variant: VariantSpec, args) -> Callable:
        return self.executors[(kind.value, key)]


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
        _check_config(m, self.cache_config)
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
        executors = {(a.kind, a.schedule_key): self._executor(a) for a in m.artifacts}
        if m.format == "onnx":
            timestep = m.user_inputs[m.timestep_input].name
            full = executors[("full", next(a.schedule_key for a in m.artifacts if a.kind == "full"))]
            if all(name != timestep for _, name in full.feed):
                raise ExportError(f"manifest field timestep_input names {timestep!r}, which the full artifact does "
                                  f"not take")
        self._runner = _SessionRunner(self, m, self.cache_config, executors)

    def _executor(self, artifact: Artifact):
        path = confined(self.folder, artifact.file)
        if self.manifest.format == "onnx":
            from ..export.onnx import OnnxExecutor

            return OnnxExecutor(path, artifact.inputs, artifact.outputs, self.providers)
        from ..export.tensorrt import TensorRTExecutor

        return TensorRTExecutor(path, artifact.inputs, artifact.outputs)

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
            if list(value.shape) == list(spec.shape):
                value = value.to(want)
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
        return [dict(r) for r in self.scope.records]

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
        kinds = ", ".join(f"{a.kind}" + (f"@{a.schedule_key}" if a.schedule_key else "") for a in self.manifest.artifacts)
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
    from ..export.api import require
    from ..export.onnx import INSTALL

    ort = require("onnxruntime", INSTALL, "running ONNX artifacts")
    known = ort.get_all_providers()
    for p in providers:
        name = p if isinstance(p, str) else p[0]
        if name not in known:
            raise ConfigError(f"unknown onnxruntime provider {name!r}; onnxruntime knows {', '.join(known)}")


def _check_config(manifest: Manifest, config: CacheConfig) -> None:
    """The manifest's config against its artifacts, before any call: every step kind the config's schedule uses
    has its artifact, none it never uses is there, and each artifact's runtime-made inputs are what the config
    implies (Taylor scalars of its order, token counts of its ratio, k-means starts of its cluster count), so a
    mismatch is an ExportError naming the field now, not a KeyError or an onnxruntime error mid-generation."""
    if config.method != manifest.method:
        raise ExportError(f"manifest field config.method is {config.method!r} but method is {manifest.method!r}")
    kinds = {a.kind for a in manifest.artifacts}
    for kind in sorted(k.value for k in config.kinds):
        if kind not in kinds:
            raise ExportError(f"manifest field artifacts has no {kind} artifact, which its config {config!r} uses "
                              f"(it has {', '.join(sorted(kinds))}); export the model again with this config")
    used = {k.value for k in config.kinds}
    for i, a in enumerate(manifest.artifacts):
        if a.kind not in used:
            raise ExportError(f"manifest field artifacts[{i}].kind is {a.kind}, which its config {config!r} never "
                              f"runs: the artifacts were exported with another config")
    partial_keys = {a.schedule_key for a in manifest.artifacts if a.kind == "partial"}
    for i, entry in enumerate(manifest.schedule):
        if entry["kind"] not in used:
            raise ExportError(f"manifest field schedule[{i}].kind is {entry['kind']}, which its config {config!r} "
                              f"never runs")
        if entry["kind"] == "partial" and entry["schedule_key"] not in partial_keys:
            raise ExportError(f"manifest field schedule[{i}].schedule_key is {entry['schedule_key']}, for which "
                              f"artifacts has no partial artifact")
    order = config.taylor_order
    clusters = getattr(config, "clusters", None)
    in_graph = getattr(config, "selects_in_graph", False)
    for i, a in enumerate(manifest.artifacts):
        extras = {}
        for j, t in enumerate(a.inputs):
            if not t.role.startswith("extra:"):
                continue
            _, kind, key = t.role.split(":", 2)
            extras.setdefault(kind, []).append(t)
            field = f"manifest field artifacts[{i}].inputs[{j}]"
            if kind in ("coef", "diff"):
                if order is None:
                    raise ExportError(f"{field} is a Taylor {kind} input, but its config {config!r} keeps no "
                                      f"Taylor factors")
                want = [order + 1] if kind == "coef" else [order]
                if t.shape != want:
                    raise ExportError(f"{field}.shape is {t.shape}, but config.order={order} needs {want}: the "
                                      f"artifacts were exported with another order")
            elif kind == "idx":
                tokens = int(key.split(":")[1])
                if in_graph or StepKind.PARTIAL not in config.kinds:
                    raise ExportError(f"{field} takes token indices, which its config {config!r} does not draw")
                if t.shape[1] != config.tokens_for(tokens):
                    raise ExportError(f"{field}.shape is {t.shape}, but its config recomputes "
                                      f"{config.tokens_for(tokens)} of {tokens} tokens: the artifacts were exported "
                                      f"with another ratio")
            elif kind == "kinit":
                tokens = int(key.split(":")[1])
                if clusters is None:
                    raise ExportError(f"{field} takes k-means starts, but its config {config!r} runs no k-means")
                if t.shape != [min(clusters, tokens)]:
                    raise ExportError(f"{field}.shape is {t.shape}, but config.clusters={clusters} needs "
                                      f"{[min(clusters, tokens)]}: the artifacts were exported with another count")
        where = f"manifest field artifacts[{i}].inputs"
        if order is not None and a.kind in ("forecast", "cluster") and "coef" not in extras:
            raise ExportError(f"{where} lacks the Taylor coefficients (extra:coef:...) its {a.kind} step takes")
        if order and a.kind == "full" and len(config.kinds) > 1 and "diff" not in extras:
            raise ExportError(f"{where} lacks the Taylor step differences (extra:diff:...) of config.order={order}")
        if in_graph and a.kind == "partial":  # ToCa: random scores are drawn by the runtime, others computed
            score = getattr(config, "score", None)
            scored = any(t.role.startswith("extra:cache:tocascore:") for t in a.inputs)
            if (extras.get("rand") and score != "random") or (scored and score in ("random", "staleness")):
                raise ExportError(f"{where} are those of another token score than its config's score={score!r}: the "
                                  f"artifacts were exported with another score")


def _model_config(data: dict):
    try:
        from diffusers.configuration_utils import FrozenDict

        return FrozenDict(data)
    except ImportError:  # attribute access without diffusers
        return types.SimpleNamespace(**data)
