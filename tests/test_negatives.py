"""Ontology, absent-sound sampling and the counterfactual pair kinds, on timelines built here."""

from __future__ import annotations

import re

import numpy as np
import pytest

from train.data.ontology import KINDS as CLASS_KINDS
from train.data.ontology import load_ontology
from train.data.prefs import scene_pairs
from train.data.qa import absent_candidates, caption, groups, popular_classes, scene_questions
from train.data.sources import _load_rules, apply_label_rules, recording_group

ONTO = load_ontology()


def _timeline(events, bed=None, sid="s-1"):
    return {"scene_id": sid, "duration": 10.0, "audio": f"scenes/train/{sid}.flac",
            "events": [{"label": l, "onset": a, "offset": b} for l, a, b in events],
            "background": {"label": bed, "source_id": None}}


def test_ontology_is_complete_and_consistent():
    assert len(ONTO) >= 35
    for c in ONTO:
        assert c.kind in CLASS_KINDS
        assert len(c.phrases) >= 2 and c.siblings and c.group
        assert c.mid is None or re.fullmatch(r"/[mt]/[0-9a-z_]+", c.mid)
        assert all(s in ONTO for s in c.siblings)
    assert ONTO["Dog"].mid == "/m/0bt9lr" and ONTO["Speech"].mid == "/m/09x0r" and ONTO["Rain"].mid == "/m/06mb1"
    assert {c.kind for c in ONTO} == set(CLASS_KINDS)
    assert len({c.mid for c in ONTO if c.mid}) == len([c for c in ONTO if c.mid]), "duplicate MID"


def test_label_rules_refine_and_exclude():
    rules = _load_rules()
    assert apply_label_rules("Aircraft/helicopter", "/x/helicopter_engine.wav", rules)[0] == "Helicopter"
    assert apply_label_rules("Aircraft/helicopter", "/x/f16_1.wav", rules)[0] == "Aircraft"
    assert apply_label_rules("Vinyl scratch", "/x/vinyl_hiss.flac", rules)[0] is None
    assert apply_label_rules("Nonexistent", "/x", rules)[0] is None


def test_recording_groups_merge_takes_of_one_recording():
    assert recording_group("p", "/d/bd_01.flac") == recording_group("p", "/d/bd_02.flac")
    assert recording_group("p", "/d/doors_door_open.ogg") == recording_group("p", "/d/doors_door_close.ogg")
    assert recording_group("p", "/d/dog.wav") != recording_group("p", "/d/cat.wav")
    assert recording_group("p", "/a/dog.wav") != recording_group("p", "/b/dog.wav")
    assert recording_group("p", "/k/6b-0.wav") == recording_group("p", "/k/17-0.wav")  # hex key codes, one keyboard
    assert recording_group("p", "/d/bd_01.flac") != recording_group("p", "/d/hh_01.flac")


def test_absent_candidates_by_sampling():
    present = {"Dog", "Rain"}
    adv = absent_candidates(ONTO, present, "adversarial", [], ONTO.names)
    assert "Howl" in adv and "Thunder" in adv and not present & set(adv)
    pop = absent_candidates(ONTO, present, "popular", ["Dog", "Speech", "Wind"], ONTO.names)
    assert pop == ["Speech", "Wind"]
    rnd = absent_candidates(ONTO, present, "random", [], ONTO.names)
    assert len(rnd) == len(ONTO) - 2


def test_popular_classes_count_events_and_beds():
    tls = [_timeline([("Dog", 1, 2), ("Dog", 3, 4)], bed="Rain"), _timeline([("Cat", 1, 2)], bed="Rain")]
    assert popular_classes(tls, k=2) == ["Rain", "Cat"]


def test_caption_orders_counts_and_overlaps():
    tl = _timeline([("Door", 5.0, 6.0), ("Dog", 1.0, 1.5), ("Dog", 2.0, 2.4), ("Speech", 5.5, 7.0)], bed="Rain")
    text = caption(ONTO, tl)
    assert text == "A dog barks twice, then a door opens or closes, while someone speaks, with rain in the background."
    assert [g.label for g in groups(tl)] == ["Dog", "Door", "Speech"]


def _scene(seed=0):
    tl = _timeline([("Dog", 1.0, 1.5), ("Dog", 2.0, 2.4), ("Door", 4.0, 5.0), ("Siren", 6.0, 8.0)], bed="Wind")
    rng = np.random.default_rng(seed)
    rows = scene_questions(ONTO, "s-1", "train", tl["audio"], tl, ["Speech", "Wind", "Dog", "Cat"], ONTO.names, rng)
    others = [("s-2", "scenes/train/s-2.flac", frozenset({"Cat"})), ("s-3", "scenes/train/s-3.flac", frozenset({"Dog", "Door", "Siren"}))]
    return tl, rows, others


def test_questions_cover_every_kind_and_are_true():
    tl, rows, _ = _scene()
    kinds = {(r.kind, r.sampling) for r in rows}
    assert {("presence", s) for s in ("positive", "random", "popular", "adversarial")} <= kinds
    assert {"order", "count", "duration", "caption"} <= {r.kind for r in rows}
    assert next(r for r in rows if r.kind == "count" and r.label == "Dog").answer == "2"
    which = next(r for r in rows if r.kind == "order" and r.question.startswith("Which"))
    assert (which.label, which.other_label) in {("Door", "Siren")}
    for r in rows:
        if r.kind == "presence":
            assert (r.answer == "Yes") == (r.label in {"Dog", "Door", "Siren", "Wind"})


def test_pairs_have_all_kinds_with_real_counterfactuals():
    tl, rows, others = _scene()
    seen = {}
    calls = []

    def writer(label, phrase, rng):
        calls.append(label)
        return f"Listen closely: can you make out {phrase}?"

    for seed in range(12):
        tl, rows, others = _scene(seed)
        for p in scene_pairs(ONTO, tl, rows, tl["audio"], "train", others, np.random.default_rng(seed), writer):
            seen.setdefault(p.kind, []).append(p)
    assert set(seen) == {"listen_absent", "aha_event_omission", "aha_false_event_identity", "aha_temporal_relation_error",
                         "aha_quantitative_temporal_error", "acpo_output_contrastive", "acpo_input_contrastive"}
    assert calls and all(p.prompt.startswith("Listen closely") for p in seen["listen_absent"])  # hook used
    truth = caption(ONTO, tl)
    for p in seen["aha_event_omission"]:
        assert p.chosen == truth and len(p.rejected) < len(p.chosen)
    for p in seen["aha_false_event_identity"]:
        assert p.chosen == truth and p.rejected != truth
    for p in seen["aha_temporal_relation_error"]:
        assert p.chosen != p.rejected
    for p in seen["aha_quantitative_temporal_error"]:
        assert "twice" in p.chosen and "twice" not in p.rejected  # the dog barks exactly twice
    for p in seen["acpo_input_contrastive"]:
        assert p.chosen == p.rejected and p.rejected_audio == "scenes/train/s-2.flac"  # the only scene lacking them


@pytest.mark.parametrize("seed", range(5))
def test_temporal_error_really_reorders(seed):
    tl, rows, others = _scene(seed)
    for p in scene_pairs(ONTO, tl, rows, tl["audio"], "train", others, np.random.default_rng(seed)):
        if p.kind == "aha_temporal_relation_error" and p.prompt.startswith("Describe"):
            order = lambda s: [n for n in ("dog", "door", "siren") if n in s.lower()]  # noqa: E731
            positions = lambda s: sorted(order(s), key=lambda n: s.lower().index(n))  # noqa: E731
            assert positions(p.chosen) != positions(p.rejected)
