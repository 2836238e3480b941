"""Who teaches whom in Phase II (paper §4, "hub-and-spoke" for K > 2).

* ``full``: every pair of branches distils both ways (Algorithm 1 as written, O(K²) pairs).
* ``hub``: one hub ↔ every spoke, never spoke ↔ spoke (the paper's three-branch setting,
  text as hub). The hub gets cross batches from each spoke; each spoke from the hub only.
* ``edges``: an explicit list of undirected pairs.

Edges are undirected because CoPD's OPD is bidirectional: on an edge (a, b), a teaches b and
b teaches a. A branch with β = 0 is never a student (its Phase II is plain GRPO), but still
teaches its neighbours.
"""

from __future__ import annotations

from typing import Sequence


def edges_for(names: Sequence[str], topology: str, hub: str | None = None,
              edges: Sequence[Sequence[str]] = ()) -> list[tuple[str, str]]:  # fmt: skip
    """Undirected teacher pairs, each as a sorted-by-branch-order tuple, in a stable order."""
    order = {n: i for i, n in enumerate(names)}
    if topology == "full":
        pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    elif topology == "hub":
        if hub not in order:
            raise ValueError(f"hub {hub!r} is not a branch; expected one of {list(names)}")
        pairs = [(hub, n) for n in names if n != hub]
    elif topology == "edges":
        pairs = [tuple(e) for e in edges]
    else:
        raise ValueError(f"unknown topology {topology!r}; expected full, hub or edges")
    out = []
    for a, b in pairs:
        a, b = sorted((a, b), key=order.__getitem__)
        if (a, b) not in out:
            out.append((a, b))
    return out


def teachers_of(student: str, names: Sequence[str], pairs: Sequence[tuple[str, str]]) -> list[str]:
    """The peers that teach ``student`` (its neighbours), in branch order."""
    peers = {b for a, b in pairs if a == student} | {a for a, b in pairs if b == student}
    return [n for n in names if n in peers]
