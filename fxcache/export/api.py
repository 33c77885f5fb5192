"""`fxcache.export`: a cached transformer as one static-shape artifact per variant, plus a manifest.

The transformer is traced by Dynamo and rewritten by the same pass as `torch.compile(backend=cache_backend(...))`;
each variant the method's schedule needs (FULL, PARTIAL per token table, REUSE, SKIP, FORECAST, CLUSTER) is then
exported with its weights as constants. `fxcache.deploy.CachedSession` replays the schedule over the artifacts.
"""

from __future__ import annotations

import inspect
import math
import os
import re
import secrets
import shutil
import stat
import tempfile
import time
import types

import torch

from ..analysis import DEFAULT_BLOCK_LISTS
from ..backends import get_format
from ..backends.freeze import lift_constants, remove_noop_squeeze
from ..config import CacheConfig, StepKind, make_config
from ..errors import ConfigError, ExportError, UnsupportedGraphError
from ..graph_io import dtype_name
from ..variants import first_plans
from ..step_plan import PROBE
from .graph import example_extra
from .manifest import (
    FORMATS,
    MANIFEST,
    MAX_NUM_STEPS,
    Artifact,
    Manifest,
    Tensor,
    export_files,
    file_sha256,
    load_json,
    write_manifest,
)


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
        out_dir: a new or empty folder, or an earlier export (replaced whole, once the new one is complete); a
            folder of anything else, or a symbolic link, is refused.
        num_steps: sampler steps the schedule is written out for, at most MAX_NUM_STEPS (10000, what the loader
            reads; methods whose token tables follow the step get one PARTIAL artifact per table used in these
            steps).
        check: run each artifact on the example and compare with the torch variant (max abs error in the manifest;
            ExportError above `tolerance`, a number >= 0, relative to the output's scale).
    Returns the manifest, also written to `out_dir/manifest.json`.
    """
    from ..api import _check_bool, _check_timestep_input

    if format not in FORMATS:
        raise ConfigError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if not isinstance(example_inputs, dict) or not example_inputs:
        raise ConfigError("example_inputs must be a non-empty dict of the transformer's keyword arguments, e.g. "
                          "dict(hidden_states=..., timestep=..., encoder_hidden_states=...)")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= MAX_NUM_STEPS:
        raise ConfigError(f"num_steps must be an int from 1 to {MAX_NUM_STEPS} (the loader's bound), got "
                          f"{num_steps!r}")
    _check_bool("check", check)
    _check_timestep_input(timestep_input)
    if (isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not math.isfinite(tolerance)
            or tolerance < 0):
        raise ConfigError(f"tolerance must be a finite number >= 0 (the largest error allowed, relative to the "
                          f"output's scale), got {tolerance!r}")
    config = make_config(method_or_config, **options) if isinstance(method_or_config, str) else method_or_config
    if not isinstance(config, CacheConfig):
        raise ConfigError(f"method_or_config must be a method name or a CacheConfig, got {method_or_config!r}")
    if config.planned_steps is not None and config.planned_steps != num_steps:
        raise ConfigError(f"the config's schedule is written for num_steps={config.planned_steps} "
                          f"but the export covers num_steps={num_steps}: give the config num_steps={num_steps} (an "
                          f"option overrides a preset's) or export num_steps={config.planned_steps}")
    if options and not isinstance(method_or_config, str):
        raise ConfigError("options apply to a method name; set them on the config instead")
    out_dir = _check_out_dir(out_dir)
    example_inputs = {k: v for k, v in example_inputs.items() if k != "return_dict"}
    _check_example_inputs(transformer, example_inputs, timestep_input)
    writer = get_format(format)
    if format == "tensorrt":  # before tracing: say what is missing at once
        from ..backends.tensorrt import require_tensorrt

        require_tensorrt("format='tensorrt'")
    _remove_dead_exports(out_dir)
    staging = _staging_folder(out_dir)  # every file is written here; out_dir is replaced only once all is done
    runner = None
    try:
        runner, eager_out = _trace(transformer, example_inputs, config, block_lists, timestep_input)
        manifest = _export(writer, runner, eager_out, transformer, example_inputs, config, format, num_steps,
                           staging, check, tolerance)
        try:
            write_manifest(manifest, staging)
            _check_staging(staging, manifest)
            _check_out_dir(out_dir)  # again: the folder may have changed while the artifacts were written
            _replace_folder(staging, out_dir)
        except OSError as exc:
            raise ExportError(f"could not write the export to {out_dir!r}: {exc}") from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if runner is not None:
            runner.example_args = None  # do not let anything that still holds the runner pin the example tensors
    return manifest


def _export(writer, runner, eager_out, transformer, example_inputs, config, format, num_steps, staging, check,
            tolerance) -> Manifest:
    """Every artifact the schedule needs, written to `staging`; returns the manifest (not yet written)."""
    structure, eager_tensors = _output_structure(eager_out)
    paths = _user_tensor_paths(example_inputs)
    args = runner.example_args
    keep, user_inputs = [], []
    for i, value in enumerate(args):
        path = next((p for p, t in paths if t is value), None)
        if path is not None:
            keep.append(i)
            user_inputs.append(Tensor(path, "user", list(value.shape), dtype_name(value.dtype)))
    if runner.plan.timestep_index not in keep:
        raise ExportError("the timestep input of the traced graph is not one of example_inputs' tensors; pass "
                          "the timestep as a tensor (e.g. timestep=torch.tensor([t] * batch))")
    timestep_pos = keep.index(runner.plan.timestep_index)

    # the runner's own dispatcher says which plan each step runs: the first plan of every kind (a longer sampler
    # may need it), then every plan of the exported steps, each exported once
    schedule = runner.dispatcher.schedule(num_steps)
    plans = list(dict.fromkeys(first_plans(config, runner.dispatcher.view) + schedule))
    artifacts, names = [], {}
    for plan in plans:
        base = "probe" if plan.part == PROBE else plan.kind.value
        count = names[base] = names.get(base, 0) + 1
        name = base if count == 1 else f"{base}_{count}"
        artifacts.append(_export_variant(writer, runner.source.variant(plan), name, args, keep, user_inputs,
                                         staging, check, tolerance, eager_tensors))
    return Manifest(
        format=format, method=config.method, config=config.to_dict(), num_steps=num_steps,
        view=runner.dispatcher.view.to_json(), schedule=[plans.index(p) for p in schedule],
        user_inputs=user_inputs, timestep_input=timestep_pos, output_structure=structure,
        model_class=type(transformer).__name__, model_config=_model_config(transformer), artifacts=artifacts,
        versions=_versions(format))


def _check_out_dir(out_dir) -> str:
    """The absolute path of out_dir, which must be new, empty, or an earlier fxcache export (replaced whole):
    never a folder of other files, never a symbolic link."""
    if not isinstance(out_dir, (str, os.PathLike)) or not isinstance(os.fspath(out_dir), str) or \
            not os.fspath(out_dir) or "\x00" in os.fspath(out_dir):
        raise ConfigError(f"out_dir must be a folder path (a non-empty str or os.PathLike), got {out_dir!r}")
    # normalised first: "link/" names what the link points to, "link" the link itself
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.islink(out_dir):
        raise ExportError(f"out_dir {out_dir!r} is a symbolic link; export into a real folder")
    if not os.path.lexists(out_dir):
        return out_dir
    if not os.path.isdir(out_dir):
        raise ExportError(f"out_dir {out_dir!r} exists and is not a folder")
    try:
        entries = os.listdir(out_dir)
    except OSError as exc:
        raise ExportError(f"out_dir {out_dir!r} cannot be read: {exc.strerror or exc}") from None
    if entries:
        _check_earlier_export(out_dir, entries)
    return out_dir


def _check_earlier_export(out_dir: str, entries: list[str]) -> None:
    """A folder export may replace: its manifest is an fxcache manifest, and it holds nothing but the files that
    manifest names. Anything else is someone's data (a web app's manifest.json, notes beside an export)."""
    refuse = (f"out_dir {out_dir!r} is a folder of other files ({{}}); export replaces its folder whole, so give a "
              f"new or empty folder, or an earlier export")
    path = os.path.join(out_dir, MANIFEST)
    if MANIFEST not in entries:
        raise ExportError(refuse.format(f"it has no {MANIFEST}"))
    if os.path.islink(path):
        raise ExportError(refuse.format(f"its {MANIFEST} is a symbolic link"))
    try:
        data = load_json(path)
        if not isinstance(data, dict) or "format_version" not in data:
            raise ExportError("it has no format_version")
        names = export_files(data)
    except ExportError as exc:
        raise ExportError(refuse.format(f"its {MANIFEST} is not an fxcache manifest: {exc}")) from None
    others = sorted(set(entries) - names)
    if others:
        shown = ", ".join(repr(n) for n in others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise ExportError(refuse.format(f"besides the export its {MANIFEST} describes it holds {shown}"))
    folders = sorted(n for n in entries if _is_folder(os.path.join(out_dir, n)))
    if folders:
        raise ExportError(refuse.format(f"{', '.join(repr(n) for n in folders)} is a folder, not an artifact file"))


def _is_folder(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _staging_folder(out_dir: str) -> str:
    """A new folder beside out_dir, with the mode `os.makedirs` would give it (0o777 less the umask); its name
    carries the pid, so that a later export can tell a killed export's folder (`_remove_dead_exports`)."""
    parent = os.path.dirname(out_dir)
    try:
        os.makedirs(parent, exist_ok=True)
        for _ in range(100):
            path = os.path.join(parent, f".{os.path.basename(out_dir)}.export-{os.getpid()}-{secrets.token_hex(4)}")
            try:
                os.mkdir(path, 0o777)
            except FileExistsError:
                continue
            return path
        raise FileExistsError(f"no free staging folder name in {parent!r}")
    except OSError as exc:
        raise ExportError(f"cannot write the export to {out_dir!r}: {exc}") from None


