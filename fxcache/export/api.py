"""`fxcache.export`: a cached transformer as one static-shape artifact per variant, plus a manifest.

The transformer is traced by Dynamo and rewritten by the same pass as `torch.compile(backend=cache_backend(...))`;
each variant the method's schedule needs (FULL, PARTIAL per token table, REUSE, SKIP, FORECAST, CLUSTER) is then
exported with its weights as constants. `fxcache.deploy.CachedSession` replays the schedule over the artifacts.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import torch

from ..analysis import DEFAULT_BLOCK_LISTS
from ..config import CacheConfig, StepKind, make_config
from ..errors import ConfigError, ExportError, MissingDependencyError, UnsupportedGraphError
from ..variants import schedule_key
from .graph import dtype_name, example_extra, lift_constants, remove_noop_squeeze
from .manifest import FORMATS, MANIFEST, Artifact, Manifest, Tensor, write_manifest


def export(transformer: torch.nn.Module, example_inputs: dict, method_or_config: str | CacheConfig = "duca", *,
           format: str = "onnx", out_dir: str, num_steps: int = 50, block_lists: tuple[str, ...] = DEFAULT_BLOCK_LISTS,
           timestep_input: int | str | None = None, check: bool = True, tolerance: float = 1e-3,
           **options) -> Manifest:
    """Export `transformer` called as `transformer(**example_inputs)` with a cache method.

    Args:
        example_inputs: the keyword arguments of one call, at the shapes to deploy (batch with CFG rows, resolution,
            text length). Shapes are static: export again for other shapes.
        method_or_config: a method name ("duca", "fora", ...; `**options` set its options) or a config.
        format: "onnx" (onnxruntime, CPU or CUDA) or "tensorrt" (saved torch-tensorrt programs; needs CUDA).
        num_steps: sampler steps the schedule is written out for (methods whose token tables follow the step get
            one PARTIAL artifact per table used in these steps).
        check: run each artifact on the example and compare with the torch variant (max abs error in the manifest;
            ExportError above `tolerance` relative to the output's scale).
    Returns the manifest, also written to `out_dir/manifest.json`.
    """
    if format not in FORMATS:
        raise ConfigError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if not isinstance(example_inputs, dict) or not example_inputs:
        raise ConfigError("example_inputs must be a non-empty dict of the transformer's keyword arguments, e.g. "
                          "dict(hidden_states=..., timestep=..., encoder_hidden_states=...)")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ConfigError(f"num_steps must be an int >= 1, got {num_steps!r}")
    config = make_config(method_or_config, **options) if isinstance(method_or_config, str) else method_or_config
    if not isinstance(config, CacheConfig):
        raise ConfigError(f"method_or_config must be a method name or a CacheConfig, got {method_or_config!r}")
    if options and not isinstance(method_or_config, str):
        raise ConfigError("options apply to a method name; set them on the config instead")
    _check_out_dir(out_dir)
    writer = _writer(format)
    if format == "tensorrt":  # before tracing: say what is missing at once
        from .tensorrt import require_tensorrt

        require_tensorrt("format='tensorrt'")
    example_inputs = {k: v for k, v in example_inputs.items() if k != "return_dict"}
    runner, eager_out = _trace(transformer, example_inputs, config, block_lists, timestep_input)
    structure, eager_tensors = _output_structure(eager_out)

    paths = _user_tensor_paths(example_inputs)
    args = runner.example_args
    keep, user_inputs = [], []
    for i, value in enumerate(args):
        path = next((p for p, t in paths if t is value), None)
        if path is not None:
            keep.append(i)
            user_inputs.append(Tensor(path, f"user:{path}", list(value.shape), dtype_name(value.dtype)))
    if runner.plan.timestep_index not in keep:
        raise ExportError("the timestep input of the traced graph is not one of example_inputs' tensors; pass "
                          "the timestep as a tensor (e.g. timestep=torch.tensor([t] * batch))")
    timestep_pos = keep.index(runner.plan.timestep_index)

    staging = _staging_folder(out_dir)  # every file is written here; out_dir is replaced only once all is done
    try:
        artifacts, seen = [], set()
        schedule = []
        for step in range(num_steps):
            kind = config.step_kind(step)
            key = schedule_key(config, step) if kind is StepKind.PARTIAL else 0
            schedule.append({"step": step, "kind": kind.value, "schedule_key": key})
        wanted = [(k, 0) for k in StepKind if k in config.kinds and k is not StepKind.PARTIAL]
        wanted += sorted({(StepKind.PARTIAL, s["schedule_key"]) for s in schedule if s["kind"] == "partial"},
                         key=lambda x: x[1])
        if StepKind.PARTIAL in config.kinds and not any(k is StepKind.PARTIAL for k, _ in wanted):
            wanted.append((StepKind.PARTIAL, schedule_key(config, config.warmup)))
        for kind, key in wanted:
            if (kind, key) in seen:
                continue
            seen.add((kind, key))
            step = next((s["step"] for s in schedule if s["kind"] == kind.value and s["schedule_key"] == key), 0)
            variant, _ = runner._variant(kind, step)
            artifacts.append(_export_variant(writer, variant, kind, key, args, keep, user_inputs, staging, check,
                                             tolerance, eager_tensors))
        manifest = Manifest(
            format=format, method=config.method, config=config.to_dict(), num_steps=num_steps, schedule=schedule,
            user_inputs=user_inputs, timestep_input=timestep_pos, output_structure=structure,
            model_class=type(transformer).__name__, model_config=_model_config(transformer), artifacts=artifacts,
            versions=_versions(format))
        write_manifest(manifest, staging)
        _replace_folder(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        runner.example_args = None  # Dynamo keeps the backend alive: do not let it pin the example tensors
    return manifest


def _check_out_dir(out_dir) -> None:
    """out_dir is new, empty, or an earlier export (replaced whole): never a folder of other files."""
    if not isinstance(out_dir, (str, os.PathLike)) or not os.fspath(out_dir):
        raise ConfigError(f"out_dir must be a folder path, got {out_dir!r}")
    out_dir = os.fspath(out_dir)
    if os.path.islink(out_dir):
        raise ExportError(f"out_dir {out_dir!r} is a symbolic link; export into a real folder")
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise ExportError(f"out_dir {out_dir!r} exists and is not a folder")
        if os.listdir(out_dir) and not os.path.isfile(os.path.join(out_dir, MANIFEST)):
            raise ExportError(f"out_dir {out_dir!r} is a folder of other files (it has no {MANIFEST}); export "
                              "replaces its folder whole, so give a new or empty folder, or an earlier export")


def _staging_folder(out_dir: str) -> str:
    out_dir = os.path.abspath(os.fspath(out_dir))
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.export-", dir=parent)


def _replace_folder(staging: str, out_dir: str) -> None:
    """Put the finished export in place: renames on one file system, the old folder kept until the new one is
    there (a failure in between leaves the old folder, renamed, beside it)."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    if not os.path.exists(out_dir):
        os.rename(staging, out_dir)
        return
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=os.path.dirname(out_dir))
    os.rmdir(old)
    os.rename(out_dir, old)
    try:
        os.rename(staging, out_dir)
    except BaseException:
        os.rename(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


# -- tracing ---------------------------------------------------------------------------------------------------

def _trace(transformer, example_inputs, config, block_lists, timestep_input):
    from ..api import CacheBackend
    from ..runtime.attach import detach

    backend = CacheBackend(config, lowering="eager", strict=True, block_lists=block_lists,
                           timestep_input=timestep_input)
    backend.capture_args = True
    compiled = torch.compile(transformer, backend=backend, dynamic=False, fullgraph=True)
    try:
        with torch.no_grad():
            compiled(**example_inputs, return_dict=False)
            eager_out = transformer(**example_inputs)  # the default return: a diffusers output or a tuple
    except (UnsupportedGraphError, torch._dynamo.exc.BackendCompilerFailed) as exc:
        inner = getattr(exc, "inner_exception", exc)
        if not isinstance(inner, UnsupportedGraphError):
            raise
        raise ExportError(f"the transformer cannot be cached, so it cannot be exported cached: {inner}") from None
    except torch._dynamo.exc.Unsupported as exc:
        raise ExportError("export needs the whole transformer in one graph, but Dynamo broke it: "
                          f"{str(exc).splitlines()[0]}") from None
    finally:
        detach(transformer, backend)  # the tracing backend must not hear (or outlive with) the user's module
    runners = [r for r in backend.runners if getattr(r, "example_args", None) is not None]
    if len(runners) != 1:
        raise ExportError(f"export needs one cached graph, Dynamo produced {len(backend.runners)}")
    return runners[0], eager_out


def _user_tensor_paths(inputs: dict, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    out = []
    for name, value in inputs.items():
        path = f"{prefix}{name}"
        if isinstance(value, torch.Tensor):
            out.append((path, value))
        elif isinstance(value, dict):
            out.extend(_user_tensor_paths(value, path + "."))
    return out


def _output_structure(out) -> tuple[str, list[torch.Tensor]]:
    if isinstance(out, torch.Tensor):
        return "tensor", [out]
    if hasattr(out, "to_tuple"):  # with return_dict=False the session returns the tuple, as the model would
        return "model_output", [t for t in out.to_tuple() if isinstance(t, torch.Tensor)]
    if isinstance(out, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in out):
        return "tuple", list(out)
    raise ExportError(f"the transformer returned {type(out).__name__}; export handles a tensor, a tuple of tensors "
                      "or a diffusers output (return_dict=False gives a tuple)")


# -- one variant ---------------------------------------------------------------------------------------------------

def _export_variant(writer, variant, kind, key, args, keep, user_inputs, out_dir, check, tolerance, eager_tensors):
    device = args[keep[0]].device
    extras = [example_extra(e, device) for e in variant.extra_inputs]
    full = list(args) + extras
    keep_all = keep + [len(args) + j for j in range(len(extras))]
    lifted = lift_constants(variant.gm, full, keep_all)
    remove_noop_squeeze(lifted)
    inputs = [full[i] for i in keep_all]
    with torch.no_grad():
        expected = list(lifted(*inputs))
    if len(expected) != variant.num_outputs + len(variant.extra_outputs):
        raise ExportError(f"{kind.value} variant returned {len(expected)} outputs, expected "
                          f"{variant.num_outputs} + {len(variant.extra_outputs)} caches")
    if kind is StepKind.FULL and len(eager_tensors) != variant.num_outputs:
        raise ExportError(f"the graph has {variant.num_outputs} outputs but the transformer returns "
                          f"{len(eager_tensors)} tensors; export handles models whose outputs are graph outputs")
    in_specs = list(user_inputs) + [
        Tensor(f"{e.kind}:{e.key}", f"extra:{e.kind}:{e.key}", list(e.shape), dtype_name(e.dtype))
        for e in variant.extra_inputs]
    out_specs = [Tensor(f"output_{i}", f"output:{i}", list(t.shape), dtype_name(t.dtype))
                 for i, t in enumerate(expected[:variant.num_outputs])]
    out_specs += [Tensor(f"new:{k}", f"cache:{k}", list(t.shape), dtype_name(t.dtype))
                  for k, t in zip(variant.extra_outputs, expected[variant.num_outputs:])]
    name = kind.value if key == 0 else f"{kind.value}_s{key}"
    t0 = time.perf_counter()
    file = writer.write(lifted, inputs, in_specs, out_specs, os.path.join(out_dir, name), kind.value)
    error = None
    if check:
        got = writer.run(os.path.join(out_dir, file), inputs, in_specs, out_specs)
        error = 0.0
        for spec, g, e in zip(out_specs, got, expected):
            if g.shape != e.shape:
                raise ExportError(f"{kind.value} artifact output {spec.name} has shape {tuple(g.shape)}, the torch "
                                  f"variant {tuple(e.shape)}")
            if e.is_floating_point():
                diff = (g.float() - e.float()).abs().max().item() if e.numel() else 0.0
                scale = max(1.0, e.float().abs().max().item() if e.numel() else 0.0)
                if not diff <= tolerance * scale:
                    raise ExportError(f"{kind.value} artifact output {spec.name} differs from the torch variant by "
                                      f"{diff:.3g} (tolerance {tolerance * scale:.3g})")
                error = max(error, diff)
            elif not torch.equal(g.to(e.dtype), e):
                raise ExportError(f"{kind.value} artifact output {spec.name} differs from the torch variant")
    return Artifact(file=file, kind=kind.value, schedule_key=key, tokens=variant.tokens, flops=variant.flops,
                    num_outputs=variant.num_outputs, single_output=variant.single_output, inputs=in_specs,
                    outputs=out_specs, max_abs_error=error)


# -- formats ---------------------------------------------------------------------------------------------------

def _writer(format: str):
    if format == "onnx":
        from .onnx import OnnxWriter

        return OnnxWriter()
    from .tensorrt import TensorRTWriter

    return TensorRTWriter()


def _model_config(transformer) -> dict:
    config = getattr(transformer, "config", None)
    if config is None:
        return {}
    try:
        return {k: v for k, v in dict(config).items() if not k.startswith("_") or k == "_class_name"}
    except (TypeError, ValueError):
        return {}


def _versions(format: str) -> dict:
    from importlib import metadata

    from .. import __version__

    out = {"fxcache": __version__, "torch": torch.__version__}
    for pkg in ("diffusers", "onnx", "onnxruntime", "torch_tensorrt"):
        try:
            out[pkg] = metadata.version(pkg.replace("_", "-"))
        except metadata.PackageNotFoundError:
            pass
    return out


def require(module: str, install: str, why: str):
    """Import an optional dependency or raise MissingDependencyError saying what to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(f"{why} needs the `{module}` package: {install}") from None
