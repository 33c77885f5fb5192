"""Which sampling loop, step and CFG branch a model call belongs to, from what the call itself shows.

This is the fallback for calls that come without a request boundary (`fxcache.request`, `fxcache.enable`, a
pipeline's end-of-call reset); inside a request it still tells the steps and CFG branches apart. A call carries its
timestep t, a fingerprint of its conditioning inputs (text embeddings, class labels, ...: everything but the latents
and t) and, under a diffusers pipeline, the name of its `cache_context` ("cond" / "uncond"). A CFG branch of one
sampling loop keeps its conditioning (and name) from step to step while t moves one way (down in most pipelines,
up in Lumina's). So a call goes to the branch with its name, else the one with its conditioning, and then:

* t moved on in the time direction: that branch's next step;
* t repeats at a later step (Heun-type samplers evaluate twice at one t): the next step too;
* t repeats at step 0 (the same request again, after a failure) or t moved back: that branch starts over; when t
  moved back, the branches that stopped calling before it did (an unconditional branch that CFG truncation ended
  early) end with it, so a new request never continues them.

Calls of several trajectories with one conditioning (micro-batches of one prompt, lockstep loops) are told apart
by their latents, sampled at a few hundred fixed positions with t: a trajectory's latents move a step at a time,
another's are elsewhere (even one that starts close, as variations of one image do). A repeated t continues a
branch only with latents nearer to its last ones than half the step before moved them (a Heun re-evaluation), or,
at step 0, with the same latents (the same request again); else it is another trajectory. Of several branches t
moves on from, a call continues the least recently used (the order of a loop), unless another's latents are less
than half as far from the call's.

A call that matches no branch is a new branch at step 0 (it runs FULL): a repeated t is the other half of a
true-CFG pair, a t above every branch's is a new request, which drops the old branches, and any other is a request
that cannot be told from the others, so it reads no one's caches. Only inside an explicit request
(`continue_unmatched`: no other request can interleave there) does such a call continue the least recently used
branch t moves on from: a loop whose conditioning changes every step (per-step residual inputs). The fingerprints
of dropped branches are remembered, so a dropped request that calls again starts over. Two moves back in a row
reveal a rising time convention. Beyond `max_branches` the least recently used branch is dropped.
"""

from __future__ import annotations

import collections
import dataclasses
import math

from ..errors import ConfigError

FALLING, RISING = -1, 1
_TOMBSTONES = 16  # fingerprints of dropped branches remembered per tracker
#: relative distance between two latent samples that no re-evaluation at one t reaches, and a jump in t's direction
#: beyond which (and beyond 4 of the branch's last steps) a call looks like a new request; two trajectories of
#: independent noise differ by about sqrt(2)
FAR = 0.5
SAME = 1e-3  # relative distance within which two latent samples are the same latents (rounding)


def distance(a: tuple | None, b: tuple | None) -> float:
    """Relative distance of two latent samples (0 when either is unknown)."""
    if a is None or b is None or len(a) != len(b):
        return 0.0
    scale = max(math.hypot(*a), math.hypot(*b))
    return math.dist(a, b) / scale if scale > 0 else 0.0


@dataclasses.dataclass
class TimeDirection:
    """The direction t moves in during sampling, shared by every tracker of one graph (it is the model's)."""

    sign: int = FALLING
    fixed: bool = False

    @classmethod
    def of(cls, option: str) -> "TimeDirection":
        if option == "auto":
            return cls()
        if option not in ("falling", "rising"):
            raise ConfigError(f"time_direction must be 'auto', 'falling' or 'rising', got {option!r}")
        return cls(FALLING if option == "falling" else RISING, fixed=True)

    def forward(self, t: float, last: float) -> bool:
        return (t - last) * self.sign > 0

    @property
    def name(self) -> str:
        return "falling" if self.sign == FALLING else "rising"


@dataclasses.dataclass
class Branch:
    slot: int  # the branch number in records and cache storage
    name: str | None
    fingerprint: tuple | None  # None: forced by `fxcache.step`, never matched by the rule
    step: int = 0
    last_t: float = math.nan
    used: int = 0  # call counter at last use (least recently used goes first)
    varying: bool = False  # its conditioning changed from one step to the next
    moved_back: bool = False  # its last call started it over because t moved back
    sample: tuple | None = None  # its last call's latents, at fixed positions
    jump: float = math.nan  # how far its latents moved at its last step (relative)


@dataclasses.dataclass
class Position:
    step: int
    branch: int
    new: bool  # the branch starts over: its caches must be dropped before this call
    dropped: tuple[int, ...] = ()  # branches dropped (their caches must be freed)
    crowded: bool = False  # a dropped branch was still in use: more live branches than max_branches
    flipped: bool = False  # this call revealed the opposite time direction
    unmatched: bool = False  # a call that continues no branch: its conditioning changed, or another request
    revived: bool = False  # a dropped branch's conditioning called again, t moving on: a request taken for ended
    returning: bool = False  # a dropped branch's conditioning called again (not conditioning that changes)
    jumped: bool = False  # t moved on but the latents jumped far more than a step moves them: maybe a new request


