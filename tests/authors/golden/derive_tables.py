"""Derive golden step tables from the authors' scheduling code (standalone re-statement).

Run:  python tests/authors/golden/derive_tables.py [--check-doc]

Writes tests/authors/golden/<family>_<method>.json.  No network, no fxcache import: every rule below is a
re-statement of the authors' code, cited by file:line in the RULES tables (paths relative to each repo root).

Float behaviour reproduced:
  * `torch.tensor(python_float)` -> float32 (np.float32 of the Python double);
  * `torch.round` -> round half to even (np.round on float32);
  * `int(num) / float32_tensor` -> float32 division;
  * `int(clamp(f32(r), 0, 1) * N)` -> float32 product, truncated toward zero;
  * the Python-level ratio products are float64, evaluated in the authors' left-to-right order.

--check-doc additionally compares the DiT tables with docs/authors/dit-schedules.md (sections 1.3 and 3.3).
"""
from __future__ import annotations

import json
import math
import os
import re
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))

SHA = {
    "Shenyi-Z/ToCa": "e84096ffd85af4540a6a1f64e3334e428e1b7377",
    "Shenyi-Z/DuCa": "0a7151b7bfea3822295e8d29f26cd2e10756670c",
    "Shenyi-Z/TaylorSeer": "288776dfd0cbb6e201c654c31cd22139f848a6cf",
    "Shenyi-Z/Cache4Diffusion": "91a1949fcc88acab46547f0b5f295f5de2df2870",
}


# ----------------------------------------------------------------------------------------------
# float32 helpers (emulating torch)
# ----------------------------------------------------------------------------------------------
def f32(x: float) -> np.float32:
    """torch.tensor(python_float) (default dtype float32)."""
    return np.float32(x)


def torch_round_div(num: int, step_factor_py: float) -> float:
    """torch.round(num / torch.tensor(step_factor_py)): float32 division, half-to-even rounding."""
    q = np.float32(np.float32(num) / f32(step_factor_py))
    return float(np.round(q))


def topk_count(ratio_py: float, n_tokens: int) -> int:
    """cache_cutfresh: r = clamp(torch.tensor(ratio), 0, 1); topk = int(r * N) (float32 product, truncation)."""
    r = f32(ratio_py)
    r = np.float32(min(max(r, np.float32(0.0)), np.float32(1.0)))
    prod = np.float32(r * np.float32(n_tokens))
    return int(prod)


def py_mod_zero(i: int, interval) -> bool:
    """`current['step'] % fresh_interval == 0` with fresh_interval an int or a float32 tensor of an integer."""
    return (i % float(interval)) == 0.0


# ----------------------------------------------------------------------------------------------
# fresh ratio schedules (exact Python expressions of the authors, float64)
# ----------------------------------------------------------------------------------------------
def ratio_dit_toca_ddim50(fresh_ratio, step, num_steps, layer, module):
    # DiT-ToCa/cache_functions/fresh_ratio_scheduler.py L40-56 (== DuCa-DiT branch 'ToCa' L38-54)
    step_weight = 2.0
    step_factor = 1 + step_weight - 2 * step_weight * step / num_steps
    layer_weight = -0.2
    layer_factor = 1 + layer_weight - 2 * layer_weight * layer / 27
    module_weight = 2.5
    module_time_weight = 0.6
    module_factor = (1 - (1 - module_time_weight) * module_weight) if module == 'attn' else (1 + module_time_weight * module_weight)
    return fresh_ratio * layer_factor * step_factor * module_factor


def ratio_pixart_toca(fresh_ratio, step, num_steps, layer, module):
    # PixArt-alpha-ToCa/diffusion/model/cache_functions/fresh_ratio_scheduler.py L42-55
    # (== DuCa-PixArt-alpha same file, same lines)
    step_weight = -0.9
    step_factor = 1 - step_weight + 2 * step_weight * step / num_steps
    layer_weight = 0.6
    layer_factor = 1 + layer_weight - 2 * layer_weight * layer / 27
    module_weight = 1.0
    module_time_weight = 0.6
    module_factor = (1 - (1 - module_time_weight) * module_weight) if module == 'cross-attn' else (1 + module_time_weight * module_weight)
    return fresh_ratio * layer_factor * step_factor * module_factor


def ratio_flux_toca(fresh_ratio, step, num_steps, layer, stream):
    # flux-ToCa/src/flux/modules/cache_functions/fresh_ratio_scheduler.py L42-56
    step_weight = 0.0
    step_factor = 1 - step_weight + 2 * step_weight * step / num_steps
    layer_weight = 0.5
    layer_factor = 1 + layer_weight - 2 * layer_weight * layer / 27
    stream_weight = 0.6
    stream_factor = (1 - stream_weight) if stream == 'double_stream' else (1 + stream_weight)
    return fresh_ratio * layer_factor * step_factor * stream_factor


# ----------------------------------------------------------------------------------------------
# DiT (DDIM-50, 28 blocks, 256 tokens); authors' index i = T-1-s
# ----------------------------------------------------------------------------------------------
def dit_force_scheduler(i, T, N, r):
    # DiT-ToCa/cache_functions/force_scheduler.py L6-19 (DuCa-DiT identical)
    w = 0.0 if r == 0 else 0.4
    thr = torch_round_div(N, 1 + w - 2 * w * i / T)
    if (i in range(int(T * 0.2), int(T * 0.4))) and (r != 0):
        thr = 2
    return thr


def derive_dit_toca_like(T, L, ntok, N, r, variant):
    """variant: 'toca' (scheduler only in block 0), 'duca' (in every FULL block, aggressive branch).

    Returns list of per-step dicts {s, i, blocks, k, nt_in, nt_out}.
    """
    cal_threshold = None  # unset until the first FULL block (cache_init sets no value)
    steps = []
    for s in range(T):
        i = T - 1 - s
        nt_in = cal_threshold
        kinds, k = [], {}
        for l in range(L):
            # cal_type.py L5-20 (ToCa) / L5-21 (DuCa)
            first_step = (i == T - 1)
            interval = N if first_step else cal_threshold
            if py_mod_zero(i, interval) or first_step:
                kind = 'full'
                # force_init: ToCa L9-12 only in layer 0; DuCa L9 every FULL block (called after attn and mlp)
                if variant == 'duca' or l == 0:
                    cal_threshold = dit_force_scheduler(i, T, N, r)
            elif (i % interval) % 2 == 1 or variant == 'toca':
                kind = 'partial'
            else:
                kind = 'skip'  # DuCa 'aggressive'
            if kind == 'partial':
                k[f"blocks.{l}.mlp"] = topk_count(ratio_dit_toca_ddim50(r, i, T, l, 'mlp'), ntok)
            kinds.append(kind)
        steps.append(dict(s=s, i=i, blocks=kinds, k=k, nt_in=nt_in, nt_out=cal_threshold))
    return steps


