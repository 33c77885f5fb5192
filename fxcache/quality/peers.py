"""Other caching libraries, driven the way their own pipelines drive them, for side-by-side rows in the harness.

A peer is a recipe that wraps its own copy of a reference transformer. The wrapper is called exactly like the
transformer (keyword arguments, `return_dict=False`) and does what a diffusers pipeline does around each call:
it sets the cache context (`cache_context(name, step_index=..., timestep=...)`), answers the hooks'
`current_timestep_callback`, and resets the hooks' state between generations (`reset()`). The bookkeeping stays
in Python; with `lowering="inductor"` only the hooked transformer is `torch.compile`d, as a user would do.

Peers here:
- diffusers' cache hooks: FirstBlockCache, TaylorSeerCache, FasterCache, PyramidAttentionBroadcast, MagCache
  (MagCache with ratios calibrated on the same model and sampler, as its docs ask);
- cache-dit's DBCache and its TaylorSeer calibrator (`pip install cache-dit`; it is in the `dev` extra).
"""

from __future__ import annotations

import copy
import dataclasses
import types
from typing import Any, Callable

import torch
from torch import nn

#: per family: the factor from the transformer's `timestep` input to the 0..1000 timestep that diffusers' hooks and
#: pipelines speak in (FLUX-style pipelines feed t / 1000 to the transformer; DiT and PixArt feed t itself).
TIMESTEP_SCALE = {"flux": 1000.0, "dit": 1.0, "pixart": 1.0, "scenes": 1000.0}
#: inputs that carry a batch dimension split into [uncond, cond] halves (FasterCache drops the uncond half)
BATCHED_INPUTS = ("hidden_states", "encoder_hidden_states", "timestep", "class_labels", "pooled_projections",
                  "attention_mask", "encoder_attention_mask")


class PeerModel(nn.Module):
    """A hooked copy of a transformer plus the per-call bookkeeping its pipeline would do."""

    def __init__(self, transformer: nn.Module, family: str, num_steps: int, library: str = "diffusers",
                 name: str = "cond_uncond"):
        super().__init__()
        self.inner = copy.deepcopy(transformer)
        _own_forward(self.inner)
        self.library = library
        self.family = family
        self.num_steps = num_steps
        self.context_name = name
        self.current_timestep: float | None = None
        self.step_index = 0
        self._run: Callable = self.inner
        self.uses_context = library == "diffusers"  # cache-dit keeps its own step count

    def compile(self, **options) -> "PeerModel":
        """Compile the hooked transformer (the wrapper's bookkeeping stays eager)."""
        self._run = torch.compile(self.inner, **options)
        return self

    def eager(self) -> None:
        self._run = self.inner

    def reset(self) -> None:
        """Forget everything cached: the next call starts a new generation."""
        if self.library == "cache-dit":
            import cache_dit

            # cache-dit's own reset after `num_inference_steps` calls is off by one (1.5.3); refresh explicitly
            cache_dit.refresh_context(self.inner)
        else:
            from diffusers.hooks import HookRegistry

            HookRegistry.check_if_exists_or_initialize(self.inner).reset_stateful_hooks(recurse=True)
        self.step_index = 0
        self.current_timestep = None

    def forward(self, **kwargs):
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        t = kwargs["timestep"]
        self.current_timestep = float(t.reshape(-1)[0]) * TIMESTEP_SCALE[self.family]
        if self.uses_context:
            _set_cache_context(self.inner, CacheContext(self.context_name, step_index=self.step_index,
                                                         num_inference_steps=self.num_steps,
                                                         timestep=self.current_timestep))
        try:
            return self._run(**kwargs)
        finally:
            if self.uses_context:
                _set_cache_context(self.inner, None)
            self.step_index += 1


def _own_forward(module: nn.Module) -> None:
    """Give this copy a forward whose code object no other module shares.

    Dynamo keeps state per code object: its cache entries, and the mark "run this frame eagerly" that compiling a
    hooked copy can set when the hooks break the graph at the top frame. Sharing the class's forward with the
    fxcache and uncached models would then make those fall back to eager (measured: FORA 5x slower after a
    FirstBlockCache copy ran). Skips diffusers' LoRA-scale wrapper, a no-op without PEFT adapters.
    """
    cls = type(module)
    fn = getattr(cls.forward, "__wrapped__", cls.forward)
    fresh = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    fresh.__kwdefaults__ = fn.__kwdefaults__
    fresh.__qualname__ = fn.__qualname__
    module.__class__ = type(cls.__name__, (cls,), {"forward": fresh, "__module__": cls.__module__})