class StepTracker:
    """Per (request, graph, model): the branches seen and where each one is."""

    def __init__(self, direction: TimeDirection | None = None, max_branches: int = 3, *,
                 continue_unmatched: bool = False):
        self.direction = direction or TimeDirection()
        self.max_branches = max_branches
        self.continue_unmatched = continue_unmatched
        self.branches: list[Branch] = []
        self.calls = 0
        self._tombstones: collections.OrderedDict = collections.OrderedDict()  # fingerprint -> its last t
        # (fingerprint, latent sample) of branches dropped for room (max_branches): such a trajectory that calls
        # again is not taken for another one of its conditioning
        self._dropped: collections.deque = collections.deque(maxlen=_TOMBSTONES)

    def locate(self, t: float, *, name: str | None = None, fingerprint: tuple = (),
               sample: tuple | None = None) -> Position:
        """The (step, branch) of a call at timestep `t` with this conditioning `fingerprint`, context `name` and
        latent `sample`."""
        if not math.isfinite(t):
            self.reset()
            raise ConfigError(f"the timestep is {t}: fxcache needs finite timesteps to follow the sampling loop "
                              "(this model's caches were dropped; the next call starts a new request)")
        self.calls += 1
        position = self._locate(t, name, fingerprint, sample)
        for b in self.branches:
            if b.slot == position.branch and b.fingerprint is not None:
                b.sample = sample
        return position

    def _locate(self, t: float, name: str | None, fingerprint: tuple, sample: tuple | None) -> Position:
        branch = self._match(t, name, fingerprint, sample)
        if branch is not None:
            return self._advance(branch, t, name, fingerprint, sample)
        behind = [b for b in self.branches if b.fingerprint is not None and self.direction.forward(t, b.last_t)]
        if behind and name is None:
            branch = min(behind, key=lambda b: b.used)
            if self.continue_unmatched and (fingerprint not in self._tombstones or branch.varying):
                branch.varying = True  # conditioning that changes every step: the loop t moves on in
                return self._advance(branch, t, name, fingerprint, sample)
            return dataclasses.replace(self._new_branch(t, name, fingerprint), unmatched=True)
        if any(b.last_t == t for b in self.branches):  # the other half of a true-CFG pair, or another trajectory
            return self._new_branch(t, name, fingerprint)
        live = [b for b in self.branches if b.fingerprint is not None]
        if len(live) == 1 and live[0].moved_back and self.continue_unmatched and not self.direction.fixed:
            return self._advance(live[0], t, name, fingerprint, sample)  # -> flips the direction
        if live and not any(self.direction.forward(t, b.last_t) for b in live):
            for b in live:  # t above every branch: a new request
                self._drop(b, taken_for_ended=True)
            dropped = tuple(b.slot for b in live)
            pos = self._new_branch(t, name, fingerprint)
            self.branches[-1].moved_back = True
            return dataclasses.replace(pos, dropped=pos.dropped + dropped)
        return self._new_branch(t, name, fingerprint)

    def force(self, step: int, slot: int, t: float) -> Position:
        """An explicit (step, branch) (`fxcache.step`); step 0 starts that branch over. A branch the rule made in
        that slot is dropped first: its caches are never read as the forced branch's."""
        self.calls += 1
        branch = next((b for b in self.branches if b.slot == slot), None)
        dropped = ()
        if branch is not None and branch.fingerprint is not None:
            self._drop(branch)
            branch, dropped = None, (slot,)
        crowded = False
        if branch is None:
            if len(self.branches) >= self.max_branches:  # forced branches obey the bound too
                old = min(self.branches, key=lambda b: b.used)
                crowded = self.calls - old.used <= self.max_branches
                self._drop(old)
                dropped += (old.slot,)
            branch = Branch(slot, None, None)
            self.branches.append(branch)
        branch.step, branch.last_t, branch.used = step, t, self.calls
        return Position(step, slot, step == 0 or bool(dropped), dropped, crowded)

    def forget(self, slot: int) -> None:
        """A call of this branch failed: its next call starts over (its conditioning is not continued either)."""
        for b in [b for b in self.branches if b.slot == slot]:
            self._drop(b)

    def ended_before(self, t: float) -> bool:
        """Whether a new request starting at `t` ends this tracker's: t lies before (above, for falling time)
        the last t of every branch the rule follows. A graph of another input shape uses it."""
        live = [b for b in self.branches if b.fingerprint is not None]
        return bool(live) and all(self.direction.forward(b.last_t, t) for b in live)

    def reset(self) -> None:
        self.branches.clear()
        self._tombstones.clear()
        self._dropped.clear()

    # -- internals ---------------------------------------------------------------------------------------------
    def _match(self, t: float, name: str | None, fingerprint: tuple, sample: tuple | None) -> Branch | None:
        candidates = []
        if name is not None:  # outside an explicit request, a name is a branch of this conditioning only
            candidates = [b for b in self.branches if b.name == name and b.fingerprint is not None
                          and (self.continue_unmatched or b.fingerprint == fingerprint)]
        if not candidates:
            candidates = [b for b in self.branches
                          if b.fingerprint == fingerprint and (name is None or b.name is None)]
        # a repeated t with other latents is another trajectory (a micro-batch), not this branch's
        candidates = [b for b in candidates if t != b.last_t or self._repeats(b, sample)]
        if not candidates:
            return None

        def rank(b: Branch):  # a branch that t moves on from first, then a repeat, then one that t moved back from
            order = 0 if self.direction.forward(t, b.last_t) else 1 if t == b.last_t else 2
            return order, b.used

        best = min(candidates, key=rank)
        moving = [b for b in candidates if self.direction.forward(t, b.last_t)]
        if len(moving) > 1:  # the least recently used (a loop's order), unless another's latents are far nearer
            nearest = min(moving, key=lambda b: distance(b.sample, sample))
            if 2 * distance(nearest.sample, sample) < distance(best.sample, sample):
                best = nearest
        if sample is not None and any(f == fingerprint and distance(s, sample) < distance(best.sample, sample)
                                      for f, s in self._dropped):
            return None  # a dropped trajectory of this conditioning calls again: it continues no other's
        return best

    @staticmethod
    def _repeats(branch: Branch, sample: tuple | None) -> bool:
        """Whether a call at the branch's last t continues it: a re-evaluation at one t (Heun) moves the latents
        by a fraction of the step before it, so they must be nearer than half that step (and than `FAR`); at
        step 0 (no step yet: the same request again) they must be the same latents. Unknown latents continue."""
        if branch.sample is None or sample is None:
            return True
        d = distance(branch.sample, sample)
        if branch.step >= 1 and math.isfinite(branch.jump):
            return d <= min(FAR, 0.5 * branch.jump)
        return d <= SAME

    def _advance(self, branch: Branch, t: float, name, fingerprint, sample=None) -> Position:
        moved_back, branch.moved_back = branch.moved_back, False
        jump, previous = distance(branch.sample, sample), branch.jump
        previous_use, branch.used = branch.used, self.calls
        if name is not None:
            branch.name = name
        branch.fingerprint = fingerprint
        flipped = False
        jumped = False
        if self.direction.forward(t, branch.last_t):
            branch.step += 1
            jumped = branch.step >= 2 and jump > FAR and jump > 4 * previous  # not how a loop moves its latents
            branch.jump = jump
        elif t == branch.last_t and branch.step > 0:
            branch.step += 1  # a second evaluation at one t (Heun)
        elif t != branch.last_t and moved_back and branch.step == 0 and not self.direction.fixed:
            self.direction.sign = -self.direction.sign  # t moved back twice in a row: it runs the other way
            branch.step, flipped = 1, True
        else:  # the same request again at step 0, or t moved back: this branch starts over
            branch.moved_back = t != branch.last_t
            branch.step, branch.last_t = 0, t
            stale = ()
            if branch.moved_back:  # a new loop: branches that stopped before this one did (CFG truncation) end too
                stale = tuple(b for b in self.branches
                              if b is not branch and b.fingerprint is not None and b.used < previous_use)
                for b in stale:
                    self._drop(b, taken_for_ended=True)
            return Position(0, branch.slot, True, dropped=tuple(b.slot for b in stale))
        branch.last_t = t
        return Position(branch.step, branch.slot, False, flipped=flipped, jumped=jumped)

    def _drop(self, branch: Branch, *, taken_for_ended: bool = False) -> None:
        """`taken_for_ended`: the rule guessed its request ended (another one started); remember where it was."""
        self.branches.remove(branch)
        if branch.fingerprint is not None:
            self._tombstones.pop(branch.fingerprint, None)
            self._tombstones[branch.fingerprint] = branch.last_t if taken_for_ended else None
            while len(self._tombstones) > _TOMBSTONES:
                self._tombstones.popitem(last=False)

    def _new_branch(self, t: float, name: str | None, fingerprint: tuple) -> Position:
        dropped, crowded = (), False
        if len(self.branches) >= self.max_branches:
            old = min(self.branches, key=lambda b: b.used)
            # a call at the same t and conditioning with other latents, again and again (a fixed-t loop), replaces
            # a branch that never went on: quietly (a micro-batch that does go on finds it dropped and says so)
            replaced = old.step == 0 and old.fingerprint == fingerprint and old.last_t == t
            crowded = self.calls - old.used <= self.max_branches and not replaced
            self._drop(old)
            if old.fingerprint is not None and old.sample is not None:
                self._dropped.append((old.fingerprint, old.sample))
            dropped = (old.slot,)
        revived = returning = False
        if fingerprint in self._tombstones:
            last_t = self._tombstones.pop(fingerprint)
            revived = last_t is not None and self.direction.forward(t, last_t)
            returning = True
        used = {b.slot for b in self.branches}
        slot = next(i for i in range(len(self.branches) + 1) if i not in used)
        self.branches.append(Branch(slot, name, fingerprint, 0, t, self.calls))
        return Position(0, slot, True, dropped, crowded, revived=revived, returning=returning)
