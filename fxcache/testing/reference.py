"""An independent eager reference of the caching maths, built from forward hooks on the real modules.

It shares no code with the graph passes: attention modules return their cached output, token-wise modules run on
all tokens and keep only the chosen rows (`cache.index_copy(1, idx, out.index_select(1, idx))`), and on SKIP steps
the last block returns its cached output. Random inputs are drawn as the runner documents it
(`fxcache.runtime.draws`): the draw of input `key` at step s comes from a generator seeded with
`step_seed(config.seed, s, key)`, e.g. one `random_token_indices` draw per token count ("idx:<tokens>") on each
PARTIAL step, shared by the CFG branches of a step.
"""

from __future__ import annotations

import math

import torch

from ..config import CacheConfig, StepKind
from ..runtime.draws import draw_indices, draw_permutation, draw_uniform


class HookedReference:
    """Run `model` with caching done by hooks. `attention` / `token_wise` / `last_block`: module paths."""

    def __init__(self, model: torch.nn.Module, config: CacheConfig, *, attention: list[str],
                 token_wise: list[str], last_block: str):
        self.model, self.config = model, config
        mods = dict(model.named_modules())
        self.attention, self.token_wise, self.last_block = attention, token_wise, last_block
        self.kind: StepKind = StepKind.FULL
        self.branch = 0
        self.step = 0
        self.caches: dict[int, dict[str, object]] = {}
        self.order: list[str] = []  # token-wise units in order of first execution
        self.tokens: dict[str, int] = {}
        self.indices: dict[str, torch.Tensor] = {}
        self.seed = int(getattr(config, "seed", 0))
        self.block_calls = 0
        self._handles = []
        for name in attention:
            self._handles.append(mods[name].register_forward_hook(self._attention_hook(name)))
        for name in token_wise:
            self._handles.append(mods[name].register_forward_hook(self._token_hook(name)))
        self._handles.append(mods[last_block].register_forward_hook(self._last_hook))
        for name, m in mods.items():
            parts = name.split(".")
            if len(parts) == 2 and parts[1].isdigit() and "blocks" in parts[0]:
                self._handles.append(m.register_forward_pre_hook(self._count_block))

    def close(self) -> None:
        for h in self._handles:
            h.remove()

    def _count_block(self, module, args):
        self.block_calls += 1

    def _state(self) -> dict:
        return self.caches.setdefault(self.branch, {})

    def _taylor(self, name, out):
        """TaylorSeer maths, written out: factors by divided differences, forecast by the Taylor sum."""
        if isinstance(out, tuple):  # e.g. joint attention returns (image, text) outputs
            return tuple(self._taylor(f"{name}#{i}", o) for i, o in enumerate(out))
        state, m = self._state(), self.config.taylor_order
        last = state.get("taylor_last_full")
        if self.kind is StepKind.FULL:
            new, old = [out], state.get(("taylor", name), [])
            if last is not None and self.step >= self.config.warmup - 1 and self.step > last:
                for i in range(m):
                    if i >= len(old):
                        break
                    new.append((new[i] - old[i]) / (self.step - last))
            state[("taylor", name)] = new
            return out
        delta = self.step - last
        factors = state[("taylor", name)]
        total = factors[0] * 1.0
        for i in range(1, len(factors)):
            total = total + factors[i] * (delta ** i / math.factorial(i))
        return total

    def _attention_hook(self, name):
        def hook(module, args, out):
            state = self._state()
            if self.config.taylor_order is not None:
                return self._taylor(name, out)
            if self.kind is StepKind.FULL:
                state[name] = out
                return out
            return state[name]
        return hook

    def _token_hook(self, name):
        def hook(module, args, out):
            state = self._state()
            if self.kind is StepKind.FULL and name not in self.order:
                self.order.append(name)
                self.tokens[name] = out.shape[1]
            if self.config.taylor_order is not None:
                return self._taylor(name, out)
            if self.kind is StepKind.FULL:
                state[name] = out
                return out
            if self.kind is StepKind.PARTIAL:
                idx = self.indices[name]
                new = state[name].index_copy(1, idx, out.index_select(1, idx))
                state[name] = new
                return new
            return state[name]
        return hook

    def _last_hook(self, module, args, out):
        state = self._state()
        if self.kind is StepKind.SKIP:
            return state["final"]
        state["final"] = out
        return out

    def new_generation(self) -> None:
        self.caches.clear()

    def draw(self) -> None:
        """Token indices of one PARTIAL step: one (units, k) draw per token count, in first-execution order."""
        groups: dict[int, list[str]] = {}
        for name in self.order:
            groups.setdefault(self.tokens[name], []).append(name)
        self.indices = {}
        for tokens, names in groups.items():
            rows = draw_indices(self.seed, self.step, f"idx:{tokens}", len(names), tokens,
                                self.config.tokens_for(tokens), "cpu")
            for i, name in enumerate(names):
                self.indices[name] = rows[i]

    def __call__(self, step: int, branch: int, *args, **kwargs):
        """One model call at (step, branch); FULL while the branch has no cache, as the runner does."""
        if step == 0 and branch == 0:
            self.new_generation()
        self.branch, self.step = branch, step
        kind = self.config.step_kind(step)
        if branch not in self.caches or not self.caches[branch]:
            kind = StepKind.FULL
        if kind is StepKind.PARTIAL and branch == 0:
            self.step = step
            self.draw()
        self.kind = kind
        with torch.no_grad():
            out = self.model(*args, **kwargs)
        if kind is StepKind.FULL and self.config.taylor_order is not None:
            self._state()["taylor_last_full"] = step
        return out


