"""Every way of asking about a sound is a presence question: the grammar (``models.questions``) and the text
encoder together, on a table of everyday phrasings written apart from the training templates
(``train.data.qa.PRESENCE_FAMILIES``), each with the class (ontology or AudioSet) it asks about."""

from __future__ import annotations

import numpy as np
import pytest

from models.questions import read_presence

# question → the classes it asks about (a row with alternatives in one set: either class is the right one)
PHRASINGS: list[tuple[str, list[set[str]]]] = [
    ("Is someone talking?", [{"Speech"}]),
    ("Is a car passing?", [{"Car passing by", "Car"}]),
    ("Is a dog barking?", [{"Dog"}]),
    ("Any music?", [{"Music"}]),
    ("Was there a knock?", [{"Knock"}]),
    ("Anything ringing?", [{"Telephone bell ringing", "Bell", "Ringtone"}]),
    ("Isn't there a siren?", [{"Siren"}]),
    ("Are there cats or dogs?", [{"Cat"}, {"Dog"}]),
    ("Anyone coughing?", [{"Cough"}]),
    ("Did someone sneeze?", [{"Sneeze"}]),
    ("Was that thunder?", [{"Thunder"}]),
    ("Is it raining?", [{"Rain"}]),
    ("Can a baby be heard crying?", [{"Baby cry, infant cry"}]),
    ("Are birds chirping?", [{"Bird"}]),
    ("Is the phone ringing?", [{"Telephone bell ringing"}]),
    ("Does the recording have applause in it?", [{"Applause"}]),
    ("Hear any footsteps?", [{"Walk, footsteps"}]),
    ("Do I hear a piano?", [{"Piano"}]),
    ("Any guitar in there?", [{"Guitar"}]),
    ("Was a door slammed?", [{"Door"}]),
    ("Did a gun go off?", [{"Gunshot, gunfire"}]),
    ("Is there an explosion or a gunshot?", [{"Explosion"}, {"Gunshot, gunfire"}]),
    ("Is a helicopter flying overhead?", [{"Helicopter"}]),
    ("Are people clapping?", [{"Clapping", "Applause"}]),
    ("Is anybody laughing?", [{"Laughter"}]),
    ("Is someone snoring?", [{"Snoring"}]),
    ("Could that be a train?", [{"Train"}]),
    ("Did the toilet flush?", [{"Toilet flush"}]),
    ("Is the wind blowing?", [{"Wind"}]),
    ("Is water running?", [{"Water"}]),
    ("Is a fire crackling?", [{"Fire"}]),
    ("Was someone typing?", [{"Typing"}]),
    ("Did glass break?", [{"Glass"}]),
    ("Can you make out a horse?", [{"Horse"}]),
    ("Are cows mooing?", [{"Cattle, bovinae"}]),
    ("Is a rooster crowing?", [{"Chicken, rooster"}]),
    ("Any ducks quacking?", [{"Duck"}]),
    ("Is an owl hooting?", [{"Owl"}]),
    ("Are frogs croaking?", [{"Frog"}]),
    ("Were insects buzzing?", [{"Insect"}]),
    ("Is a wolf howling?", [{"Howl"}]),
    ("Was there an engine running?", [{"Engine"}]),
    ("Is a car honking?", [{"Vehicle horn, car horn, honking"}]),
    ("Is an alarm clock going off?", [{"Alarm clock"}]),
    ("Is a bell ringing?", [{"Bell"}]),
    ("Tell me if you hear drums.", [{"Drum"}]),
    ("Do you think there's a violin?", [{"Bowed string instrument"}]),
    ("Is somebody whistling?", [{"Whistle"}]),
    ("Are waves crashing?", [{"Waves, surf"}]),
    ("Was an accordion playing?", [{"Accordion"}]),
    ("Is someone playing the organ?", [{"Organ"}]),
    ("Does it sound like a harp?", [{"Harp"}]),
    ("Is a xylophone playing?", [{"Marimba, xylophone"}]),
    ("Someone screaming?", [{"Screaming"}]),
    ("A cat meowing?", [{"Cat"}]),
    ("Does anybody sing?", [{"Singing"}]),
    ("Is a crowd cheering?", [{"Crowd", "Cheering"}]),
    ("Were there footsteps or a knock?", [{"Walk, footsteps"}, {"Knock"}]),
    ("Has a dog barked?", [{"Dog"}]),
    ("Isn't someone talking?", [{"Speech"}]),
    ("Aren't there birds singing?", [{"Bird"}]),
    ("Rain or thunder?", [{"Rain"}, {"Thunder"}]),
    ("Was a camera shutter clicking?", [{"Camera"}]),
    ("Scissors cutting?", [{"Scissors"}]),
    ("Any beeping?", [{"Beep, bleep"}]),
    ("I wonder whether a cymbal crashes.", [{"Cymbal"}]),
    ("Is a man speaking?", [{"Speech", "Male speech, man speaking"}]),
    ("Was a woman singing?", [{"Singing", "Female singing"}]),
    ("Any hammering?", [{"Tools", "Hammer"}]),
    ("Is someone hammering?", [{"Tools", "Hammer"}]),
    ("Any crickets chirping?", [{"Insect", "Cricket"}]),
    ("Is music playing in the background?", [{"Music"}]),
    ("Are there voices?", [{"Speech"}]),
    ("Can you pick up a siren or a horn?", [{"Siren"}, {"Vehicle horn, car horn, honking"}]),
    ("Is something beeping?", [{"Beep, bleep"}]),
    ("So, was there a cough at all?", [{"Cough"}]),
    ("Did a horse neigh, or not?", [{"Horse"}]),
    ("Quick question: a snare drum somewhere in there?", [{"Snare drum"}]),
]
TARGET = 0.95

