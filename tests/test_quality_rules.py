"""Each quality rule against a documented example on each side of its threshold (just passing,
just failing), DataTrove's quirks that decide keep/drop, the word and sentence counts, the
vectorised n-gram values against the plain scans, chat rows, per-language overrides."""

from __future__ import annotations

import random

import polars as pl
import pytest
from thresher.pipeline.stages.ngrams import NGrams
from thresher.pipeline.stages.rule_values import QualityValues
from thresher.pipeline.stages.text_rules import _offsets, duplicated_ngram_chars, top_ngram_chars
from thresher.pipeline.stages.words import Words
from thresher.scoring.quality_rules import QualityRulesParams, effective, rules_for, stage_for

pytest.importorskip("spacy")


def frame(text: str, **params) -> pl.DataFrame:
    stage = stage_for(QualityRulesParams(**params))
    rows = [{"id": "x", "kind": "text", "text": text, "messages": None}]
    return pl.from_arrow(stage.run_shard(stage.open_worker("cpu"), rows).tables["annotations"])


def fails(text: str, rule: str, **params) -> bool:
    group, name = rule.split(":")
    expr = {n: e for n, e, *_ in rules_for(QualityRulesParams(**params))[group]}[name]
    return frame(text, **params).select(expr.fill_null(False)).item()


def pad(prefix: str, total: int) -> str:
    """`prefix`, then distinct filler words, to exactly `total` characters."""
    out, i = prefix, 0
    while len(out) < total:
        word = f" z{i:03d}"
        out += word[: total - len(out)] if total - len(out) < len(word) else word
        i += 1
    assert len(out) == total
    return out


WORDS50 = "the of " + "house " * 48          # 50 non-symbol words, 2 stop words, mean 4.9


