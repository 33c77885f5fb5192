"""TeaCache against an oracle that does what the authors' FLUX script does, on the plain diffusers model: it reads
the indicator by calling block 0's `norm1(H_0, temb)[0]` itself (the authors' line), keeps the accumulator on the
host, and on a reused call makes block 0 return `H_0 + R` and every later block return its inputs. fxcache finds the
indicator in the graph, decides between two compiled graphs and rebuilds the stream from a cached residual; the two
must take the same decisions and give the same outputs."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import fxcache
from fxcache.errors import ConfigError
from fxcache.testing import make_inputs, make_model

STEPS = 8
SHIFT = 0.5  # how far row 1's latents move beyond the loop's step at step 3


class TeaCacheOracle:
    """TeaCache's FLUX rule (ADAPTIVE.md section 8) around the blocks of an uncompiled FluxTransformer2DModel."""

    def __init__(self, model, coefficients, threshold: float, num_steps: int):
        self.model = model
        self.rescale = np.poly1d(coefficients)
        self.threshold, self.num_steps = threshold, num_steps
        self.calls, self.total, self.previous, self.residual = 0, 0.0, None, None
        self.decisions: list[bool] = []
        blocks = list(model.transformer_blocks) + list(model.single_transformer_blocks)
        self.first, self.last = blocks[0], blocks[-1]
        for block in blocks:
            block.forward = self._wrap(block, block.forward)

    def _wrap(self, block, forward):
        def run(*, hidden_states, encoder_hidden_states, temb, **kwargs):
            if block is self.first:
                self._decide(hidden_states, temb)
                self.start = hidden_states
            if not self.compute:
                out = self.start + self.residual if block is self.first else hidden_states
                return encoder_hidden_states, out
            encoder, out = forward(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                                   temb=temb, **kwargs)
            if block is self.last:
                self.residual = out - self.start
            return encoder, out
        return run

    def _decide(self, hidden_states, temb) -> None:
        indicator = self.first.norm1(hidden_states, emb=temb)[0]
        position = self.calls % self.num_steps
        if position in (0, self.num_steps - 1) or self.previous is None:
            self.compute, self.total = True, 0.0
        else:
            change = ((indicator - self.previous).abs().mean() / self.previous.abs().mean()).item()
            self.total += float(self.rescale(change))
            self.compute = not self.total < self.threshold
            if self.compute:
                self.total = 0.0
        self.previous = indicator
        self.calls += 1
        self.decisions.append(self.compute)


def sample(model, kw, steps=STEPS):
    """A smooth sampling loop: each step's latents move by the model's output (as a flow sampler's do)."""
    x, outs = kw["hidden_states"].clone(), []
    with torch.no_grad():
        for s in range(steps):
            out = model(**dict(kw, hidden_states=x, timestep=torch.full((x.shape[0],), 1.0 - s / steps)))[0]
            outs.append(out)
            x = x - out / steps
    return outs


@pytest.fixture(scope="module")
def flux():
    return make_model("flux", num_layers=2, num_single_layers=3).eval()


@pytest.mark.parametrize("threshold", [0.2, 0.5])
def test_teacache_takes_the_decisions_of_the_authors_rule_and_gives_its_outputs(flux, threshold):
    coefficients = (1.0, 0.0)  # rescale = identity: the accumulated raw change, so thresholds are readable
    oracle = TeaCacheOracle(copy.deepcopy(flux), coefficients, threshold, STEPS)
    kw = make_inputs("flux")
    expected = sample(oracle.model, kw)
    config = fxcache.TeaCacheConfig(coefficients=coefficients, threshold=threshold, num_steps=STEPS)
    model = torch.compile(copy.deepcopy(flux), backend=fxcache.cache_backend(config, lowering="eager", strict=True),
                          dynamic=False)
    got = sample(model, kw)
    decisions = [r["kind"] == "full" for r in fxcache.stats(model)]
    assert decisions == oracle.decisions
    assert not all(decisions), "the loop must reuse some calls to test anything"
    for a, b in zip(got, expected):
        assert float((a - b).abs().max()) <= 1e-5 * float(b.abs().max())


def test_the_flux_preset_is_the_authors_polynomial_and_a_batch_decides_per_row(flux):
    config = fxcache.cache_backend("teacache", preset="flux", num_steps=STEPS).config
    assert config.coefficients[0] == pytest.approx(498.651651) and config.threshold == 0.25
    # row 1's latents move further at step 3: "rows" computes there, "mean" (the batch's change, half of it) does not
    kw = make_inputs("flux", batch=2)
    calls = {}
    for reduce in ("rows", "mean"):
        cfg = fxcache.TeaCacheConfig(coefficients=(1.0, 0.0), threshold=0.5, num_steps=STEPS, reduce=reduce)
        model = torch.compile(copy.deepcopy(flux), backend=fxcache.cache_backend(cfg, lowering="eager"),
                              dynamic=False)
        x = kw["hidden_states"].clone()
        with torch.no_grad(), fxcache.request(model):
            for s in range(STEPS):
                if s == 3:
                    x = x.clone()
                    x[1] = x[1] + SHIFT * torch.randn(x[1].shape, generator=torch.Generator().manual_seed(1))
                out = model(**dict(kw, hidden_states=x, timestep=torch.full((2,), 1.0 - s / STEPS)))[0]
                x = x - out / STEPS
        calls[reduce] = [r["kind"] == "full" for r in fxcache.stats(model)]
    assert calls["rows"][3], "a row whose input moved further must make the call compute"
    assert not calls["mean"][3], "the batch's mean change stays below the threshold"


def test_teacache_options_are_checked():
    assert fxcache.TeaCacheConfig().coefficients is None  # no rescaling until one is fitted
    with pytest.raises(ConfigError, match=r"coefficients must be None or a non-empty list of finite"):
        fxcache.TeaCacheConfig(coefficients=[1.0, float("nan")])
    with pytest.raises(ConfigError, match=r"TeaCacheConfig\.threshold must be >= 0"):
        fxcache.TeaCacheConfig(coefficients=[1.0], threshold=-0.1)
    assert fxcache.TeaCacheConfig(coefficients=[2.0, 1.0]).coefficients == (2.0, 1.0)