def derive_dit_counter(T, L, interval, first_enhance, kind_cached, K=None):
    """TaylorSeer-DiT / ClusCa-DiT counter schedule, decided once per step (DiT.forward)."""
    counter = 0
    activated = [T - 1]  # cache_init.py L26: activated_steps = [49] (hard-coded)
    nfactors = {}  # max derivative order available
    order_avail = -1
    steps = []
    for s in range(T):
        i = T - 1 - s
        first_steps = i > (T - first_enhance - 1)
        if first_steps or counter == interval - 1:
            kind = 'full'
            counter = 0
            activated.append(i)
            # taylor_utils derivative_approximation: new order j+1 iff old j exists and i < T - first_enhance + 1
            if order_avail < 0 or not (i < T - first_enhance + 1):
                order_avail = 0
            else:
                order_avail = min(order_avail + 1, 4)
        else:
            counter += 1
            kind = kind_cached
        e = dict(s=s, i=i, blocks=[kind] * L, k={})
        if kind != 'full':
            e['delta_s'] = activated[-1] - i  # authors use x = i - activated[-1] (negative); |x| in s units
            e['order'] = order_avail
            if K is not None:
                e['k'] = {f"blocks.{l}.mlp": K for l in range(L)}
        steps.append(e)
    return steps


# ----------------------------------------------------------------------------------------------
# PixArt-alpha (DPM-Solver++ multistep order 2, 20 steps, one CFG-batched call per step, s counts up)
# ----------------------------------------------------------------------------------------------
def derive_pixart(T, L, ntok, N, r, variant):
    cal_threshold = None
    lsw = 0.2 if variant == 'toca' else 0.0  # force_scheduler.py L8 (ToCa 0.2, DuCa 0.0)
    steps = []
    for s in range(T):
        nt_in = cal_threshold
        kinds, k = [], {}
        for l in range(L):
            first_step = (s == 0)
            interval = N if first_step else cal_threshold
            if first_step or py_mod_zero(s, interval):
                kind = 'full'
                # force_init.py L8: force_scheduler in every FULL block (called 3x: attn, xattn, mlp)
                w = 0.0 if r == 0 else lsw
                cal_threshold = torch_round_div(N, 1 - w + 2 * w * s / T)
            elif variant == 'toca' or (s % interval) % 2 == 1:
                kind = 'partial'
            else:
                kind = 'skip'
            if kind == 'partial':
                k[f"blocks.{l}.xattn"] = topk_count(ratio_pixart_toca(r, s, T, l, 'cross-attn'), ntok)
                k[f"blocks.{l}.mlp"] = topk_count(ratio_pixart_toca(r, s, T, l, 'mlp'), ntok)
            kinds.append(kind)
        steps.append(dict(s=s, i=s, blocks=kinds, k=k, nt_in=nt_in, nt_out=cal_threshold))
    return steps


# ----------------------------------------------------------------------------------------------
# FLUX.1-dev (50 Euler steps, one call per step, s counts up; 19 double + 38 single)
# ----------------------------------------------------------------------------------------------
FLUX_D, FLUX_S, FLUX_IMG, FLUX_TXT = 19, 38, 4096, 512


def flux_counter(T, fresh_threshold, first_enhance_pred):
    """Shared FLUX cal_type counter (ToCa / TaylorSeer / ClusCa): FULL iff first or counter == Nt-1."""
    counter = 0
    cal_threshold = None
    activated = [0]  # cache_init: activated_steps = [0]
    out = []
    for s in range(T):
        first = first_enhance_pred(s)
        interval = fresh_threshold if first else cal_threshold
        if first or counter == interval - 1:
            counter = 0
            activated.append(s)
            cal_threshold = torch_round_div(fresh_threshold, 1.0)  # force_scheduler: step weight 0.0
            out.append(('full', 0, activated[-2]))
        else:
            counter += 1
            out.append(('cached', s - activated[-1], activated[-1]))
    return out


def derive_flux_toca(T):
    r, N = 0.1, 4  # flux-ToCa cache_init.py L71-79 (mode 'ToCa', hard-coded)
    sched = flux_counter(T, N, lambda s: s <= 2)  # cal_type.py L7-12: r != 0 -> first_step = step <= 2
    steps = []
    for s, (kind, delta, _) in enumerate(sched):
        if kind == 'full':
            steps.append(dict(s=s, i=s, blocks=['full'] * (FLUX_D + FLUX_S), k={}))
            continue
        k = {}
        for l in range(FLUX_D):
            rr = ratio_flux_toca(r, s, T, l, 'double_stream')
            k[f"double.{l}.mlp_img"] = topk_count(rr, FLUX_IMG)
            k[f"double.{l}.mlp_txt"] = topk_count(rr, FLUX_TXT)
        for l in range(FLUX_S):
            rr = ratio_flux_toca(r, s, T, l, 'single_stream')
            k[f"single.{l}.fused"] = topk_count(rr, FLUX_IMG + FLUX_TXT)
        steps.append(dict(s=s, i=s, blocks=['partial'] * (FLUX_D + FLUX_S), k=k))
    return steps


def derive_flux_taylor(T, N, first_enhance, max_order, K=None):
    sched = flux_counter(T, N, lambda s: s < first_enhance)
    steps = []
    order_avail = -1
    for s, (kind, delta, _) in enumerate(sched):
        if kind == 'full':
            # taylor_utils L18-22: new order j+1 iff old j exists and step > first_enhance - 2
            if order_avail < 0 or not (s > first_enhance - 2):
                order_avail = 0
            else:
                order_avail = min(order_avail + 1, max_order)
            steps.append(dict(s=s, i=s, blocks=['full'] * (FLUX_D + FLUX_S), k={}))
            continue
        if K is None:
            e = dict(s=s, i=s, blocks=['forecast'] * (FLUX_D + FLUX_S), k={})
        else:
            # ClusCa: double blocks refresh mlp_img / mlp_txt on K cluster members; single blocks forecast only
            e = dict(s=s, i=s, blocks=['cluster'] * FLUX_D + ['forecast'] * FLUX_S, k={})
            for l in range(FLUX_D):
                e['k'][f"double.{l}.mlp_img"] = K
                e['k'][f"double.{l}.mlp_txt"] = K
        e['delta_s'] = delta
        e['order'] = order_avail
        steps.append(e)
    return steps


