"""ONNX: `torch.onnx.export` (dynamo exporter) of a variant whose weights are constants, run by onnxruntime.

The artifact format of `fxcache.export(format="onnx")` (`FORMAT`) and `lowering="onnx"` (`lower`: each variant
exported on first use and run in an onnxruntime session inside torch.compile, so a CPU or GPU deployment can be
tried before exporting; weights are frozen at that moment, as in an export).
"""

from __future__ import annotations

import logging
import re
import warnings

import numpy as np
import torch

from ..errors import ExportError
from ..graph_io import dtype_from_name
from . import require

INSTALL = "pip install 'fxcache[onnx]' (onnx, onnxscript, onnxruntime; onnxruntime-gpu for the CUDA provider)"


def _require():
    require("onnx", INSTALL, "ONNX export")
    require("onnxscript", INSTALL, "ONNX export")


class OnnxFormat:
    suffix = ".onnx"

    def write(self, gm, inputs, in_specs, out_specs, stem: str, kind: str) -> str:
        _require()
        path = stem + self.suffix
        # one self-contained file unless the weights pass protobuf's 2 GB limit (then `<file>.data` beside it)
        weight_bytes = sum(b.numel() * b.element_size() for b in gm.buffers())
        try:
            with warnings.catch_warnings(), _quiet():
                warnings.simplefilter("ignore")
                torch.onnx.export(gm, tuple(inputs), path, dynamo=True, optimize=True, verbose=False,
                                  external_data=weight_bytes > 1_800_000_000,
                                  input_names=[s.name for s in in_specs], output_names=[s.name for s in out_specs])
        except Exception as exc:  # the exporter raises many types; name the variant and the op
            text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # the exporter colours its messages
            ops = sorted(set(re.findall(r"((?:aten|prims)\.\w+(?:\.\w+)?)", text)))
            op = f"; ops named in the exporter's message: {', '.join(ops[:8])}" if ops else ""
            raise ExportError(f"the {kind} variant could not be exported to ONNX: {type(exc).__name__}: "
                              f"{text.strip().splitlines()[0] if text.strip() else ''}{op}") from exc
        return path.rsplit("/", 1)[-1]

    def run(self, path, inputs, in_specs, out_specs) -> list[torch.Tensor]:
        return OnnxExecutor(path, in_specs, out_specs)(*inputs)

    def executor(self, path, in_specs, out_specs, providers=None) -> "OnnxExecutor":
        return OnnxExecutor(path, in_specs, out_specs, providers)


class _quiet:
    """The exporter and its ONNX libraries log progress and notes at INFO / WARNING; keep the user's console clean."""

    names = ("torch.onnx", "onnx_ir", "onnxscript")

    def __enter__(self):
        self.levels = {n: logging.getLogger(n).level for n in self.names}
        for n in self.names:
            logging.getLogger(n).setLevel(logging.ERROR)

    def __exit__(self, *exc):
        for n, level in self.levels.items():
            logging.getLogger(n).setLevel(level)


class OnnxExecutor:
    """One artifact in an onnxruntime session; called with torch tensors in manifest order, returns torch tensors."""

    def __init__(self, path: str, in_specs, out_specs, providers=None):
        ort = require("onnxruntime", INSTALL, "running ONNX artifacts")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(path, sess_options=options,
                                                providers=providers or ["CPUExecutionProvider"])
        except Exception as exc:
            raise ExportError(f"onnxruntime could not load {path}: {str(exc).splitlines()[0]}") from exc
        self.feed, self.out_names = check_signature(
            path.rsplit("/", 1)[-1], in_specs, out_specs, self.session.get_inputs(), self.session.get_outputs())
        self.out_dtypes = [dtype_from_name(s.dtype) for s in out_specs]

    def __call__(self, *args) -> list[torch.Tensor]:
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
        feeds = {name: _numpy(args[i]) for i, name in self.feed}
        outs = self.session.run(self.out_names, feeds)
        return [torch.from_numpy(np.ascontiguousarray(o)).to(device=device, dtype=d)
                for o, d in zip(outs, self.out_dtypes)]


