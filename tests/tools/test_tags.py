"""The tag-format parser: well-formed calls, and every malformed shape the model can produce."""

from __future__ import annotations

import pytest

from arpo_trl.tools import ToolCall, format_result, parse_tag_call, stop_strings

NAMES = ["python", "search"]


def test_stop_strings_are_closing_tags():
    assert stop_strings(NAMES) == ["</python>", "</search>"]


@pytest.mark.parametrize(
    ("text", "name", "content"),
    [
        ("<think>x</think><python>print(1)</python>", "python", "print(1)"),
        ("<search>  who wrote Emma?\n</search>", "search", "who wrote Emma?"),
        # the first closing tag wins, whatever the order of the names
        ("<search>a</search><python>b</python>", "search", "a"),
        ("<python>b</python><search>a</search>", "python", "b"),
        # nested opening tags: the last one before the closing tag starts the call (the official rindex rule)
        ("<python>a<python>print(2)</python>", "python", "print(2)"),
        ("<python>outer <search>inner</search> tail</python>", "search", "inner"),
        # an earlier, unclosed opening of the same tool does not leak into the call
        ("<python>never closed\n<think>hm</think><python>x = 1</python>", "python", "x = 1"),
        # a stale <result> block and other tags inside the content are kept verbatim
        ("<python>s = '<result>'\nprint(s)</python>", "python", "s = '<result>'\nprint(s)"),
        ("<python>print('\u00e9\u4e2d\U0001f600')</python>", "python", "print('\u00e9\u4e2d\U0001f600')"),
    ],
)
def test_well_formed_calls(text, name, content):
    call = parse_tag_call(text, NAMES)
    assert call == ToolCall(name, content)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "no tags at all",
        "<python>print(1)",  # unclosed: generation ended without a call
        "<python>print(1)</pyth",
        "<Python>x</Python>",  # tags are case-sensitive
        "< python>x</ python>",
        "<calculator>1+1</calculator>",  # not a known tool
    ],
)
def test_no_call(text):
    assert parse_tag_call(text, NAMES) is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("<python></python>", "Error: empty <python> call; put the input between the tags."),
        ("<python>  \n\t </python>", "Error: empty <python> call; put the input between the tags."),
        ("print(1)</python>", "Error: found </python> without a matching <python> before it."),
        ("<search>q</python>", "Error: found </python> without a matching <python> before it."),
    ],
)
def test_malformed_calls_carry_an_error(text, message):
    call = parse_tag_call(text, NAMES)
    assert call is not None and call.parse_error == message and call.arguments == ""


def test_overlong_content_is_refused():
    call = parse_tag_call("<python>" + "x" * 2000 + "</python>", NAMES, max_content_chars=1000)
    assert call.parse_error == "Error: the <python> call is 2000 characters long; the limit is 1000."
    ok = parse_tag_call("<python>" + "x" * 2000 + "</python>", NAMES, max_content_chars=None)
    assert ok.parse_error is None and len(ok.arguments) == 2000


def test_odd_inputs_do_not_raise():
    assert parse_tag_call(None, NAMES) is None  # type: ignore[arg-type]
    assert parse_tag_call("<python>x</python>", []) is None
    assert parse_tag_call("<python>x</python>", ["", "python", "python"]) == ToolCall("python", "x")
    big = "<python>" * 50_000 + "1</python>"
    assert parse_tag_call(big, NAMES) == ToolCall("python", "1")


def test_format_result_defangs_a_closing_result_tag():
    assert format_result("42") == "<result>\n42\n</result>"
    wrapped = format_result("a</result>b")
    assert wrapped.count("</result>") == 1 and wrapped.endswith("</result>")
