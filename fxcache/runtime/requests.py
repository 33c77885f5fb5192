"""Requests: who owns a set of caches, and where one request ends and the next begins.

A `Request` holds the state (caches, Taylor factors, step positions) of every graph it ran, per model. A call
belongs to the innermost active request (`with fxcache.request(model):`, or the one `fxcache.enable` opens for each
pipeline call), else to its thread's implicit request, whose steps and branches the timestep rule follows and
which a pipeline's end-of-call reset (`_reset_stateful_cache`) ends. Active requests live in a `ContextVar`, so
threads and asyncio tasks each see their own; implicit requests are per thread. Nothing here is traced by Dynamo.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import itertools
import sys
import threading
import warnings
import weakref

#: the active requests, innermost last, each as (request, thread that entered it, frame of its `with` statement)
_ACTIVE: contextvars.ContextVar[tuple] = contextvars.ContextVar("fxcache_requests", default=())
_OWN_FILES = (__file__, contextlib.__file__)
#: explicit (scope, step, branch) overrides from `fxcache.step`, innermost last
_OVERRIDES: contextvars.ContextVar[tuple] = contextvars.ContextVar("fxcache_step_overrides", default=())
_IDS = itertools.count()


class Request:
    """The state of one request (one generation: every step and CFG branch of it) on one or more models.

    `with fxcache.request(model):` opens one and ends it (freeing its caches) when the block ends, exceptions
    included. For requests interleaved in one thread, keep the object and re-enter it with `resume()`, then
    `end()` it.
    """

    def __init__(self, scopes: tuple["RequestScope", ...] | None = None, *, implicit: bool = False):
        self.id = next(_IDS)
        self.scopes = scopes  # None: every fxcache model
        self.implicit = implicit
        self.states: dict = {}  # (runner, model key) -> GraphState
        self.ended = False
        self.mark = None  # implicit requests: the pipeline call frame they serve (attach.pipeline_call_mark)
        self.gaps: set = set()  # scopes one of whose calls ran outside fxcache (Dynamo's eager fallback)
        self._lock = threading.Lock()
        for scope in scopes or ():
            scope._requests.add(self)
        if scopes is None:
            _ALL_SCOPES_REQUESTS.add(self)

    def __repr__(self) -> str:
        kind = "implicit" if self.implicit else "explicit"
        return f"<fxcache.Request {self.id} {kind}, {len(self.states)} graph states, {self.cache_bytes()} cache bytes>"

    def serves(self, scope: "RequestScope") -> bool:
        return self.scopes is None or scope in self.scopes

    # -- activation ------------------------------------------------------------------------------------------
    def __enter__(self) -> "Request":
        self._activate()
        return self

    def __exit__(self, *exc) -> None:
        self._deactivate()
        self.end()

    @contextlib.contextmanager
    def resume(self):
        """Make this request current for the block without ending it afterwards (interleaved requests)."""
        self._activate()
        try:
            yield self
        finally:
            self._deactivate()

    def _activate(self) -> None:
        if self.ended:
            from ..errors import ConfigError

            raise ConfigError(f"fxcache request {self.id} has ended (its caches were freed); open a new one with "
                              "fxcache.request(model) instead of re-entering or resuming an ended request")
        for scope in self.scopes or ():
            scope.limits.apply()  # a worker thread's request: the limits its models were compiled under
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_filename in _OWN_FILES:
            frame = frame.f_back  # the caller's `with` statement, past resume() and contextlib
        _ACTIVE.set(_ACTIVE.get() + ((self, threading.get_ident(), frame),))

    def _deactivate(self) -> None:
        """Remove this request's innermost entry, wherever it is: a generator suspended inside `with request`
        and resumed after other requests were entered must neither end theirs nor leave its own active."""
        stack = _ACTIVE.get()
        for i in range(len(stack) - 1, -1, -1):
            if stack[i][0] is self:
                _ACTIVE.set(stack[:i] + stack[i + 1:])
                return

    # -- state -------------------------------------------------------------------------------------------------
    def state(self, runner, model_key, factory):
        key = (runner, model_key)
        state = self.states.get(key)
        if state is None:
            with self._lock:
                state = self.states.get(key)
                if state is None:
                    state = self.states[key] = factory()
        return state

    def clear(self, scope: "RequestScope | None" = None) -> None:
        """Drop the state of `scope`'s graphs (all graphs when None): the next call starts over."""
        with self._lock:
            for key in [k for k in self.states if scope is None or k[0].scope is scope]:
                state = self.states.pop(key, None)
                if state is not None:
                    state.release()

    def discard(self, key) -> None:
        """Drop one (runner, model) state, from a weakref callback (no lock: it may run inside `clear`)."""
        state = self.states.pop(key, None)
        if state is not None:
            state.release()

    def end(self) -> None:
        """Free every cache of this request."""
        self.clear()
        self.ended = True
        self.mark = None

    def cache_bytes(self) -> int:
        return sum(s.cache_bytes() for s in list(self.states.values()))


_ALL_SCOPES_REQUESTS: "weakref.WeakSet[Request]" = weakref.WeakSet()


