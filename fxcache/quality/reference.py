"""Reference models with learned structure: small diffusers transformers trained on MNIST digits by our scripts.

Each family wraps a real diffusers transformer (loaded with `from_pretrained` from a local folder) and a small
conditioner that turns a class label into the transformer's conditioning inputs:

- `flux`:   FluxTransformer2DModel (2 double + 2 single blocks); the "text" tokens are 4 learned embeddings of the
            class, the pooled projection one more. Rectified flow, sampled with FlowMatchEulerDiscreteScheduler.
- `dit`:    DiTTransformer2DModel, class-conditional through its own label embedding (class 10 = unconditional).
            Rectified flow as well (timestep = 1000 t), FlowMatchEulerDiscreteScheduler.
- `pixart`: PixArtTransformer2DModel, cross-attention to 4 learned class tokens.

Images are 32x32 (MNIST padded), one channel, in [-1, 1]; FLUX sees them as 8x8 tokens of 4x4 pixels.
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch
from torch import nn

from ..testing.models import flux_ids
from .files import write_json

CHECKPOINTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints")
FAMILIES = ("flux", "dit", "pixart")
NULL_CLASS = 10  # the unconditional "class" used for classifier-free guidance
TEXT_TOKENS = 4
IMAGE = 32
FLUX_PATCH = 4


def transformer_config(family: str) -> tuple[type, dict]:
    from diffusers import DiTTransformer2DModel, FluxTransformer2DModel, PixArtTransformer2DModel

    if family == "flux":
        return FluxTransformer2DModel, dict(
            patch_size=1, in_channels=FLUX_PATCH * FLUX_PATCH, num_layers=2, num_single_layers=2,
            attention_head_dim=32, num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=64,
            guidance_embeds=False, axes_dims_rope=(8, 12, 12))
    if family == "dit":
        return DiTTransformer2DModel, dict(
            num_attention_heads=4, attention_head_dim=32, in_channels=1, out_channels=1, num_layers=4,
            sample_size=IMAGE, patch_size=4, num_embeds_ada_norm=NULL_CLASS)
    if family == "pixart":
        return PixArtTransformer2DModel, dict(
            sample_size=IMAGE, num_layers=4, attention_head_dim=32, num_attention_heads=4, in_channels=1,
            out_channels=1, cross_attention_dim=128, caption_channels=64, patch_size=4,
            norm_type="ada_norm_single", use_additional_conditions=False)
    raise ValueError(f"unknown reference family {family!r}; known: {', '.join(FAMILIES)}")


class Conditioner(nn.Module):
    """Class label -> the transformer's conditioning inputs (learned tokens; labels for DiT)."""

    def __init__(self, family: str):
        super().__init__()
        self.family = family
        if family in ("flux", "pixart"):
            self.tokens = nn.Embedding(NULL_CLASS + 1, TEXT_TOKENS * 64)
        if family == "flux":
            self.pooled = nn.Embedding(NULL_CLASS + 1, 64)

    def forward(self, labels: torch.Tensor) -> dict:
        b = labels.shape[0]
        if self.family == "dit":
            return dict(class_labels=labels)
        out = dict(encoder_hidden_states=self.tokens(labels).reshape(b, TEXT_TOKENS, 64))
        if self.family == "flux":
            out["pooled_projections"] = self.pooled(labels)
        else:
            out["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
        return out


def pack(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, 32, 32) -> (B, 64, 16) tokens of 4x4 pixels (FLUX layout)."""
    b, s, p = x.shape[0], IMAGE // FLUX_PATCH, FLUX_PATCH
    return x.reshape(b, s, p, s, p).permute(0, 1, 3, 2, 4).reshape(b, s * s, p * p)


def unpack(t: torch.Tensor) -> torch.Tensor:
    b, s, p = t.shape[0], IMAGE // FLUX_PATCH, FLUX_PATCH
    return t.reshape(b, s, s, p, p).permute(0, 1, 3, 2, 4).reshape(b, 1, IMAGE, IMAGE)


@dataclasses.dataclass
class ReferenceModel:
    """A trained (or freshly initialised) reference: transformer + conditioner, and how to call them."""

    family: str
    transformer: nn.Module
    conditioner: Conditioner
    meta: dict = dataclasses.field(default_factory=dict)

    null_label = NULL_CLASS  # the conditioner's label of the unconditional branch (CFG)

    def eval_labels(self, per_class: int) -> torch.Tensor:
        """The labels a harness samples: `per_class` of each digit."""
        return torch.arange(10).repeat_interleave(per_class)

    def sigmas(self, steps: int) -> list[float] | None:
        """The sampler's noise levels, or None for the scheduler's own (1 down to 1/1000, linear)."""
        return None

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Sampler output -> images in [-1, 1] (digits are sampled in pixel space)."""
        return x

    def judge(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
        """(Frechet distance of the digit classifier's logits to the real digits', class accuracy)."""
        from .classifier import load_classifier, real_feature_stats
        from .metrics import frechet_distance

        with torch.no_grad():
            logits = load_classifier().fd_features(images)
        return frechet_distance(logits, real_feature_stats()), float((logits.argmax(1) == labels).float().mean())

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, 1, IMAGE, IMAGE)

    def inputs(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> dict:
        """The transformer's keyword arguments for images x at time t in [0, 1] (1 = pure noise)."""
        b = x.shape[0]
        if self.family == "flux":
            side = IMAGE // FLUX_PATCH
            img_ids, txt_ids = flux_ids(side, side, TEXT_TOKENS)
            return dict(hidden_states=pack(x), timestep=t.expand(b).to(x.dtype), img_ids=img_ids, txt_ids=txt_ids,
                        **cond)
        return dict(hidden_states=x, timestep=(1000.0 * t).expand(b).to(x.dtype), **cond)

    def call(self, model, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """Velocity prediction v = noise - x0 at time t in [0, 1] (1 = pure noise), image layout in and out."""
        out = model(**self.inputs(x, t, cond), return_dict=False)[0]
        return unpack(out) if self.family == "flux" else out

    def example_inputs(self, batch: int = 1, cfg: bool = True) -> dict:
        """One call's inputs at the shapes of sampling `batch` images (doubled rows with batched CFG)."""
        rows = 2 * batch if cfg else batch
        labels = torch.arange(rows) % (NULL_CLASS + 1)
        with torch.no_grad():
            return self.inputs(torch.zeros(self.latent_shape(rows)), torch.ones(1), self.conditioner(labels))


def build(family: str, seed: int = 0) -> ReferenceModel:
    cls, cfg = transformer_config(family)
    torch.manual_seed(seed)
    return ReferenceModel(family, cls(**cfg).eval(), Conditioner(family).eval(), dict(family=family))


class _quiet_diffusers:
    """Silence diffusers' and transformers' loading chatter (accelerate hints, dtype notes, progress bars) while
    loading or saving checkpoints."""

    def __enter__(self):
        from diffusers.utils import logging as dl

        self.level = dl.get_verbosity()
        self.bars = dl.is_progress_bar_enabled()
        dl.set_verbosity_error()
        dl.disable_progress_bar()
        try:
            from transformers.utils import logging as tl
        except ImportError:
            self.tl = None
        else:
            self.tl, self.tlevel, self.tbars = tl, tl.get_verbosity(), tl.is_progress_bar_enabled()
            tl.set_verbosity_error()
            tl.disable_progress_bar()

    def __exit__(self, *exc):
        from diffusers.utils import logging as dl

        dl.set_verbosity(self.level)
        if self.bars:
            dl.enable_progress_bar()
        if self.tl is not None:
            self.tl.set_verbosity(self.tlevel)
            if self.tbars:
                self.tl.enable_progress_bar()


def save(ref: ReferenceModel, folder: str) -> None:
    from safetensors.torch import save_file

    import copy

    os.makedirs(folder, exist_ok=True)
    # float16 on disk halves the committed size; `load` computes in float32 (the rounding is far below the noise
    # floor of the digits: see tests/quality)
    with _quiet_diffusers():
        copy.deepcopy(ref.transformer).to(torch.float16).save_pretrained(os.path.join(folder, "transformer"))
    save_file({k: v.contiguous() for k, v in ref.conditioner.state_dict().items()},
              os.path.join(folder, "conditioner.safetensors"))
    write_json(os.path.join(folder, "reference.json"), ref.meta, indent=2, sort_keys=True)


#: every reference the harness evaluates: the digit ones and the text-to-image one
ALL_FAMILIES = FAMILIES + ("scenes",)


def load_family(family: str) -> ReferenceModel:
    """A committed reference by name: a digit family (`load`) or `"scenes"`, the text-to-image FluxPipeline."""
    if family == "scenes":
        from .scene_eval import load_reference

        return load_reference()
    return load(family)


def load(family_or_folder: str = "flux") -> ReferenceModel:
    """A committed reference (`"flux"`, `"dit"`, `"pixart"`) or a folder written by `save`, via `from_pretrained`.

    A family name is always the committed one, never a folder of that name in the working directory (pass
    "./flux" for that)."""
    from safetensors.torch import load_file

    folder = family_or_folder
    if folder in FAMILIES or not os.path.isdir(folder):
        folder = os.path.join(CHECKPOINTS, family_or_folder)
    meta_path = os.path.join(folder, "reference.json")
    if not os.path.exists(meta_path):
        have = sorted(d for d in os.listdir(CHECKPOINTS)) if os.path.isdir(CHECKPOINTS) else []
        raise FileNotFoundError(f"no reference model at {folder!r} (reference.json missing); committed ones: "
                                f"{', '.join(have) or 'none'}; train one with benchmarks/train_reference.py")
    with open(meta_path) as f:
        meta = json.load(f)
    family = meta["family"]
    cls, _ = transformer_config(family)
    with _quiet_diffusers():
        transformer = cls.from_pretrained(os.path.join(folder, "transformer"), torch_dtype=torch.float32).eval()
    conditioner = Conditioner(family)
    conditioner.load_state_dict(load_file(os.path.join(folder, "conditioner.safetensors")))
    return ReferenceModel(family, transformer, conditioner.eval(), meta)
