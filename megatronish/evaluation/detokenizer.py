"""Undo WikiText's tokenization before a model's own tokenizer sees the text.

WikiText-103 stores text split into space-separated tokens (" @-@ " for a hyphen inside a word,
" , " for a comma, ...). A GPT-2 tokenizer never saw text like that in training, so the
Megatron-LM paper (and this evaluation) first turns it back into ordinary prose. The rules run
in this order, each over the whole text; the order matters (for instance the "= =" rules must
go from the longest run of "=" down to the shortest).
"""

import re

# (old, new): plain substring replacements, applied before the bracket rules.
_BEFORE_BRACKETS = [
    ("s '", "s'"),  # plural possessive: "players ' " -> "players' "
    (" @-@ ", "-"),  # number and word separators
    (" @,@ ", ","),
    (" @.@ ", "."),
] + [(f" {mark} ", f"{mark} ") for mark in ":;.!?,"]  # no space before punctuation

# Non-greedy, so that "( a ) b ( c )" becomes "(a) b (c)", not one bracket spanning both.
_BRACKETS = [
    (re.compile(r"\(\s*([^\)]*?)\s*\)"), r"(\1)"),
    (re.compile(r"\[\s*([^\]]*?)\s*\]"), r"[\1]"),
    (re.compile(r"{\s*([^}]*?)\s*}"), r"{\1}"),
    (re.compile(r"\"\s*([^\"]*?)\s*\""), r'"\1"'),
    (re.compile(r"'\s*([^']*?)\s*'"), r"'\1'"),
]

_AFTER_BRACKETS = [
    ("= = = =", "===="),  # section headings, longest first
    ("= = =", "==="),
    ("= =", "=="),
    (" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}"),
    (" \n", "\n"),  # no space at either end of a line
    ("\n ", "\n"),
    (" N ", " 1 "),  # the Penn-Treebank-style number placeholder
    (" 's", "'s"),
]


def wikitext_detokenize(text: str) -> str:
    """WikiText's tokenized text as ordinary prose (the Megatron-LM paper's rules, in its order)."""
    for old, new in _BEFORE_BRACKETS:
        text = text.replace(old, new)
    for pattern, replacement in _BRACKETS:
        text = pattern.sub(replacement, text)
    for old, new in _AFTER_BRACKETS:
        text = text.replace(old, new)
    return text
