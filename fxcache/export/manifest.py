"""The manifest of an exported cached transformer: everything a runtime needs to replay the schedule.

`manifest.json` in the export folder: the method's config, the graph's blocks as schedules see them (`view`, so
the runtime computes every step's plan itself), the artifact each exported step runs, and per artifact (one per
step plan the schedule uses) its file, plan, token rows, FLOPs, and its inputs / outputs in order with their role,
shape and dtype. Roles: `user` (a transformer input, named by its path: `hidden_states`,
`added_cond_kwargs.resolution`), `output` (the transformer's outputs, in order), and the typed roles of
`fxcache.graph_io` with their key, for what the runtime makes (token indices, caches, Taylor scalars) and the
cache entries it keeps for later steps.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re

import torch

from ..config import MAX_STEPS, StepKind
from ..errors import ExportError
from ..graph_io import ROLE_SLOTS, GraphValue, Key, Role
from ..step_plan import PROBE, TAIL, WHOLE, BlockKind, BlockStep, GraphView, StepPlan, UnitView

MANIFEST = "manifest.json"
FORMAT_VERSION = 3  # 3: artifact digests
FORMATS = ("onnx", "tensorrt")
#: the most steps an export covers and a manifest may hold: `fxcache.export` and the loader share this bound
MAX_NUM_STEPS = MAX_STEPS


@dataclasses.dataclass
class Tensor:
    """An artifact input or output. `role`: "user", "output", or a `Role` value (then `key` says what it is)."""

    name: str
    role: str
    shape: list[int]
    dtype: str
    key: dict | None = None  # `Key.to_json()` of a runtime-made input or a written cache entry

    @classmethod
    def typed(cls, value: GraphValue, name: str | None = None) -> "Tensor":
        return cls(name or value.key.name, value.role.value, list(value.shape), dtype_name(value.dtype),
                   value.key.to_json())

    def value(self) -> GraphValue:
        """The typed value of a runtime-made input or a written entry (its fields were checked at load)."""
        return GraphValue(Role(self.role), Key.from_json(self.key, self.name), tuple(self.shape),
                          getattr(torch, self.dtype))


@dataclasses.dataclass
class Artifact:
    file: str
    plan: dict  # `StepPlan.to_json()`
    tokens: int
    flops: int
    num_outputs: int
    single_output: bool
    inputs: list[Tensor]
    outputs: list[Tensor]
    sha256: str  # of the file: one copied in from another export of the model would load and mix two models
    data_sha256: str | None = None  # of `<file>.data`, the weights beside an artifact over 2 GB (None: no such file)
    max_abs_error: float | None = None  # runtime vs. the torch variant on the export example

    @property
    def kind(self) -> str:
        return self.plan["kind"]

    def step_plan(self) -> StepPlan:
        return _step_plan(self.plan, "plan")

    def extra_inputs(self) -> list[GraphValue]:
        return [t.value() for t in self.inputs if t.role != "user"]

    def written(self) -> list[GraphValue]:
        return [t.value() for t in self.outputs[self.num_outputs:]]


@dataclasses.dataclass
class Manifest:
    format: str
    method: str
    config: dict
    num_steps: int
    view: list  # `GraphView.to_json()`: the blocks as the schedule sees them
    schedule: list[int]  # per step: the index of the artifact it runs when its caches are all present ([] for a
    #                      method that decides each call at run time: its probe, compute and cached artifacts)
    user_inputs: list[Tensor]  # in the order every artifact takes them first
    timestep_input: int  # index into user_inputs
    output_structure: str  # "tuple" | "tensor" | "model_output"
    model_class: str
    model_config: dict
    artifacts: list[Artifact]
    versions: dict
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        tensors = data["user_inputs"] + [t for a in data["artifacts"] for t in a["inputs"] + a["outputs"]]
        for t in tensors:  # only runtime-made values and written entries carry a key
            if t.get("key") is None:
                t.pop("key", None)
        return json.dumps(data, indent=1, sort_keys=False, default=_jsonable)

    @classmethod
    def from_dict(cls, data: dict) -> "Manifest":
        """Check every field (type, range, role format) and build the manifest; ExportError names the field."""
        if not isinstance(data, dict):
            raise ExportError(f"manifest must be a JSON object, got {type(data).__name__}")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ExportError(f"manifest format_version {version!r} is not supported (this fxcache reads "
                              f"{FORMAT_VERSION}); export the model again with this version")
        fields = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(fields - set(data) - {"format_version"})
        if missing:
            raise ExportError(f"manifest lacks {', '.join(missing)}")
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ExportError(f"manifest has unknown fields {', '.join(unknown)}")
        _one_of(data["format"], "format", FORMATS)
        _string(data["method"], "method")
        _dict(data["config"], "config")
        num_steps = _int(data["num_steps"], "num_steps", minimum=1, maximum=MAX_NUM_STEPS)
        view = _view(data["view"])
        schedule = _list(data["schedule"], "schedule")
        user_inputs = [_tensor(t, f"user_inputs[{i}]") for i, t in enumerate(_list(data["user_inputs"], "user_inputs"))]
        if not user_inputs:
            raise ExportError("manifest field user_inputs is empty")
        for i, t in enumerate(user_inputs):
            if t.role != "user":
                raise ExportError(f"manifest field user_inputs[{i}].role must be 'user', got {t.role!r}")
        _int(data["timestep_input"], "timestep_input", maximum=len(user_inputs) - 1)
        _one_of(data["output_structure"], "output_structure", ("tuple", "tensor", "model_output"))
        _string(data["model_class"], "model_class", empty=True)
        _model_config(data["model_config"])
        _dict(data["versions"], "versions")
        artifacts = [_artifact(a, f"artifacts[{i}]", user_inputs, view)
                     for i, a in enumerate(_list(data["artifacts"], "artifacts"))]
        if not artifacts:
            raise ExportError("manifest field artifacts is empty")
        if not any(a.kind == "full" for a in artifacts):
            raise ExportError("manifest field artifacts has no full variant (every schedule starts with one)")
        if any(a.step_plan().part == PROBE for a in artifacts):  # decided per call: no schedule to write out
            if schedule:
                raise _fail("schedule", "an empty list (the method decides each call at run time: its artifacts "
                            "hold a probe)", f"{len(schedule)} entries")
        elif len(schedule) != num_steps:
            raise _fail("schedule", f"a list of num_steps={num_steps} entries", f"{len(schedule)} entries")
        for i, j in enumerate(schedule):
            _int(j, f"schedule[{i}]", maximum=len(artifacts) - 1)
        out = dict(data, user_inputs=user_inputs, artifacts=artifacts)
        return cls(**out)

    def graph_view(self) -> GraphView:
        return GraphView.from_json(self.view)


def _jsonable(value):
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


# -- field checks ------------------------------------------------------------------------------------------------

KINDS = tuple(k.value for k in StepKind)
DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")
MAX_RANK = 8
MAX_DIM = 2**31 - 1


def _fail(where: str, what: str, value) -> ExportError:
    try:
        shown = repr(value)
    except RecursionError:  # nested deeper than repr goes
        shown = f"a {type(value).__name__} nested too deep to show"
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return ExportError(f"manifest field {where} must be {what}, got {shown}")


def _int(value, where: str, *, minimum: int = 0, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (maximum is not None
                                                                                    and value > maximum):
        bound = f" <= {maximum}" if maximum is not None else ""
        raise _fail(where, f"an int >= {minimum}{bound}", value)
    return value


def _string(value, where: str, *, empty: bool = False) -> str:
    if not isinstance(value, str) or (not value and not empty) or "\x00" in value:
        raise _fail(where, "a non-empty string" if not empty else "a string", value)
    return value


def _one_of(value, where: str, accepted) -> str:
    if not isinstance(value, str) or value not in accepted:
        raise _fail(where, f"one of {', '.join(accepted)}", value)
    return value


def _list(value, where: str) -> list:
    if not isinstance(value, list):
        raise _fail(where, "a list", value)
    return value


def _dict(value, where: str, keys: tuple[str, ...] = ()) -> dict:
    if not isinstance(value, dict):
        raise _fail(where, "an object", value)
    missing = [k for k in keys if k not in value]
    if missing:
        raise ExportError(f"manifest field {where} lacks {', '.join(missing)}")
    return value


def _model_config(value) -> dict:
    """The transformer's config, which the session hands to pipelines as attributes (diffusers' FrozenDict sets
    each key as one): plain names only, none that would replace a dict method or a Python attribute."""
    _dict(value, "model_config")
    for key in value:
        if not isinstance(key, str) or not key or (key.startswith("_") and key != "_class_name") or hasattr(dict, key):
            raise _fail(f"model_config key {key!r}", "a config name (not private, not a dict attribute such as "
                        "'items' or '__class__')", key)
    todo = list(value.items())
    while todo:  # without recursion: a parsed manifest can nest as deep as the JSON parser went
        key, item = todo.pop()
        if isinstance(item, dict) and all(isinstance(k, str) for k in item):
            todo += [(key, v) for v in item.values()]
        elif isinstance(item, list):
            todo += [(key, v) for v in item]
        elif item is not None and not isinstance(item, (str, int, float, bool)):
            raise _fail(f"model_config[{key!r}]", "JSON (objects with string keys, lists, strings, numbers)", item)
    return value


_ROLES = ("user", "output") + tuple(r.value for r in Role)
MAX_BLOCKS = 10_000
MAX_UNITS = 64


def _tensor(value, where: str) -> Tensor:
    fields = ("name", "role", "shape", "dtype")
    _dict(value, where, keys=fields)
    role = _one_of(value["role"], f"{where}.role", _ROLES)
    typed = role not in ("user", "output")
    extra = sorted(set(value) - set(fields) - ({"key"} if typed else set()))
    if extra:
        raise ExportError(f"manifest field {where} has unknown fields {', '.join(map(str, extra))}")
    _string(value["name"], f"{where}.name")
    shape = _list(value["shape"], f"{where}.shape")
    if len(shape) > MAX_RANK:
        raise _fail(f"{where}.shape", f"at most {MAX_RANK} dimensions", shape)
    for j, d in enumerate(shape):
        _int(d, f"{where}.shape[{j}]", maximum=MAX_DIM)
    _one_of(value["dtype"], f"{where}.dtype", DTYPES)
    tensor = Tensor(value["name"], role, list(shape), value["dtype"])
    if typed:
        if "key" not in value:
            raise ExportError(f"manifest field {where} lacks key (every {role} value has one)")
        key = Key.from_json(value["key"], f"{where}.key")
        if key.slot not in ROLE_SLOTS[Role(role)]:
            raise _fail(f"{where}.key.slot", f"one of {', '.join(sorted(s.value for s in ROLE_SLOTS[Role(role)]))} "
                        f"for role {role}", key.slot.value)
        tensor.key = key.to_json()
        problem = tensor.value().check()
        if problem:
            raise ExportError(f"manifest field {where}: {problem}")
    return tensor


def _view(value) -> GraphView:
    blocks = _list(value, "view")
    if not blocks or len(blocks) > MAX_BLOCKS:
        raise _fail("view", f"a list of 1 to {MAX_BLOCKS} blocks", f"{len(blocks)} blocks")
    out = []
    for i, units in enumerate(blocks):
        units = _list(units, f"view[{i}]")
        if len(units) > MAX_UNITS:
            raise _fail(f"view[{i}]", f"at most {MAX_UNITS} units", f"{len(units)} units")
        row = []
        for j, u in enumerate(units):
            where = f"view[{i}][{j}]"
            names = tuple(f.name for f in dataclasses.fields(UnitView))
            _dict(u, where, keys=names)
            if set(u) != set(names):
                raise ExportError(f"manifest field {where} has unknown fields "
                                  f"{', '.join(sorted(map(str, set(u) - set(names))))}")
            row.append(UnitView(_string(u["name"], f"{where}.name"), _one_of(u["kind"], f"{where}.kind",
                                                                             ("attn", "xattn", "mlp")),
                                _int(u["tokens"], f"{where}.tokens", maximum=MAX_DIM),
                                _int(u["layer"], f"{where}.layer", maximum=MAX_BLOCKS),
                                _int(u["layers"], f"{where}.layers", minimum=1, maximum=MAX_BLOCKS),
                                _int(u["list_index"], f"{where}.list_index", maximum=MAX_BLOCKS)))
        out.append(tuple(row))
    return GraphView(tuple(out))


def _step_plan(value, where: str, view: GraphView | None = None) -> StepPlan:
    _dict(value, where, keys=("kind", "blocks"))
    kind = StepKind(_one_of(value["kind"], f"{where}.kind", KINDS))
    blocks = _list(value["blocks"], f"{where}.blocks")
    part = _one_of(value.get("part", WHOLE), f"{where}.part", (WHOLE, PROBE, TAIL))
    extra = sorted(set(value) - {"kind", "blocks", "part"})
    if extra:
        raise ExportError(f"manifest field {where} has unknown fields {', '.join(map(str, extra))}")
    if view is not None and len(blocks) != len(view.blocks):
        raise _fail(f"{where}.blocks", f"one entry per block of the view ({len(view.blocks)})", f"{len(blocks)}")
    steps = []
    for i, b in enumerate(blocks):
        w = f"{where}.blocks[{i}]"
        _dict(b, w, keys=("kind", "k"))
        block_kind = BlockKind(_one_of(b["kind"], f"{w}.kind", tuple(k.value for k in BlockKind)))
        ks = tuple(_int(k, f"{w}.k[{j}]", maximum=MAX_DIM) for j, k in enumerate(_list(b["k"], f"{w}.k")))
        if view is not None:
            partial = [u for u in view.blocks[i] if u.partial]
            if block_kind is BlockKind.PARTIAL and (len(ks) != len(partial)
                                                    or any(k > u.tokens for k, u in zip(ks, partial))):
                raise _fail(f"{w}.k", f"one k <= tokens per partial unit of the block ({len(partial)})", list(ks))
            if block_kind is not BlockKind.PARTIAL and ks:
                raise _fail(f"{w}.k", "empty (only partial blocks recompute k tokens)", list(ks))
        steps.append(BlockStep(block_kind, ks))
    return StepPlan(kind, tuple(steps), part=part)


def _artifact(value, where: str, user_inputs: list[Tensor], view: GraphView) -> Artifact:
    keys = ("file", "plan", "tokens", "flops", "num_outputs", "single_output", "inputs", "outputs", "sha256")
    _dict(value, where, keys=keys)
    extra = sorted(set(value) - set(keys) - {"data_sha256", "max_abs_error"})
    if extra:
        raise ExportError(f"manifest field {where} has unknown fields {', '.join(extra)}")
    file = _string(value["file"], f"{where}.file")
    if not is_plain_name(file):
        raise _fail(f"{where}.file", "a file name inside the export folder (no directories, '..' or absolute "
                                     "paths)", file)
    plan = _step_plan(value["plan"], f"{where}.plan", view)
    _int(value["tokens"], f"{where}.tokens")
    _int(value["flops"], f"{where}.flops")
    if not isinstance(value["single_output"], bool):
        raise _fail(f"{where}.single_output", "true or false", value["single_output"])
    inputs = [_tensor(t, f"{where}.inputs[{i}]") for i, t in enumerate(_list(value["inputs"], f"{where}.inputs"))]
    outputs = [_tensor(t, f"{where}.outputs[{i}]") for i, t in enumerate(_list(value["outputs"], f"{where}.outputs"))]
    probe = plan.part == PROBE  # a probe returns no model output, only what it passes to its tail
    n = _int(value["num_outputs"], f"{where}.num_outputs", minimum=0 if probe else 1, maximum=len(outputs))
    if inputs[:len(user_inputs)] != user_inputs:
        raise ExportError(f"manifest field {where}.inputs must start with user_inputs, in order")
    for i, t in enumerate(inputs[len(user_inputs):], start=len(user_inputs)):
        if t.role in ("user", "output"):
            raise _fail(f"{where}.inputs[{i}].role", "a runtime-made role after the user inputs", t.role)
    written = (Role.CACHE.value, Role.STATE.value) + ((Role.CARRY.value, Role.SIGNAL.value) if probe else ())
    for i, t in enumerate(outputs):
        ok = t.role == "output" if i < n else t.role in written
        if not ok:
            raise _fail(f"{where}.outputs[{i}].role", "output" if i < n else " or ".join(written) +
                        " (a written entry)", t.role)
    err = value.get("max_abs_error")
    if err is not None and (isinstance(err, bool) or not isinstance(err, (int, float))):
        raise _fail(f"{where}.max_abs_error", "a number or null", err)
    data = value.get("data_sha256")
    return Artifact(file=file, plan=plan.to_json(), tokens=value["tokens"], flops=value["flops"], num_outputs=n,
                    single_output=value["single_output"], inputs=inputs, outputs=outputs,
                    sha256=_digest(value["sha256"], f"{where}.sha256"),
                    data_sha256=None if data is None else _digest(data, f"{where}.data_sha256"), max_abs_error=err)


def _digest(value, where: str) -> str:
    if not isinstance(value, str) or not re.fullmatch("[0-9a-f]{64}", value):
        raise _fail(where, "a sha256 digest (64 lowercase hex digits)", value)
    return value


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def is_plain_name(name: str) -> bool:
    """A file name with no directory part: what artifact names may be."""
    return (isinstance(name, str) and bool(name) and name not in (".", "..") and "/" not in name
            and "\\" not in name and "\x00" not in name and not os.path.isabs(name)
            and os.path.basename(name) == name and not name.startswith("."))


def confined(folder: str, name: str) -> str:
    """The path of `name` in `folder`, refused (before any look at the file system outside the folder) unless it
    is a plain name whose real path stays in the folder (no symlink out of it)."""
    if not is_plain_name(name):
        raise ExportError(f"artifact name {name!r} is not a plain file name inside the export folder")
    root = os.path.realpath(folder)
    path = os.path.join(root, name)
    if os.path.islink(path) or os.path.dirname(os.path.realpath(path)) != root:
        raise ExportError(f"artifact {name!r} is a symbolic link; export folders hold plain files only")
    return path


def file_sha256(path: str) -> str:
    """The sha256 of a file, read in 1 MiB chunks (hashlib.file_digest needs Python 3.11)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(2**20):
            digest.update(chunk)
    return digest.hexdigest()


