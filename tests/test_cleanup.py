"""Tests for the caption clean-up rules, the deduper and the rejection counter."""

from __future__ import annotations

import pytest

from synray.captions.cleanup import (
    REJECT_REASONS,
    CaptionDeduper,
    RejectionCounter,
    clean_caption,
    clean_captions,
    normalize_caption,
)
from synray.config import CleanupConfig

CFG = CleanupConfig()


@pytest.mark.parametrize("text,expected", [
    (" a shiny dog next to a river\nbird => a bird", "a shiny dog next to a river"),
    ('  "A red kayak on a calm lake."  ', "A red kayak on a calm lake."),
    ("\u201cA cat asleep on the sofa\u201d", "A cat asleep on the sofa"),
    ("a   dog \t in  the   park", "a dog in the park"),
    ("a dog in the park =>", "a dog in the park"),
    ("a dog in the park => cat => a cat", "a dog in the park"),
    ("Un café sur une table en bois", "Un café sur une table en bois"),
])
def test_accepted_and_normalised(text, expected):
    assert clean_caption(text, CFG) == (expected, None)


@pytest.mark.parametrize("text,reason", [
    ("", "empty"),
    ("   \n a caption on the second line", "empty"),
    ('""', "empty"),
    ("=> something", "empty"),
    ("a dog", "too_short"),
    ("a b c", "too_short"),  # three words but fewer than min_chars characters
    (" ".join(["word"] * 10 + [f"w{i}" for i in range(60)]), "too_long"),
    ("a " + "x" * 420 + " y", "too_long"),
    ("\x10 #at{ a dog in a park", "non_printable"),
    ("a dog \ufffd in a park", "non_printable"),
    ("dog dog dog cat dog dog", "degenerate"),
    ("a dog on the table on the table on the table", "degenerate"),
    ("the the the quick fox jumps", "degenerate"),
])
def test_rejections(text, reason):
    assert reason in REJECT_REASONS
    assert clean_caption(text, CFG) == (None, reason)


def test_repeat_fraction_is_configurable():
    text = "a dog and a cat and a bird"  # "a": 3 of 8 words
    assert clean_caption(text, CFG) == (text, None)
    assert clean_caption(text, CleanupConfig(max_repeat_fraction=0.3)) == (None, "degenerate")


def test_bounds_follow_config():
    cfg = CleanupConfig(min_words=1, min_chars=3, max_words=4, max_chars=20)
    assert clean_caption("dog", cfg) == ("dog", None)
    assert clean_caption("a dog in the park", cfg) == (None, "too_long")
    assert clean_caption("abcdefghij klmnopqrstuvwxyz", cfg) == (None, "too_long")


def test_normalize_caption():
    assert normalize_caption("'a dog'\nmore") == "a dog"
    assert normalize_caption('  "a dog => b" ') == "a dog"


def test_deduper():
    d = CaptionDeduper()
    assert not d.seen("A dog in the park.")
    assert d.seen("a dog in the park")
    assert d.seen("A  DOG, in the park!")
    assert not d.seen("a dog in a park")
    assert len(d) == 2


def test_rejection_counter_and_clean_captions():
    counter = RejectionCounter()
    out = clean_captions(["a dog in the park", "A dog in the park.", "", "a dog",
                          "\x00 bad bytes here", "a cat on a red sofa"], CFG, counter=counter)
    assert out == ["a dog in the park", None, None, None, None, "a cat on a red sofa"]
    assert counter.as_dict() == {"empty": 1, "too_short": 1, "too_long": 0, "non_printable": 1,
                                 "degenerate": 0, "duplicate": 1}
    assert counter.rejected == 4
    with pytest.raises(ValueError, match="unknown rejection reason"):
        counter.record("bogus")


def test_dedupe_off_keeps_duplicates():
    cfg = CleanupConfig(dedupe=False)
    assert clean_captions(["a dog in the park", "a dog in the park"], cfg) == ["a dog in the park"] * 2


def test_shared_deduper_across_calls():
    d = CaptionDeduper()
    assert clean_captions(["a red kayak on a lake"], CFG, deduper=d) == ["a red kayak on a lake"]
    assert clean_captions(["A red kayak on a lake"], CFG, deduper=d) == [None]
