"""The text-to-image reference: a real diffusers `FluxPipeline` trained on procedural scenes by our own script.

Components, all small and all ours (no hub download):

- `tokenizer` / `tokenizer_2`: a CLIP BPE tokenizer and a T5 unigram tokenizer whose vocabularies are the caption
  words (`scenes.vocabulary()`), 16 tokens per prompt;
- `text_encoder` (`CLIPTextModel`, its pooled output) and `text_encoder_2` (`T5EncoderModel`, its token states),
  trained with the transformer;
- `vae`: an `AutoencoderKL` without downsampling (4 latent channels per pixel), trained first to reconstruct the
  scenes; the transformer sees its 32x32 latents packed 2x2, i.e. **256 image tokens** and 16 text tokens;
- `transformer`: `FluxTransformer2DModel` (double and single blocks), rectified flow;
- `scheduler`: `FlowMatchEulerDiscreteScheduler` (shift 1).

Call it as any FluxPipeline, with the sizes it was trained at and true CFG:
`pipe(prompt, height=32, width=32, max_sequence_length=16, true_cfg_scale=4.0, negative_prompt="")`
(`CALL_ARGS`).
"""

from __future__ import annotations

import os

import torch

from . import scenes

CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints", "scenes")
TEXT_TOKENS = 16
LATENT_CHANNELS = 4
TEXT_DIM = 64
#: the keyword arguments the reference pipeline is called with (the sizes it was trained at, true CFG)
CALL_ARGS = dict(height=scenes.SIZE, width=scenes.SIZE, max_sequence_length=TEXT_TOKENS, true_cfg_scale=4.0,
                 negative_prompt="")
TRANSFORMER = dict(patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=2, num_single_layers=4,
                   attention_head_dim=32, num_attention_heads=4, joint_attention_dim=TEXT_DIM,
                   pooled_projection_dim=TEXT_DIM, guidance_embeds=False, axes_dims_rope=(8, 12, 12))
#: Transformer shapes a training run can choose (same width, parameters and FLOPs). An image token learns where it
#: is only from its rotary angles against the text tokens (all at position 0), so the rotary dimensions per image
#: axis bound how well a prompt word can say "left" or "top": "h32" has 12 (6 frequencies, 2 of them useful over
#: 16 positions), "h64" has 28 (14 frequencies, several slow enough to be monotone across the image, as FLUX's 56).
ARCHITECTURES = {"h32": TRANSFORMER,
                 "h64": dict(TRANSFORMER, attention_head_dim=64, num_attention_heads=2, axes_dims_rope=(8, 28, 28))}


def _clip_tokenizer():
    """A CLIP BPE tokenizer whose merges spell each caption word as one token ("red</w>")."""
    from transformers import CLIPTokenizer

    words = scenes.vocabulary()
    chars = sorted({c for w in words for c in w})
    vocab: dict[str, int] = {}
    for tok in ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]:
        vocab.setdefault(tok, len(vocab))
    merges = []
    for w in words:  # spell the word right to left: ("e", "d</w>") -> "ed</w>", ("r", "ed</w>") -> "red</w>"
        tail = w[-1] + "</w>"
        for c in reversed(w[:-1]):
            merges.append((c, tail))
            tail = c + tail
            vocab.setdefault(tail, len(vocab))
    merges = list(dict.fromkeys(merges))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=TEXT_TOKENS)


def _t5_tokenizer():
    """A T5 unigram tokenizer with one piece per caption word ("▁red"), characters as the fallback."""
    from transformers import T5TokenizerFast

    words = scenes.vocabulary()
    chars = sorted({c for w in words for c in w})
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    pieces += [("▁" + w, -1.0) for w in words] + [(c, -5.0) for c in chars]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=TEXT_TOKENS)


def build_components(seed: int = 0, architecture: str = "h32") -> dict:
    """Fresh (untrained) components of the reference pipeline, keyed as `FluxPipeline` takes them."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture={architecture!r}: expected one of {', '.join(ARCHITECTURES)}")
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tok, tok2 = _clip_tokenizer(), _t5_tokenizer()
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=TEXT_DIM, intermediate_size=2 * TEXT_DIM, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=TEXT_TOKENS, projection_dim=TEXT_DIM,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(tok2), d_model=TEXT_DIM, d_kv=32, d_ff=2 * TEXT_DIM, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=TEXT_TOKENS, dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False, pad_token_id=tok2.pad_token_id, eos_token_id=tok2.eos_token_id, decoder_start_token_id=0))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), block_out_channels=(16,), layers_per_block=1,
                        latent_channels=LATENT_CHANNELS, norm_num_groups=8, sample_size=scenes.SIZE,
                        mid_block_add_attention=False, scaling_factor=1.0, shift_factor=0.0)
    transformer = FluxTransformer2DModel(**ARCHITECTURES[architecture])
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    return dict(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tok, text_encoder_2=t5,
                tokenizer_2=tok2, transformer=transformer)


def make_pipeline(components: dict):
    from diffusers import FluxPipeline

    return FluxPipeline(**components)


def token_ids(pipe, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The CLIP and T5 input ids `FluxPipeline.encode_prompt` makes of `prompts` (padded to 16 tokens)."""
    common = dict(padding="max_length", truncation=True, return_tensors="pt")
    clip = pipe.tokenizer(prompts, max_length=pipe.tokenizer_max_length, **common).input_ids
    t5 = pipe.tokenizer_2(prompts, max_length=TEXT_TOKENS, **common).input_ids
    return clip, t5


def encode(pipe, clip_ids: torch.Tensor, t5_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds, pooled_prompt_embeds) as `FluxPipeline.encode_prompt` computes them, with gradients."""
    pooled = pipe.text_encoder(clip_ids, output_hidden_states=False).pooler_output
    return pipe.text_encoder_2(t5_ids, output_hidden_states=False)[0], pooled


def to_latents(pipe, images: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, 32, 32) in [-1, 1] -> packed latents (B, 256, 16) as the transformer sees them."""
    from diffusers import FluxPipeline

    cfg = pipe.vae.config
    z = (pipe.vae.encode(images).latent_dist.mean - cfg.shift_factor) * cfg.scaling_factor
    b, c, h, w = z.shape
    return FluxPipeline._pack_latents(z, b, c, h, w)


def load_pipeline(folder: str | None = None, dtype: torch.dtype = torch.float32):
    """The committed reference pipeline (or one saved by `benchmarks/train_reference.py scenes --out`), offline."""
    from .pipeline_eval import load_pipeline as load

    folder = folder or CHECKPOINT
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        raise FileNotFoundError(f"no reference pipeline at {folder!r} (model_index.json missing); train it with "
                                "python benchmarks/train_reference.py scenes")
    return load(folder, dtype)  # stored in float16, computed in `dtype`


def save_pipeline(components: dict, folder: str, meta: dict | None = None) -> None:
    """Write the components as a `FluxPipeline` folder in float16 (safetensors; `load_pipeline` computes in
    float32), with `meta` (how it was trained) in reference.json."""
    import copy

    from .files import write_json

    pipe = make_pipeline({k: copy.deepcopy(v) for k, v in components.items()})
    pipe.to(torch.float16)
    from .reference import _quiet_diffusers

    with _quiet_diffusers():
        pipe.save_pretrained(folder)
    if meta is not None:
        write_json(os.path.join(folder, "reference.json"), meta, indent=2, sort_keys=True)