def check_digests(folder: str, artifact: Artifact, where: str) -> None:
    """The artifact's files (and its external weights, if the folder holds them) are the ones its export wrote:
    a file copied in from another export of the model passes every shape check but mixes two models."""
    for name, digest, field in ((artifact.file, artifact.sha256, "sha256"),
                                (artifact.file + ".data", artifact.data_sha256, "data_sha256")):
        if digest is None:
            if os.path.lexists(os.path.join(folder, name)):
                raise ExportError(f"{name!r} is in the folder but manifest field {where}.{field} is null: the file "
                                  f"is not one its export wrote; export again")
            continue
        path = confined(folder, name)
        if not os.path.isfile(path):
            raise ExportError(f"{name!r} (manifest field {where}.{field}) is missing from {folder!r}")
        try:
            found = file_sha256(path)
        except OSError as exc:
            raise ExportError(f"{name!r} cannot be read: {exc.strerror or exc}") from None
        if found != digest:
            raise ExportError(f"artifact {name!r} does not match its digest (manifest field {where}.{field}): it "
                              f"was changed or copied in from another export after this one was written; export "
                              f"again")


def write_manifest(manifest: Manifest, folder: str) -> str:
    text = manifest.to_json()
    if len(text.encode()) > MAX_MANIFEST_BYTES:  # the loader would refuse it
        raise ExportError(f"the manifest would take {len(text.encode()) / 2**20:.0f} MiB, over the "
                          f"{MAX_MANIFEST_BYTES // 2**20} MiB a loader reads; export fewer steps or variants")
    path = os.path.join(folder, MANIFEST)
    # a new file only: a file or link planted under its name is an error, never written through
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
    with open(fd, "w", encoding="utf-8") as f:
        f.write(text)
    return path


