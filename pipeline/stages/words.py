"""Word tokens as DataTrove's rule filters count them, at a fraction of the cost.

    w = Words("en")
    w.words("Hello, world... it's 3.5%!")   # ['Hello', ',', 'world', '...', 'it', "'s", '3.5', '%', '!']
    w.sentences("One. Two three.")          # 2: spaCy's sentencizer count

DataTrove splits words with spaCy's tokenizer for `spacy.blank(lang)` (punctuation tokens count
as words) and C4 counts sentences with spaCy's sentencizer. spaCy's tokenizer cuts a text at
whitespace and tokenizes each whitespace-free chunk on its own (prefixes, suffixes, infixes,
exceptions), so a chunk's tokens never depend on its neighbours. This module keeps that exact
result while calling spaCy once per DISTINCT chunk: the chunks of a batch of texts that are not
cached yet are tokenized in one call (joined by single spaces, which spaCy attaches to the
previous token and never makes a token of), and every text is then the concatenation of its
chunks' cached tokens. Web text repeats its words, so after a few thousand documents nearly
every chunk is a cache hit: the cost is Python's `str.split` and dictionary lookups.

For the languages written without spaces (Chinese, Japanese, Thai, Lao, Khmer, Burmese,
Tibetan), characters of those scripts (Han, Hiragana, Katakana, Thai...) are single-character
words (spaCy's own Chinese default, `segmenter="char"`): FineWeb-2's word counts for `cmn_Hani`
and `jpn_Jpan` need a splitter that works without spaces, and a dictionary segmenter (jieba,
SudachiPy) would be a download or a heavy dependency. Other languages keep spaCy's tokens even
for a CJK run inside them (as DataTrove does for English). A language without a blank spaCy tokenizer that works offline falls back to spaCy's
multi-language one (`xx`).
"""

from __future__ import annotations

import re
import unicodedata
from functools import cache, lru_cache
from itertools import chain

# Han (with extensions and compatibility), Hiragana, Katakana, Thai, Lao, Tibetan, Myanmar, Khmer
NO_SPACE_SCRIPTS = re.compile(
    "([\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
    "\u0e00-\u0e7f\u0e80-\u0eff\u0f00-\u0fff\u1000-\u109f\u1780-\u17ff])")
_TOKENS = re.compile(r"(\S+)|(\s+)")
_ODD_SPACE = re.compile(r"[^\S ]|  ")       # whitespace other than single spaces
_BREAK = re.compile(r"P[Pp]*w")
NO_SPACE_LANGUAGES = frozenset({"zh", "ja", "th", "lo", "km", "my", "bo", "yue", "wuu", "cmn",
                                "jpn", "tha", "lao", "khm", "mya", "bod"})
MAX_CACHE = 2_000_000         # chunks kept; the cache is cleared past this (memory ~ 200 MB)


@cache
def _nlp(language: str):
    import spacy

    try:
        return spacy.blank(language)
    except Exception:  # noqa: BLE001 - a language spaCy lacks or that needs a segmenter download
        return spacy.blank("xx")


@lru_cache(maxsize=1)
def sentence_punct() -> frozenset[str]:
    from spacy.pipeline.sentencizer import Sentencizer

    return frozenset(Sentencizer.default_punct_chars)


@lru_cache(maxsize=1)
def _maybe_end() -> re.Pattern:
    return re.compile("[" + "".join(re.escape(c) for c in sorted(sentence_punct())) + "]")


@lru_cache(maxsize=1 << 16)
def is_punct(token: str) -> bool:
    """spaCy's lexical `is_punct`: every character in a Unicode punctuation category."""
    return all(unicodedata.category(c).startswith("P") for c in token)


class Words:
    """spaCy-exact word tokens (DataTrove's `split_into_words`) with a per-chunk cache."""

    def __init__(self, language: str = "en"):
        self.language = language
        self.no_space = language in NO_SPACE_LANGUAGES
        # spaCy's Chinese/Japanese tokenizers cut everything into characters or need a
        # segmenter: the multi-language one handles the spaced runs between CJK characters
        self.tokenizer = _nlp("xx" if self.no_space else language).tokenizer
        self.cache: dict[str, tuple[str, ...]] = {}
        self.codes: dict[str, str] = {}
        self.maybe_end = _maybe_end()

    def _split_no_space(self, chunk: str) -> tuple[str, ...]:
        out: list[str] = []
        for part in NO_SPACE_SCRIPTS.split(chunk):
            if not part:
                continue
            if NO_SPACE_SCRIPTS.fullmatch(part):
                out.append(part)
            else:
                out.extend(self._spacy([part])[part])
        return tuple(out)

    def _spacy(self, chunks: list[str]) -> dict[str, tuple[str, ...]]:
        """Tokens of each chunk, from one tokenizer call over the chunks joined by spaces."""
        out: dict[str, tuple[str, ...]] = {}
        if not chunks:
            return out
        doc = self.tokenizer(" ".join(chunks))
        at, current = 0, []
        for tok in doc:
            current.append(tok.text)
            if tok.whitespace_:
                out[chunks[at]] = tuple(current)
                at, current = at + 1, []
        if current:
            out[chunks[at]] = tuple(current)
        return out

    def prepare(self, texts: list[str]) -> None:
        """Tokenize, in one spaCy call, every chunk of these texts not cached yet."""
        if len(self.cache) > MAX_CACHE:
            self.cache.clear()
            self.codes.clear()
        new = {c for t in texts for c in t.split() if c not in self.cache}
        if not new:
            return
        plain = [c for c in new if not (self.no_space and NO_SPACE_SCRIPTS.search(c))]
        for start in range(0, len(plain), 100_000):
            self.cache.update(self._spacy(plain[start:start + 100_000]))
        for c in new:
            if c not in self.cache:
                self.cache[c] = self._split_no_space(c)

    def chunk(self, c: str) -> tuple[str, ...]:
        got = self.cache.get(c)
        if got is None:
            self.prepare([c])
            got = self.cache[c]
        return got

    def words(self, text: str) -> list[str]:
        """Every token of `text`, whitespace tokens left out (DataTrove's strip_strings)."""
        chunks = text.split()
        try:
            return list(chain.from_iterable(map(self.cache.__getitem__, chunks)))
        except KeyError:          # not prepared: tokenize the missing chunks first
            self.prepare([text])
            return list(chain.from_iterable(map(self.cache.__getitem__, chunks)))

    def _code(self, chunk: str) -> str:
        """One letter per token of a chunk: P a sentence-final mark, p other punctuation, w else."""
        code = self.codes.get(chunk)
        if code is None:
            punct = sentence_punct()
            code = "".join("P" if t in punct else ("p" if is_punct(t) else "w")
                           for t in self.chunk(chunk))
            self.codes[chunk] = code
        return code

    def sentences(self, line: str) -> int:
        """How many sentences spaCy's sentencizer finds in a stripped line (at least 1).

        The sentencizer starts a sentence at a token that is neither punctuation nor a
        sentence-final mark when such a mark came before it (since the last start): with one
        letter per token (`_code`), that is each match of `P[Pp]*w`."""
        if not self.maybe_end.search(line):
            return 1
        if _ODD_SPACE.search(line) or line[0] == " " or line[-1] == " ":
            parts = []
            for m in _TOKENS.finditer(line):
                if m.group(1) is not None:
                    parts.append(self._code(m.group(1)))
                elif m.group(2) != " ":
                    parts.append("w")     # a whitespace token: neither punctuation nor a mark
            code = "".join(parts)
        else:
            code = "".join(map(self._code, line.split(" ")))
        return 1 + len(_BREAK.findall(code)) if "P" in code else 1