# ----------------------------------------------------------------------------------------------
# Rules (file:line) per setting
# ----------------------------------------------------------------------------------------------
def R(what, file, lines, rule):
    return dict(what=what, file=file, lines=lines, rule=rule)


RULES = {
    ('dit', 'toca'): [
        R('command', 'README.md', '115', "sample.py --num-sampling-steps 50 --cache-type attention --fresh-threshold 3 --fresh-ratio 0.07 --ratio-scheduler ToCa-ddim50 --force-fresh global --soft-fresh-weight 0.25 --ddim-sample"),
        R('step index', 'DiT-ToCa/diffusion/gaussian_diffusion.py', '680-694', "ddim loop: indices = range(T)[::-1], current['step'] = i, so i = 49 - s; one CFG-batched model call per step"),
        R('per-block decision', 'DiT-ToCa/models.py', '132', "cal_type(cache_dic, current) at the top of every DiTBlock.forward (block loop L351-352 sets current['layer'])"),
        R('per-block step type', 'DiT-ToCa/cache_functions/cal_type.py', '5-20', "first_step = (i == T-1); interval = fresh_threshold on the first step else cal_threshold; FULL iff i % interval == 0 or first_step; else 'ToCa' (both parity branches)"),
        R('threshold update site', 'DiT-ToCa/cache_functions/force_init.py', '8-12', "force_scheduler runs only when layer == 0 (inside FULL block 0), so blocks 1-27 of a FULL-at-block-0 step use the new Nt"),
        R('threshold', 'DiT-ToCa/cache_functions/force_scheduler.py', '6-19', "w = 0 if r == 0 else 0.4; Nt = torch.round(N / torch.tensor(1 + w - 2w*i/T)) (float32, half-even); Nt = 2 if i in range(10, 20) and r != 0"),
        R('what FULL runs', 'DiT-ToCa/models.py', '134-166', "full attention (attn map stored) + full MLP; force_init after each"),
        R('what PARTIAL runs', 'DiT-ToCa/models.py', '168-199', "attention reused whole (L183); MLP on k selected rows (cache_cutfresh L186, scatter L188); x += gate*cache (L190)"),
        R('fresh ratio', 'DiT-ToCa/cache_functions/fresh_ratio_scheduler.py', '40-56', "'ToCa-ddim50': r*(1+wl-2wl*l/27)*(1+ws-2ws*i/T)*mf, ws=2.0, wl=-0.2, mf attn 0.0 / mlp 2.5 (float64)"),
        R('token count', 'DiT-ToCa/cache_functions/cache_cutfresh.py', '17-25', "r_eff = clamp(torch.tensor(ratio), 0, 1) (float32); k = int(r_eff * 256); top-k descending of score (+ s4 bonus 0.6, g=2 at L21)"),
        R('staleness', 'DiT-ToCa/cache_functions/cache_cutfresh.py', '31-33', "(layer, mlp) staleness += 1 then 0 at the fresh rows on every PARTIAL block call, including k = 0"),
    ],
    ('dit', 'fora'): [
        R('command', 'README.md', '115', "README ToCa DDIM-50 command with --fresh-ratio 0 (no DiT FORA command exists); N = --fresh-threshold 3"),
        R('step index', 'DiT-ToCa/diffusion/gaussian_diffusion.py', '680-694', "i = 49 - s, one model call per step"),
        R('per-block step type', 'DiT-ToCa/cache_functions/cal_type.py', '5-20', "FULL iff i % Nt == 0 or i == T-1; else 'ToCa' (never 'FORA')"),
        R('threshold', 'DiT-ToCa/cache_functions/force_scheduler.py', '6-8,15', "r == 0 -> step weight 0 -> Nt = round(3/1) = 3 for the whole run; sensitive-range override needs r != 0"),
        R('what a non-FULL block runs', 'DiT-ToCa/models.py', '168-199', "the 'ToCa' branch with k = int(0*...) = 0: attention and MLP caches reused (numerically FORA); score still evaluated, staleness += 1"),
        R('FORA branch', 'DiT-ToCa/models.py', '201-215', "'FORA' branch is unreachable (cal_type never emits it)"),
    ],
    ('dit', 'duca'): [
        R('command', 'README.md', '82', "sample.py --num-sampling-steps 50 --cache-type attention --fresh-threshold 3 --fresh-ratio 0.05 --ratio-scheduler ToCa --force-fresh global --soft-fresh-weight 0.25 --ddim-sample"),
        R('step index', 'DuCa-DiT/diffusion/gaussian_diffusion.py', '679-693', "i = 49 - s, one model call per step"),
        R('per-block decision', 'DuCa-DiT/models.py', '194', "cal_type per block (live DiTBlock L166-355; first DiTBlock L104-165 is inside a string literal); L196 res_enable = False"),
        R('per-block step type', 'DuCa-DiT/cache_functions/cal_type.py', '5-21', "FULL iff i % interval == 0 or first step; (i % interval) % 2 == 1 -> 'ToCa' (conservative); else 'aggressive'"),
        R('threshold update site', 'DuCa-DiT/cache_functions/force_init.py', '8-9', "force_scheduler in EVERY FULL block (same value within a step)"),
        R('threshold', 'DuCa-DiT/cache_functions/force_scheduler.py', '6-19', "same as ToCa: w = 0.4, torch.round half-even, Nt = 2 for i in 10..19"),
        R('conservative block', 'DuCa-DiT/models.py', '242-278', "as ToCa PARTIAL: attention reused, MLP on k rows"),
        R('aggressive block', 'DuCa-DiT/models.py', '345-348', "block does nothing; block 27 replaces x with cache['noise']; L352-353 noise = x after every block-27 call"),
        R('fresh ratio', 'DuCa-DiT/cache_functions/fresh_ratio_scheduler.py', '38-54', "branch 'ToCa' = ToCa's 'ToCa-ddim50' formula (ws 2.0, wl -0.2, attn 0.0, mlp 2.5)"),
        R('token count', 'DuCa-DiT/cache_functions/cache_cutfresh.py', '17-25', "k = int(clamp(f32(r_eff),0,1) * 256); s4 bonus 0.8 g=2 (L21)"),
        R('staleness', 'DuCa-DiT/cache_functions/cache_cutfresh.py', '31-33', "advanced on every conservative block call (k = 0 included), not on aggressive blocks"),
    ],
    ('dit', 'taylorseer'): [
        R('command', 'TaylorSeer-DiT.md', '33', "sample.py --ddim-sample --num-sampling-steps 50 --interval 4 --max-order 4"),
        R('step index', 'TaylorSeer-DiT/diffusion/gaussian_diffusion.py', '679-693', "i = 49 - s"),
        R('per-step decision', 'TaylorSeer-DiT/models.py', '324', "cal_type once per DiT.forward, before the block loop (no mixed steps)"),
        R('init', 'TaylorSeer-DiT/cache_functions/cache_init.py', '21-26', "first_enhance = 2, cache_counter = 0, activated_steps = [49] (hard-coded T=50)"),
        R('step type', 'TaylorSeer-DiT/cache_functions/cal_type.py', '6-18', "FULL iff i > T-first_enhance-1 or counter == interval-1; FULL resets counter and appends i; else counter += 1, 'Taylor'"),
        R('derivatives', 'TaylorSeer-DiT/taylor_utils/__init__.py', '11-21', "d = activated[-1]-activated[-2]; F_{j+1} = (F_j_new - F_j_old)/d while F_j_old exists and i < T-first_enhance+1 (not at s=0)"),
        R('forecast', 'TaylorSeer-DiT/taylor_utils/__init__.py', '31-36', "x = i - activated[-1] (negative); out = sum F_j x^j / j!"),
        R('forecast block', 'TaylorSeer-DiT/models.py', '164-178', "adaLN, x += gate_msa*Taylor(attn), x += gate_mlp*Taylor(mlp)"),
    ],
    ('dit', 'clusca'): [
        R('command', 'dit/clusca-dit/sample.py', '107-120', "no README command; sample.py defaults: steps 50 (L107), interval 4 (L112), max-order 4 (L113), cluster-num 16 (L117), propagation-ratio 0.0 (L119), k 1 (L120); --ddim-sample must be passed (default off, L111)"),
        R('step index', 'dit/clusca-dit/diffusion/gaussian_diffusion.py', '679-693', "i = 49 - s"),
        R('per-step decision', 'dit/clusca-dit/models.py', '378', "cal_type once per DiT.forward"),
        R('init', 'dit/clusca-dit/cache_functions/cache_init.py', '21-28', "first_enhance 2, counter 0, activated_steps [49], enable_clusca = cluster_num > 0"),
        R('step type', 'dit/clusca-dit/cache_functions/cal_type.py', '8-27', "FULL iff first_steps (i in {49,48}) or counter == cal_threshold-1 (force_scheduler.py L6: cal_threshold = interval); else 'ClusCa'"),
        R('clustering', 'dit/clusca-dit/models.py', '160-161', "at FULL steps, block 27 output is clustered (k-means, K=16)"),
        R('cluster block', 'dit/clusca-dit/models.py', '186-220', "every block: attention Taylor forecast; MLP exact on one random member per cluster, scattered into F0, then Taylor forecast"),
        R('members per row', 'dit/clusca-dit/cache_functions/select_fresh_tokens.py', '3-17', "argmax of torch.rand(B,N) inside each cluster -> exactly cluster_num (16) rows per batch row per block; --k ignored"),
        R('derivatives', 'dit/clusca-dit/taylor_utils/__init__.py', '11-21', "as TaylorSeer-DiT (guard i < T-first_enhance+1)"),
    ],
    ('pixart', 'toca'): [
        R('command', 'README.md', '140', "scripts/inference.py --image_size 256 --fresh_threshold 3 --fresh_ratio 0.30 --cache_type attention --force_fresh global --soft_fresh_weight 0.25 --ratio_scheduler ToCa"),
        R('sampler', 'PixArt-alpha-ToCa/scripts/inference.py', '34,106-129,174-175', "default sampling_algo dpm-solver, 20 steps, order=2, multistep, time_uniform; CFG batched [uncond; cond] (diffusion/model/dpm_solver.py L327-331)"),
        R('step index', 'PixArt-alpha-ToCa/diffusion/model/dpm_solver.py', '1197-1251', "cache_init(num_steps=20); model calls at current['step'] = 0 (L1209-1212), 1 (L1219-1228), 2..19 (L1232-1251, none at step 20): one call per step, s counts up"),
        R('tokens', 'PixArt-alpha-ToCa/scripts/inference.py', '171,181', "latent 256/8 = 32, PixArt_XL_2 patch 2 -> 16x16 = 256 image tokens"),
        R('per-block decision', 'PixArt-alpha-ToCa/diffusion/model/nets/PixArt.py', '51-54', "global_force_fresh per block; FULL branch L54-68, partial branch L70-92"),
        R('per-block step type', 'PixArt-alpha-ToCa/diffusion/model/cache_functions/global_force_fresh.py', '6-14', "first_step = (s == 0); FULL iff first_step or s % Nt == 0 (Nt = fresh_threshold on s=0, else cal_threshold)"),
        R('threshold update site', 'PixArt-alpha-ToCa/diffusion/model/cache_functions/force_init.py', '7-8', "force_scheduler in every FULL block (after attn, xattn, mlp)"),
        R('threshold', 'PixArt-alpha-ToCa/diffusion/model/cache_functions/force_scheduler.py', '3-15', "w = 0.2 (0 if r == 0); Nt = torch.round(N / torch.tensor(1 - w + 2w*s/T)); no sensitive range"),
        R('what partial runs', 'PixArt-alpha-ToCa/diffusion/model/nets/PixArt.py', '70-92', "self-attention reused whole (L78); cross-attn on k_xattn rows (L81-83, map rows scattered back); MLP on k_mlp rows (L88-90)"),
        R('fresh ratio', 'PixArt-alpha-ToCa/diffusion/model/cache_functions/fresh_ratio_scheduler.py', '42-55', "'ToCa': r*(1.6-1.2*l/27)*(1.9-1.8*s/T)*mf, mf cross-attn 0.6 / else 1.6"),
        R('token count', 'PixArt-alpha-ToCa/diffusion/model/cache_functions/cache_cutfresh.py', '17-24', "k = int(clamp(f32(r_eff),0,1) * 256); s2 entropy score + 0.25*stale/3, s4 bonus 0.4 with 4x4 cells (L21)"),
        R('staleness', 'PixArt-alpha-ToCa/diffusion/model/cache_functions/cache_cutfresh.py', '30-35', "per (layer, module) += 1 then 0 at fresh rows on every partial call"),
    ],
    ('pixart', 'duca'): [
        R('command', 'README.md', '98', "scripts/inference.py --image_size 256 --fresh_threshold 3 --fresh_ratio 0.75 --cache_type attention --force_fresh global --soft_fresh_weight 0.25 --ratio_scheduler ToCa"),
        R('sampler', 'DuCa-PixArt-alpha/scripts/inference.py', '34', "dpm-solver default, 20 steps, multistep order 2 (same dpm_solver.py as ToCa): one CFG-batched call per step, s = 0..19"),
        R('per-block decision', 'DuCa-PixArt-alpha/diffusion/model/nets/PixArt.py', '50', "cal_type per block; full L54-87, 'ToCa' L89-132, 'FORA' L134-149 (unreachable), else aggressive L151-154"),
        R('per-block step type', 'DuCa-PixArt-alpha/diffusion/model/cache_functions/cal_type.py', '6-21', "FULL iff s == 0 or s % Nt == 0; (s % Nt) % 2 == 1 -> 'ToCa' (conservative); else 'aggressive'"),
        R('threshold', 'DuCa-PixArt-alpha/diffusion/model/cache_functions/force_scheduler.py', '3-15', "linear_step_weight = 0.0 (L8) -> Nt = round(3/1) = 3 constant"),
        R('threshold update site', 'DuCa-PixArt-alpha/diffusion/model/cache_functions/force_init.py', '7-8', "force_scheduler in every FULL block"),
        R('aggressive block', 'DuCa-PixArt-alpha/diffusion/model/nets/PixArt.py', '151-157', "nothing runs; block 27 replaces x with cache['noise']; noise = x after every block-27 call"),
        R('conservative block', 'DuCa-PixArt-alpha/diffusion/model/nets/PixArt.py', '102-125', "self-attn reused; cross-attn on k_xattn rows (L112-115, skipped if k == 0); MLP on k_mlp rows (L120-123, skipped if k == 0)"),
        R('fresh ratio', 'DuCa-PixArt-alpha/diffusion/model/cache_functions/fresh_ratio_scheduler.py', '42-55', "same 'ToCa' formula as PixArt-ToCa"),
        R('token count', 'DuCa-PixArt-alpha/diffusion/model/cache_functions/cache_cutfresh.py', '17-24', "k = int(clamp(f32(r_eff),0,1) * 256); s4 bonus 0.4, 4x4 cells"),
    ],
    ('flux', 'toca'): [
        R('command', 'README.md', '204', "python src/sample.py --prompt_file ... --width 1024 --height 1024 --model_name flux-dev --add_sampling_metadata --output_dir ... --num_steps 50 (all cache settings hard-coded)"),
        R('settings', 'flux-ToCa/src/flux/modules/cache_functions/cache_init.py', '60-79', "mode 'ToCa': cache_type attention, ratio schedule 'ToCa', r = 0.1, N = 4, force_fresh global, lambda3 = 0.25"),
        R('step index', 'flux-ToCa/src/flux/ideas/cache_denoise.py', '22-41', "current['step'] = 0.. counting up, num_steps = 50, one model call per step (no CFG batch)"),
        R('tokens', 'flux-ToCa/src/sample.py', '73', "T5 max_length 512 for flux-dev; 1024x1024 -> 64x64 packed = 4096 image tokens"),
        R('per-step decision', 'flux-ToCa/src/flux/model.py', '115', "cal_type once per forward, before the double (L117-119) and single (L122-124) loops; current['layer'] restarts at 0 for single blocks"),
        R('step type', 'flux-ToCa/src/flux/modules/cache_functions/cal_type.py', '7-28', "r != 0 -> first_step = step <= 2; FULL iff first_step or cache_counter == Nt-1 (counter reset at FULL, += 1 otherwise); else 'ToCa'"),
        R('threshold', 'flux-ToCa/src/flux/modules/cache_functions/force_scheduler.py', '3-15', "step weight 0.0 -> Nt = round(4/1) = 4"),
        R('double partial', 'flux-ToCa/src/flux/modules/layers.py', '264-286', "joint attention reused (L268); img_mlp on k rows of 4096 (L274-276); txt_mlp on k rows of 512 (L283-285)"),
        R('single partial', 'flux-ToCa/src/flux/modules/layers.py', '404-424', "k rows of the joint 4608-token x: mlp_in on fresh rows, cached attn rows gathered, linear2 -> scattered into 'total' (written back)"),
        R('fresh ratio', 'flux-ToCa/src/flux/modules/cache_functions/fresh_ratio_scheduler.py', '42-56', "'ToCa': r*(1.5 - l/27)*1.0*stream, stream 0.4 double / 1.6 single; no module factor (img and txt same ratio)"),
        R('token count', 'flux-ToCa/src/flux/modules/cache_functions/cache_cutfresh.py', '19-27', "k = int(clamp(f32(r_eff),0,1) * N_unit), N_unit = 4096 img / 512 txt / 4608 single; no s4 bonus (L24 commented)"),
    ],
    ('flux', 'taylorseer'): [
        R('command', 'TaylorSeer-FLUX.md', '80-82', "python src/sample.py --prompt_file ... --width 1024 --height 1024 --model_name flux-dev --add_sampling_metadata --output_dir ... --num_steps 50 (settings hard-coded)"),
        R('settings', 'TaylorSeer-FLUX/src/flux/modules/cache_functions/cache_init.py', '63,89-100,117', "mode 'Taylor': fresh_threshold (N) 6, taylor_cache, max_order 1, first_enhance 3; activated_steps = [0]"),
        R('step index', 'TaylorSeer-FLUX/src/flux/ideas/cache_denoise.py', '22-41', "step counts up from 0, one call per step"),
        R('per-step decision', 'TaylorSeer-FLUX/src/flux/model.py', '115', "cal_type once per forward"),
        R('step type', 'TaylorSeer-FLUX/src/flux/modules/cache_functions/cal_type.py', '7-30', "first_step = step < first_enhance (3); FULL iff first_step or counter == Nt-1; else 'taylor_cache'"),
        R('threshold', 'TaylorSeer-FLUX/src/flux/modules/cache_functions/force_scheduler.py', '3-15', "Nt = round(6/1) = 6"),
        R('derivatives', 'TaylorSeer-FLUX/src/flux/taylor_utils/__init__.py', '12-24', "d = activated[-1]-activated[-2]; F_{j+1} only if F_j old exists and step > first_enhance-2 (= step >= 2)"),
        R('forecast', 'TaylorSeer-FLUX/src/flux/taylor_utils/__init__.py', '33-38', "x = step - activated[-1]"),
        R('forecast blocks', 'TaylorSeer-FLUX/src/flux/modules/layers.py', '333-352,496-498', "double: img_attn, img_mlp, txt_attn, txt_mlp forecast; single: 'total' forecast"),
    ],
    ('flux', 'clusca'): [
        R('command', 'flux/clusca-flux/sample.py', '192-212', "no README command; assumed: sample.py --model_name flux-dev --mode ClusCa --width 1024 --height 1024 (defaults: flux-schnell, Taylor mode, 1360x768!), fresh_threshold 5, max_order 1, cluster_num 16, k 1, propagation_ratio 0.005, num_steps 50 for dev"),
        R('settings', 'flux/clusca-flux/flux/modules/cache_functions/cache_init.py', '104-130', "mode 'ClusCa': taylor_cache, first_enhance 3, cluster_num/k/propagation_ratio from CLI; fresh_ratio 0.1 (unused by ClusCa blocks)"),
        R('step index', 'flux/clusca-flux/flux/ideas/cache_denoise.py', '23-42', "step counts up from 0, one call per step"),
        R('step type', 'flux/clusca-flux/flux/modules/cache_functions/cal_type.py', '7-33', "first_step = step < 3; FULL iff first_step or counter == Nt-1 (Nt = round(5/1) = 5, force_scheduler.py L9-15); else 'ClusCa' (cluster_num > 0)"),
        R('clustering', 'flux/clusca-flux/flux/modules/layers.py', '274-275,295-296', "at FULL, double block 18: img clustered (for img_mlp) and txt clustered (for txt_mlp)"),
        R('double cluster block', 'flux/clusca-flux/flux/modules/layers.py', '356-409', "img_attn/txt_attn forecast; img_mlp: 16 members (one per cluster) recomputed + propagation (gamma 0.005); txt_mlp: 16 members, plain scatter (propagation commented out)"),
        R('single cluster block', 'flux/clusca-flux/flux/modules/layers.py', '561-563', "single blocks in a 'ClusCa' step are a pure Taylor forecast of 'total' (cluster path commented out L564-586)"),
        R('members per row', 'flux/clusca-flux/flux/modules/cache_functions/select_fresh_tokens.py', '3-23', "argmax of torch.rand(B,N) in each cluster -> cluster_num rows per batch row"),
        R('known crash', 'flux/clusca-flux/flux/cluster_utils/__init__.py', '5-6,14', "cluster_scheduler reads cache_dic['topk'] (never set; cache_init sets 'k') and select reads cluster_info['k'] while get_cluster_info writes 'topk': KeyError at s=0 block 18 in this snapshot; table = intended schedule"),
        R('derivatives', 'flux/clusca-flux/flux/taylor_utils/__init__.py', '12-24', "as TaylorSeer-FLUX (step > first_enhance-2)"),
    ],
}