class ClusCaReference(HookedReference):
    """ClusCa by hooks, written independently of the graph passes (loops over rows and clusters for our
    formulation; for the authors' options, `anchor="ref"`, `draws="per_unit"`, `kmeans="ref"`, transcriptions of
    Cache4Diffusion @91a1949 dit/clusca-dit: `Kmeans.fit`, `select_one_fresh_index_per_cluster`, `update_cache`
    and `propagation_update_cache`, `taylor_formula`).

    `refreshed`: {token-wise module path: (block path, output position in that block's outputs)}: the block output
    clustered for that unit's stream. Random draws follow the runner's documented rule (`fxcache.runtime.draws`),
    shared by the CFG branches of a step, with K = min(clusters, tokens) per stream:
    - on each FULL call without centroids, the k-means start: kmeans="fixed": `randperm(tokens)[:K]`
      ("kinit:<tokens>"); kmeans="ref": `rand(B, K)` ("kinit:<tokens>"), token floor(u * tokens) (the authors'
      `randint(0, N, (B, K))`, per row, with replacement);
    - on each CLUSTER step, the member draw: draws="shared": one `rand(1, tokens)` per stream ("rand:<tokens>");
      draws="per_unit": one `rand(units, B, tokens)` per stream ("rand:<tokens>"), row u for the stream's u-th
      refreshed unit in execution order (the authors' `torch.rand(B, N)` per call).
    """

    def __init__(self, model, config, *, refreshed: dict[str, tuple[str, int]], **units):
        super().__init__(model, config, **units)
        self.refreshed = refreshed
        self.streams: list[int] = []  # token counts in graph order of first refreshed unit
        self.features: dict[int, torch.Tensor] = {}
        self.rand: dict[int, torch.Tensor] = {}
        self.rand_step = -1
        self.picks: dict[str, torch.Tensor] = {}  # unit -> its members (B, K) at the last CLUSTER call
        mods = dict(model.named_modules())
        for block in sorted({b for b, _ in refreshed.values()}):
            self._handles.append(mods[block].register_forward_hook(self._block_hook(block)))

    def _block_hook(self, block):
        def hook(module, args, out):
            outs = out if isinstance(out, tuple) else (out,)
            for name, (b, pos) in self.refreshed.items():
                if b == block and self.kind is StepKind.FULL:
                    self.features[outs[pos].shape[1]] = outs[pos]
            return out
        return hook

    def _k(self, tokens: int) -> int:
        return min(self.config.clusters, tokens)

    def _stream_units(self, tokens: int) -> list[str]:
        return [n for n in self.order if n in self.refreshed and self.tokens[n] == tokens]

    # -- k-means ------------------------------------------------------------------------------------------------
    @staticmethod
    def _kmeans(x, centroids, iters):
        """Ours, one row: fixed iterations, an emptied cluster keeps its centroid, labels of the final centroids."""
        x, c = x.float(), centroids.clone()
        for _ in range(iters):
            labels = torch.stack([(x[:, None, :] - c[None]).abs().sum(-1).argmin(1)])[0]
            for k in range(c.shape[0]):
                members = x[labels == k]
                if len(members):
                    c[k] = members.mean(0)
        return (x[:, None, :] - c[None]).abs().sum(-1).argmin(1), c

    @staticmethod
    def _kmeans_authors(X, cache_centroids, init_indices, n_clusters, max_iters):
        """cluster_utils/Kmeans.py `Kmeans(init='random', p=1).fit(X, cache_centroids)`, the whole batch at once."""
        B, N, dim = X.shape
        if cache_centroids is not None:
            centroids = cache_centroids
        else:
            centroids = X[torch.arange(B)[:, None], init_indices]
        labels = torch.cdist(X.float(), centroids.float(), p=1).argmin(dim=-1)  # max_iters = 0 (theirs: unbound)
        for _ in range(max_iters):
            dists = torch.cdist(X.float(), centroids.float(), p=1)
            labels = dists.argmin(dim=-1)
            one_hot = torch.nn.functional.one_hot(labels, num_classes=n_clusters).type_as(X)
            counts = one_hot.sum(dim=1) + 1e-8
            centroids_new = torch.bmm(one_hot.permute(0, 2, 1), X) / counts.unsqueeze(-1)
            if torch.allclose(centroids, centroids_new, rtol=1e-4):
                break
            centroids = centroids_new
        return labels, centroids

    def _cluster(self, step: int) -> None:
        """k-means of every stream at a FULL call, warm-started from the branch's centroids."""
        state = self._state()
        for tokens in self.streams:
            x = self.features[tokens]
            k = self._k(tokens)
            prev = state.get(("centroids", tokens))
            if self.config.kmeans == "ref":
                init = None
                if prev is None:
                    u = draw_uniform(self.seed, step, f"kinit:{tokens}", (x.shape[0], k), "cpu")
                    init = (u * tokens).long().clamp(max=tokens - 1)
                labels, cents = self._kmeans_authors(x, prev, init, k, self.config.kmeans_iters)
            else:
                init = draw_permutation(self.seed, step, f"kinit:{tokens}", tokens, k, "cpu")
                rows = [self._kmeans(x[b], prev[b] if prev is not None else x[b, init].float(),
                                     self.config.kmeans_iters) for b in range(x.shape[0])]
                labels, cents = torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
            state[("labels", tokens)], state[("centroids", tokens)] = labels, cents

    # -- CLUSTER steps ------------------------------------------------------------------------------------------
    def _members(self, name: str, labels: torch.Tensor) -> torch.Tensor:
        """(B, K) members of unit `name`'s refresh."""
        tokens, k = labels.shape[1], self._k(labels.shape[1])
        if self.config.draws == "per_unit":  # select_fresh_tokens.py select_one_fresh_index_per_cluster
            rand_weights = self.rand[tokens][self._stream_units(tokens).index(name)]  # (B, N)
            cluster_ids = torch.arange(k).view(1, -1, 1)
            mask = labels.unsqueeze(1) == cluster_ids
            masked_weights = torch.where(mask, rand_weights.unsqueeze(1), torch.tensor(-float("inf")))
            return masked_weights.argmax(dim=2, keepdim=False)
        rand = self.rand[tokens][0]
        picks = torch.zeros(labels.shape[0], k, dtype=torch.long)
        for b in range(labels.shape[0]):
            chosen = {}
            for c in range(k):
                members = (labels[b] == c).nonzero().flatten()
                if len(members):
                    chosen[c] = int(members[rand[members].argmax()])
            for c in range(k):  # an empty cluster repeats the pick of token 0's cluster
                picks[b, c] = chosen.get(c, chosen[int(labels[b, 0])])
        return picks

    def _taylor(self, name, out):
        if name not in self.refreshed or self.kind is not StepKind.CLUSTER:
            return super()._taylor(name, out)
        state = self._state()
        tokens = out.shape[1]
        labels, factors = state[("labels", tokens)], state[("taylor", name)]
        delta = self.step - state["taylor_last_full"]
        propagate = tokens == max(self.streams) and self.config.gamma > 0
        picks = self.picks[name] = self._members(name, labels)
        if self.config.anchor == "ref":
            return self._refresh_authors(out, picks, labels, factors, delta, propagate)
        coefs = [delta ** i / math.factorial(i) for i in range(len(factors))]
        f0 = factors[0].clone()
        result = torch.empty_like(out)
        for b in range(out.shape[0]):
            higher = sum((factors[i][b] * coefs[i] for i in range(1, len(factors))), torch.zeros_like(out[b]))
            for j in picks[b].tolist():
                f0[b, j] = out[b, j] - higher[j]
            forecast = f0[b] + higher
            if propagate:
                for j in range(tokens):
                    rep = int(picks[b, int(labels[b, j])])
                    forecast[j] = forecast[j] + self.config.gamma * (out[b, rep] - forecast[j])
                    f0[b, j] = forecast[j] - higher[j]
            result[b] = forecast
        factors[0] = f0
        return result

    def _refresh_authors(self, out, fresh_indices, cluster_indices, module_dict, distance, propagate):
        """models.py L208-220: fresh tokens' MLP values, `update_cache` (gamma = 0) or `propagation_update_cache`
        (gamma > 0, k = 1), then `taylor_formula` of the factors with the overwritten F_0."""
        dim = out.shape[-1]
        fresh_tokens = torch.gather(out, 1, fresh_indices.unsqueeze(-1).expand(-1, -1, dim))
        module_dict[0] = module_dict[0].clone()  # theirs writes in place; the FULL output tensor is not ours to edit
        module_dict[0].scatter_(dim=1, index=fresh_indices.unsqueeze(-1).expand(-1, -1, dim), src=fresh_tokens)
        if propagate:
            old_cache = module_dict[0]
            B, N, dim = old_cache.shape
            fresh_cluster_indices = cluster_indices.gather(dim=1, index=fresh_indices)
            sum_per_cluster = torch.zeros((B, self._k(N), dim))
            sum_per_cluster.scatter_add_(dim=1, index=fresh_cluster_indices.unsqueeze(-1).expand(-1, -1, dim),
                                         src=fresh_tokens.float())
            mean_per_cluster = sum_per_cluster  # only when k == 1
            new_cache = mean_per_cluster.gather(1, cluster_indices.unsqueeze(-1).expand(-1, -1, dim))
            gamma = self.config.gamma
            module_dict[0] = (new_cache * gamma + old_cache * (1 - gamma)).to(old_cache.dtype)
        output = 0
        for i in range(len(module_dict)):
            output += (1 / math.factorial(i)) * module_dict[i] * (distance ** i)
        return output

    def __call__(self, step: int, branch: int, *args, **kwargs):
        if step == 0 and branch == 0:
            self.streams, self.rand_step = [], -1
        kind = self.config.step_kind(step)
        state = self.caches.get(branch)
        if not state:
            kind = StepKind.FULL
        if kind is StepKind.CLUSTER and self.rand_step != step:
            if self.config.draws == "per_unit":
                self.rand = {t: draw_uniform(self.seed, step, f"rand:{t}", (len(self._stream_units(t)),
                                                                             state[("labels", t)].shape[0], t), "cpu")
                             for t in self.streams}
            else:
                self.rand = {t: draw_uniform(self.seed, step, f"rand:{t}", (1, t), "cpu") for t in self.streams}
            self.rand_step = step
        if kind is StepKind.FULL:
            self.features = {}
        out = super().__call__(step, branch, *args, **kwargs)
        if self.kind is StepKind.FULL and self.config.interval > 1:
            if not self.streams:  # streams in the order their first refreshed unit ran
                self.streams = list(dict.fromkeys(self.tokens[n] for n in self.order if n in self.refreshed))
            self._cluster(step)
        return out


