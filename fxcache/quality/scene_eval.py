"""The text-to-image reference (`t2i`) as the quality harness sees it, and its metrics.

`SceneReference` drives the reference pipeline's transformer the way `FluxPipeline` does (packed 2x2 latents,
timestep t in [0, 1], the prompt's T5 states and pooled CLIP vector, image and text position ids), with prompts
as integer labels into the 216 captions (the last label is the empty prompt, the unconditional branch of CFG).
Its images are the VAE's decodings. Its judge: prompt adherence by exact checks (`scenes.detect`: count, colour,
shape and position all right) and the Frechet distance (torchmetrics) of a scene classifier's features against
drawn scenes of the same prompts.
"""

from __future__ import annotations

import os
import random

import torch
from torch import nn

from . import scenes, t2i
from .reference import ReferenceModel

CLASSIFIER = os.path.join(os.path.dirname(t2i.CHECKPOINT), "scenes_classifier.safetensors")
HEADS = {"count": len(scenes.COUNTS), "colour": len(scenes.COLOURS), "shape": len(scenes.SHAPES),
         "position": len(scenes.POSITIONS)}
CAPTIONS = [s.caption() for s in scenes.all_scenes()]
EMPTY = len(CAPTIONS)  # the label of the empty prompt


def eval_labels(n: int) -> torch.Tensor:
    """`n` prompt labels spread over the captions (a stride coprime with 216: every attribute value early on)."""
    return torch.tensor([(7 + 37 * i) % len(CAPTIONS) for i in range(n)])


class SceneConditioner(nn.Module):
    """Prompt label -> the FLUX transformer's text inputs, encoded once by the pipeline's own text encoders."""

    def __init__(self, pipe):
        super().__init__()
        clip_ids, t5_ids = t2i.token_ids(pipe, CAPTIONS + [""])
        with torch.no_grad():
            seq, pooled = t2i.encode(pipe, clip_ids, t5_ids)
        self.register_buffer("seq", seq.float())
        self.register_buffer("pooled", pooled.float())

    def forward(self, labels: torch.Tensor) -> dict:
        return dict(encoder_hidden_states=self.seq[labels], pooled_projections=self.pooled[labels])