SOURCES = {
    ('dit', 'toca'): ('Shenyi-Z/ToCa', 'DiT-ToCa'),
    ('dit', 'fora'): ('Shenyi-Z/ToCa', 'DiT-ToCa'),
    ('dit', 'duca'): ('Shenyi-Z/DuCa', 'DuCa-DiT'),
    ('dit', 'taylorseer'): ('Shenyi-Z/TaylorSeer', 'TaylorSeer-DiT'),
    ('dit', 'clusca'): ('Shenyi-Z/Cache4Diffusion', 'dit/clusca-dit'),
    ('pixart', 'toca'): ('Shenyi-Z/ToCa', 'PixArt-alpha-ToCa'),
    ('pixart', 'duca'): ('Shenyi-Z/DuCa', 'DuCa-PixArt-alpha'),
    ('flux', 'toca'): ('Shenyi-Z/ToCa', 'flux-ToCa'),
    ('flux', 'taylorseer'): ('Shenyi-Z/TaylorSeer', 'TaylorSeer-FLUX'),
    ('flux', 'clusca'): ('Shenyi-Z/Cache4Diffusion', 'flux/clusca-flux'),
}

COMMANDS = {
    ('dit', 'toca'): "python sample.py --image-size 256 --num-sampling-steps 50 --cache-type attention --fresh-threshold 3 --fresh-ratio 0.07 --ratio-scheduler ToCa-ddim50 --force-fresh global --soft-fresh-weight 0.25 --ddim-sample",
    ('dit', 'fora'): "python sample.py --image-size 256 --num-sampling-steps 50 --cache-type attention --fresh-threshold 3 --fresh-ratio 0 --ratio-scheduler ToCa-ddim50 --force-fresh global --soft-fresh-weight 0.25 --ddim-sample",
    ('dit', 'duca'): "python sample.py --image-size 256 --num-sampling-steps 50 --cache-type attention --fresh-threshold 3 --fresh-ratio 0.05 --ratio-scheduler ToCa --force-fresh global --soft-fresh-weight 0.25 --ddim-sample",
    ('dit', 'taylorseer'): "python sample.py --ddim-sample --num-sampling-steps 50 --interval 4 --max-order 4",
    ('dit', 'clusca'): "python sample.py --ddim-sample (defaults: --num-sampling-steps 50 --interval 4 --max-order 4 --cluster-num 16 --k 1 --propagation-ratio 0.0)",
    ('pixart', 'toca'): "python scripts/inference.py --model_path PixArt-XL-2-256x256.pth --image_size 256 --bs 100 --txt_file test.txt --fresh_threshold 3 --fresh_ratio 0.30 --cache_type attention --force_fresh global --soft_fresh_weight 0.25 --ratio_scheduler ToCa (sampler default dpm-solver, 20 steps)",
    ('pixart', 'duca'): "python scripts/inference.py --model_path PixArt-XL-2-256x256.pth --image_size 256 --bs 100 --txt_file test.txt --fresh_threshold 3 --fresh_ratio 0.75 --cache_type attention --force_fresh global --soft_fresh_weight 0.25 --ratio_scheduler ToCa (sampler default dpm-solver, 20 steps)",
    ('flux', 'toca'): "python src/sample.py --prompt_file prompts.txt --width 1024 --height 1024 --model_name flux-dev --add_sampling_metadata --output_dir out --num_steps 50 (cache_init mode 'ToCa': r=0.1, N=4, attention, lambda3=0.25)",
    ('flux', 'taylorseer'): "python src/sample.py --prompt_file prompts.txt --width 1024 --height 1024 --model_name flux-dev --add_sampling_metadata --output_dir out --num_steps 50 (cache_init mode 'Taylor': N=6, order 1, first_enhance 3)",
    ('flux', 'clusca'): "python sample.py --prompt_file prompts.txt --model_name flux-dev --mode ClusCa --width 1024 --height 1024 --num_steps 50 (defaults: --fresh_threshold 5 --max_order 1 --cluster_num 16 --k 1 --propagation_ratio 0.005); no README command",
}