@pytest.mark.parametrize("rule, passing, failing, params", [
    # fewer than 50 non-symbol words (punctuation tokens do not count)
    ("gopher_quality:short_doc", WORDS50 + ".", "the of " + "house " * 47 + ".", {}),
    ("gopher_quality:long_doc", "the of " + "house " * 58, "the of " + "house " * 59,
     {"max_doc_words": 60}),
    # mean word length 3.0 passes, 2.98 fails
    ("gopher_quality:below_avg_word_length", "the of abcd " + "abc " * 47, "the of " + "abc " * 48, {}),
    # mean 10.0 passes, 10.02 fails
    ("gopher_quality:above_avg_word_length", "the of " + "a" * 11 + " " + ("b" * 11 + " ") * 14
     + ("c" * 10 + " ") * 33, "the of " + ("b" * 11 + " ") * 16 + ("c" * 10 + " ") * 32, {}),
    # '#' per token: 5 of 50 tokens (0.1) passes, 6 of 50 fails
    ("gopher_quality:too_many_hashes", "the of " + "# " * 5 + "house " * 43,
     "the of " + "# " * 6 + "house " * 42, {}),
    ("gopher_quality:too_many_ellipsis", "the of " + "... " * 5 + "house " * 43,
     "the of " + "… " * 6 + "house " * 42, {}),
    # bullet lines: 9 of 10 passes, 10 of 10 fails
    ("gopher_quality:too_many_bullets", "\n".join(["- item"] * 9 + ["plain"]),
     "\n".join(["- item"] * 5 + ["• item"] * 5), {}),
    ("gopher_quality:too_many_end_ellipsis", "\n".join(["a b..."] * 3 + ["a b."] * 7),
     "\n".join(["a b…"] * 4 + ["a b."] * 6), {}),
    # words holding a letter: 40 of 50 (0.8) passes, 39 of 50 fails (DataTrove's misnamed
    # max_non_alpha_words_ratio); numbers and punctuation tokens are words without letters
    ("gopher_quality:below_alpha_threshold", "the of " + "house " * 38 + "12 " * 10,
     "the of " + "house " * 37 + "12 " * 11, {}),
    # two distinct stop words pass, one fails; matching is case-sensitive ("The" is no stop word)
    ("gopher_quality:too_few_stop_words", WORDS50, "The Of the " + "house " * 47, {}),
    # duplicate paragraphs 3 of 10 (0.3) pass, 4 of 10 fail
    ("gopher_repetition:dup_para_frac", "\n\n".join(["same"] * 4 + [f"p{i}" for i in range(6)]),
     "\n\n".join(["same"] * 5 + [f"p{i}" for i in range(5)]), {}),
    # characters in duplicate paragraphs: 20 of 100 pass, 20 of 99 fail
    ("gopher_repetition:dup_para_char_frac", "a" * 20 + "\n\n" + "a" * 20 + "\n\n" + "b" * 56,
     "a" * 20 + "\n\n" + "a" * 20 + "\n\n" + "b" * 55, {}),
    ("gopher_repetition:dup_line_frac", "\n".join(["same"] * 4 + [f"l{i}" for i in range(6)]),
     "\n".join(["same"] * 5 + [f"l{i}" for i in range(5)]), {}),
    ("gopher_repetition:dup_line_char_frac", "a" * 20 + "\n" + "a" * 20 + "\n" + "b" * 58,
     "a" * 20 + "\n" + "a" * 20 + "\n" + "b" * 57, {}),
    # top 2-gram "ab cd" twice: 10 characters of 50 (0.2) pass, of 49 fail
    ("gopher_repetition:top_2_gram", pad("ab cd ab cd", 50), pad("ab cd ab cd", 49), {}),
    # duplicated 5-grams: "abcde" (5 characters, joined without spaces) of 34 pass, of 33 fail
    ("gopher_repetition:duplicated_5_n_grams", pad("a b c d e a b c d e", 34),
     pad("a b c d e a b c d e", 33), {}),
    # lorem ipsum drops the document, but only on a line that survived the line rules
    ("c4:lorem_ipsum", "Lorem ipsum\nfine words here.", "Lorem ipsum dolor sit amet.", {}),
    # a curly bracket drops the document, unless its line was removed first (fewer than 3 words,
    # or mentions javascript)
    ("c4:curly_bracket", "a {\nEnable javascript { now.", "x = {1, 2}", {}),
    # five sentences (counted on the kept lines) pass, four fail
    # ("b." would be one token: spaCy's abbreviation exceptions, so no sentence end)
    ("c4:too_few_sentences", ("One two three. Four five six. Seven eight nine.\nTen more words. "
     "And more words."), "One two three. Four five six. Seven eight nine.\nTen more words.", {}),
    # lines ending in terminal punctuation: 12 of 100 pass, 11 of 100 fail; a closing quote is
    # not terminal punctuation in FineWeb's list
    ("fineweb:line_punct_ratio", "\n".join(["end."] * 12 + ["open"] * 88),
     "\n".join(["end."] * 11 + ['end."'] + ["open"] * 88), {}),
    # lines of <= 30 characters: 67 of 100 pass, 68 of 100 fail
    ("fineweb:short_line_ratio", "\n".join([f"s{i}." for i in range(67)] + ["L" * 31 + f"{i}."
                                                                            for i in range(33)]),
     "\n".join([f"s{i}." for i in range(68)] + ["L" * 31 + f"{i}." for i in range(32)]), {}),
    # characters of duplicate lines over characters without newlines: 0.01 passes
    # (3 of 300 passes, 3 of 299 fails)
    ("fineweb:char_dup_ratio", "ab.\nab.\n" + "x" * 293 + ".", "ab.\nab.\n" + "x" * 292 + ".", {}),
    # newlines per word: 3 of 10 pass, 4 of 10 fail
    ("fineweb:list_ratio", "a b c\nd e f\ng h\ni j", "a b c\nd e\nf g\nh i\nj", {}),
])
def test_rule_at_its_threshold(rule, passing, failing, params):
    assert not fails(passing, rule, **params), f"{rule} should pass"
    assert fails(failing, rule, **params), f"{rule} should fail"


def test_top_ngram_counts_an_ngram_seen_once():
    """DataTrove's quirk: a short text's only 2-gram is its 'most common' one."""
    f = frame("hello world")
    assert f["gr_top_2gram"].item() == 1.0 and f["gr_top_4gram"].item() is None
    assert fails("hello world", "gopher_repetition:top_2_gram")


def test_words_count_punctuation_and_split_like_spacy():
    w = Words("en")
    assert w.words("Hello, world... it's 3.5%!") == ["Hello", ",", "world", "...", "it", "'s",
                                                      "3.5", "%", "!"]
    assert w.words("don't  stop\n\nme") == ["do", "n't", "stop", "me"]
    assert w.sentences("One. Two three! Four") == 3
    assert w.sentences("Dr. Smith said so. Yes") == 2    # "Dr." is one token: no sentence end
    assert w.sentences("One . . Two") == 2
    assert w.sentences("One .  . Two") == 3              # a double space is a token too
    assert w.sentences("no end mark here") == 1


