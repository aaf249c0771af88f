"""Transitivity check of ordinal answers on one image.

Points are nodes (identical [x, y] = the same point). "a equal b" merges a and b;
"a farther than b" is a strict edge b -> a (depth increases along edges). A set of
answers is consistent exactly when no strict edge joins two merged points and the strict
edges have no cycle, i.e. when some depth assignment satisfies every answer. "equal" is
taken as exactly equal (the check cannot know a person's tolerance).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["conflicting_pairs"]


def conflicting_pairs(pairs: Sequence[dict[str, Any]]) -> set[int]:
    """Indices of the pairs that take part in a contradiction (empty set: consistent).

    pairs: dicts with "a", "b" ([x, y]) and "relation" ("farther" / "closer" / "equal").
    A strict pair conflicts when its two points are forced equal or it lies on a strict
    cycle; an "equal" pair conflicts when it joins points of a conflicting strict pair's
    equal class (so every answer that has to change for a fix is marked).
    """
    parent: dict[tuple, tuple] = {}

    def find(u: tuple) -> tuple:
        parent.setdefault(u, u)
        while parent[u] != u:
            parent[u] = parent[parent[u]]
            u = parent[u]
        return u

    for p in pairs:
        a, b = tuple(p["a"]), tuple(p["b"])
        find(a), find(b)
        if p["relation"] == "equal":
            parent[find(a)] = find(b)

    edges: list[tuple[tuple, tuple, int]] = []  # (closer class, farther class, pair index)
    for i, p in enumerate(pairs):
        a, b = find(tuple(p["a"])), find(tuple(p["b"]))
        if p["relation"] == "farther":
            edges.append((b, a, i))
        elif p["relation"] == "closer":
            edges.append((a, b, i))
    succ: dict[tuple, set] = {}
    for u, v, _ in edges:
        succ.setdefault(u, set()).add(v)

    def reaches(src: tuple, dst: tuple) -> bool:
        seen, stack = {src}, [src]
        while stack:
            u = stack.pop()
            if u == dst:
                return True
            for v in succ.get(u, ()):
                if v not in seen:
                    seen.add(v)
                    stack.append(v)
        return False

    bad: set[int] = set()
    bad_classes: set[tuple] = set()
    for u, v, i in edges:
        if u == v or reaches(v, u):  # forced equal, or a strict cycle through u -> v
            bad.add(i)
            bad_classes.update((u, v))
    if bad:
        for i, p in enumerate(pairs):
            if p["relation"] == "equal" and find(tuple(p["a"])) in bad_classes:
                bad.add(i)
    return bad