def strip(steps):
    out = []
    for e in steps:
        d = dict(s=e['s'], i=e['i'], blocks=e['blocks'])
        if e.get('k'):
            d['k'] = e['k']
        for key in ('delta_s', 'order'):
            if key in e:
                d[key] = e[key]
        if 'nt_out' in e and e['nt_out'] is not None:
            d['nt_after'] = int(e['nt_out'])
        out.append(d)
    return out


def counts(steps):
    """Number of steps per block pattern: the kind when uniform, else 'mixed:kind[a-b],...'."""
    c = {}
    for e in steps:
        key = e['blocks'][0] if len(set(e['blocks'])) == 1 else 'mixed:' + ','.join(_runs(e['blocks']))
        c[key] = c.get(key, 0) + 1
    return c


def _runs(kinds):
    runs, start = [], 0
    for j in range(1, len(kinds) + 1):
        if j == len(kinds) or kinds[j] != kinds[start]:
            runs.append(f"{kinds[start]}[{start}-{j - 1}]")
            start = j
    return runs


def build_all(T_dit=50, T_pix=20, T_flux=50):
    tables = {}
    L = 28
    tables[('dit', 'toca')] = derive_dit_toca_like(T_dit, L, 256, 3, 0.07, 'toca')
    fora = derive_dit_toca_like(T_dit, L, 256, 3, 0.0, 'toca')
    for e in fora:
        assert all(v == 0 for v in e['k'].values())
        e['blocks'] = ['reuse' if b == 'partial' else b for b in e['blocks']]
        e['k'] = {}
    tables[('dit', 'fora')] = fora
    tables[('dit', 'duca')] = derive_dit_toca_like(T_dit, L, 256, 3, 0.05, 'duca')
    tables[('dit', 'taylorseer')] = derive_dit_counter(T_dit, L, 4, 2, 'forecast')
    tables[('dit', 'clusca')] = derive_dit_counter(T_dit, L, 4, 2, 'cluster', K=16)
    tables[('pixart', 'toca')] = derive_pixart(T_pix, L, 256, 3, 0.30, 'toca')
    tables[('pixart', 'duca')] = derive_pixart(T_pix, L, 256, 3, 0.75, 'duca')
    tables[('flux', 'toca')] = derive_flux_toca(T_flux)
    tables[('flux', 'taylorseer')] = derive_flux_taylor(T_flux, 6, 3, 1)
    tables[('flux', 'clusca')] = derive_flux_taylor(T_flux, 5, 3, 1, K=16)
    return tables