def test_cjk_words_are_characters_for_languages_without_spaces():
    assert Words("zh").words("我爱北京。Hello world") == ["我", "爱", "北", "京", "。", "Hello", "world"]
    assert Words("en").words("小さなバイキング") == ["小さなバイキング"]   # as DataTrove for English


def test_vectorised_ngrams_equal_the_plain_scans():
    rng = random.Random(0)
    for _ in range(400):
        words = [rng.choice(["a", "b", "ab", "ba", "c", ".", "aa"]) for _ in range(rng.randint(0, 40))]
        g = NGrams(words)
        for n in (2, 3, 4):
            assert g.top_chars(n) == top_ngram_chars(words, n, " ".join(words), _offsets(words, 1))
        for n in range(5, 11):
            assert g.duplicated_chars(n) == duplicated_ngram_chars(n, "".join(words), _offsets(words, 0))
    # joined without spaces, "ab c d e f" and "a bc d e f" are the same 5-gram
    assert NGrams(["ab", "c", "d", "e", "f", "a", "bc", "d", "e", "f"]).duplicated_chars(5) == 6


def test_c4_annotates_removed_lines_and_never_rewrites():
    text = "Short line\nA kept line here.\nWe use cookies to track you.\nEnable javascript please."
    f = frame(text)
    assert f["c4_removed_lines"].item().to_list() == [0, 2, 3]
    assert f["c4_lines_removed"].item() == 3
    f = frame("No terminal mark on this line\nThis one ends well.", c4_no_terminal_punct=True)
    assert f["c4_removed_lines"].item().to_list() == [0]


def test_first_failing_rule_follows_fineweb_order(tmp_path):
    from thresher.pipeline.filtering import Rule, apply_rules

    text = "hello world"          # fails top_2_gram (repetition) and short_doc (quality)
    p = QualityRulesParams()
    f = frame(text)
    rules = [Rule(f"{g}:{n}", e) for g in p.filters for n, e, *_ in rules_for(p)[g] if e is not None]
    out, counts = apply_rules(f, rules)
    assert out["reason"].item() == "gopher_repetition:top_2_gram"
    assert counts["rules"]["gopher_quality:short_doc"] == {"first": 0, "any": 1, "only": 0}


def test_chat_rows_are_skipped_unless_asked():
    chat = {"id": "c", "kind": "chat", "text": None,
            "messages": [{"role": "user", "content": "Write code."},
                         {"role": "assistant", "content": "x = {1}\n" * 3}]}
    for mode, measured in [("skip", False), ("assistant", True)]:
        st = QualityValues(chat=mode)
        f = pl.from_arrow(st.run_shard(st.open_worker("cpu"), [chat]).tables["annotations"])
        assert (f["gr_dup_line_frac"].item() is not None) == measured
    assert QualityValues(chat="assistant").values(Words("en"), "x = {1}")["n_words"] == 5


def test_overrides_by_language_and_script(tmp_path):
    path = tmp_path / "lang.yaml"
    path.write_text("cmn_Hani: {min_avg_word_length: 1, max_avg_word_length: 4, "
                    "stop_words: [的, 了, 是]}\n")
    p = effective(QualityRulesParams(language="cmn_Hani", overrides=str(path)))
    assert p.min_avg_word_length == 1 and p.stop_words == ("的", "了", "是")
    assert stage_for(p).language == "zh"
    assert effective(QualityRulesParams(language="eng_Latn", overrides=str(path))).min_avg_word_length == 3
    path.write_text("cmn_Hani: {min_avg_word_lenght: 1}\n")
    with pytest.raises(ValueError, match="cmn_Hani: parameter"):
        effective(QualityRulesParams(language="cmn_Hani", overrides=str(path)))
    path.write_text("[not, a, mapping]\n")
    with pytest.raises(ValueError, match="overrides are a mapping"):
        effective(QualityRulesParams(language="cmn_Hani", overrides=str(path)))
    with pytest.raises(FileNotFoundError, match="no such overrides file"):
        effective(QualityRulesParams(overrides=str(tmp_path / "nope.yaml")))


def test_null_switches_a_rule_off_from_the_command_line():
    from thresher.pipeline.params import parse_params

    p = parse_params(QualityRulesParams, {"min_doc_words": "null", "filters": "gopher_quality"})
    assert p.min_doc_words is None and p.filters == ("gopher_quality",)
    names = [n for n, e, *_ in rules_for(p)["gopher_quality"] if e is not None]
    assert "short_doc" not in names and "long_doc" in names
    with pytest.raises(ValueError, match="min_stop_words"):
        parse_params(QualityRulesParams, {"min_stop_words": "two"})