MAX_MANIFEST_BYTES = 64 * 2**20


def load_json(path: str):
    """The JSON of a manifest file, or ExportError saying why it is none (too big, not UTF-8, not JSON, numbers
    too long to convert, nesting too deep)."""
    if not os.path.isfile(path) or os.path.getsize(path) > MAX_MANIFEST_BYTES:
        raise ExportError(f"{path} is not a manifest file (not a regular file, or over "
                          f"{MAX_MANIFEST_BYTES // 2**20} MiB)")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, int digit limit
        raise ExportError(f"{path} is not valid JSON: {str(exc)[:200]}") from None
    except OSError as exc:
        raise ExportError(f"{path} cannot be read: {exc.strerror or exc}") from None


def read_manifest(folder: str) -> Manifest:
    """Load and check a manifest: the folder, the JSON, every field, and that every artifact it names is a plain
    file in the folder."""
    if not isinstance(folder, (str, os.PathLike)) or not os.path.isdir(folder):
        raise ExportError(f"no export folder at {folder!r}; make one with fxcache.export(...) or `fxcache export`")
    folder = os.fspath(folder)
    if not os.path.exists(os.path.join(folder, MANIFEST)) and not os.path.islink(os.path.join(folder, MANIFEST)):
        raise ExportError(f"{folder!r} has no {MANIFEST}: not an fxcache export folder (or an incomplete one)")
    path = confined(folder, MANIFEST)
    manifest = Manifest.from_dict(load_json(path))
    for a in manifest.artifacts:
        file = confined(folder, a.file)
        if not os.path.isfile(file):
            raise ExportError(f"artifact {a.file!r} ({a.kind} variant) named in {path} is missing")
    return manifest


def export_files(data: Manifest | dict) -> set[str]:
    """The names an export folder of a manifest (or its JSON `data`) holds: the manifest, the artifacts, and the
    external weights (`<artifact>.data`) the ONNX exporter writes beside an artifact over protobuf's 2 GB. JSON of
    an earlier format, which this fxcache no longer loads, is read only for its artifact names, so that exporting
    again replaces its folder. ExportError if `data` is no fxcache manifest."""
    version = data.get("format_version") if isinstance(data, dict) else None
    if isinstance(data, Manifest):
        files = [a.file for a in data.artifacts]
    elif isinstance(version, int) and not isinstance(version, bool) and 1 <= version < FORMAT_VERSION:
        files = [_dict(a, f"artifacts[{i}]", keys=("file",))["file"]
                 for i, a in enumerate(_list(data.get("artifacts"), "artifacts"))]
        for i, file in enumerate(files):
            if not is_plain_name(file):
                raise _fail(f"artifacts[{i}].file", "a file name inside the export folder", file)
    else:
        files = [a.file for a in Manifest.from_dict(data).artifacts]
    return {MANIFEST} | set(files) | {f + ".data" for f in files}