def write_all(tables):
    for (fam, meth), steps in tables.items():
        repo, folder = SOURCES[(fam, meth)]
        if fam == 'flux':
            blocks = {"lists": [{"name": "double", "depth": FLUX_D}, {"name": "single", "depth": FLUX_S}]}
            tokens = {"img": FLUX_IMG, "txt": FLUX_TXT}
            sampler = {"name": "flow-matching Euler (denoise_cache)", "model_calls_per_step": 1, "cfg": "none (guidance-distilled)"}
        elif fam == 'pixart':
            blocks = {"lists": [{"name": "blocks", "depth": 28}]}
            tokens = {"img": 256, "txt": 0, "xattn_context": 120, "image_size": 256}
            sampler = {"name": "DPM-Solver++ multistep order 2, time_uniform", "model_calls_per_step": 1, "cfg": "batched [uncond; cond]"}
        else:
            blocks = {"lists": [{"name": "blocks", "depth": 28}]}
            tokens = {"img": 256, "txt": 0}
            sampler = {"name": "DDIM (eta 0), respaced 50", "model_calls_per_step": 1, "cfg": "batched [cond; null]"}
        doc = {
            "family": fam, "method": meth,
            "source": {"repo": repo, "commit": SHA[repo], "folder": folder},
            "command": COMMANDS[(fam, meth)],
            "num_steps": len(steps), "blocks": blocks, "tokens": tokens, "sampler": sampler,
            "index_note": ("i = authors' down-counting index = num_steps-1-s" if fam == 'dit'
                           else "i = authors' up-counting step = s"),
            "rules": RULES[(fam, meth)],
            "counts": counts(steps),
            "steps": strip(steps),
        }
        path = os.path.join(HERE, f"{fam}_{meth}.json")
        with open(path, 'w') as fh:
            fh.write(_dump(doc))
        print(f"wrote {os.path.relpath(path)}  counts={doc['counts']}")


