import pytest

from models.answers import classify
from models.questions import presence_target


@pytest.mark.parametrize(
    "text, kind",
    [
        ("Yes", "yes"),
        ("yes, a dog is barking.", "yes"),
        ("No.", "no"),
        ("no, there is no dog", "no"),
        ("There is no dog in the audio.", "no"),
        ("I don't hear a dog.", "no"),
        ("A dog barks twice.", "other"),
        ("", "other"),
        ("   ...", "other"),
    ],
)
def test_reads_answers_like_the_benchmarks(text, kind):
    assert classify(text) == kind


def test_every_phrasing_family_is_read_as_a_presence_question_and_held_out_ones_are_never_trained():
    from train.data.qa import PRESENCE_FAMILIES, QARow, paraphrased, presence_question

    for family, parts in PRESENCE_FAMILIES.items():
        assert parts["train"] and parts["held_out"] and not set(parts["train"]) & set(parts["held_out"]), family
        for template in parts["train"] + parts["held_out"]:
            question = presence_question(template, "a dog barking")
            assert question[0].isupper() and "dog barking" in (presence_target(question) or ""), question

    rows = [QARow("s", "train", "a.flac", "Is there a sound of rain in the audio?", "No", "presence", "random", "rain", "rain"),
            QARow("s", "train", "a.flac", "How many times do you hear rain?", "2", "count", "positive", "rain", "rain")] * 40
    once, again = paraphrased(rows, seed=3), paraphrased(rows, seed=3)
    trained = {presence_question(t, "rain") for parts in PRESENCE_FAMILIES.values() for t in parts["train"]}
    assert once == again and [r.answer for r in once] == [r.answer for r in rows]
    assert {r.question for r in once if r.kind == "presence"} <= trained and len({r.question for r in once if r.kind == "presence"}) > 4
    assert [r for r in once if r.kind == "count"] == [r for r in rows if r.kind == "count"]
