"""Per-document heuristic filters: Gopher-style quality/repetition rules for text and sanity rules for Python.

Each filter is `(text) -> reason | None`; None keeps the document, a reason string (stable, short, used as the
key of the stats) removes it. Thresholds follow Gopher (Rae et al. 2021, appendix A) where one exists.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from collections import Counter
from dataclasses import dataclass, field

_WORD = re.compile(r"\S+")
_ALPHA = re.compile(r"[^\W\d_]")
_STOP_WORDS = frozenset(["the", "be", "to", "of", "and", "that", "have", "with"])


@dataclass
class TextFilter:
    """Gopher quality + repetition rules (set a field to None to switch its rule off)."""

    min_words: int | None = 50
    max_words: int | None = 100_000
    min_mean_word_len: float | None = 3.0
    max_mean_word_len: float | None = 10.0
    max_symbol_word_ratio: float | None = 0.1  # '#' and '...' per word
    max_bullet_lines: float | None = 0.9  # fraction of lines starting with a bullet
    max_ellipsis_lines: float | None = 0.3  # fraction of lines ending with an ellipsis
    min_alpha_words: float | None = 0.8  # fraction of words with at least one letter
    min_stop_words: int | None = 2
    max_dup_line_frac: float | None = 0.3  # duplicate lines / lines
    max_dup_para_frac: float | None = 0.3
    max_top_ngram_frac: dict[int, float] = field(default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16})
    max_dup_ngram_frac: dict[int, float] = field(default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12,
                                                                         9: 0.11, 10: 0.10})

    def __call__(self, text: str) -> str | None:
        words = _WORD.findall(text)
        n = len(words)
        if self.min_words is not None and n < self.min_words:
            return "too_few_words"
        if self.max_words is not None and n > self.max_words:
            return "too_many_words"
        if n == 0:
            return None
        mean_len = sum(map(len, words)) / n
        if self.min_mean_word_len is not None and mean_len < self.min_mean_word_len:
            return "mean_word_length"
        if self.max_mean_word_len is not None and mean_len > self.max_mean_word_len:
            return "mean_word_length"
        if self.max_symbol_word_ratio is not None:
            symbols = text.count("#") + text.count("...") + text.count("\u2026")
            if symbols / n > self.max_symbol_word_ratio:
                return "symbol_word_ratio"
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        if lines:
            if self.max_bullet_lines is not None:
                bullets = sum(ln.startswith(("-", "*", "\u2022", "\u2023")) for ln in lines)
                if bullets / len(lines) > self.max_bullet_lines:
                    return "bullet_lines"
            if self.max_ellipsis_lines is not None:
                ell = sum(ln.endswith(("...", "\u2026")) for ln in lines)
                if ell / len(lines) > self.max_ellipsis_lines:
                    return "ellipsis_lines"
        if self.min_alpha_words is not None and sum(bool(_ALPHA.search(w)) for w in words) / n < self.min_alpha_words:
            return "alpha_words"
        if self.min_stop_words is not None:
            lower = {w.lower() for w in words}
            if len(lower & _STOP_WORDS) < self.min_stop_words:
                return "stop_words"
        return self.repetition(text, lines, [w.lower() for w in words])

    def repetition(self, text: str, lines: list[str], words: list[str]) -> str | None:
        """Gopher repetition: duplicated lines/paragraphs, top n-gram share, share of chars in repeated n-grams."""
        if self.max_dup_line_frac is not None and lines and _dup_fraction(lines) > self.max_dup_line_frac:
            return "dup_lines"
        paras = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
        if self.max_dup_para_frac is not None and paras and _dup_fraction(paras) > self.max_dup_para_frac:
            return "dup_paragraphs"
        total_chars = sum(map(len, words)) or 1
        for n, limit in sorted(self.max_top_ngram_frac.items()):
            grams = _ngrams(words, n)
            if not grams:
                continue
            gram, count = Counter(grams).most_common(1)[0]
            if count > 1 and count * sum(map(len, gram)) / total_chars > limit:
                return f"top_{n}gram"
        for n, limit in sorted(self.max_dup_ngram_frac.items()):
            grams = _ngrams(words, n)
            if not grams:
                continue
            # characters of words covered by any n-gram occurring more than once (each word counted once)
            counts = Counter(grams)
            covered = bytearray(len(words))
            for i, g in enumerate(grams):
                if counts[g] > 1:
                    covered[i:i + n] = b"\x01" * n
            dup_chars = sum(len(w) for w, c in zip(words, covered) if c)
            if dup_chars / total_chars > limit:
                return f"dup_{n}gram"
        return None


def _dup_fraction(items: list[str]) -> float:
    seen: set[str] = set()
    dup = 0
    for it in items:
        if it in seen:
            dup += 1
        seen.add(it)
    return dup / len(items)


def _ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return list(zip(*(words[i:] for i in range(n))))


_AUTOGEN = re.compile(r"(auto-?generated|generated by|do not edit|autogenerated|this file was generated|"
                      r"code generated by)", re.IGNORECASE)


@dataclass
class PythonFilter:
    """Sanity rules for Python source: parses with `ast`, comment/docstring share, generated files, data blobs."""

    min_lines: int | None = 3
    max_lines: int | None = 5000
    max_line_len: int | None = 1000
    max_mean_line_len: float | None = 100.0
    min_doc_ratio: float | None = None  # (comment + docstring chars) / chars, e.g. 0.01 to want *some* prose
    max_doc_ratio: float | None = 0.8  # mostly prose with little code
    max_literal_ratio: float | None = 0.5  # chars inside string/number literals (data blobs)
    max_alnum_frac_low: float | None = 0.25  # minimum share of alphanumeric characters
    check_autogen: bool = True

    def __call__(self, text: str) -> str | None:
        lines = text.splitlines()
        if self.min_lines is not None and len([ln for ln in lines if ln.strip()]) < self.min_lines:
            return "too_few_lines"
        if self.max_lines is not None and len(lines) > self.max_lines:
            return "too_many_lines"
        if self.max_line_len is not None and lines and max(map(len, lines)) > self.max_line_len:
            return "long_line"
        if self.max_mean_line_len is not None and lines and sum(map(len, lines)) / len(lines) > self.max_mean_line_len:
            return "mean_line_length"
        if self.check_autogen and _AUTOGEN.search("\n".join(lines[:10])):
            return "auto_generated"
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            return "syntax_error"
        n = max(len(text), 1)
        if self.max_alnum_frac_low is not None and sum(c.isalnum() for c in text) / n < self.max_alnum_frac_low:
            return "low_alnum"
        doc_chars = _docstring_chars(tree)
        comment_chars = 0
        literal_chars = 0
        try:
            for tok in tokenize.generate_tokens(io.StringIO(text).readline):
                if tok.type == tokenize.COMMENT:
                    comment_chars += len(tok.string)
                elif tok.type in (tokenize.STRING, tokenize.NUMBER):
                    literal_chars += len(tok.string)
        except (tokenize.TokenError, IndentationError, SyntaxError):
            return "syntax_error"
        ratio = (doc_chars + comment_chars) / n
        if self.min_doc_ratio is not None and ratio < self.min_doc_ratio:
            return "few_comments"
        if self.max_doc_ratio is not None and ratio > self.max_doc_ratio:
            return "mostly_comments"
        if self.max_literal_ratio is not None and (literal_chars - doc_chars) / n > self.max_literal_ratio:
            return "data_blob"
        return None


def _docstring_chars(tree: ast.AST) -> int:
    total = 0
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = getattr(node, "body", [])
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                    and isinstance(body[0].value.value, str):
                total += len(body[0].value.value) + 6  # plus the quotes
    return total