def _dump(doc):
    """Compact JSON: one line per step, one line per rule."""
    head = {k: v for k, v in doc.items() if k not in ('rules', 'steps')}
    s = json.dumps(head, indent=1)[:-2] + ',\n "rules": [\n'
    s += ',\n'.join('  ' + json.dumps(r) for r in doc['rules']) + '\n ],\n "steps": [\n'
    s += ',\n'.join('  ' + json.dumps(e, separators=(',', ':')) for e in doc['steps']) + '\n ]\n}\n'
    json.loads(s)
    return s


# ----------------------------------------------------------------------------------------------
# cross-checks
# ----------------------------------------------------------------------------------------------
def torch_crosscheck():
    """Check the numpy float32 emulation against torch itself (if importable)."""
    try:
        import torch
    except ImportError:
        print("torch not importable; skipped torch cross-check")
        return
    torch.set_num_threads(1)
    for i in range(50):
        for N in (3, 4, 5, 6):
            for w in (0.0, 0.2, 0.4):
                a = float(torch.round(N / torch.tensor(1 + w - 2 * w * i / 50)))
                b = torch_round_div(N, 1 + w - 2 * w * i / 50)
                assert a == b, (i, N, w, a, b)
                a = float(torch.round(N / torch.tensor(1 - w + 2 * w * i / 50)))
                b = torch_round_div(N, 1 - w + 2 * w * i / 50)
                assert a == b
    for (fn, rs, T, ntoks, mods) in ((ratio_dit_toca_ddim50, (0.07, 0.05), 50, (256,), ('mlp', 'attn')),
                                     (ratio_pixart_toca, (0.30, 0.75), 20, (256, 1024), ('cross-attn', 'mlp'))):
        for r in rs:
            for st in range(T):
                for l in range(28):
                    for m in mods:
                        x = fn(r, st, T, l, m)
                        for n in ntoks:
                            t = torch.clamp(torch.tensor(x), 0.0, 1.0)
                            assert int(t * n) == topk_count(x, n), (fn.__name__, r, st, l, m, n)
    for l in range(38):
        for stream, n in (('double_stream', 4096), ('double_stream', 512), ('single_stream', 4608)):
            x = ratio_flux_toca(0.1, 7, 50, l, stream)
            assert int(torch.clamp(torch.tensor(x), min=0, max=1) * n) == topk_count(x, n)
    print("torch cross-check of float32 emulation: OK")


