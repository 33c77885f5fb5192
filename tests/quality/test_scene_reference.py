"""The committed text-to-image reference, used as a user uses it: diffusers' own `FluxPipeline.from_pretrained` on
the folder (no fxcache code), then `fxcache.enable` on that pipeline."""

from __future__ import annotations

import os

import pytest
import torch

import fxcache
from fxcache.quality import scenes, t2i
from fxcache.quality.metrics import psnr

PROMPTS = ["a picture of two red circles on the left", "a picture of one blue square at the top",
           "a picture of three yellow triangles at the bottom", "a picture of one green circle on the right",
           "a picture of two magenta squares on the right", "a picture of three cyan circles at the top"]
#: measured on the committed checkpoint for these prompts and seeds at 20 steps: colour 5/6, count 4/6, shape 4/6,
#: position 2/6 (mean 0.625); an untrained model scores about chance (colour 1/6, mean ~0.15). The bars sit below.
MIN_COLOUR, MIN_MEAN = 0.66, 0.4


@pytest.fixture(scope="module")
def pipe():
    from diffusers import FluxPipeline

    p = FluxPipeline.from_pretrained(t2i.CHECKPOINT, local_files_only=True).to(torch.float32)
    p.set_progress_bar_config(disable=True)
    return p


def generate(pipe, prompts=PROMPTS, steps=20, seed=0, **overrides):
    gen = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    args = dict(t2i.CALL_ARGS, **overrides)
    return pipe(prompts, num_inference_steps=steps, generator=gen, output_type="pt", **args).images * 2 - 1


def test_the_folder_is_data_only_and_small():
    files = [os.path.join(d, f) for d, _, fs in os.walk(t2i.CHECKPOINT) for f in fs]
    assert not [f for f in files if f.endswith((".py", ".pkl", ".bin", ".pt"))]
    assert {"model_index.json", "reference.json", "curve.json", "samples.png"} <= {os.path.basename(f) for f in files}
    assert sum(os.path.getsize(f) for f in files) < 20e6


def test_the_reference_draws_what_the_prompt_asks(pipe):
    images = generate(pipe)
    score = scenes.adherence(images, [scenes.parse(p) for p in PROMPTS])
    assert score["colour"] >= MIN_COLOUR, score
    assert sum(score[a] for a in scenes.ATTRIBUTES) / len(scenes.ATTRIBUTES) >= MIN_MEAN, score


def test_duca_on_the_pipeline_is_close_to_uncached_and_requests_do_not_leak(pipe):
    uncached = generate(pipe, steps=20)
    fxcache.enable(pipe, "duca", lowering="eager")
    try:
        first = generate(pipe, steps=20)
        shorter = generate(pipe, steps=9, seed=5)  # another request in between: an odd, shorter one
        again = generate(pipe, steps=20)
    finally:
        fxcache.disable(pipe)
    assert torch.equal(first, again)
    assert (first - uncached).abs().max() > 0  # it cached something
    assert psnr(first, uncached).mean() > 20.0
    fresh = generate(pipe, steps=9, seed=5)
    assert psnr(shorter, fresh).mean() > 20.0


def test_every_step_full_equals_uncached_at_another_size(pipe):
    """48x48 images: 576 image tokens, not the 256 the reference was trained at."""
    uncached = generate(pipe, PROMPTS[:2], steps=5, height=48, width=48)
    fxcache.enable(pipe, fxcache.config.make_config("fora", interval=1), lowering="eager")
    try:
        full = generate(pipe, PROMPTS[:2], steps=5, height=48, width=48)
    finally:
        fxcache.disable(pipe)
    assert full.shape == (2, 3, 48, 48)
    assert (full - uncached).abs().max() < 1e-5
