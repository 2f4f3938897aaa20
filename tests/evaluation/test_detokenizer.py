"""Each WikiText detokenizer rule on its own small string, then the order between rules."""

import pytest

from megatronish.evaluation.detokenizer import wikitext_detokenize

RULES = [
    ("the players ' union", "the players' union"),
    ("a 3 @-@ 2 win", "a 3-2 win"),
    ("1 @,@ 000 people", "1,000 people"),
    ("3 @.@ 5 metres", "3.5 metres"),
    ("as follows : one", "as follows: one"),
    ("first ; second", "first; second"),
    ("ended . Then", "ended. Then"),
    ("stop ! Now", "stop! Now"),
    ("why ? Because", "why? Because"),
    ("red , green", "red, green"),
    ("a ( b c ) d", "a (b c) d"),
    ("a [ b c ] d", "a [b c] d"),
    ("a { b c } d", "a {b c} d"),
    ('he said " hello there " to', 'he said "hello there" to'),
    ("the ' Big One ' song", "the 'Big One' song"),
    ("= = = = Deep = = = =", "==== Deep ===="),
    ("= = = Sub = = =", "=== Sub ==="),
    ("= = Section = =", "== Section =="),
    ("30 ° C", "30°C"),
    ("end \nnext", "end\nnext"),
    ("end\n next", "end\nnext"),
    ("about N people", "about 1 people"),
    ("the king 's men", "the king's men"),
]


@pytest.mark.parametrize("raw, expected", RULES, ids=[raw for raw, _ in RULES])
def test_each_rule(raw, expected):
    assert wikitext_detokenize(raw) == expected


def test_brackets_are_non_greedy():
    assert wikitext_detokenize("( a ) and ( b )") == "(a) and (b)"
    assert wikitext_detokenize('" a " and " b "') == '"a" and "b"'


def test_rules_run_in_order():
    # " , " becomes ", " before the bracket rule, which then trims the inner spaces.
    assert wikitext_detokenize("( a , b )") == "(a, b)"
    # Headings: the longest run first, or "= = = =" would become "== ==".
    assert wikitext_detokenize(" = = = = H = = = = \n") == " ==== H ====\n"
    # " N " is replaced after the punctuation rules, which have taken the space after it here.
    assert wikitext_detokenize("over N . Then") == "over N. Then"


def test_a_wikitext_paragraph():
    raw = (" = Valkyria Chronicles III = \n \n Senjō no Valkyria 3 : Unrecorded Chronicles ( Japanese : "
           "戦場のヴァルキュリア3 , lit . Valkyria of the Battlefield 3 ) , commonly referred to as Valkyria "
           "Chronicles III outside Japan , is a tactical role @-@ playing video game . \n")
    assert wikitext_detokenize(raw) == (
        " = Valkyria Chronicles III =\n\nSenjō no Valkyria 3: Unrecorded Chronicles (Japanese: "
        "戦場のヴァルキュリア3, lit. Valkyria of the Battlefield 3), commonly referred to as Valkyria "
        "Chronicles III outside Japan, is a tactical role-playing video game.\n")