def near_boundary_report(tables):
    """List k values whose float32 product lies within 1e-3 of an integer (rounding-sensitive)."""
    hits = []
    for l in range(28):
        for st in range(50):
            for r in (0.07, 0.05):
                x = ratio_dit_toca_ddim50(r, st, 50, l, 'mlp')
                p = float(np.float32(f32(min(max(x, 0), 1)) * np.float32(256)))
                if x > 0 and abs(p - round(p)) < 1e-3:
                    hits.append(('dit', r, st, l, p, int(p), int(x * 256)))
    for l in range(28):
        for st in range(20):
            for r in (0.30, 0.75):
                for m in ('cross-attn', 'mlp'):
                    x = ratio_pixart_toca(r, st, 20, l, m)
                    if 0 < x < 1:
                        p = float(np.float32(f32(x) * np.float32(256)))
                        if abs(p - round(p)) < 1e-3:
                            hits.append(('pixart', r, st, l, m, p, int(p), int(x * 256)))
    for l in range(38):
        for stream, n in (('double_stream', 4096), ('double_stream', 512), ('single_stream', 4608)):
            if stream == 'double_stream' and l >= 19:
                continue
            x = ratio_flux_toca(0.1, 5, 50, l, stream)
            p = float(np.float32(f32(x) * np.float32(n)))
            if abs(p - round(p)) < 1e-3:
                hits.append(('flux', stream, n, l, p, int(p), int(x * n)))
    return hits


def check_doc(tables):
    path = os.path.join(HERE, '..', '..', '..', 'docs', 'authors', 'dit-schedules.md')
    if not os.path.exists(path):
        print("dit-schedules.md not found; skipped")
        return True
    text = open(path).read()
    ok = True
    for sec, key in (('### 1.3', ('dit', 'toca')), ('### 3.3', ('dit', 'duca'))):
        part = text.split(sec, 1)[1].split('\n##', 1)[0]
        rows = [ln for ln in part.splitlines() if re.match(r'^\| \d+ \|', ln)]
        steps = tables[key]
        for ln in rows:
            cells = [c.strip() for c in ln.strip('|').split('|')]
            s, i, nt_in, b0, rest, nt_out, kcol = cells[:7]
            e = steps[int(s)]
            conv = {'FULL': 'full', 'PARTIAL': 'partial', 'SKIP(aggr)': 'skip'}
            exp0, exp1 = conv[b0], conv[rest]
            got0 = e['blocks'][0]
            got1 = set(e['blocks'][1:])
            bad = []
            if int(i) != e['i'] or got0 != exp0 or got1 != {exp1}:
                bad.append('kinds')
            if int(nt_out) != int(e['nt_out']):
                bad.append('Nt')
            if kcol != '-':
                kk = kcol.split(':-', 1)[-1].strip()
                if kk.startswith('all '):
                    want = {l: int(kk[4:].split()[0]) for l in range(28) if e['blocks'][l] == 'partial'}
                else:
                    vals = [int(v) for v in kk.split(',')]
                    ls = [l for l in range(28) if e['blocks'][l] == 'partial']
                    want = dict(zip(ls if len(vals) == len(ls) else range(28), vals))
                for l, v in want.items():
                    if e['k'].get(f"blocks.{l}.mlp") != v:
                        bad.append(f"k l={l} doc={v} got={e['k'].get(f'blocks.{l}.mlp')}")
            if bad:
                ok = False
                print(f"MISMATCH {key} s={s}: {bad}")
        print(f"doc check {key}: {len(rows)} rows compared")
    # TaylorSeer / ClusCa FULL list (sections 4.2, 5.2)
    want = [0, 1] + list(range(5, 50, 4))
    for key in (('dit', 'taylorseer'), ('dit', 'clusca')):
        got = [e['s'] for e in tables[key] if e['blocks'][0] == 'full']
        if got != want:
            ok = False
            print(f"MISMATCH {key}: FULL {got} vs doc {want}")
    got = [e['s'] for e in tables[('dit', 'fora')] if e['blocks'][0] == 'full']
    if got != [0] + list(range(1, 50, 3)):
        ok = False
        print(f"MISMATCH fora FULL {got}")
    print("doc check:", "OK" if ok else "MISMATCHES")
    return ok


def main(argv):
    tables = build_all()
    write_all(tables)
    if '--check-doc' in argv:
        torch_crosscheck()
        hits = near_boundary_report(tables)
        print(f"k products within 1e-3 of an integer: {len(hits)}")
        for h in hits:
            print("  ", h)
        if not check_doc(tables):
            return 1
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
