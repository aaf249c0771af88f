"""One entry point for every procedural scene family: ``render("room" | "street", seed)``."""

from __future__ import annotations

from collections.abc import Callable

from .scenes import Scene, SceneParams, render_scene
from .streets import StreetParams, render_street

__all__ = ["FAMILIES", "render"]


def _room(seed: int, height: int, width: int) -> Scene:
    return render_scene(seed, SceneParams(height=height, width=width))


def _street(seed: int, height: int, width: int) -> Scene:
    return render_street(seed, StreetParams(height=height, width=width))


_RENDERERS: dict[str, Callable[[int, int, int], Scene]] = {"room": _room, "street": _street}
FAMILIES: tuple[str, ...] = tuple(_RENDERERS)


def render(family: str, seed: int, height: int = 126, width: int = 126) -> Scene:
    """Render scene `seed` of `family` ("room": indoor rooms, depth ~1-22 m; "street":
    outdoor streets, depth ~1-80 m) at height x width pixels, default parameters otherwise.
    The two families draw from independent random streams: the same seed gives unrelated
    scenes."""
    if family not in _RENDERERS:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}; got {family!r}")
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be positive; got {height}x{width}")
    return _RENDERERS[family](int(seed), int(height), int(width))