class SceneReference(ReferenceModel):
    """The reference pipeline's transformer, called as FluxPipeline calls it; images decoded by its VAE."""

    null_label = EMPTY

    def __init__(self, pipe, meta: dict | None = None):
        super().__init__("scenes", pipe.transformer, SceneConditioner(pipe).eval(), dict(meta or {}))
        self.pipe = pipe
        side = scenes.SIZE // 2
        self.img_ids = type(pipe)._prepare_latent_image_ids(None, side, side, "cpu", torch.float32)
        self.txt_ids = torch.zeros(t2i.TEXT_TOKENS, 3)
        self._judge_state = None

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, t2i.LATENT_CHANNELS, scenes.SIZE, scenes.SIZE)

    def inputs(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> dict:
        b, c, h, w = x.shape
        return dict(hidden_states=type(self.pipe)._pack_latents(x, b, c, h, w), timestep=t.expand(b).to(x.dtype),
                    img_ids=self.img_ids, txt_ids=self.txt_ids, **cond)

    def call(self, model, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        out = model(**self.inputs(x, t, cond), return_dict=False)[0]
        return type(self.pipe)._unpack_latents(out, x.shape[2], x.shape[3], 1)  # latents are pixels (no downsampling)

    def example_inputs(self, batch: int = 1, cfg: bool = True) -> dict:
        rows = 2 * batch if cfg else batch
        labels = torch.cat([eval_labels(batch)] + ([torch.full((batch,), EMPTY)] if cfg else []))
        with torch.no_grad():
            return self.inputs(torch.zeros(self.latent_shape(rows)), torch.ones(1), self.conditioner(labels))

    def eval_labels(self, per_class: int) -> torch.Tensor:
        return eval_labels(10 * per_class)

    def sigmas(self, steps: int) -> list[float]:
        """FluxPipeline's: linear from 1 down to 1/steps (shift 1, no dynamic shifting)."""
        return [1.0 - i * (1.0 - 1.0 / steps) / max(steps - 1, 1) for i in range(steps)]

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.pipe.vae.config
        with torch.no_grad():
            return self.pipe.vae.decode(x / cfg.scaling_factor + cfg.shift_factor).sample.clamp(-1, 1)

    def captions(self, labels: torch.Tensor) -> list[str]:
        return [(CAPTIONS + [""])[int(i)] for i in labels]

    def judge(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
        """(Frechet distance of classifier features to drawn scenes of the same prompts -- four per image; with a
        few dozen images it carries estimation bias, so compare rows of one run, not runs of other sizes --,
        adherence: the fraction of images whose count, colour, shape and position all match the prompt)."""
        from torchmetrics.image.fid import FrechetInceptionDistance

        key = tuple(int(i) for i in labels)
        if self._judge_state is None or self._judge_state[0] != key:
            rng = random.Random(1234)
            real = torch.stack([scenes.draw(scenes.all_scenes()[i], rng) for i in key for _ in range(4)])
            self._judge_state = (key, load_scene_classifier(), real)
        _, classifier, real = self._judge_state
        fid = FrechetInceptionDistance(feature=classifier)
        with torch.no_grad():
            fid.update(real, real=True)
            fid.update(images.clamp(-1, 1), real=False)
            fd = float(fid.compute())
        picked = [scenes.all_scenes()[int(i)] for i in labels]
        return fd, scenes.adherence(images, picked)["all"]


def load_reference(folder: str | None = None) -> SceneReference:
    """The committed text-to-image reference (or a pipeline folder written by `train_reference.py scenes`)."""
    import json

    pipe = t2i.load_pipeline(folder)
    meta_path = os.path.join(folder or t2i.CHECKPOINT, "reference.json")
    meta = json.load(open(meta_path)) if os.path.exists(meta_path) else {"family": "scenes"}
    return SceneReference(pipe, meta)


class SceneClassifier(nn.Module):
    """32x32 RGB scenes -> logits of count, colour, shape and position (16 in all, concatenated): the features of
    the Frechet distance (`num_features` tells torchmetrics their size)."""

    num_features = sum(HEADS.values())

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 16, 128), nn.GELU(), nn.Linear(128, self.num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.float().clamp(-1, 1))

    def split(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(HEADS, logits.split(list(HEADS.values()), dim=1)))


def _targets(picked: list[scenes.Scene]) -> dict[str, torch.Tensor]:
    return dict(count=torch.tensor([s.count - 1 for s in picked]),
                colour=torch.tensor([list(scenes.COLOURS).index(s.colour) for s in picked]),
                shape=torch.tensor([scenes.SHAPES.index(s.shape) for s in picked]),
                position=torch.tensor([list(scenes.POSITIONS).index(s.position) for s in picked]))


def train_scene_classifier(n: int = 20000, epochs: int = 3, seed: int = 0,
                           noise: float = 0.1) -> tuple[SceneClassifier, dict[str, float]]:
    """Train on `n` drawn scenes (Gaussian pixel noise as augmentation); returns (model, held-out accuracy per
    attribute on 1000 other scenes)."""
    torch.manual_seed(seed)
    images, picked = scenes.dataset(n, seed)
    targets = _targets(picked)
    model = SceneClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(n, generator=g)
        for i in range(0, n, 128):
            idx = order[i:i + 128]
            x = images[idx] + noise * torch.rand(1, generator=g) * torch.randn(images[idx].shape, generator=g)
            out = model.split(model(x))
            loss = sum(nn.functional.cross_entropy(out[k], targets[k][idx]) for k in HEADS)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    test, test_picked = scenes.dataset(1000, seed + 1)
    with torch.no_grad():
        out = model.split(model(test))
    want = _targets(test_picked)
    return model, {k: float((out[k].argmax(1) == want[k]).float().mean()) for k in HEADS}


def load_scene_classifier(path: str = CLASSIFIER) -> SceneClassifier:
    from .classifier import load_weights

    return load_weights(SceneClassifier(), path, "scene classifier", "scene-classifier")


def sample_grid(pipe, path: str, prompts: int = 8, per_prompt: int = 3, steps: int = 50) -> None:
    """A look at the pipeline: `per_prompt` images of each of `prompts` captions (columns), via the pipeline."""
    from .grids import save_labelled_grid

    labels = eval_labels(prompts)
    caps = [CAPTIONS[int(i)] for i in labels]
    rows = []
    for r in range(per_prompt):
        gen = [torch.Generator().manual_seed(100 * r + i) for i in range(prompts)]
        out = pipe(caps, num_inference_steps=steps, generator=gen, output_type="pt", **t2i.CALL_ARGS).images
        rows.append((f"seed {r}", out * 2 - 1))
    save_labelled_grid(rows, path, columns=[c.replace(scenes.PREFIX + " ", "") for c in caps])