def check_signature(file: str, in_specs, out_specs, graph_inputs, graph_outputs):
    """Check the manifest's inputs and outputs of an artifact against what its graph declares, before anything is
    allocated from the manifest's shapes: every one present (the exporter may drop a transformer input that a
    variant does not read: those, and only those, may be missing), with the same static shape and dtype.

    Returns (feed: (position in in_specs, name) of the inputs the graph takes, the output names in order)."""
    declared_in = {i.name: i for i in graph_inputs}
    declared_out = {o.name: o for o in graph_outputs}
    for role, specs, declared in (("input", in_specs, declared_in), ("output", out_specs, declared_out)):
        for spec in specs:
            meta = declared.get(spec.name)
            if meta is None:
                if role == "input" and spec.role == "user":
                    continue
                raise ExportError(f"the manifest lists {role} {spec.name!r} ({spec.role}) of {file}, which the "
                                  f"artifact does not have")
            if any(not isinstance(d, int) for d in meta.shape):
                raise ExportError(f"{file} declares {role} {spec.name!r} with the symbolic shape {list(meta.shape)}; "
                                  f"exported artifacts have static shapes only")
            if list(meta.shape) != list(spec.shape):
                raise ExportError(f"the manifest gives {spec.name!r} of {file} the shape {list(spec.shape)}, the "
                                  f"artifact declares {list(meta.shape)}")
            if meta.type != _ORT_TYPES.get(spec.dtype):
                raise ExportError(f"the manifest gives {spec.name!r} of {file} the dtype {spec.dtype}, the artifact "
                                  f"declares {meta.type}")
    unknown = set(declared_in) - {s.name for s in in_specs}
    if unknown:
        raise ExportError(f"{file} takes inputs the manifest does not list: {', '.join(sorted(unknown))}")
    feed = [(i, s.name) for i, s in enumerate(in_specs) if s.name in declared_in]
    return feed, [s.name for s in out_specs]


_ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "bfloat16": "tensor(bfloat16)",
              "float64": "tensor(double)", "int64": "tensor(int64)", "int32": "tensor(int32)",
              "int16": "tensor(int16)", "int8": "tensor(int8)", "uint8": "tensor(uint8)", "bool": "tensor(bool)"}


def _numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        if t.dtype == torch.bfloat16:
            raise ExportError("bfloat16 inputs cannot go through numpy to onnxruntime; export in float16 / float32")
        return t.contiguous().numpy()
    return np.asarray(value)


FORMAT = OnnxFormat()


def check() -> None:
    _require()
    require("onnxruntime", INSTALL, "lowering='onnx'")


def lower(gm, example_inputs, *, mode=None, options=None):
    """Export `gm` with its parameters (inputs that are `nn.Parameter`s) as constants and run it in onnxruntime;
    the callable takes the graph's inputs as lowerings do. `options`: {"providers": [...]} for onnxruntime."""
    import os
    import tempfile

    from ..graph_io import dtype_name
    from .freeze import lift_constants, remove_noop_squeeze

    args = list(example_inputs)
    keep = [i for i, a in enumerate(args) if not isinstance(a, torch.nn.Parameter)]
    lifted = lift_constants(gm, args, keep)
    remove_noop_squeeze(lifted)
    inputs = [args[i] for i in keep]
    with torch.no_grad():
        expected = lifted(*inputs)
    single = not isinstance(expected, (tuple, list))
    outs = [expected] if single else list(expected)

    class Spec:
        def __init__(self, name, t):
            self.name, self.role, self.shape, self.dtype = name, "input", list(t.shape), dtype_name(t.dtype)

    in_specs = [Spec(f"input_{i}", args[i]) for i in keep]
    out_specs = [Spec(f"output_{j}", t) for j, t in enumerate(outs)]
    with tempfile.TemporaryDirectory(prefix="fxcache-onnx-") as folder:  # the session holds the model in memory
        file = FORMAT.write(lifted, inputs, in_specs, out_specs, os.path.join(folder, "variant"), "lowered")
        executor = FORMAT.executor(os.path.join(folder, file), in_specs, out_specs, (options or {}).get("providers"))

    def run(*call_args):
        result = executor(*[call_args[i] for i in keep])
        return result[0] if single else tuple(result)

    return run