class ToCaReference(HookedReference):
    """ToCa by hooks, independent of the graph passes: scores from hooked projections / inputs, selection by an
    explicit loop. Random scores are drawn as the runner documents: on each PARTIAL step (once, shared by CFG
    branches) one `rand(tokens)` per recomputed unit, in graph order."""

    def __init__(self, model, config, **units):
        super().__init__(model, config, **units)
        self.k: dict[str, int] = {}  # unit -> k, set by the test from the ratio schedule
        self.sources: dict[tuple[str, int], torch.Tensor] = {}  # (block, tokens) -> k/v projection at FULL
        self.inputs: dict[str, torch.Tensor] = {}
        self.rand: dict[str, torch.Tensor] = {}
        self.rand_step = -1
        mods = dict(model.named_modules())
        which = {"knorm": ("to_k", "add_k_proj"), "vnorm": ("to_v", "add_v_proj")}.get(config.score, ())
        for attn in units["attention"]:
            for leaf in which:
                if f"{attn}.{leaf}" in mods:
                    self._handles.append(mods[f"{attn}.{leaf}"].register_forward_hook(self._proj_hook(attn)))
        # similarity compares the unit's normalised input: the norm output the block modulates (feed-forward),
        # the fused unit's norm output (FLUX single block), the module input (cross-attention)
        siblings = {"ff": "norm2", "ff_context": "norm2_context", "proj_out": "norm"}
        for name in units["token_wise"]:
            parent, leaf = name.rsplit(".", 1)
            if leaf in siblings:
                norm = siblings[leaf]
                if leaf == "ff" and getattr(mods[parent], "norm_type", "ada_norm_single") != "ada_norm_single":
                    norm = "norm3"  # diffusers' BasicTransformerBlock (DiT) normalises before its ff with norm3
                self._handles.append(mods[f"{parent}.{norm}"].register_forward_hook(
                    lambda m, a, out, name=name: self._record_input(name, out[0] if isinstance(out, tuple) else out)))
            else:
                self._handles.append(mods[name].register_forward_pre_hook(
                    lambda m, a, name=name: self._record_input(name, a[0])))
        self.heads = {a: mods[a].heads for a in units["attention"]}
        self.maps: dict[str, tuple] = {}  # attention module -> (q, k) of its last call, at FULL steps
        self.current_attention: str | None = None
        self.text_first = type(model).__name__.startswith("Flux")  # joint key order: FLUX [txt; img], SD3 [img; txt]
        if config.score in ("attention", "cross_entropy"):
            for name, m in mods.items():
                if type(m).__name__.endswith("Attention") and name.count(".") == 2:
                    self._handles.append(m.register_forward_pre_hook(
                        lambda mod, a, name=name: setattr(self, "current_attention", name)))

    def __call__(self, step, branch, *args, **kwargs):
        if self.config.score not in ("attention", "cross_entropy"):
            return super().__call__(step, branch, *args, **kwargs)
        ref = self

        class Record(torch.overrides.TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                partial_xattn = ref.kind is StepKind.PARTIAL and str(ref.current_attention).endswith("attn2")
                if func is torch.nn.functional.scaled_dot_product_attention and (
                        ref.kind is StepKind.FULL or partial_xattn):
                    q = kwargs.get("query", args[0] if args else None)
                    k = kwargs.get("key", args[1] if len(args) > 1 else None)
                    ref.maps[ref.current_attention] = (q, k)
                return func(*args, **kwargs)

        with Record():
            return super().__call__(step, branch, *args, **kwargs)

    def _map_score(self, name, tokens):
        block = name.rsplit(".", 1)[0]
        if self.config.score == "cross_entropy":
            q, k = self.maps[f"{block}.attn2"]
        else:
            attn = next(a for a in self.maps if a.rsplit(".", 1)[0] == block and not a.endswith("attn2"))
            q, k = self.maps[attn]
        probs = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1).mean(1)  # (B, Lq, Lk)
        each = self.config.rows == "each"
        if self.config.score == "cross_entropy":
            if not each:
                c = probs.mean(0)
            elif probs.shape[0] % 2 == 0:  # the authors' PixArt: the CFG halves share the mean of their maps
                half = probs.shape[0] // 2
                c = torch.cat([(probs[:half] + probs[half:]) / 2] * 2)
            else:
                c = probs
            return 1 + (-(c * torch.log(c + 1e-7)).sum(-1))
        received = probs.mean(1)  # (B, Lk)
        if not each:
            received = received.mean(0)
        if received.shape[-1] == tokens:
            return received
        other = received.shape[-1] - tokens
        context = name.endswith("ff_context")
        offset = (0 if context else other) if self.text_first else (other if context else 0)
        return received[..., offset:offset + tokens]

    def _refresh_entropy(self, name, idx):
        """The authors' PixArt partial step scatters the fresh cross-attention map rows back: the s2 score of the
        block (its cross-attention's and its feed-forward's) takes the fresh entropies of the recomputed rows."""
        state, block = self._state(), name.rsplit(".", 1)[0]
        fresh = self._map_score(name, self.tokens[name])  # from this call's map: (B, N) or (N,), unnormalised
        for other in self.order:
            if other.rsplit(".", 1)[0] == block and ("score", other) in state:
                old = state[("score", other)].clone()
                if old.dim() == 1:
                    old[idx[0]] = fresh[idx[0]]
                else:
                    for r in range(old.shape[0]):
                        old[r, idx[r]] = fresh[r, idx[r]]
                state[("score", other)] = old

    def _proj_hook(self, attn):
        def hook(module, args, out):
            if self.kind is StepKind.FULL:
                self.sources[(attn.rsplit(".", 1)[0], out.shape[1])] = (out, self.heads[attn])
        return hook

    def _record_input(self, name, x):
        state = self._state()
        if self.kind is StepKind.FULL:
            state[("input", name)] = x
        self.inputs[name] = x

    def _base(self, name, tokens):
        """(rows, tokens) with rows the batch (rows="each") or (tokens,) shared; each row at unit L2 norm."""
        c, state = self.config, self._state()
        each = c.rows == "each"
        if c.score == "random":
            return self.rand[name].clone()
        if c.score == "staleness":
            return torch.zeros(tokens)
        if c.score == "similarity":
            ref, cur = state[("input", name)], self.inputs[name]
            s = torch.stack([1 - torch.nn.functional.cosine_similarity(cur[b], ref[b], dim=-1)
                             for b in range(cur.shape[0])])
            s = s if each else s.mean(0)
        else:
            s = state[("score", name)]
        return s / s.norm(dim=-1, keepdim=True)

    def _select(self, name, tokens, batch):
        c, state = self.config, self._state()
        rows = batch if c.rows == "each" else 1
        stale = state.setdefault(("stale", name), torch.zeros(rows, tokens))
        s = (self._base(name, tokens) + c.staleness_weight * stale / c.interval).expand(rows, tokens).clone()
        side = int(round(tokens ** 0.5))
        if c.spatial_grid and c.spatial_bonus and side * side == tokens and side % c.spatial_grid == 0:
            cell = c.spatial_grid  # the side of a cell, in tokens
            for r in range(rows):
                grid = s[r].reshape(side, side)
                boosted = grid.clone()
                for gy in range(side // cell):
                    for gx in range(side // cell):
                        block = grid[gy * cell:(gy + 1) * cell, gx * cell:(gx + 1) * cell]
                        j = int(block.flatten().argmax())
                        y, x = gy * cell + j // cell, gx * cell + j % cell
                        boosted[y, x] = grid[y, x] + c.spatial_bonus * grid[y, x]
                s[r] = boosted.flatten()
        new = stale + 1
        chosen = []
        for r in range(rows):
            idx = torch.sort(torch.topk(s[r], self.k[name]).indices).values
            new[r, idx] = 0
            chosen.append(idx)
        state[("stale", name)] = new
        return torch.stack(chosen).expand(batch, -1)

    def _token_hook(self, name):
        base_hook = super()._token_hook(name)

        def hook(module, args, out):
            state = self._state()
            if self.kind is StepKind.FULL and self.config.score in ("attention", "cross_entropy"):
                state[("score", name)] = self._map_score(name, out.shape[1])
            if self.kind is StepKind.FULL and self.config.score in ("knorm", "vnorm"):
                block = name.rsplit(".", 1)[0]
                proj, heads = self.sources[(block, out.shape[1])]
                b, n, d = proj.shape
                norms = proj.reshape(b, n, heads, d // heads).norm(dim=-1)
                s = (1 - norms).sum(-1) if self.config.prefer == "low" else norms.sum(-1)
                state[("score", name)] = s if self.config.rows == "each" else s.mean(0)
            if self.kind is StepKind.FULL:
                state.pop(("stale", name), None)
            if self.kind is StepKind.PARTIAL:
                if self.k.get(name, 0) == 0:
                    rows = out.shape[0] if self.config.rows == "each" else 1  # a call with no token ages them
                    state[("stale", name)] = state.get(("stale", name), torch.zeros(rows, out.shape[1])) + 1
                    return state[name]
                idx = self._select(name, out.shape[1], out.shape[0])  # (B, k)
                if self.config.score == "cross_entropy" and name.rsplit(".", 1)[-1] == "attn2":
                    self._refresh_entropy(name, idx)
                new = state[name].clone()
                for r in range(out.shape[0]):
                    new[r, idx[r]] = out[r, idx[r]]
                state[name] = new
                return new
            return base_hook(module, args, out)
        return hook

    def draw(self) -> None:
        if self.config.score == "random":
            self.rand = {n: draw_uniform(self.seed, self.step, f"tocarand:{n}", (self.tokens[n],), "cpu")
                         for n in self.order if self.k.get(n, 0) > 0}