def _stack_frames() -> "_FrameSet":
    return _FrameSet(sys._getframe(2))


class _FrameSet:
    """Membership by identity in the current call stack (frames compare by identity anyway; no hashing)."""

    def __init__(self, frame):
        self.ids = set()
        while frame is not None:
            self.ids.add(id(frame))
            frame = frame.f_back

    def __contains__(self, frame) -> bool:
        return id(frame) in self.ids


class RequestScope:
    """What a backend (or an export session) shares with its runners: requests, records, limits."""

    def __init__(self, *, max_branches: int = 3, max_records: int = 100_000, keep_caches: bool = False,
                 time_direction: str = "auto"):
        self.max_branches = max_branches
        self.keep_caches = keep_caches
        self.time_direction = time_direction
        self.records: collections.deque = collections.deque(maxlen=max_records)
        self.runners: "weakref.WeakSet" = weakref.WeakSet()  # runners serving this scope (pooled buffers)
        self.freeing = False  # reset() in progress: buffers are freed, not pooled
        self._implicit = threading.local()
        self._requests: "weakref.WeakSet[Request]" = weakref.WeakSet()
        self._warned: set[str] = set()
        from .recompiles import Limits

        self.limits = Limits()  # Dynamo's recompile limits, applied in every thread that calls the models

    def warn_once(self, message: str, key: str | None = None) -> None:
        """One FxCacheWarning per distinct `key` (the message itself by default) for this scope."""
        from ..errors import FxCacheWarning

        key = key or message
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, FxCacheWarning, stacklevel=4)

    def has_warned(self, key: str) -> bool:
        return key in self._warned

    def current(self) -> Request:
        """The request a call made now belongs to: the innermost active one whose `with` block the call is in.

        A request entered in a generator stays in the caller's context while the generator is suspended (Python
        shares one context); calls made then are not in its block, and its frame is not on the stack. A request
        entered in another thread (context copied, as `asyncio.to_thread` does) applies as it is."""
        here = None
        for request, thread, frame in reversed(_ACTIVE.get()):
            if not request.serves(self):
                continue
            if thread != threading.get_ident() or frame is None:
                return request
            if here is None:
                here = _stack_frames()
            if frame in here:
                return request
        return self._implicit_request()

    def _implicit_request(self) -> Request:
        """The thread's implicit request; a new one when the calling pipeline call is not the one it served (the
        previous call raised or was interrupted before its end-of-call reset)."""
        from .attach import pipeline_call_mark

        request = getattr(self._implicit, "request", None)
        mark = pipeline_call_mark(sys._getframe(2))
        if request is not None and mark is not None and request.mark is not mark:
            request.end()
            request = None
        if request is None:
            request = self._implicit.request = Request((self,), implicit=True)
        if mark is not None:
            request.mark = mark
        return request

    def end_current(self) -> None:
        """The caller's request ended (a pipeline's reset): free its caches of this scope's graphs. An implicit
        request is replaced by a new one (a new id in `stats`)."""
        request = self.current()
        if request.implicit:
            request.end()
            self._implicit.request = None
        else:
            request.clear(self)

    def reset(self) -> None:
        """Free every request's caches of this scope's graphs (all threads), and buffers kept for reuse."""
        self.freeing = True
        try:
            for request in list(self._requests) + list(_ALL_SCOPES_REQUESTS):
                request.clear(self)
            for runner in list(self.runners):
                runner.free_pool()
        finally:
            self.freeing = False

    def cache_bytes(self) -> int:
        """Bytes held now: every request's caches and the in-place buffers kept for the next request."""
        total = sum(runner.pooled_bytes() for runner in list(self.runners) if hasattr(runner, "pooled_bytes"))
        for request in list(self._requests) + list(_ALL_SCOPES_REQUESTS):
            total += sum(s.cache_bytes() for (runner, _), s in list(request.states.items()) if runner.scope is self)
        return total

    # -- explicit step override -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def step(self, index: int, branch: int):
        token = _OVERRIDES.set(_OVERRIDES.get() + ((self, index, branch),))
        try:
            yield
        finally:
            _OVERRIDES.reset(token)

    def override(self) -> tuple[int, int] | None:
        for scope, index, branch in reversed(_OVERRIDES.get()):
            if scope is self:
                return index, branch
        return None

    def record(self, **record) -> None:
        from .records import Record

        self.records.append(Record(record))

    def serve(self) -> None:
        """A runner of this scope serves a call now: the calling thread gets the recompile limits, and the
        model call around it counts as served (`outside.py`)."""
        from .outside import served

        self.limits.apply()
        served()

    def ran_outside(self, *, record: bool = True) -> None:
        """A call of this scope's model ran (or runs now) outside fxcache (Dynamo's eager fallback, past its
        recompile limit): the caller's request starts over at its next fxcache call (`Request.gaps`); `record`:
        the call goes in `stats` (graph -1, uncached)."""
        from .runner import _CALLS

        request = self.current()
        request.gaps.add(self)
        if record:
            self.record(graph=-1, call=next(_CALLS), step=-1, branch=0, kind="full", plan=None, tokens=None,
                        flops=None, t=None, cached=False, request=request.id, cache_bytes=0)
