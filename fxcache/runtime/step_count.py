"""A schedule written for a step count (a preset's `num_steps`) against the steps a pipeline call will run.

The runner can only tell a short request when it ends (`GraphState._check_length`); a pipeline call says its step
count up front (`num_inference_steps`, or the length of `timesteps` / `sigmas`), so an enabled pipeline warns
before the first step instead, and the runner does not say it again.
"""

from __future__ import annotations

import inspect

#: the `warn_once` key of the warning: the runner's end-of-request and past-the-table warnings stay quiet after it
KEY = "num-steps"


def requested_steps(pipe, call, args: tuple, kwargs: dict) -> int | None:
    """The sampling steps `call(pipe, *args, **kwargs)` will run, where its arguments say so plainly; None for an
    img2img strength below 1 and for schedulers of higher order (Heun), whose step count only the run shows."""
    try:
        signature = inspect.signature(call)
        given = signature.bind(pipe, *args, **kwargs).arguments
    except (TypeError, ValueError):
        return None
    params = signature.parameters
    if getattr(getattr(pipe, "scheduler", None), "order", 1) != 1:
        return None
    if "strength" in params and given.get("strength", params["strength"].default) != 1:
        return None
    for name in ("timesteps", "sigmas"):
        if given.get(name) is not None:
            try:
                return len(given[name])
            except TypeError:
                return None
    if "num_inference_steps" not in params:
        return None
    steps = given.get("num_inference_steps", params["num_inference_steps"].default)
    return steps if isinstance(steps, int) and not isinstance(steps, bool) and steps > 0 else None


def check_steps(pipe, call, args: tuple, kwargs: dict, backends) -> None:
    """Warn (once per backend) before the first step when the call's step count is not the one a backend's
    schedule is written for."""
    planned = [(b, b.config.planned_steps) for b in backends if b.config.planned_steps is not None]
    if not planned:
        return
    steps = requested_steps(pipe, call, args, kwargs)
    if steps is None:
        return
    for backend, count in planned:
        if count != steps:
            backend.scope.warn_once(
                f"fxcache: this {type(pipe).__name__} call runs {steps} sampling steps, but the "
                f"{backend.config.method} schedule is written for num_steps={count} (presets assume one): the "
                f"request runs the first {steps} steps of that table, which ends differently. Enable with "
                f"num_steps={steps} (it overrides a preset's; fxcache.disable(pipe) first), or call the pipeline "
                f"with num_inference_steps={count}", key=KEY)
