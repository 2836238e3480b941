"""Topology and rhythm: the exact sequence of (phase, branch, teachers) events."""

from copd_megatron.copd.schedule import OPD, RL, Rhythm
from copd_megatron.copd.topology import edges_for, teachers_of

NAMES = ["text", "image", "video"]


def test_full_topology_pairs_everyone_both_ways():
    pairs = edges_for(NAMES, "full")
    assert pairs == [("text", "image"), ("text", "video"), ("image", "video")]
    assert teachers_of("image", NAMES, pairs) == ["text", "video"]


def test_hub_never_pairs_two_spokes():
    pairs = edges_for(NAMES, "hub", hub="text")
    assert pairs == [("text", "image"), ("text", "video")]
    assert teachers_of("text", NAMES, pairs) == ["image", "video"]
    assert teachers_of("image", NAMES, pairs) == ["text"]
    assert teachers_of("video", NAMES, pairs) == ["text"]


def test_explicit_edges_are_undirected_and_deduplicated():
    pairs = edges_for(NAMES, "edges", edges=[["video", "image"], ["image", "video"]])
    assert pairs == [("image", "video")]
    assert teachers_of("text", NAMES, pairs) == []


def _events(rhythm):
    return [(p.cycle, p.phase, p.step_in_phase, p.global_step, p.teachers) for p in rhythm]


def test_rhythm_sequence_is_exact():
    pairs = edges_for(["a", "b"], "full")
    ev = _events(Rhythm(["a", "b"], pairs, {"a": 1.0, "b": 1.0}, cycles=2, s_rl=3, s_opd=2))
    none, mutual = {"a": (), "b": ()}, {"a": ("b",), "b": ("a",)}
    expected = []
    g = 0
    for c in range(2):
        for s in range(3):
            expected.append((c, RL, s, g, none))
            g += 1
        for s in range(2):
            expected.append((c, OPD, s, g, mutual))
            g += 1
    assert ev == expected
    assert sum(1 for e in ev if e[1] == RL) / sum(1 for e in ev if e[1] == OPD) == 1.5  # S_RL : S_OPD


def test_beta_zero_makes_phase_two_pure_grpo():
    pairs = edges_for(["a", "b"], "full")
    ev = _events(Rhythm(["a", "b"], pairs, {"a": 0.0, "b": 1.0}, cycles=1, s_rl=1, s_opd=2))
    for _, phase, _, _, teachers in ev:
        assert teachers["a"] == ()  # a is never a student...
        if phase == OPD:
            assert teachers["b"] == ("a",)  # ...but still teaches b


def test_adaptive_rhythm_ends_phases_on_overlap():
    r = Rhythm(["a", "b"], [("a", "b")], {"a": 1.0, "b": 1.0}, cycles=1, s_rl=5, s_opd=5, adaptive=True,
               overlap_floor=0.9, overlap_ceiling=0.95)  # fmt: skip
    seen = []
    overlaps = iter([0.95, 0.85, 0.90, 0.97])  # after RL0, RL1 (< floor: end RL), OPD0, OPD1 (> ceiling)
    for plan in r:
        seen.append((plan.phase, plan.step_in_phase))
        r.observe_overlap(next(overlaps, 0.5))
    assert seen == [(RL, 0), (RL, 1), (OPD, 0), (OPD, 1)]
