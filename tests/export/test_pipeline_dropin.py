"""A CachedSession replaces the transformer of a real diffusers pipeline for whole generations."""

from __future__ import annotations

import pytest
import torch

import fxcache
from fxcache.deploy import CachedSession

from helpers import make_model

pytest.importorskip("onnxruntime", reason="ONNX export tests need onnxruntime (in the dev extra)")

STEPS = 8


def dit_pipeline():
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        layers_per_block=1, norm_num_groups=4, sample_size=12).eval()
    return DiTPipeline(transformer=make_model("dit"), vae=vae, scheduler=DDIMScheduler())


def generate(pipe, labels):
    return pipe(class_labels=labels, num_inference_steps=STEPS, guidance_scale=4.0, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def test_session_drives_a_dit_pipeline_like_the_compiled_transformer(tmp_path):
    pipe = dit_pipeline()
    labels = [1, 7]
    # the pipeline's own call, as the export example: CFG doubles the batch, DDIM gives int64 timesteps
    example = dict(hidden_states=torch.randn(4, 4, 12, 12), timestep=torch.full((4,), 999, dtype=torch.long),
                   class_labels=torch.tensor([1, 7, 1000, 1000]))
    config = fxcache.DuCaConfig(interval=3)
    fxcache.export(pipe.transformer, example, config, out_dir=str(tmp_path), num_steps=STEPS)
    transformer = pipe.transformer
    pipe.transformer = torch.compile(transformer, backend=fxcache.cache_backend(config, lowering="eager"),
                                     dynamic=False)
    with torch.no_grad():
        expected = generate(pipe, labels)
    compiled_kinds = [r["kind"] for r in fxcache.stats(pipe.transformer)]
    session = CachedSession(str(tmp_path))
    pipe.transformer = session
    first = generate(pipe, labels)
    second = generate(pipe, labels)  # a new request: the timestep rule resets the caches
    kinds = [r["kind"] for r in session.stats()]
    assert kinds[:STEPS] == compiled_kinds == [config.step_kind(s).value for s in range(STEPS)]
    assert kinds[STEPS:] == kinds[:STEPS]
    assert abs(first - expected).max() < 1e-4 and (first == second).all()
    pipe.transformer = transformer
    with torch.no_grad():
        uncached = generate(pipe, labels)
    assert abs(first - uncached).max() > 1e-4, "the session must have cached"