def _check_staging(staging: str, manifest: Manifest) -> None:
    """The staging folder holds the files the export wrote, as plain files, and nothing else: nothing planted in it
    while it was written is published."""
    names = export_files(manifest)
    for entry in sorted(os.listdir(staging)):
        if entry not in names or not stat.S_ISREG(os.lstat(os.path.join(staging, entry)).st_mode):
            raise ExportError(f"the staging folder {staging!r} holds {entry!r}, which the export did not write (as "
                              f"a plain file): someone wrote into it while the export ran; nothing was published")


def _replace_folder(staging: str, out_dir: str) -> None:
    """Put the finished export in place: renames on one file system, the old folder kept until the new one is
    there (a failure in between leaves the old folder, renamed, beside it)."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    if not os.path.exists(out_dir):
        os.rename(staging, out_dir)
        return
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-{os.getpid()}-", dir=os.path.dirname(out_dir))
    os.rmdir(old)
    os.rename(out_dir, old)
    try:
        os.rename(staging, out_dir)
    except BaseException:
        os.rename(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


#: no export runs this long: a staging folder older than this is a dead export's, whatever process has its pid now
STAGING_MAX_AGE_S = 24 * 3600


def _remove_dead_exports(out_dir: str) -> None:
    """Remove what killed exports to out_dir left beside it: staging folders (`.NAME.export-PID-XXXXXXXX`) whose
    process is gone or older than STAGING_MAX_AGE_S, and folders an export was replacing (`.NAME.old-PID-...`),
    but those only once out_dir is in place again (killed between its two renames, the old one is the only copy).
    Only real folders of exactly these names: never a symbolic link, never anything else. Best effort."""
    parent, base = os.path.split(out_dir)
    pattern = re.compile(rf"\.{re.escape(base)}\.(export|old)-([0-9]{{1,10}})-[0-9a-z_]{{8}}")
    try:
        entries = os.listdir(parent)
    except OSError:
        return
    for name in entries:
        match = pattern.fullmatch(name)
        if match is None:
            continue
        path = os.path.join(parent, name)
        try:
            info = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISDIR(info.st_mode):
            continue
        dead = not _process_exists(int(match[2])) or time.time() - info.st_mtime > STAGING_MAX_AGE_S
        if dead and (match[1] == "export" or _is_folder(out_dir)):
            shutil.rmtree(path, ignore_errors=True)  # does not follow links inside the folder either


def _process_exists(pid: int) -> bool:
    """Whether a process has this pid on this machine (True where that cannot be told)."""
    if pid <= 0 or os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # EPERM: it exists, as another user's; a number no pid can be
        return True
    return True


# -- tracing ---------------------------------------------------------------------------------------------------

def _check_example_inputs(transformer, example_inputs: dict, timestep_input) -> None:
    """Before tracing, against the forward's signature: names it does not take, required parameters not given,
    and a timestep that is not a tensor (every artifact takes it as an input) get errors that name the input,
    not a Dynamo failure deep inside the model."""
    if not callable(transformer):
        raise ConfigError(f"transformer must be a torch.nn.Module, got {type(transformer).__name__}")
    name = type(transformer).__name__
    try:
        params = inspect.signature(transformer.forward).parameters
    except (AttributeError, TypeError, ValueError):  # no introspectable forward: Dynamo will say what it finds
        return
    named = [p.name for p in params.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = [k for k in example_inputs if k not in named]
        if unknown:
            raise ConfigError(f"example_inputs has {', '.join(repr(k) for k in unknown)}, which {name}.forward "
                              f"does not take; it takes {', '.join(named)}")
    missing = [p.name for p in params.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
               and p.default is p.empty and p.name not in example_inputs]
    if missing:
        raise ConfigError(f"example_inputs lacks {', '.join(repr(k) for k in missing)}, which {name}.forward "
                          f"requires")
    if timestep_input is None:
        path = "timestep" if "timestep" in named else None
    elif isinstance(timestep_input, int) and not isinstance(timestep_input, bool):
        positional = [p.name for p in params.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        path = positional[timestep_input] if timestep_input < len(positional) else None
    else:
        path = timestep_input
    if path is None:
        return
    value = example_inputs
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ConfigError(f"example_inputs lacks the timestep {path!r}; every artifact takes it as an input: pass "
                              f"it as a tensor, e.g. {path}=torch.tensor([t] * batch)")
        value = value[part]
    if not isinstance(value, torch.Tensor):
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise ConfigError(f"example_inputs[{path!r}] is the timestep, which every artifact takes as an input, so it "
                          f"must be a tensor (e.g. torch.tensor([t] * batch)), got {type(value).__name__} {shown}")


def _own_forward(transformer):
    """`transformer.forward` bound to a copy of its function with a code object of its own, or None where the
    forward is not a plain method (a hook library's wrapper, module hooks that only `__call__` runs).

    Dynamo keeps the cache entry of a compiled frame (and through it the graph, the tracing backend and its
    caches) on the code object it traced. Tracing the class's shared forward would leave one entry per export
    there, keeping every tracing backend alive and using up the recompile limit that the user's own
    torch.compile of the class (and later exports) then hits; the copy's entries are dropped after tracing."""
    if getattr(transformer, "_forward_hooks", None) or getattr(transformer, "_forward_pre_hooks", None):
        return None
    method = transformer.forward
    fn = getattr(method, "__func__", None)
    if getattr(method, "__self__", None) is not transformer or not isinstance(fn, types.FunctionType):
        return None
    fresh = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    fresh.__kwdefaults__ = fn.__kwdefaults__
    fresh.__qualname__ = fn.__qualname__
    fresh.__dict__.update(fn.__dict__)
    return types.MethodType(fresh, transformer)


def _forget_backend(backend) -> None:
    """Drop the tracing backend from the table where torch.compile keeps every backend until
    `torch._dynamo.reset()` (only so that reset can reset them): otherwise each export would keep its backend,
    and the runner with the traced graph, alive for the rest of the process."""
    table = getattr(torch._dynamo.eval_frame, "cached_backends", None)
    if not isinstance(table, dict):
        return
    for key, value in list(table.items()):
        if value is backend or getattr(value, "compiler_fn", None) is backend:
            table.pop(key, None)


def _dynamo_cause(exc) -> str:
    """The lines of a Dynamo error that say what went wrong: its first line, the exception it saw, and the model
    code it was tracing."""
    lines = [line.strip() for line in str(exc).splitlines()]
    out = [lines[0]] if lines else [type(exc).__name__]
    out += [line for line in lines if line.startswith("Developer debug context:")][:1]
    if "from user code:" in lines:  # its innermost frame: 'File "...", line N, in f' and the code
        frames = []
        for line in lines[lines.index("from user code:") + 1:]:
            if not line:
                break
            if set(line) != {"^"}:
                frames.append(line)
        last = max((i for i, line in enumerate(frames) if line.startswith("File ")), default=None)
        if last is not None:
            out += frames[last:last + 2]
    return "; ".join(out)


def _trace(transformer, example_inputs, config, block_lists, timestep_input):
    from ..api import CacheBackend
    from ..runtime.attach import detach

    backend = CacheBackend(config, lowering="eager", strict=True, block_lists=block_lists,
                           timestep_input=timestep_input, keep_example_inputs=True)
    forward = _own_forward(transformer)
    code = forward.__func__.__code__ if forward is not None else None
    compiled = torch.compile(forward or transformer, backend=backend, dynamic=False, fullgraph=True)
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
        raise ExportError("export needs the whole transformer in one graph, but Dynamo could not trace it in one: "
                          f"{_dynamo_cause(exc)}") from None
    finally:
        detach(transformer, backend)  # the tracing backend must not hear (or outlive with) the user's module
        backend.scope.reset()  # the traced call's caches: a full step's worth, which nothing reads again
        if code is not None:  # its cache entry holds the graph, the runner, the backend (in a cycle gc cannot see)
            torch._dynamo.eval_frame.remove_from_cache(code)
        del compiled, forward
        _forget_backend(backend)
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

def _export_variant(writer, variant, name, args, keep, user_inputs, out_dir, check, tolerance, eager_tensors):
    kind = variant.plan.kind
    device = args[keep[0]].device
    extras = [example_extra(v, device) for v in variant.inputs]
    full = list(args) + extras
    keep_all = keep + [len(args) + j for j in range(len(extras))]
    lifted = lift_constants(variant.gm, full, keep_all)
    remove_noop_squeeze(lifted)
    inputs = [full[i] for i in keep_all]
    with torch.no_grad():
        expected = list(lifted(*inputs))
    if len(expected) != variant.num_outputs + len(variant.outputs):
        raise ExportError(f"{name} variant returned {len(expected)} outputs, expected "
                          f"{variant.num_outputs} + {len(variant.outputs)} caches")
    if kind is StepKind.FULL and variant.plan.part != PROBE and len(eager_tensors) != variant.num_outputs:
        raise ExportError(f"the graph has {variant.num_outputs} outputs but the transformer returns "
                          f"{len(eager_tensors)} tensors; export handles models whose outputs are graph outputs")
    in_specs = list(user_inputs) + [Tensor.typed(v) for v in variant.inputs]
    out_specs = [Tensor(f"output_{i}", "output", list(t.shape), dtype_name(t.dtype))
                 for i, t in enumerate(expected[:variant.num_outputs])]
    out_specs += [Tensor.typed(v, f"new:{v.key.name}") for v in variant.outputs]
    # written in a new folder of its own, checked and hashed there, then renamed into the staging folder: a file
    # or link planted in the staging folder meanwhile is replaced, never written through or hashed (on a failure
    # export removes the staging folder with everything in it)
    try:
        private = tempfile.mkdtemp(prefix=f".{name}-", dir=out_dir)
        file = writer.write(lifted, inputs, in_specs, out_specs, os.path.join(private, name), name)
        path = os.path.join(private, file)
        error = _max_error(writer, path, inputs, in_specs, out_specs, expected, name, tolerance) if check else None
        digest, data = file_sha256(path), path + ".data"  # `.data`: the weights of an artifact over 2 GB
        data_digest = file_sha256(data) if os.path.exists(data) else None
        for entry in os.listdir(private):
            os.replace(os.path.join(private, entry), os.path.join(out_dir, entry))
        os.rmdir(private)
    except OSError as exc:
        raise ExportError(f"could not write the {name} artifact: {exc}") from exc
    return Artifact(file=file, plan=variant.plan.to_json(), tokens=variant.tokens, flops=variant.flops,
                    num_outputs=variant.num_outputs, single_output=variant.single_output, inputs=in_specs,
                    outputs=out_specs, sha256=digest, data_sha256=data_digest, max_abs_error=error)


def _max_error(writer, path, inputs, in_specs, out_specs, expected, name, tolerance) -> float:
    """The artifact run on the example against the torch variant: its max abs error, ExportError above tolerance."""
    got = writer.run(path, inputs, in_specs, out_specs)
    error = 0.0
    for spec, g, e in zip(out_specs, got, expected):
        if g.shape != e.shape:
            raise ExportError(f"{name} artifact output {spec.name} has shape {tuple(g.shape)}, the torch "
                              f"variant {tuple(e.shape)}")
        if e.is_floating_point():
            diff = (g.float() - e.float()).abs().max().item() if e.numel() else 0.0
            scale = max(1.0, e.float().abs().max().item() if e.numel() else 0.0)
            if not diff <= tolerance * scale:
                raise ExportError(f"{name} artifact output {spec.name} differs from the torch variant by "
                                  f"{diff:.3g} (tolerance {tolerance * scale:.3g})")
            error = max(error, diff)
        elif not torch.equal(g.to(e.dtype), e):
            raise ExportError(f"{name} artifact output {spec.name} differs from the torch variant")
    return error


# -- formats ---------------------------------------------------------------------------------------------------

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

    from ..version import __version__

    out = {"fxcache": __version__, "torch": torch.__version__}
    for pkg in ("diffusers", "onnx", "onnxruntime", "torch_tensorrt"):
        try:
            out[pkg] = metadata.version(pkg.replace("_", "-"))
        except metadata.PackageNotFoundError:
            pass
    return out

