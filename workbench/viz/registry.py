"""Which builder draws a result's default figure: a table from result type to builder, filled by the viz modules
with `@draws(ResultType)` when they are imported (importing `workbench.viz` imports them all)."""

from __future__ import annotations

from collections.abc import Callable

import plotly.graph_objects as go

from workbench.errors import InputError

Builder = Callable[..., go.Figure]
_DEFAULT: dict[type, Builder] = {}


def draws(*result_types: type) -> Callable[[Builder], Builder]:
    """Make the decorated builder the default figure of `result_types` (and of their subclasses)."""

    def register(build: Builder) -> Builder:
        for cls in result_types:
            if cls in _DEFAULT and _DEFAULT[cls] is not build:
                raise RuntimeError(
                    f"{cls.__name__} already has a default figure: {_DEFAULT[cls].__qualname__}"
                )
            _DEFAULT[cls] = build
        return build

    return register


def builder_for(result_type: type) -> Builder | None:
    """The default figure builder of `result_type` (the nearest registered base class's), or None."""
    for cls in result_type.__mro__:
        if cls in _DEFAULT:
            return _DEFAULT[cls]
    return None


def default_figure(result, **kwargs) -> go.Figure:
    """`result`'s default figure; `kwargs` go to its builder (see the builder's docstring for what it takes)."""
    build = builder_for(type(result))
    if build is None:
        raise InputError(
            f"{type(result).__name__} has no default figure; build one from its fields or `.to_frame()`."
        )
    return build(result, **kwargs)
