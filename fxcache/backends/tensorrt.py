"""TensorRT: saved engines per variant (`format="tensorrt"`) and `lowering="tensorrt"` for torch.compile.

Both go through torch-tensorrt's dynamo path (AOT: torch.export -> `torch_tensorrt.dynamo.compile`). torch-tensorrt
must match torch's minor version exactly: `pip install 'fxcache[tensorrt]'` pins the matching release. Both need
CUDA; without it, or without torch-tensorrt, they raise MissingDependencyError saying what to install.
"""

from __future__ import annotations

import torch

from ..errors import ExportError, MissingDependencyError

INSTALL = ("pip install 'fxcache[tensorrt]' (torch-tensorrt of the same minor version as torch "
           f"{torch.__version__.split('+')[0]}, and a CUDA GPU)")


def require_tensorrt(why: str):
    """torch_tensorrt, or MissingDependencyError naming what is missing (CUDA, the package, a version match)."""
    if not torch.cuda.is_available():
        raise MissingDependencyError(f"{why} needs a CUDA GPU (torch.cuda.is_available() is False) and "
                                     f"torch-tensorrt: {INSTALL}")
    try:
        import torch_tensorrt
    except ImportError:
        raise MissingDependencyError(f"{why} needs torch-tensorrt: {INSTALL}") from None
    want = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    have = ".".join(torch_tensorrt.__version__.split("+")[0].split(".")[:2])
    if want != have:
        raise MissingDependencyError(f"{why}: torch-tensorrt {torch_tensorrt.__version__} does not match torch "
                                     f"{torch.__version__} (the minor versions must be equal): {INSTALL}")
    return torch_tensorrt


def compile_engine(gm, inputs, precisions=(torch.float32,)):
    trt = require_tensorrt("TensorRT")
    try:
        program = torch.export.export(gm, tuple(inputs), strict=False)
        return trt.dynamo.compile(program, arg_inputs=list(inputs), enabled_precisions=set(precisions),
                                  min_block_size=1)
    except Exception as exc:
        raise ExportError(f"torch-tensorrt could not build an engine: {type(exc).__name__}: "
                          f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from exc


class TensorRTFormat:
    suffix = ".ep"

    def write(self, gm, inputs, in_specs, out_specs, stem: str, kind: str) -> str:
        trt = require_tensorrt(f"format='tensorrt' ({kind} variant)")
        cuda_inputs = [t.cuda() for t in inputs]
        engine = compile_engine(gm.cuda(), cuda_inputs)
        path = stem + self.suffix
        trt.save(engine, path, output_format="exported_program", arg_inputs=cuda_inputs, retrace=True)
        return path.rsplit("/", 1)[-1]

    def run(self, path, inputs, in_specs, out_specs) -> list[torch.Tensor]:
        outs = TensorRTExecutor(path)(*[t.cuda() for t in inputs])
        return [o.to(inputs[0].device) for o in outs]

    def executor(self, path, in_specs, out_specs, providers=None) -> "TensorRTExecutor":
        return TensorRTExecutor(path, in_specs, out_specs)


class TensorRTExecutor:
    def __init__(self, path: str, in_specs=None, out_specs=None, providers=None):
        require_tensorrt("running TensorRT artifacts")
        program = torch.export.load(path)
        if in_specs is not None and out_specs is not None:
            check_program(path.rsplit("/", 1)[-1], program, in_specs, out_specs)
        self.module = program.module()

    def __call__(self, *args) -> list[torch.Tensor]:
        out = self.module(*args)
        return list(out) if isinstance(out, (list, tuple)) else [out]


def check_program(file: str, program, in_specs, out_specs) -> None:
    """The manifest's inputs and outputs of a saved program against the program's own, before anything is
    allocated from the manifest's shapes: as many, in order, each with the same static shape and dtype (where the
    program records one)."""
    from ..graph_io import dtype_name

    nodes = {n.name: n for n in program.graph.nodes}
    inputs = [nodes.get(name) for name in program.graph_signature.user_inputs]
    output = next((n for n in program.graph.nodes if n.op == "output"), None)
    outputs = list(output.args[0]) if output is not None and isinstance(output.args[0], (list, tuple)) else []
    for role, specs, values in (("inputs", in_specs, inputs), ("outputs", out_specs, outputs)):
        if len(values) != len(specs):
            raise ExportError(f"the manifest lists {len(specs)} {role} of {file}, the program has {len(values)}")
        for spec, node in zip(specs, values):
            value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
            if not isinstance(value, torch.Tensor):
                continue
            shape = list(value.shape)
            if any(not isinstance(d, int) for d in shape):
                raise ExportError(f"{file} declares {spec.name!r} with the symbolic shape {shape}; exported "
                                  f"artifacts have static shapes only")
            if shape != list(spec.shape) or dtype_name(value.dtype) != spec.dtype:
                raise ExportError(f"the manifest gives {spec.name!r} of {file} the shape {list(spec.shape)} and "
                                  f"dtype {spec.dtype}, the program declares {shape} and {dtype_name(value.dtype)}")


def lower(gm, example_inputs, *, mode=None, options=None):
    """Each variant becomes a TensorRT engine (torch-tensorrt's dynamo path); weights stay graph inputs."""
    require_tensorrt("lowering='tensorrt'")
    engine = compile_engine(gm, [t for t in example_inputs], **(options or {}))
    return lambda *args: engine(*args)


def check() -> None:
    """Fail at cache_backend(), not mid-run."""
    require_tensorrt("lowering='tensorrt'")


FORMAT = TensorRTFormat()