@dataclasses.dataclass
class Peer:
    """One setting of one peer library's method; `make(ref, steps)` builds its wrapped model."""

    label: str
    library: str
    apply: Callable[[PeerModel, Any], None]  # (peer model, reference) -> hooks installed on peer.inner

    def make(self, ref, num_steps: int) -> PeerModel:
        model = PeerModel(ref.transformer, ref.family, num_steps, self.library)
        self.apply(model, ref)
        return model


def _diffusers_hook(make_config: Callable[[PeerModel], Any]) -> Callable[[PeerModel, Any], None]:
    def apply(model: PeerModel, ref) -> None:
        from diffusers import hooks as dh

        config = make_config(model)
        appliers = {
            dh.FirstBlockCacheConfig: dh.apply_first_block_cache,
            dh.TaylorSeerCacheConfig: dh.apply_taylorseer_cache,
            dh.FasterCacheConfig: dh.apply_faster_cache,
            dh.PyramidAttentionBroadcastConfig: dh.apply_pyramid_attention_broadcast,
            dh.MagCacheConfig: dh.apply_mag_cache,
        }
        if hasattr(model.inner, "enable_cache"):  # models with diffusers' CacheMixin (FLUX): the public route
            model.inner.enable_cache(config)
        else:  # DiT / PixArt have no CacheMixin; the hook functions themselves take any module
            appliers[type(config)](model.inner, config)

    return apply


def first_block_cache(threshold: float) -> Peer:
    from diffusers.hooks import FirstBlockCacheConfig

    return Peer(f"diffusers FBCache t={threshold:g}", "diffusers",
                _diffusers_hook(lambda m: FirstBlockCacheConfig(threshold=threshold)))


#: diffusers' TaylorSeer hooks attention modules named `...attn` by default, which misses DiT / PixArt's `attn1` /
#: `attn2`; the same intent (every attention module of every block) spelled for them
TAYLORSEER_ATTENTION = {"dit": [r"^transformer_blocks\.\d+\.attn\d$"], "pixart": [r"^transformer_blocks\.\d+\.attn\d$"]}


def diffusers_taylorseer(interval: int, order: int = 1, warmup: int = 3) -> Peer:
    from diffusers.hooks import TaylorSeerCacheConfig

    return Peer(f"diffusers TaylorSeer N={interval} O={order}", "diffusers", _diffusers_hook(
        lambda m: TaylorSeerCacheConfig(cache_interval=interval, max_order=order, disable_cache_before_step=warmup,
                                        taylor_factors_dtype=torch.float32,
                                        cache_identifiers=TAYLORSEER_ATTENTION.get(m.family))))


def pyramid_attention_broadcast(skip: int, timesteps: tuple[int, int] = (100, 800)) -> Peer:
    from diffusers.hooks import PyramidAttentionBroadcastConfig

    return Peer(f"diffusers PAB skip={skip}", "diffusers", _diffusers_hook(
        lambda m: PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=skip, spatial_attention_timestep_skip_range=timesteps,
            cross_attention_block_skip_range=2 * skip, cross_attention_timestep_skip_range=timesteps,
            current_timestep_callback=lambda: m.current_timestep)))


def faster_cache(skip: int = 2, uncond_skip: int = 5) -> Peer:
    from diffusers.hooks import FasterCacheConfig

    def config(m: PeerModel):
        # its guidance part splits the output spectrum in (H, W): only image-layout outputs (DiT, PixArt) have one;
        # for token outputs (FLUX-style) it runs as diffusers configures FLUX, attention reuse only
        distilled = m.family in ("flux", "scenes")
        return FasterCacheConfig(
            spatial_attention_block_skip_range=skip, spatial_attention_timestep_skip_range=(-1, 681),
            unconditional_batch_skip_range=uncond_skip, unconditional_batch_timestep_skip_range=(-1, 641),
            low_frequency_weight_update_timestep_range=(99, 641), high_frequency_weight_update_timestep_range=(-1, 301),
            attention_weight_callback=lambda _: 0.3, tensor_format="BCHW",
            current_timestep_callback=lambda: m.current_timestep, is_guidance_distilled=distilled,
            _unconditional_conditional_input_kwargs_identifiers=list(BATCHED_INPUTS))

    return Peer(f"diffusers FasterCache skip={skip} uncond={uncond_skip}", "diffusers", _diffusers_hook(config))


