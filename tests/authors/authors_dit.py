"""An eager re-statement of the authors' DiT caching code (ToCa, FORA-through-ToCa, DuCa, TaylorSeer, ClusCa), run on
the small DiT of ``original_dit.py`` -- an independent oracle for the per-step / per-block decisions and the numbers.

Our own code, written from a reading of (paths relative to each repository):
- ToCa          Shenyi-Z/ToCa            @e84096f  ``DiT-ToCa/``          (cited "ToCa <file> L<n>")
- DuCa          Shenyi-Z/DuCa            @0a7151b  ``DuCa-DiT/``          (cited "DuCa <file> L<n>")
- TaylorSeer    Shenyi-Z/TaylorSeer      @288776d  ``TaylorSeer-DiT/``    (cited "TS <file> L<n>")
- ClusCa        Shenyi-Z/Cache4Diffusion @91a1949  ``dit/clusca-dit/``    (cited "CC <file> L<n>")
Their sampling loop (all four): ``gaussian_diffusion.ddim_sample_loop_progressive`` sets ``current['step'] = i`` with
i = T-1 .. 0 (L679-693; ToCa L680-694) and ``cache_init`` once per loop. Here each oracle is called once per sampling
step with that i, and starts a fresh cache when i == T-1 (the loop's first step), or on ``reset()``.

Generalisations to a model that is not DiT-XL/2 (the authors hard-code 28 blocks):
- "the last block" (``layer == 27`` in ToCa models.py L219/L224, DuCa models.py L347/L352, CC models.py L160) is
  ``depth - 1``;
- the layer factor of the ratio schedules divides by 27 (``fresh_ratio_scheduler.py`` L24/L30/L49/L67) -> ``depth - 1``
  by default (``layer_div``), which is 27 for 28 blocks.
Deliberate numerical choice: FULL blocks take the attention *output* from the model's own module (SDPA), so an all-FULL
step is bit-identical to ``model.forward``; the authors' ``cache_type='attention'`` path computes it by hand
(``attention.py`` L57-62: ``softmax((q*scale) @ k^T) @ v``), equal up to rounding (``manual_attention=True`` uses that
path). The attention *map* for the score is always the materialised head-mean softmax, as theirs.

Every class: ``__call__(x, t, y, i)`` -> the model output (as ``model.forward``), ``forward_with_cfg(x, t, y,
cfg_scale, i)``, and ``trace``: per call {"i", "s", "blocks": kind per block ("full" | "partial" | "skip" | "forecast" |
"cluster"), "k": MLP rows recomputed per block per batch row (None for full/skip/forecast), "indices": the (B, k) rows
chosen per block (None where none)}, plus method-specific keys ("nt_used"/"nt_after" for ToCa/DuCa, "order" for the
Taylor methods, "labels" (B, N) for ClusCa).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from original_dit import cfg_combine

__all__ = ["ToCaDiT", "FORADiT", "DuCaDiT", "TaylorSeerDiT", "ClusCaDiT", "schedule_tables",
           "toca_cal_type", "toca_force_scheduler", "fresh_ratio_scheduler", "fresh_topk", "local_selection_with_bonus",
           "attention_score", "kmeans_fit", "select_one_per_cluster", "attention_with_map"]


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def _cfg_combine(model_out, in_channels, cfg_scale):
    # forward_with_cfg tail (eps = the first in_channels channels; the authors' models.py use model_out[:, :3],
    # e.g. ToCa models.py L374)
    return cfg_combine(model_out, in_channels, cfg_scale)


# ======================================================================================================================
# ToCa / DuCa rules, pure (shared by the oracles and schedule_tables)
# ======================================================================================================================

def toca_cal_type(i, num_steps, fresh_threshold, cal_threshold, *, duca):
    """ToCa cal_type.py L5-20 / DuCa cal_type.py L5-21, called at the top of every block (ToCa models.py L132, DuCa
    models.py L194). Returns "full" | "partial" | "skip" (DuCa's 'aggressive')."""
    first_step = i == num_steps - 1                                   # L6
    interval = fresh_threshold if first_step else cal_threshold       # L8-11
    if first_step or i % interval == 0:                               # L13
        return "full"
    if (i % interval) % 2 == 1:                                       # L16 -> 'ToCa'
        return "partial"
    return "skip" if duca else "partial"                              # DuCa L20-21 'aggressive'; ToCa L19-20 'ToCa'


def toca_force_scheduler(i, num_steps, fresh_threshold, fresh_ratio):
    """force_scheduler.py L6-19 (ToCa and DuCa identical): the refresh interval Nt set at a FULL block."""
    w = 0.0 if fresh_ratio == 0 else 0.4                                               # L6-11 (r == 0: "FORA")
    step_factor = torch.tensor(1 + w - 2 * w * i / num_steps)                         # L12: float32 tensor
    threshold = torch.round(fresh_threshold / step_factor)                             # L13: half-to-even
    if i in range(int(num_steps * 0.2), int(num_steps * 0.4)) and fresh_ratio != 0:   # L15
        threshold = 2                                                                   # L17
    nt = int(threshold)
    if nt < 1:
        raise ValueError(f"refresh interval {nt} < 1")
    return nt


# the branches each repository's fresh_ratio_scheduler.py has (ToCa's default '--ratio-scheduler ToCa' is *not* one
# of ToCa's: ValueError at the first partial block, ToCa fresh_ratio_scheduler.py L75-76)
TOCA_RATIO_SCHEDULES = ("constant", "linear", "exp", "linear-mode", "layerwise", "linear-layerwise", "ToCa-ddim50",
                        "ToCa-ddpm250")
DUCA_RATIO_SCHEDULES = ("constant", "linear", "exp", "linear-mode", "layerwise", "linear-layerwise", "ToCa")


def fresh_ratio_scheduler(schedule, fresh_ratio, i, num_steps, layer, module, fresh_threshold, layer_div=27):
    """fresh_ratio_scheduler.py (ToCa L2-76, DuCa L2-57), in Python floats as theirs (left-to-right products)."""
    weight = 0.9                                                                        # L11
    if schedule == "constant":
        return fresh_ratio
    if schedule == "linear":
        return fresh_ratio * (1 + weight - 2 * weight * i / num_steps)
    if schedule == "exp":
        return fresh_ratio * (weight ** (i / num_steps))
    if schedule == "linear-mode":
        mode = (i % fresh_threshold) / fresh_threshold - 0.5
        return fresh_ratio * (1 + weight - 2 * weight * i / num_steps + 0.1 * mode)
    if schedule == "layerwise":
        return fresh_ratio * (1 + weight - 2 * weight * layer / layer_div)
    if schedule in ("linear-layerwise", "ToCa-ddim50", "ToCa", "ToCa-ddpm250"):
        # linear-layerwise L26-36; ToCa-ddim50 (ToCa L40-56) == DuCa 'ToCa' (DuCa L38-54); ToCa-ddpm250 L58-73
        step_weight, layer_weight = {"linear-layerwise": (0.4, 0.8), "ToCa-ddim50": (2.0, -0.2),
                                     "ToCa": (2.0, -0.2), "ToCa-ddpm250": (0.4, 0.8)}[schedule]
        step_factor = 1 + step_weight - 2 * step_weight * i / num_steps
        layer_factor = 1 + layer_weight - 2 * layer_weight * layer / layer_div
        module_weight, module_time_weight = 2.5, 0.6
        module_factor = ((1 - (1 - module_time_weight) * module_weight) if module == "attn"
                         else (1 + module_time_weight * module_weight))   # attn: 0.0, mlp: 2.5
        return fresh_ratio * layer_factor * step_factor * module_factor
    raise ValueError("unrecognized fresh ratio schedule", schedule)


def fresh_topk(ratio, num_tokens):
    """cache_cutfresh.py L17-18 + L24: clamp a float32 tensor of the ratio to [0, 1], k = int(r * N) (float32)."""
    r = torch.clamp(torch.tensor(ratio), 0.0, 1.0)
    return int(r * num_tokens)


def attention_score(attn_map, staleness, soft_fresh_weight, fresh_threshold):
    """s1 + s3 of ToCa/DuCa: scores.py L12 (ToCa) / L11 (DuCa): ``F.normalize(attn_map.sum(dim=1), dim=1, p=2)`` --
    attn_map (B, N_query, N_key) is the head-mean softmax of the last FULL step (attention.py L60-64), summed over the
    *query* dim (column sums: how much attention each token receives), L2-normalised per batch row; plus
    score_evaluate.py L64-70: soft_fresh_weight * staleness / fresh_threshold (the CLI N, not Nt). No CFG averaging
    (L72-74 commented out): each batch row selects on its own."""
    score = F.normalize(attn_map.sum(dim=1), dim=1, p=2)
    return score + soft_fresh_weight * (staleness.float() / fresh_threshold)


def local_selection_with_bonus(score, bonus_ratio, grid_size=2):
    """s4 of ToCa (cache_cutfresh.py L52-82, same in DuCa): the token grid in grid_size x grid_size cells; each cell's
    arg-max gets + bonus_ratio * (its own score)."""
    B, N = score.shape
    side = int(N ** 0.5)
    g = grid_size
    assert N % (g * g) == 0
    cells = score.view(B, side // g, g, side // g, g).permute(0, 1, 3, 2, 4).reshape(B, -1, g * g)
    top, where = cells.max(dim=-1, keepdim=True)
    bonus = torch.zeros_like(cells).scatter_(-1, where, top * bonus_ratio)
    cells = cells + bonus
    return cells.view(B, side // g, side // g, g, g).permute(0, 1, 3, 2, 4).reshape(B, N)


def attention_with_map(attn, h, manual_output=False):
    """(attention output, head-mean attention map (B, N, N)) of a timm-style ``attn`` module on ``h``.
    The map as ToCa attention.py L43-44, L57-64; the output from ``attn(h)`` unless ``manual_output``."""
    B, N, C = h.shape
    qkv = attn.qkv(h).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q = q * attn.scale
    probs = (q @ k.transpose(-2, -1)).softmax(dim=-1)
    if manual_output:
        out = attn.proj((probs @ v).transpose(1, 2).reshape(B, N, C))
    else:
        out = attn(h)
    return out, probs.mean(dim=1)


# ======================================================================================================================
# TaylorSeer / ClusCa rules, pure
# ======================================================================================================================

FIRST_ENHANCE = 2  # TS cache_init.py L21, CC cache_init.py L21


def taylor_cal_type(i, num_steps, interval, counter):
    """TS cal_type.py L6-18 / CC cal_type.py L8-27, once per model call (TS models.py L324, CC models.py L378).
    Returns (is_full, new_counter). ClusCa's cal_threshold is ``interval`` (CC force_scheduler.py L6, set at every
    FULL), the same number."""
    first_steps = i > num_steps - FIRST_ENHANCE - 1                   # L6 / L8: i in {T-1, T-2}
    if first_steps or counter == interval - 1:                        # L10 / L15
        return True, 0                                                # counter reset L12 / L17
    return False, counter + 1                                         # L17 / L23


def taylor_update(old, feature, i, num_steps, activated_steps, max_order):
    """derivative_approximation, TS taylor_utils/__init__.py L5-23 (CC the same): divided differences over the
    distance between the last two FULL steps (in i units, negative), only when i < T - first_enhance + 1."""
    d = activated_steps[-1] - activated_steps[-2]                     # L11
    new = {0: feature}                                                # L14-15
    for j in range(max_order):                                        # L17
        if old.get(j) is not None and i < num_steps - FIRST_ENHANCE + 1:   # L18
            new[j + 1] = (new[j] - old[j]) / d                        # L19
        else:
            break
    return new


def taylor_eval(factors, distance):
    """taylor_formula, TS taylor_utils L25-38 (CC L25-38 with an explicit distance = i - activated_steps[-1] < 0):
    sum_j (1/j!) * F_j * distance^j, accumulated from the Python 0 in that order."""
    out = 0
    for j in range(len(factors)):
        out = out + (1 / math.factorial(j)) * factors[j] * (distance ** j)
    return out


def kmeans_fit(X, n_clusters, cache_centroids=None, max_iters=100, p=1):
    """CC cluster_utils/Kmeans.py L11-38: L1 (p=1) k-means per batch row, warm start from ``cache_centroids``, else
    ``init='random'``: rows ``torch.randint(0, N, (B, K))`` of X (the global RNG, L34). counts + 1e-8 (an empty cluster
    gets a zero centroid, L20), stop when ``allclose(old, new, rtol=1e-4)`` (L25; the labels and centroids returned
    are those of the old centroids then). Returns (labels (B, N), centroids (B, K, D))."""
    B, N, _ = X.shape
    if cache_centroids is None:
        rows = torch.randint(0, N, (B, n_clusters), device=X.device)
        centroids = X[torch.arange(B, device=X.device)[:, None], rows]
    else:
        centroids = cache_centroids
    labels = None
    for _ in range(max_iters):
        labels = torch.cdist(X, centroids, p=p).argmin(dim=-1)
        one_hot = F.one_hot(labels, num_classes=n_clusters).type_as(X)        # (B, N, K)
        counts = one_hot.sum(dim=1) + 1e-8
        new = torch.bmm(one_hot.permute(0, 2, 1), X) / counts.unsqueeze(-1)
        if torch.allclose(centroids, new, rtol=1e-4):
            break
        centroids = new
    return labels, centroids


def select_one_per_cluster(labels, n_clusters):
    """CC select_fresh_tokens.py L3-17: one ``torch.rand((B, N))`` draw (global RNG) per call, the arg-max weight
    within each cluster -> (B, K) token indices (an empty cluster: all -inf, arg-max 0)."""
    B, N = labels.shape
    device = labels.device
    weights = torch.rand((B, N), device=device)
    ids = torch.arange(n_clusters, device=device).view(1, -1, 1)
    member = labels.unsqueeze(1) == ids                                   # (B, K, N)
    masked = torch.where(member, weights.unsqueeze(1), torch.tensor(-float("inf"), device=device))
    return masked.argmax(dim=2)


# ======================================================================================================================
# oracle base
# ======================================================================================================================

class _Oracle:
    def __init__(self, model, num_steps):
        self.model = model
        self.num_steps = num_steps
        self.depth = len(model.blocks)
        self.last = self.depth - 1          # the authors' hard-coded 27
        self.num_classes = getattr(model, "num_classes", None)
        self.in_channels = model.in_channels
        self.trace = []
        self.reset()

    def reset(self):
        raise NotImplementedError

    def _embed(self, x, t, y):
        m = self.model
        x = m.x_embedder(x) + m.pos_embed
        c = m.t_embedder(t) + m.y_embedder(y, m.training)
        return x, c

    def _head(self, x, c):
        return self.model.unpatchify(self.model.final_layer(x, c))

    @staticmethod
    def _mods(block, c):
        return block.adaLN_modulation(c).chunk(6, dim=1)

    def __call__(self, x, t, y, i):
        i = int(i)
        if i == self.num_steps - 1:
            self.reset()          # cache_init at the start of the sampling loop
        with torch.no_grad():
            return self._forward(x, t, y, i)

    def forward_with_cfg(self, x, t, y, cfg_scale, i):
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)
        return _cfg_combine(self(combined, t, y, i), self.in_channels, cfg_scale)


# ======================================================================================================================
# ToCa, FORA (ToCa with r = 0), DuCa
# ======================================================================================================================

class ToCaDiT(_Oracle):
    """DiT-ToCa (``--cache-type attention --force-fresh global``) on our DiT."""

    _duca = False
    _bonus = 0.6                      # ToCa cache_cutfresh.py L21
    _schedules = TOCA_RATIO_SCHEDULES

    def __init__(self, model, fresh_ratio=0.07, fresh_threshold=3, ratio_scheduler="ToCa-ddim50",
                 soft_fresh_weight=0.25, num_steps=50, *, layer_div=None, manual_attention=False):
        self.fresh_ratio = fresh_ratio
        self.fresh_threshold = fresh_threshold
        self.ratio_scheduler = ratio_scheduler
        self.soft_fresh_weight = soft_fresh_weight
        self.manual_attention = manual_attention
        super().__init__(model, num_steps)
        self.layer_div = layer_div if layer_div is not None else max(self.depth - 1, 1)

    def reset(self):
        self.cal_threshold = None     # set by force_scheduler (absent before the first FULL block)
        self.cache_attn = {}          # cache[-1][layer]['attn']: pre-gate attention output of the last FULL step
        self.cache_mlp = {}           # cache[-1][layer]['mlp']: pre-gate MLP output, rows overwritten by partials
        self.attn_map = {}            # attn_map[-1][layer]: (B, N, N) head-mean softmax of the last FULL step
        self.stale = {}               # cache_index[-1][layer][module]: int32 (B, N)
        self.noise = None             # cache[-1]['noise']: the last block's output of the last call that ran it

    def _ratio(self, i, layer, module):
        if self.ratio_scheduler not in self._schedules:
            raise ValueError("unrecognized fresh ratio schedule", self.ratio_scheduler)
        return fresh_ratio_scheduler(self.ratio_scheduler, self.fresh_ratio, i, self.num_steps, layer, module,
                                     self.fresh_threshold, self.layer_div)

    def _force_init(self, layer, module, x, i):
        # ToCa force_init.py L8: staleness of (layer, module) -> 0; L9-12: force_scheduler only in block 0.
        # DuCa force_init.py L8-9: staleness -> 0 and force_scheduler in every FULL block.
        self.stale.setdefault(layer, {})[module] = torch.zeros(x.shape[0], x.shape[1], dtype=torch.int, device=x.device)
        if self._duca or layer == 0:
            self.cal_threshold = toca_force_scheduler(i, self.num_steps, self.fresh_threshold, self.fresh_ratio)

    def _full(self, l, blk, x, c, i):
        # ToCa models.py L134-159 / DuCa L200-230
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self._mods(blk, c)
        attn_out, amap = attention_with_map(blk.attn, modulate(blk.norm1(x), shift_msa, scale_msa),
                                            self.manual_attention)                          # L149
        self.cache_attn[l] = attn_out                                                       # L150
        self.attn_map[l] = amap                                                             # L151
        self._force_init(l, "attn", x, i)                                                   # L152
        x = x + gate_msa.unsqueeze(1) * attn_out                                            # L153
        mlp_out = blk.mlp(modulate(blk.norm2(x), shift_mlp, scale_mlp))                     # L156
        self.cache_mlp[l] = mlp_out                                                         # L157
        self._force_init(l, "mlp", x, i)                                                    # L158
        return x + gate_mlp.unsqueeze(1) * mlp_out                                          # L159

    def _partial(self, l, blk, x, c, i):
        # ToCa models.py L168-190 / DuCa L242-266
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self._mods(blk, c)
        x = x + gate_msa.unsqueeze(1) * self.cache_attn[l]                                  # L183: attention reused
        # cache_cutfresh.py L17-25 (module 'mlp')
        k = fresh_topk(self._ratio(i, l, "mlp"), x.shape[1])
        stale = self.stale[l]["mlp"]
        score = attention_score(self.attn_map[l], stale, self.soft_fresh_weight, self.fresh_threshold)   # L20
        score = local_selection_with_bonus(score, self._bonus, 2)                                         # L21
        fresh = score.argsort(dim=-1, descending=True)[:, :k]                                             # L23-25
        # L31-33: staleness += 1 for every row, 0 at the fresh rows (also when k == 0); read *before* by the score
        stale += 1
        stale.scatter_(1, fresh, torch.zeros_like(fresh, dtype=torch.int))
        idx = fresh.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        rows = torch.gather(x, 1, idx)                                                      # L44
        rows = blk.mlp(modulate(blk.norm2(rows), shift_mlp, scale_mlp))                     # L187
        self.cache_mlp[l].scatter_(1, idx, rows)                                            # update_cache.py L19
        x = x + gate_mlp.unsqueeze(1) * self.cache_mlp[l]                                   # L190
        return x, fresh

    def _forward(self, x, t, y, i):
        x, c = self._embed(x, t, y)
        first = i == self.num_steps - 1
        if not first and self.cal_threshold is None:
            raise RuntimeError("the first call of a run must be i == num_steps - 1 (a FULL step)")
        rec = {"i": i, "s": self.num_steps - 1 - i, "blocks": [], "k": [], "indices": [],
               "nt_used": self.fresh_threshold if first else self.cal_threshold}
        for l, blk in enumerate(self.model.blocks):
            kind = toca_cal_type(i, self.num_steps, self.fresh_threshold, self.cal_threshold, duca=self._duca)
            fresh = None
            if kind == "full":
                x = self._full(l, blk, x, c, i)
            elif kind == "partial":
                x, fresh = self._partial(l, blk, x, c, i)
            else:
                # DuCa models.py L345-348 ('aggressive'): nothing, the last block substitutes cache['noise']
                if l == self.last:
                    x = self.noise
            if l == self.last:
                self.noise = x            # ToCa models.py L224-225 / DuCa L352-353, after every last-block call
            rec["blocks"].append(kind)
            rec["k"].append(None if fresh is None else int(fresh.shape[1]))
            rec["indices"].append(None if fresh is None else fresh.clone())
        rec["nt_after"] = self.cal_threshold
        self.trace.append(rec)
        return self._head(x, c)


class FORADiT(ToCaDiT):
    """FORA as DiT-ToCa runs it: ``--fresh-ratio 0`` (force_scheduler.py L6-8 'FORA': step weight 0, no Nt = 2
    override), so Nt = N throughout; non-FULL blocks still take the 'ToCa' branch with k = 0 (a reuse that still
    scores and advances staleness)."""

    def __init__(self, model, fresh_threshold=3, ratio_scheduler="ToCa-ddim50", soft_fresh_weight=0.25,
                 num_steps=50, **kw):
        super().__init__(model, 0.0, fresh_threshold, ratio_scheduler, soft_fresh_weight, num_steps, **kw)


class DuCaDiT(ToCaDiT):
    """DuCa-DiT: ToCa's partial ('conservative') at odd (i % Nt), 'aggressive' at even non-zero (i % Nt), spatial
    bonus 0.8, force_scheduler in every FULL block."""

    _duca = True
    _bonus = 0.8                      # DuCa cache_cutfresh.py L21
    _schedules = DUCA_RATIO_SCHEDULES

    def __init__(self, model, fresh_ratio=0.05, fresh_threshold=3, ratio_scheduler="ToCa", soft_fresh_weight=0.25,
                 num_steps=50, **kw):
        super().__init__(model, fresh_ratio, fresh_threshold, ratio_scheduler, soft_fresh_weight, num_steps, **kw)


# ======================================================================================================================
# TaylorSeer, ClusCa
# ======================================================================================================================

class TaylorSeerDiT(_Oracle):
    """TaylorSeer-DiT: per-step FULL / Taylor forecast of every block's attention and MLP outputs (pre-gate)."""

    def __init__(self, model, interval=4, max_order=4, num_steps=50):
        self.interval = interval
        self.max_order = max_order
        super().__init__(model, num_steps)

    def reset(self):
        self.counter = 0                 # cache_init.py L22
        self.activated_steps = [49]      # cache_init.py L26 (hard-coded 49, harmless: d at the first step unused)
        self.factors = {}                # cache[-1][layer][module] = {order: tensor}

    def _decide(self, i):
        full, self.counter = taylor_cal_type(i, self.num_steps, self.interval, self.counter)
        if full:
            self.activated_steps.append(i)   # TS cal_type.py L13 / CC L18
        return full

    def _update(self, l, module, feature, i):
        if i == self.num_steps - 1:          # taylor_cache_init, TS taylor_utils L46-47
            self.factors.setdefault(l, {})[module] = {}
        self.factors[l][module] = taylor_update(self.factors[l][module], feature, i, self.num_steps,
                                                self.activated_steps, self.max_order)

    def _full(self, l, blk, x, c, i):
        # TS models.py L129-155 / CC L130-158
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self._mods(blk, c)
        attn_out = blk.attn(modulate(blk.norm1(x), shift_msa, scale_msa))
        self._update(l, "attn", attn_out, i)
        x = x + gate_msa.unsqueeze(1) * attn_out
        mlp_out = blk.mlp(modulate(blk.norm2(x), shift_mlp, scale_mlp))
        self._update(l, "mlp", mlp_out, i)
        return x + gate_mlp.unsqueeze(1) * mlp_out

    def _distance(self, i):
        return i - self.activated_steps[-1]  # TS taylor_utils L31 / CC models.py L204

    def _forecast(self, l, blk, x, c, i):
        # TS models.py L164-178: adaLN, x += gate * Taylor(attn), x += gate * Taylor(mlp); nothing written
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self._mods(blk, c)
        d = self._distance(i)
        x = x + gate_msa.unsqueeze(1) * taylor_eval(self.factors[l]["attn"], d)
        return x + gate_mlp.unsqueeze(1) * taylor_eval(self.factors[l]["mlp"], d)

    _partial_kind = "forecast"

    def _forward(self, x, t, y, i):
        x, c = self._embed(x, t, y)          # cal_type after the embeddings (TS models.py L319-324), no RNG there
        full = self._decide(i)
        rec = {"i": i, "s": self.num_steps - 1 - i, "blocks": [], "k": [], "indices": []}
        for l, blk in enumerate(self.model.blocks):
            fresh = None
            if full:
                x = self._full(l, blk, x, c, i)
            else:
                x, fresh = self._cached_block(l, blk, x, c, i)
            rec["blocks"].append("full" if full else self._partial_kind)
            rec["k"].append(None if fresh is None else int(fresh.shape[1]))
            rec["indices"].append(None if fresh is None else fresh.clone())
        rec["order"] = len(self.factors[0]["mlp"]) - 1
        self.trace.append(rec)
        return self._head(x, c)

    def _cached_block(self, l, blk, x, c, i):
        return self._forecast(l, blk, x, c, i), None


class ClusCaDiT(TaylorSeerDiT):
    """ClusCa-DiT (Cache4Diffusion ``dit/clusca-dit``): TaylorSeer's schedule; FULL steps cluster the last block's
    output; CLUSTER steps forecast attention and recompute the MLP on one random member per cluster, written into the
    MLP's F0 (in place for propagation_ratio = 0), then forecast the MLP with all factors.

    RNG: ``kmeans_fit``'s first ``torch.randint`` and each cluster block's ``torch.rand((B, N))`` come from the global
    torch RNG in the authors' order (seed with ``torch.manual_seed``)."""

    _partial_kind = "cluster"

    def __init__(self, model, interval=4, max_order=4, cluster_num=16, propagation_ratio=0.0, k=1, num_steps=50):
        if cluster_num <= 0:
            # CC cache_init.py L28: cluster_num 0 -> 'Taylor' branch, which calls taylor_formula(cache_dic, current)
            # against the new (module_dict, distance) signature (models.py L181/L184) -> TypeError in their code
            raise ValueError("cluster_num must be > 0 (ClusCa's 'Taylor' branch is broken; use TaylorSeerDiT)")
        self.cluster_num = cluster_num
        self.propagation_ratio = propagation_ratio
        self.k = k
        super().__init__(model, interval, max_order, num_steps)

    def reset(self):
        super().reset()
        self.cluster_info = {}           # CC cache_init.py L36

    def _forward(self, x, t, y, i):
        out = super()._forward(x, t, y, i)
        self.trace[-1]["labels"] = self.cluster_info["labels"].clone()   # the cluster labels after this call
        return out

    def _full(self, l, blk, x, c, i):
        x = super()._full(l, blk, x, c, i)          # CC models.py L130-158 (force_init is all comments)
        if l == self.last:                           # CC models.py L160-161 (layer == 27), after the MLP residual
            labels, centroids = kmeans_fit(x, self.cluster_num, self.cluster_info.get("centroids"))
            self.cluster_info.update(labels=labels, centroids=centroids)   # cluster_utils/__init__.py L7-14
        return x

    def _cached_block(self, l, blk, x, c, i):
        # CC models.py L186-220
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self._mods(blk, c)
        d = self._distance(i)
        x = x + gate_msa.unsqueeze(1) * taylor_eval(self.factors[l]["attn"], d)              # L202-205 seer_add
        labels = self.cluster_info["labels"]
        fresh = select_one_per_cluster(labels, self.cluster_num)                             # cache_cutfresh L19
        idx = fresh.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        rows = blk.mlp(modulate(blk.norm2(torch.gather(x, 1, idx)), shift_mlp, scale_mlp))  # L208-209
        mlp = self.factors[l]["mlp"]
        if self.propagation_ratio > 0.0:
            mlp[0] = self._propagate(mlp[0], fresh, rows, labels)                            # L211-212
        else:
            mlp[0].scatter_(1, idx, rows)            # update_cache.py L12: F0 overwritten in place (gamma = 0)
        x = x + gate_mlp.unsqueeze(1) * taylor_eval(mlp, d)                                  # L217-220
        return x, fresh

    def _propagate(self, f0, fresh, rows, labels):
        """CC update_cache.py L14-50 (propagation_update_cache)."""
        B, N, D = f0.shape
        f0.scatter_(1, fresh.unsqueeze(-1).expand(-1, -1, D), rows)                           # L23
        fresh_cluster = labels.gather(1, fresh)                                                # L28
        sums = torch.zeros((B, self.cluster_num, D), device=f0.device)
        sums.scatter_add_(1, fresh_cluster.unsqueeze(-1).expand(-1, -1, D), rows.float())      # L30-35
        if self.k == 1:
            means = sums                                                                        # L37-38: no division
        else:
            counts = torch.zeros((B, self.cluster_num), device=f0.device)
            counts.scatter_add_(1, fresh_cluster, torch.ones_like(fresh, dtype=torch.float))
            means = sums / counts.unsqueeze(-1).clamp(min=1e-6)                                 # L39-46
        spread = means.gather(1, labels.unsqueeze(-1).expand(-1, -1, D))                      # L48
        return spread * self.propagation_ratio + f0 * (1 - self.propagation_ratio)             # L50


# ======================================================================================================================
# schedule tables without a model
# ======================================================================================================================

_DEFAULTS = {
    "toca": dict(fresh_ratio=0.07, fresh_threshold=3, ratio_scheduler="ToCa-ddim50"),
    "fora": dict(fresh_ratio=0.0, fresh_threshold=3, ratio_scheduler="ToCa-ddim50"),
    "duca": dict(fresh_ratio=0.05, fresh_threshold=3, ratio_scheduler="ToCa"),
    "taylorseer": dict(interval=4, max_order=4),
    "clusca": dict(interval=4, max_order=4, cluster_num=16),
}


def schedule_tables(method, num_steps=50, depth=28, tokens=256, **params):
    """Per-step (index s = 0..T-1, i = T-1-s) per-block kinds and MLP row counts, by the same rules as the oracles,
    without a model. method: "toca" | "fora" | "duca" | "taylorseer" | "clusca"; ``params`` override the defaults
    (the recommended commands). Returns a dict of lists indexed by s:
      "kinds": [depth kinds], "k": [depth ints or None];
      ToCa/FORA/DuCa also "nt_used" (Nt block 0 decides with) and "nt_after";
      TaylorSeer/ClusCa also "order" (highest Taylor factor held after the step)."""
    method = method.lower()
    p = dict(_DEFAULTS[method])
    p.update(params)
    T = num_steps
    out = {"kinds": [], "k": []}
    if method in ("toca", "fora", "duca"):
        duca = method == "duca"
        schedules = DUCA_RATIO_SCHEDULES if duca else TOCA_RATIO_SCHEDULES
        layer_div = p.get("layer_div", max(depth - 1, 1))
        N, r = p["fresh_threshold"], p["fresh_ratio"]
        out["nt_used"], out["nt_after"] = [], []
        nt = None
        for s in range(T):
            i = T - 1 - s
            out["nt_used"].append(N if i == T - 1 else nt)
            kinds, ks = [], []
            for l in range(depth):
                kind = toca_cal_type(i, T, N, nt, duca=duca)
                k = None
                if kind == "full":
                    if duca or l == 0:
                        nt = toca_force_scheduler(i, T, N, r)
                elif kind == "partial":
                    if p["ratio_scheduler"] not in schedules:
                        raise ValueError("unrecognized fresh ratio schedule", p["ratio_scheduler"])
                    k = fresh_topk(fresh_ratio_scheduler(p["ratio_scheduler"], r, i, T, l, "mlp", N, layer_div),
                                   tokens)
                kinds.append(kind)
                ks.append(k)
            out["kinds"].append(kinds)
            out["k"].append(ks)
            out["nt_after"].append(nt)
        return out
    if method in ("taylorseer", "clusca"):
        counter, order = 0, 0
        out["order"] = []
        for s in range(T):
            i = T - 1 - s
            full, counter = taylor_cal_type(i, T, p["interval"], counter)
            if full:
                order = 0 if i == T - 1 else (min(order + 1, p["max_order"]) if i < T - FIRST_ENHANCE + 1 else 0)
                kinds, ks = ["full"] * depth, [None] * depth
            elif method == "clusca":
                kinds, ks = ["cluster"] * depth, [p["cluster_num"]] * depth
            else:
                kinds, ks = ["forecast"] * depth, [None] * depth
            out["kinds"].append(kinds)
            out["k"].append(ks)
            out["order"].append(order)
        return out
    raise ValueError(f"unknown method {method!r}")
