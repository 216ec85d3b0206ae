import pytest

from serving.answers import classify


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