NOT_PRESENCE = [
    "What do you hear?", "Describe the audio.", "How many times does the dog bark?", "Is the dog barking before the door slams?",
    "Is there no dog?", "Which is louder, the rain or the wind?", "Did the dog bark twice?", "Is the rain louder than the wind?",
    "How long does the siren last?", "Can you tell what is making that noise?",
]


@pytest.fixture(scope="module")
def served_verifier():
    """The verifier `earwitness serve` runs by default (ontology and AudioSet vocabularies), as the guard matches targets."""
    from serving.config import Settings
    from models.verifier.checkpoint import load_verifier

    return load_verifier(Settings.model_fields["verifier"].default)


def test_phrasings_are_parsed_to_the_class_they_ask_about(served_verifier):
    read = {question: read_presence(question) for question, _ in PHRASINGS}
    targets = sorted({t for asked in read.values() if asked for t in asked.targets})
    silence = np.zeros(16_000, np.float32)  # the class a target lands on depends on its text only: one call for all
    classes = {e.text: e.event for e in served_verifier.verify(silence, targets)}
    misses = []
    for question, expected in PHRASINGS:
        asked = read[question]
        got = [classes[t] for t in asked.targets] if asked else []
        if len(got) != len(expected) or not all(g in want for g, want in zip(got, expected)):
            misses.append((question, asked.targets if asked else None, got))
    share = 1 - len(misses) / len(PHRASINGS)
    print(f"\nphrasings parsed to the right class: {share:.1%} of {len(PHRASINGS)}")
    for miss in misses:
        print("  miss:", miss)
    assert len(PHRASINGS) >= 60
    assert share >= TARGET, misses


def test_alternatives_and_negations():
    assert read_presence("Are there cats or dogs?").any_of
    assert not read_presence("Is there a dog and a cat?").any_of and len(read_presence("Is there a dog and a cat?").targets) == 2
    assert read_presence("Isn't there a siren?").targets == ("a siren",)
    assert read_presence("Anything ringing?").targets == ("something ringing",)


@pytest.mark.parametrize("question", NOT_PRESENCE)
def test_open_count_order_and_comparison_questions_are_not_presence(question):
    assert read_presence(question) is None


def test_no_phrasing_is_a_training_template():
    from train.data.qa import PRESENCE_FAMILIES

    templates = [t for family in PRESENCE_FAMILIES.values() for part in family.values() for t in part]
    forms = [t.replace("{x}", "").lower().strip(" ?.") for t in templates]
    for question, _ in PHRASINGS:
        q = question.lower()
        assert not any(f and f in q and len(f) > 12 for f in forms), question
