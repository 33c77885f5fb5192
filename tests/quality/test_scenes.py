"""The text-to-image reference's data, exact checks, tokenizers and sampler, against the truth: drawn scenes, the
captions' grammar, and diffusers' own FluxPipeline."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxcache.quality import scenes, t2i


def test_every_caption_parses_back_and_names_one_scene():
    all_ = scenes.all_scenes()
    assert len(all_) == 216 and len({s.caption() for s in all_}) == 216
    for s in all_:
        assert scenes.parse(s.caption()) == s


@pytest.mark.parametrize("bad", ["a picture of two red circle on the left", "a picture of four red circles on the left",
                                 "two red circles on the left", "a picture of one red circles at the top",
                                 "a picture of one pink circle at the top", "a picture of one red circle in the middle"])
def test_a_caption_outside_the_grammar_is_refused_with_the_grammar(bad):
    with pytest.raises(ValueError, match="COUNT COLOUR SHAPE"):
        scenes.parse(bad)


@settings(max_examples=40, deadline=None)
@given(index=st.integers(0, 215), seed=st.integers(0, 10_000))
def test_the_detector_reads_a_drawn_scene_exactly(index, seed):
    scene = scenes.all_scenes()[index]
    img = scenes.draw(scene, random.Random(seed))
    found = scenes.detect(img)
    assert found["count"] == scene.count
    assert found["colour"] == scene.colour
    assert found["shape"] == scene.shape
    assert scene.position in found["position"]
    assert scenes.adherence(img[None], [scene])["all"] == 1.0


def test_adherence_fails_the_attribute_that_differs():
    scene = scenes.Scene(2, "red", "circle", "left")
    img = scenes.draw(scene, random.Random(0))[None]
    assert scenes.adherence(img, [scenes.Scene(2, "blue", "circle", "left")]) == dict(
        count=1.0, colour=0.0, shape=1.0, position=1.0, all=0.0)
    assert scenes.adherence(img, [scenes.Scene(3, "red", "square", "right")])["all"] == 0.0
    blank = torch.full((1, 3, 32, 32), -1.0)
    assert scenes.adherence(blank, [scene]) == dict(count=0.0, colour=0.0, shape=0.0, position=0.0, all=0.0)


@pytest.fixture(scope="module")
def fresh_pipe():
    return t2i.make_pipeline(t2i.build_components(seed=3))


def test_each_caption_word_is_one_token_in_both_tokenizers(fresh_pipe):
    caption = "a picture of three cyan triangles at the bottom"
    clip, t5 = t2i.token_ids(fresh_pipe, [caption])
    words = len(caption.split())
    assert clip.shape == t5.shape == (1, t2i.TEXT_TOKENS)
    assert fresh_pipe.tokenizer.convert_ids_to_tokens(clip[0, 1:words + 1].tolist()) == [w + "</w>"
                                                                                         for w in caption.split()]
    assert fresh_pipe.tokenizer_2.convert_ids_to_tokens(t5[0, :words].tolist()) == ["▁" + w for w in caption.split()]
    assert clip[0, words + 1] == fresh_pipe.tokenizer.eos_token_id and t5[0, words] == fresh_pipe.tokenizer_2.eos_token_id


def test_our_text_encoding_is_the_pipelines(fresh_pipe):
    prompts = ["a picture of two red circles on the left", ""]
    seq, pooled = t2i.encode(fresh_pipe, *t2i.token_ids(fresh_pipe, prompts))
    want_seq, want_pooled, _ = fresh_pipe.encode_prompt(prompts, prompt_2=None, max_sequence_length=t2i.TEXT_TOKENS)
    assert torch.allclose(seq, want_seq, atol=1e-6) and torch.allclose(pooled, want_pooled, atol=1e-6)


def test_the_harness_sampler_is_flux_pipelines_own(tmp_path, fresh_pipe):
    """The evaluation loop (`SceneReference` + `sampling.sample`, sequential CFG) gives FluxPipeline's images from
    the same starting latents, at an odd step count."""
    from diffusers import FluxPipeline

    from fxcache.quality.sampling import sample
    from fxcache.quality.scene_eval import SceneReference

    t2i.save_pipeline(fresh_pipe.components, str(tmp_path / "p"))
    pipe = t2i.load_pipeline(str(tmp_path / "p"))
    ref = SceneReference(pipe)
    labels = torch.tensor([5, 100, 200])
    noise = torch.randn(ref.latent_shape(3), generator=torch.Generator().manual_seed(0))
    ours = ref.decode(sample(ref, ref.transformer, labels, steps=7, guidance=4.0, cfg="sequential", noise=noise))
    packed = FluxPipeline._pack_latents(noise, 3, t2i.LATENT_CHANNELS, 32, 32)
    theirs = pipe(ref.captions(labels), num_inference_steps=7, latents=packed, output_type="pt",
                  **t2i.CALL_ARGS).images * 2 - 1
    assert (ours - theirs).abs().max() < 1e-5


def test_the_scene_judge_scores_drawn_scenes_as_perfect_and_noise_as_far():
    from fxcache.quality.scene_eval import SceneReference, eval_labels

    labels = eval_labels(20)
    rng = random.Random(99)
    drawn = torch.stack([scenes.draw(scenes.all_scenes()[int(i)], rng) for i in labels])
    judge = SceneReference.judge.__get__(type("R", (), {"_judge_state": None})())
    fd_real, adherence_real = judge(drawn, labels)
    fd_noise, adherence_noise = judge(torch.rand(20, 3, 32, 32) * 2 - 1, labels)
    assert adherence_real == 1.0 and adherence_noise < 0.2
    assert fd_real < 0.05 * fd_noise
