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

from ..errors import ExportError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
FORMATS = ("onnx", "tensorrt")


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
        try:
            out = dict(data)
            out["user_inputs"] = [Tensor(**t) for t in data["user_inputs"]]
            arts = []
            for a in data["artifacts"]:
                a = dict(a)
                a["inputs"] = [Tensor(**t) for t in a["inputs"]]
                a["outputs"] = [Tensor(**t) for t in a["outputs"]]
                arts.append(Artifact(**a))
            out["artifacts"] = arts
            manifest = cls(**out)
        except TypeError as exc:
            raise ExportError(f"malformed manifest: {exc}") from None
        if manifest.format not in FORMATS:
            raise ExportError(f"manifest format {manifest.format!r} is not one of {', '.join(FORMATS)}")
        return manifest

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


def write_manifest(manifest: Manifest, folder: str) -> str:
    path = os.path.join(folder, MANIFEST)
    with open(path, "w") as f:
        f.write(manifest.to_json())
    return path


def read_manifest(folder: str) -> Manifest:
    """Load and check a manifest: the folder, the JSON, and that every artifact file it names exists."""
    if not os.path.isdir(folder):
        raise ExportError(f"no export folder at {folder!r}; make one with fxcache.export(...) or `fxcache export`")
    path = os.path.join(folder, MANIFEST)
    if not os.path.exists(path):
        raise ExportError(f"{folder!r} has no {MANIFEST}: not an fxcache export folder (or an incomplete one)")
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise ExportError(f"{path} is not valid JSON: {exc}") from None
    manifest = Manifest.from_dict(data)
    for a in manifest.artifacts:
        if not os.path.exists(os.path.join(folder, a.file)):
            raise ExportError(f"artifact {a.file!r} ({a.kind} variant) named in {path} is missing")
    return manifest
