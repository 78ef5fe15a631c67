"""Inline `<think>` reasoning split out of a streamed answer, however the pieces fall."""

from __future__ import annotations

import pytest

from modules.chat_types import TextDelta, ThinkingDelta
from modules.think_tags import ThinkTagSplitter


def split(pieces: list[str]) -> tuple[str, str, list[type]]:
    """(reasoning, text, the event kinds in order, merged) of an answer fed in `pieces`."""
    splitter = ThinkTagSplitter()
    events = [e for piece in pieces for e in splitter.feed(piece)] + splitter.flush()
    kinds: list[type] = []
    for e in events:
        if not kinds or kinds[-1] is not type(e):
            kinds.append(type(e))
    thinking = "".join(e.text for e in events if isinstance(e, ThinkingDelta))
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    return thinking, text, kinds


ANSWER = "<think>\nThe user wants 2+2.</think>\n\nIt is 4."


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, len(ANSWER)])
def test_reasoning_and_answer_are_split_whatever_the_chunk_size(size: int) -> None:
    pieces = [ANSWER[i:i + size] for i in range(0, len(ANSWER), size)]
    assert split(pieces) == ("The user wants 2+2.", "It is 4.", [ThinkingDelta, TextDelta])


def test_an_answer_without_the_tag_is_all_text() -> None:
    assert split(["Hel", "lo <think> is a tag"]) == ("", "Hello <think> is a tag", [TextDelta])
    assert split(["<", "b>bold</b>"]) == ("", "<b>bold</b>", [TextDelta])


def test_leading_whitespace_before_the_tag_is_allowed() -> None:
    assert split(["  \n<thi", "nk>hm</think>ok"]) == ("hm", "ok", [ThinkingDelta, TextDelta])


def test_an_answer_cut_off_while_reasoning_keeps_its_reasoning() -> None:
    assert split(["<think>still going</thi"]) == ("still going</thi", "", [ThinkingDelta])


def test_a_short_answer_that_looks_like_the_start_of_the_tag_is_text() -> None:
    assert split(["<th"]) == ("", "<th", [TextDelta])
