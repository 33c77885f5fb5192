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
import threading
import warnings
import weakref

_ACTIVE: contextvars.ContextVar[tuple["Request", ...]] = contextvars.ContextVar("fxcache_requests", default=())
#: the `cache_context` name (and its keyword fields) of the current call, set by an attached module's wrapper
CONTEXT_NAME: contextvars.ContextVar[str | None] = contextvars.ContextVar("fxcache_cache_context", default=None)
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
        self._tokens: list = []
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
        self.ended = False
        self._tokens.append(_ACTIVE.set(_ACTIVE.get() + (self,)))

    def _deactivate(self) -> None:
        _ACTIVE.reset(self._tokens.pop())

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
                self.states.pop(key).release()

    def end(self) -> None:
        """Free every cache of this request."""
        self.clear()
        self.ended = True

    def cache_bytes(self) -> int:
        return sum(s.cache_bytes() for s in list(self.states.values()))


_ALL_SCOPES_REQUESTS: "weakref.WeakSet[Request]" = weakref.WeakSet()


class RequestScope:
    """What a backend (or an export session) shares with its runners: requests, records, limits."""

    def __init__(self, *, max_branches: int = 3, max_records: int = 100_000, keep_caches: bool = False,
                 time_direction: str = "auto"):
        self.max_branches = max_branches
        self.keep_caches = keep_caches
        self.time_direction = time_direction
        self.records: collections.deque = collections.deque(maxlen=max_records)
        self._implicit = threading.local()
        self._requests: "weakref.WeakSet[Request]" = weakref.WeakSet()
        self._warned: set[str] = set()

    def warn_once(self, message: str, key: str | None = None) -> None:
        """One FxCacheWarning per distinct `key` (the message itself by default) for this scope."""
        from ..errors import FxCacheWarning

        key = key or message
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, FxCacheWarning, stacklevel=4)

    def current(self) -> Request:
        """The request a call made now belongs to."""
        for request in reversed(_ACTIVE.get()):
            if request.serves(self):
                return request
        request = getattr(self._implicit, "request", None)
        if request is None:
            request = self._implicit.request = Request((self,), implicit=True)
        return request

    def end_current(self) -> None:
        """The caller's request ended (a pipeline's reset): free its caches of this scope's graphs."""
        self.current().clear(self)

    def reset(self) -> None:
        """Free every request's caches of this scope's graphs (all threads)."""
        for request in list(self._requests) + list(_ALL_SCOPES_REQUESTS):
            request.clear(self)

    def cache_bytes(self) -> int:
        total = 0
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
        self.records.append(record)
