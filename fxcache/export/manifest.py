"""The manifest of an exported cached transformer: everything a runtime needs to replay the schedule.

`manifest.json` in the export folder. Per artifact (one per variant the method needs): its file, step kind,
schedule key, token rows, FLOPs, and its inputs / outputs in order with their role, shape and dtype. Roles:
`user:<path>` (a transformer input: `hidden_states`, `added_cond_kwargs.resolution`), `extra:<kind>:<key>` (token
indices, caches, Taylor scalars: made by the runtime), `output:<i>` (the transformer's i-th output) and
`cache:<key>` (a cache entry the runtime keeps for later steps).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

from ..config import MAX_STEPS
from ..errors import ExportError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
FORMATS = ("onnx", "tensorrt")
#: the most steps an export covers and a manifest may hold: `fxcache.export` and the loader share this bound
MAX_NUM_STEPS = MAX_STEPS


@dataclasses.dataclass
class Tensor:
    name: str
    role: str
    shape: list[int]
    dtype: str


@dataclasses.dataclass
class Artifact:
    file: str
    kind: str  # a StepKind value
    schedule_key: int
    tokens: int
    flops: int
    num_outputs: int
    single_output: bool
    inputs: list[Tensor]
    outputs: list[Tensor]
    max_abs_error: float | None = None  # runtime vs. the torch variant on the export example


@dataclasses.dataclass
class Manifest:
    format: str
    method: str
    config: dict
    num_steps: int
    schedule: list[dict]  # per step: {"step", "kind", "schedule_key"} (what the runtime will pick with caches)
    user_inputs: list[Tensor]  # in the order every artifact takes them first
    timestep_input: int  # index into user_inputs
    output_structure: str  # "tuple" | "tensor" | "model_output"
    model_class: str
    model_config: dict
    artifacts: list[Artifact]
    versions: dict
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=False, default=_jsonable)

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
        schedule = _list(data["schedule"], "schedule")
        if len(schedule) != num_steps:
            raise _fail("schedule", f"a list of num_steps={num_steps} entries", f"{len(schedule)} entries")
        for i, entry in enumerate(schedule):
            where = f"schedule[{i}]"
            _dict(entry, where, keys=("step", "kind", "schedule_key"))
            if type(entry["step"]) is not int or entry["step"] != i:
                raise _fail(f"{where}.step", f"{i} (one entry per step, in order)", entry["step"])
            _one_of(entry["kind"], f"{where}.kind", KINDS)
            _int(entry["schedule_key"], f"{where}.schedule_key", maximum=MAX_NUM_STEPS)
        user_inputs = [_tensor(t, f"user_inputs[{i}]") for i, t in enumerate(_list(data["user_inputs"], "user_inputs"))]
        if not user_inputs:
            raise ExportError("manifest field user_inputs is empty")
        for i, t in enumerate(user_inputs):
            if not t.role.startswith("user:"):
                raise ExportError(f"manifest field user_inputs[{i}].role must start with 'user:', got {t.role!r}")
        _int(data["timestep_input"], "timestep_input", maximum=len(user_inputs) - 1)
        _one_of(data["output_structure"], "output_structure", ("tuple", "tensor", "model_output"))
        _string(data["model_class"], "model_class", empty=True)
        _model_config(data["model_config"])
        _dict(data["versions"], "versions")
        artifacts = [_artifact(a, f"artifacts[{i}]", user_inputs)
                     for i, a in enumerate(_list(data["artifacts"], "artifacts"))]
        if not artifacts:
            raise ExportError("manifest field artifacts is empty")
        if not any(a.kind == "full" for a in artifacts):
            raise ExportError("manifest field artifacts has no full variant (every schedule starts with one)")
        out = dict(data, user_inputs=user_inputs, artifacts=artifacts)
        return cls(**out)

    def artifact(self, kind: str, key: int = 0) -> Artifact:
        for a in self.artifacts:
            if a.kind == kind and a.schedule_key == key:
                return a
        have = ", ".join(f"{a.kind}@{a.schedule_key}" for a in self.artifacts)
        raise ExportError(f"no exported artifact for {kind} at schedule key {key} (have: {have}); the schedule "
                          f"asked for a step beyond the exported num_steps={self.num_steps}? export again with "
                          f"num_steps covering the sampler's steps")


def _jsonable(value):
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


# -- field checks ------------------------------------------------------------------------------------------------

KINDS = ("full", "partial", "reuse", "skip", "forecast", "cluster")
EXTRA_KINDS = ("idx", "rand", "cache", "state", "coef", "diff", "kinit", "warm")
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


_COUNT = re.compile(r"[1-9][0-9]{0,9}")  # a token count in a role key: decimal, no sign, no leading zeros


def _extra_role(kind: str, key: str, shape: list[int], dtype: str, where: str) -> None:
    """What the runtime parses and allocates from an extra input: token indices `idx:<tokens>` (units, k) and
    k-means starts `kinit:<tokens>` (count,) with k, count <= tokens; Taylor scalars of at most 9 / 8 entries."""
    def need(ok: bool, field: str, what: str, got) -> None:
        if not ok:
            raise _fail(f"{where}.{field}", what, got)

    if kind in ("idx", "kinit"):
        head, _, count = key.partition(":")
        need(head == kind and _COUNT.fullmatch(count) is not None and int(count) <= MAX_DIM, "role",
             f"extra:{kind}:{kind}:<tokens> with tokens an int >= 1", f"extra:{kind}:{key}")
        tokens = int(count)
        if kind == "idx":
            need(len(shape) == 2 and shape[1] <= tokens, "shape", f"(units, k) with k <= tokens={tokens}", shape)
        else:
            need(len(shape) == 1 and shape[0] <= tokens, "shape", f"(count,) with count <= tokens={tokens}", shape)
        need(dtype == "int64", "dtype", "int64 (token indices)", dtype)
    elif kind in ("coef", "diff"):
        most = 9 if kind == "coef" else 8  # Taylor orders up to 8: m + 1 coefficients, m differences
        need(len(shape) == 1 and 1 <= shape[0] <= most, "shape", f"(n,) with 1 <= n <= {most}", shape)
        need(dtype == "float32", "dtype", "float32 (Taylor scalars)", dtype)
    elif kind == "warm":
        need(shape == [1], "shape", "[1]", shape)
        need(dtype == "float32", "dtype", "float32", dtype)
    elif kind == "rand":
        need(dtype == "float32", "dtype", "float32 (uniform draws)", dtype)


def _tensor(value, where: str) -> Tensor:
    _dict(value, where, keys=("name", "role", "shape", "dtype"))
    extra = sorted(set(value) - {"name", "role", "shape", "dtype"})
    if extra:
        raise ExportError(f"manifest field {where} has unknown fields {', '.join(extra)}")
    _string(value["name"], f"{where}.name")
    role = _string(value["role"], f"{where}.role")
    shape = _list(value["shape"], f"{where}.shape")
    if len(shape) > MAX_RANK:
        raise _fail(f"{where}.shape", f"at most {MAX_RANK} dimensions", shape)
    for j, d in enumerate(shape):
        _int(d, f"{where}.shape[{j}]", maximum=MAX_DIM)
    _one_of(value["dtype"], f"{where}.dtype", DTYPES)
    head = role.split(":", 1)[0]
    if head not in ("user", "extra", "output", "cache") or ":" not in role:
        raise _fail(f"{where}.role", "user:<path>, extra:<kind>:<key>, output:<i> or cache:<key>", role)
    if head == "extra":
        parts = role.split(":", 2)
        if len(parts) != 3 or parts[1] not in EXTRA_KINDS or not parts[2]:
            raise _fail(f"{where}.role", f"extra:<kind>:<key> with kind one of {', '.join(EXTRA_KINDS)}", role)
        _extra_role(parts[1], parts[2], list(shape), value["dtype"], where)
    return Tensor(value["name"], role, list(shape), value["dtype"])


def _artifact(value, where: str, user_inputs: list[Tensor]) -> Artifact:
    keys = ("file", "kind", "schedule_key", "tokens", "flops", "num_outputs", "single_output", "inputs", "outputs")
    _dict(value, where, keys=keys)
    extra = sorted(set(value) - set(keys) - {"max_abs_error"})
    if extra:
        raise ExportError(f"manifest field {where} has unknown fields {', '.join(extra)}")
    file = _string(value["file"], f"{where}.file")
    if not is_plain_name(file):
        raise _fail(f"{where}.file", "a file name inside the export folder (no directories, '..' or absolute "
                                     "paths)", file)
    _one_of(value["kind"], f"{where}.kind", KINDS)
    _int(value["schedule_key"], f"{where}.schedule_key")
    _int(value["tokens"], f"{where}.tokens")
    _int(value["flops"], f"{where}.flops")
    if not isinstance(value["single_output"], bool):
        raise _fail(f"{where}.single_output", "true or false", value["single_output"])
    inputs = [_tensor(t, f"{where}.inputs[{i}]") for i, t in enumerate(_list(value["inputs"], f"{where}.inputs"))]
    outputs = [_tensor(t, f"{where}.outputs[{i}]") for i, t in enumerate(_list(value["outputs"], f"{where}.outputs"))]
    n = _int(value["num_outputs"], f"{where}.num_outputs", minimum=1, maximum=len(outputs))
    if inputs[:len(user_inputs)] != user_inputs:
        raise ExportError(f"manifest field {where}.inputs must start with user_inputs, in order")
    for i, t in enumerate(inputs[len(user_inputs):], start=len(user_inputs)):
        if not t.role.startswith("extra:"):
            raise _fail(f"{where}.inputs[{i}].role", "extra:<kind>:<key> after the user inputs", t.role)
    for i, t in enumerate(outputs):
        want = "output:" if i < n else "cache:"
        if not t.role.startswith(want):
            raise _fail(f"{where}.outputs[{i}].role", f"{want}... (num_outputs={n})", t.role)
    err = value.get("max_abs_error")
    if err is not None and (isinstance(err, bool) or not isinstance(err, (int, float))):
        raise _fail(f"{where}.max_abs_error", "a number or null", err)
    return Artifact(file=file, kind=value["kind"], schedule_key=value["schedule_key"], tokens=value["tokens"],
                    flops=value["flops"], num_outputs=n, single_output=value["single_output"], inputs=inputs,
                    outputs=outputs, max_abs_error=err)


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


def write_manifest(manifest: Manifest, folder: str) -> str:
    text = manifest.to_json()
    if len(text.encode()) > MAX_MANIFEST_BYTES:  # the loader would refuse it
        raise ExportError(f"the manifest would take {len(text.encode()) / 2**20:.0f} MiB, over the "
                          f"{MAX_MANIFEST_BYTES // 2**20} MiB a loader reads; export fewer steps or variants")
    path = os.path.join(folder, MANIFEST)
    with open(path, "w") as f:
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


def export_files(manifest: Manifest) -> set[str]:
    """The names an export folder of `manifest` holds: the manifest, the artifacts, and the external weights
    (`<artifact>.data`) the ONNX exporter writes beside an artifact over protobuf's 2 GB."""
    names = {MANIFEST}
    for a in manifest.artifacts:
        names |= {a.file, a.file + ".data"}
    return names
