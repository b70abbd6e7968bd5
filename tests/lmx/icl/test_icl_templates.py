import pytest

from lmx.icl.templates import SST2_TEMPLATE, PromptTemplate


def test_render_demo_query_answer():
    t = SST2_TEMPLATE
    assert t.query("good film") == "Review: good film\nSentiment:"
    assert t.answer(1) == " positive"
    assert t.demo("bad", 0) == "Review: bad\nSentiment: negative\n"
    assert t.prompt([("bad", 0), ("fine", 1)], "ok") == (
        "Review: bad\nSentiment: negative\nReview: fine\nSentiment: positive\n"
        "Review: ok\nSentiment:")
    assert t.prompt([], "ok", label=0) == "Review: ok\nSentiment: negative"


@pytest.mark.parametrize("tpl,key", [
    ("Review: {input}\nSentiment: {label}", "Sentiment:"),
    ("Input: {input}\nType: {label}", "Type:"),
    ("{premise} Can we know {input}? {label}.", "?"),
    ("{input} {label}", None),
])
def test_key_word_of_run_py_templates(tpl, key):
    assert PromptTemplate(tpl, labels=("a", "b")).key_word() == key


def test_multi_column_and_suffix():
    t = PromptTemplate("{premise} Can we know {input}? {label}.", labels=("Yes", "No"))
    ex = {"premise": "It rains.", "input": "the street is wet"}
    assert t.slots == ("premise", "input")
    assert t.query(ex) == "It rains. Can we know the street is wet?"
    assert t.answer(1) == " No."
    assert t.retrieval_text(ex) == "It rains. the street is wet"
    with pytest.raises(ValueError, match="mapping"):
        t.query("only a string")
    with pytest.raises(ValueError, match="lacks"):
        t.query({"input": "x"})


@pytest.mark.parametrize("tpl,match", [
    ("Review: {text}\nSentiment: {label}", "input"),
    ("Review: {input}\nSentiment:", "label"),
    ("{label} {input}", "after"),
    ("{input} {} {label}", "named"),
    ("{input {label}", "format"),
])
def test_bad_templates_raise(tpl, match):
    with pytest.raises(ValueError, match=match):
        PromptTemplate(tpl, labels=("a", "b"))


def test_bad_labels_raise():
    with pytest.raises(ValueError, match="labels"):
        PromptTemplate("{input} {label}", labels=())
    with pytest.raises(ValueError, match="distinct"):
        PromptTemplate("{input} {label}", labels=("a", "a"))
    with pytest.raises(ValueError, match="label must be in"):
        SST2_TEMPLATE.answer(2)