def mag_cache(threshold: float, ratios: list[float], max_skip: int = 3) -> Peer:
    from diffusers.hooks import MagCacheConfig

    def config(m: PeerModel):
        return MagCacheConfig(threshold=threshold, max_skip_steps=max_skip, num_inference_steps=m.num_steps,
                              mag_ratios=torch.tensor(ratios))

    return Peer(f"diffusers MagCache t={threshold:g}", "diffusers", _diffusers_hook(config))


def calibrate_mag_ratios(ref, num_steps: int, guidance: float = 2.0, per_class: int = 1) -> list[float]:
    """MagCache's magnitude ratios for this model and sampler: one calibration run, as MagCache's docs prescribe."""
    import ast
    import contextlib
    import io

    from diffusers.hooks import MagCacheConfig

    from .sampling import sample

    model = Peer("calibration", "diffusers", _diffusers_hook(
        lambda m: MagCacheConfig(calibrate=True, num_inference_steps=m.num_steps))).make(ref, num_steps)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        sample(ref, model, ref.eval_labels(per_class), steps=num_steps, guidance=guidance)
    text = out.getvalue()
    start = text.rfind("[", 0, text.rfind("]") + 1)
    ratios = ast.literal_eval(text[start:text.rfind("]") + 1])
    if len(ratios) != num_steps:
        raise RuntimeError(f"MagCache calibration gave {len(ratios)} ratios for {num_steps} steps")
    return [float(r) for r in ratios]


def diffusers_peers(ref, num_steps: int, guidance: float = 2.0) -> list[Peer]:
    """Every diffusers cache hook that applies to `ref`, at two or three settings each (their defaults among them)."""
    ratios = calibrate_mag_ratios(ref, num_steps, guidance)
    return [
        first_block_cache(0.05), first_block_cache(0.1), first_block_cache(0.2),
        diffusers_taylorseer(5, 1), diffusers_taylorseer(3, 2),
        pyramid_attention_broadcast(2), pyramid_attention_broadcast(4),
        faster_cache(2), faster_cache(3),
        mag_cache(0.06, ratios), mag_cache(0.12, ratios), mag_cache(0.24, ratios),
    ]


def cachedit_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("cache_dit") is not None


def cachedit_dbcache(threshold: float, fn: int = 1, bn: int = 0, warmup: int = 8, taylorseer_order: int = 0) -> Peer:
    """cache-dit's DBCache on the transformer itself (its adapters for FLUX / DiT / PixArt are matched by class).

    `fn` / `bn`: blocks always computed at the front / back (cache-dit's default Fn=8 needs more blocks than the
    reference models have); `threshold`: relative L1 change of the front blocks' residual below which the rest is
    reused; `warmup`: first steps always computed; `taylorseer_order` > 0 adds its TaylorSeer calibrator.
    """
    label = f"cache-dit DBCache F{fn}B{bn} r={threshold:g}" + (f" +TaylorSeer O{taylorseer_order}"
                                                              if taylorseer_order else "")

    def apply(model: PeerModel, ref) -> None:
        import os

        os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "warning")
        import cache_dit
        from cache_dit import DBCacheConfig, TaylorSeerCalibratorConfig

        config = DBCacheConfig(Fn_compute_blocks=fn, Bn_compute_blocks=bn, residual_diff_threshold=threshold,
                               max_warmup_steps=warmup, enable_separate_cfg=False)  # batched CFG: one call a step
        calibrator = TaylorSeerCalibratorConfig(taylorseer_order=taylorseer_order) if taylorseer_order else None
        cache_dit.enable_cache(model.inner, cache_config=config, calibrator_config=calibrator)

    return Peer(label, "cache-dit", apply)


def cachedit_peers() -> list[Peer]:
    """cache-dit at three DBCache settings and with its TaylorSeer calibrator; empty when it is not installed."""
    if not cachedit_available():
        return []
    return [cachedit_dbcache(0.08), cachedit_dbcache(0.12), cachedit_dbcache(0.12, taylorseer_order=1),
            cachedit_dbcache(0.3, taylorseer_order=1)]


def all_peers(ref, num_steps: int, guidance: float = 2.0) -> list[Peer]:
    return diffusers_peers(ref, num_steps, guidance) + cachedit_peers()
