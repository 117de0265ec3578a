"""The linear-time regex matcher (`lowrank._regex`) against Python's `re` itself: random
patterns of every construct it takes on random strings, for fullmatch, match and search;
PEFT's layer index; hostile patterns on long names, answered with bounded work; the
constructs it refuses."""

from __future__ import annotations

import contextlib
import random
import re
import sys
import threading
import tracemalloc
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lowrank import _regex

_ops, _regex_parser = _regex._ops, _regex._regex_parser

# K: the Kelvin sign, ſ: long s (both fold to ASCII letters), İ ı ß: case folding specials,
# é: a non-ASCII letter, ٣: a non-ASCII digit
ALPHABET = "abAB._1\nKkſsİıß é٣"
LITERALS = ["a", "b", "A", "_", "1", r"\.", r"\n", "K", "s", "ß", "İ", "é", " ", r"\x61",
            r"\N{DIGIT ONE}", r"\u0130", r"\0"]  # fmt: skip
CLASSES = [".", "[ab]", "[^a.]", "[a-b1]", r"\d", r"\w", r"\s", r"\D", r"\W", r"[\w.]",
           r"[^\W_]", "[K]", "[^s]", r"[^\W\d]", r"[\s\S]", "[k-l]", "[ß-ſ]", "[^\n]"]  # fmt: skip
ANCHORS = ["^", "$", r"\A", r"\Z", r"\b", r"\B"]
REPEATS = ["*", "+", "?", "{2}", "{1,}", "{0,2}", "{1,3}", "{0}", "{,2}", "{3,}"]
FLAGS = ["i", "s", "m", "a", "-i", "i-s", "u", "x", "-m", "a-i"]

single = st.sampled_from(LITERALS + CLASSES)
zero_width = st.one_of(
    st.sampled_from([r"\b", "$", "^"]),
    st.tuples(st.sampled_from(["=", "!", "<=", "<!"]), single).map(lambda p: f"(?{p[0]}{p[1]})"),
)
fixed = st.lists(st.one_of(single, zero_width), min_size=1, max_size=3)


behind = fixed.map("".join)


def _extend(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        st.tuples(inner, inner).map("".join),
        st.tuples(inner, inner).map("|".join),
        inner.map("{}|".format),  # an empty alternative
        inner.map(" # a comment\n{}".format),  # under (?x)
        inner.map("({})".format),
        inner.map("(?:{})".format),
        st.tuples(st.sampled_from(FLAGS), inner).map(lambda p: f"(?{p[0]}:{p[1]})"),
        st.tuples(inner, st.sampled_from(REPEATS), st.booleans()).map(
            lambda p: f"(?:{p[0]}){p[1]}{'?' if p[2] else ''}"
        ),
        st.tuples(st.sampled_from(["=", "!"]), inner).map(lambda p: f"(?{p[0]}{p[1]})"),
        st.tuples(st.sampled_from(["<=", "<!"]), behind).map(lambda p: f"(?{p[0]}{p[1]})"),
    )


patterns = st.tuples(
    st.sampled_from(["", "(?i)", "(?s)", "(?m)", "(?a)", "(?is)", "(?im)", "(?x)", "(?u)",
                     "(?ia)"]),
    st.recursive(st.one_of(single, st.sampled_from(ANCHORS)), _extend, max_leaves=7),
).map("".join)
texts = st.text(ALPHABET, max_size=8)


@contextlib.contextmanager
def _re_steps(budget: int) -> Iterator[None]:
    """`_regex.RE_STEPS` set to `budget` (−1: the DFA matches every name; 10³⁰: `re` matches
    every name on which its backtracking has a bound), the caches emptied around."""
    saved = _regex.RE_STEPS
    _regex.RE_STEPS = budget
    _regex._MATCHERS.clear()
    _regex._FIRSTS.clear()
    try:
        yield
    finally:
        _regex.RE_STEPS = saved
        _regex._MATCHERS.clear()
        _regex._FIRSTS.clear()


BUDGETS = [-1, 10**30]
"""`RE_STEPS` for the DFA on every name, and for `re` itself wherever its backtracking has a
bound."""


def _check_against_re(pattern: str, text: str) -> None:
    try:
        compiled = re.compile(pattern)
    except re.error:
        assume(False)
    for budget in BUDGETS:
        with _re_steps(budget):
            for mine, theirs in ((_regex.fullmatch, re.fullmatch), (_regex.match, re.match),
                                 (_regex.search, re.search)):  # fmt: skip
                expected = theirs(pattern, text) is not None
                if mine is _regex.search and not expected:  # re.search's scan for a first
                    # character ignores a scoped (?a:…) or (?u:…) around it (a CPython bug):
                    # re.match somewhere
                    expected = any(compiled.match(text, i) for i in range(len(text) + 1))
                assert mine(pattern, text) == expected, (mine, pattern, text, budget)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(patterns, texts)
def test_random_patterns_match_as_in_re(pattern, text):
    _check_against_re(pattern, text)


@pytest.mark.exhaustive
@settings(max_examples=20_000, deadline=None,
          suppress_health_check=[HealthCheck.filter_too_much])  # fmt: skip
@given(patterns, st.lists(texts, min_size=1, max_size=8))
def test_random_patterns_match_as_in_re_exhaustively(pattern, many):
    for text in many:
        _check_against_re(pattern, text)


@pytest.mark.parametrize(
    ("pattern", "texts"),
    [
        (r"(?i)k", ["K", "\u212a", "k", "x"]),  # the Kelvin sign folds to k
        (r"(?i)[a-z]+", ["\u212a\u017f", "AbC", "1"]),
        (r"(?a:\w)(?u:\w)", ["é1", "aé", "éa"]),
        (r"(?a)\b\w+\b", ["é", "ab"]),
        (r"(?m)^a$\n^b$", ["a\nb", "a\nb\n"]),
        (r"a$", ["a", "a\n", "a\n\n"]),
        (r"a\Z", ["a", "a\n"]),
        (r"(?s:.)(?-s:.)", ["\n\n", "\na", "a\n"]),
        (r"(?=(?!a)(?<=b))", ["", "b", "ba", "bb"]),
        (r"(?:(?=a)|b)*a", ["a", "ba", "bba", "bb"]),
        (r"(?:a|){3}b", ["b", "ab", "aaab", "aaaab"]),
        (r"(?:a{0,2}?){2,3}$", ["", "aaaaaa", "aaaaaaa"]),
        (r"[^\d\s]+", ["a1", "ab", "٣"]),
        (r"\d\.", ["٣.", "3."]),
        (r"(?<=\d\d)x", ["1x", "12x", "x"]),
        (r"(?<!^)x", ["x", "ax"]),
        (r"a(?!)|b(?<!)|c", ["a", "b", "c", ""]),  # (?!): FAILURE in Python 3.13's parse
        (r"(?a:\W)", ["é", "aé", "a"]),  # re.search misses these (see _check_against_re)
        (r"(?a)(?u:\w)", ["é", " é"]),
        (r"(?i)ß|İ", ["ss", "SS", "ẞ", "i", "i̇", "İ"]),
        (r"(?x) a # a comment\n b", ["ab", "a b", "a # a comment\n b"]),
        (r"(?:a*)*(?:(?=a)a)*b{,2}", ["", "aab", "bbb"]),
        (r"\N{LATIN SMALL LETTER A}\101\x41\u00e9\0", ["aAAé\0", "aAAé"]),
        (r"[^\W\d][\s\S]\b", ["é\n", "٣a", "a."]),
    ],
)
def test_character_tests_and_assertions_follow_re(pattern, texts):
    for text in texts:
        _check_against_re(pattern, text)


LAYER = r"(?:^|.*?\.){}\.(?P<idx>\d+)\."
components = st.sampled_from(["model", "layers", "h", "block", "0", "1", "12", "03", "x", "a1",
                              "٣", "1\n", ""])  # fmt: skip
names = st.lists(components, min_size=1, max_size=7).map(".".join)
layer_patterns = st.one_of(
    st.sampled_from(["layers", "h", "(?:layers|h)", r"\w+", r".*", r"[^.]+", r"layers(?:\.\d+)?",
                     r"(layers|block)", r"\d", "", r"(?:x\.)?layers", r"(?<=\.)h", r"\d*",
                     r"(?=\d)", "$", "(?m:$)", "(?s:.*)"]),
    patterns.filter(lambda p: not p.startswith("(?") or p.startswith("(?:")),
)  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(layer_patterns, names)
def test_the_layer_index_is_the_one_re_reads(pattern, name):
    """PEFT's `re.match(...)["idx"]`, or a refusal where the pattern can end at two places
    followed by different indices (then `re` does read one of them)."""
    regex = LAYER.format(pattern)
    try:
        re.compile(regex)
    except re.error:
        assume(False)
    found = re.match(regex, name)
    try:
        index = _regex.layer_index(regex, name)
    except _regex.RegexError as err:
        if "outside any group" in str(err):  # a top-level '|': not the index on every match
            assert "idx" not in re.compile(regex).groupindex or "|" in pattern or "\\" in pattern
            return
        assert "several places" in str(err) and found is not None
        ends = {int(m["idx"]) for m in (re.match(LAYER.format(f"(?:{pattern})"), name),) if m}
        assert int(found["idx"]) in ends | {int(found["idx"])}
        return
    expected = found["idx"] if found else None
    assert index == (None if expected is None else int(expected)), (regex, name)


def test_an_ambiguous_layer_index_is_refused_and_real_ones_read():
    regex = LAYER.format(r"layers(?:\.\d+)?")
    with pytest.raises(_regex.RegexError, match=r"several places .* \(1, 2\)"):
        _regex.layer_index(regex, "model.layers.1.2.mlp")
    assert _regex.layer_index(regex, "model.layers.1.mlp") == 1
    for pattern, name in [("layers", "model.layers.12.self_attn.q_proj"),
                          ("h", "transformer.h.3.attn.c_attn"),
                          (r"(?:layers|block)", "encoder.block.1.layer.0.SelfAttention.q"),
                          ("layers", "model.layers.x.mlp"), ("layers", "layers.7.mlp")]:
        regex = LAYER.format(pattern)
        found = re.match(regex, name)
        assert _regex.layer_index(regex, name) == (found and int(found["idx"]))
    with pytest.raises(_regex.RegexError, match="outside any group"):
        _regex.layer_regex(LAYER.format("layers|h"))


# hostile patterns (`re` takes exponential or high-power polynomial time on them) with a
# regex of the same language that `re` matches quickly, and 512-character names
HOSTILE = [
    (r"(a|aa)*c", r"a*c"), (r"(a+)+b", r"a+b"), (r"(.*)*x", r".*x"),
    (r".*.*.*.*.*.*x", r".*x"), ("(?:a|)*" * 24 + "a" * 24, "a{24,}"),
    (r"(.*\.)?(.*.*.*.*.*.*x)$", r".*x\n?"), (r".*(?=.*.*.*y)", r".*(?=.*y)"),
    ("a?" * 28 + "a" * 28, "a{28,56}"), (r".*.*.*\d+\.", r".*\d\."),
    (".*.*.*" + "a" * 100 + "b", ".*" + "a" * 100 + "b"), (".*.*.*(?:ab){200}", ".*(?:ab){200}"),
    (r"(a?a?)*c", r"a*c"), (r"(.*a){20}", r"(?:[^a\n]*a){19}[^\n]*a"),
]  # fmt: skip
LONG = ["a" * 512, "a" * 511 + "c", "a." * 256, "1." * 256, "ab" * 256, "a" * 511 + "x",
        "y" + "a" * 511, "a" * 412 + "b" * 100]  # fmt: skip


@pytest.mark.parametrize(("hostile", "same"), HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_patterns_are_answered_with_linear_work(hostile, same):
    """Each answer is `re`'s on the equivalent regex; the work (NFA states visited building
    DFA states) is at most a small multiple of the name's length times the NFA's size."""
    limits = [_regex._matcher(hostile).re_limit(search) for search in (False, True)]
    assert max(limits) < min(map(len, LONG))  # checked first: `re` would not answer
    for name in LONG:
        _regex._MATCHERS.clear()  # no DFA state built yet
        _regex.Work.visits = _regex.Work.steps = 0
        for mine, theirs in ((_regex.fullmatch, re.fullmatch), (_regex.match, re.match),
                             (_regex.search, re.search)):  # fmt: skip
            assert mine(hostile, name) == (theirs(same, name) is not None), (mine, name[:20])
        size = _regex.compiled(hostile).size
        assert _regex.Work.steps <= 3 * (len(name) + 1) * (1 + hostile.count("(?"))
        assert _regex.Work.visits <= 3 * 4 * (len(name) + 1) * size


@pytest.mark.parametrize(
    ("pattern", "what"),
    [(r"(a)\1", "backreference"), (r"(?P<x>a)(?P=x)", "backreference"),
     (r"(a)?(?(1)b|c)", "conditional"), (r"(?>a*)b", "atomic group"),
     (r"a*+b", "possessive repeat"), (r"a++", "possessive"), (r"(?:ab){2,}+", "possessive"),
     (r"(?:a{1000}){70}", "more than 8192 automaton states"),
     (r"a{99999999999}", "not a valid regular expression"), ("(", "not a valid regular")],
)  # fmt: skip
def test_constructs_without_linear_matching_are_refused(pattern, what):
    with pytest.raises(_regex.RegexError, match=re.escape(what)):
        _regex.fullmatch(pattern, "a")


def test_a_large_listing_of_module_names_fits():
    """A regex of 8 KiB listing module names (`|` of literal names) is taken, and matches
    as `re` does."""
    names = [f"model.layers.{i}.{part}" for i in range(1200)
             for part in ("self_attn.q_proj", "mlp.down_proj")]  # fmt: skip
    regex = "|".join(map(re.escape, names))[: 2**13].rpartition("|")[0]
    assert len(regex) > 8_000
    for name in ["model.layers.3.mlp.down_proj", "model.layers.700.mlp.down_proj",
                 "model.layers.3.mlp.up_proj", names[0] + ".x"]:  # fmt: skip
        assert _regex.fullmatch(regex, name) == (re.fullmatch(regex, name) is not None)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(st.lists(st.tuples(patterns, st.sampled_from(["(.*\\.)?({})$", "{}", "{}\\Z", "{}$",
                                                     "(?m){}$", "{}$\\Z"])),
                min_size=1, max_size=4), texts)  # fmt: skip
def test_the_first_of_several_regexes_that_matches_is_res(parts, text):
    """`first_match` (PEFT's first `rank_pattern` key whose `(.*\\.)?(key)$` matches)."""
    regexes = tuple(form.format(pattern) for pattern, form in parts)
    try:
        for regex in regexes:
            re.compile(regex)
    except re.error:
        assume(False)
    expected = next((i for i, r in enumerate(regexes) if re.match(r, text)), None)
    for budget in BUDGETS:
        with _re_steps(budget):
            assert _regex.first_match(regexes, text) == expected


def test_first_match_holds_at_most_the_cached_states(monkeypatch):
    """End-anchored regexes whose automata exceed `CACHED_STATES` together (12 of ≈ 1,000
    states against a cap of 8,192 here; 34 of ≈ 8,000 against the real 2¹⁸ behave alike, in
    seconds) are run one after another, not built into one automaton held in memory; the
    answers are `re`'s on regexes of the same language (`a{0,500}`, on which `re` does not
    backtrack)."""
    monkeypatch.setattr(_regex, "CACHED_STATES", 2**13)
    regexes = tuple(rf"(.*\.)?((?:a?){{500}}b{i})$" for i in range(12))
    same = [rf"(.*\.)?(a{{0,500}}b{i})$" for i in range(12)]
    _regex._FIRSTS.clear()
    for name in ("x.aab7", "aab11", "b12"):
        expected = next((i for i, r in enumerate(same) if re.match(r, name)), None)
        assert _regex.first_match(regexes, name) == expected
    held = [b.program.size for b in _regex._FIRSTS._values.values() if b is not None]
    assert sum(held) <= _regex.CACHED_STATES


@pytest.mark.parametrize("regex", [r"a.{3}b", r"(?:a|b)*c", r"x[ab]{2,4}y", r"\w{3}\d"])
def test_answers_stay_res_when_the_cache_is_flushed(regex, monkeypatch):
    """A cache of a few states, flushed within most runs: a run that goes on after a flush
    still stops where the answer is known (the accepting state outlives the flush)."""
    monkeypatch.setattr(_regex, "CACHE_BUDGET", 40)
    texts = ["".join(random.Random(seed).choices("abcxy1", k=30)) for seed in range(40)]
    for text in texts:
        _regex._MATCHERS.clear()
        for mine, theirs in ((_regex.fullmatch, re.fullmatch), (_regex.match, re.match),
                             (_regex.search, re.search)):  # fmt: skip
            assert mine(regex, text) == (theirs(regex, text) is not None), (mine, text)


def test_the_cache_bounds_transitions_too(monkeypatch):
    """Names of many distinct characters add transitions, not states: they count in the
    cache's budget."""
    monkeypatch.setattr(_regex, "CACHE_BUDGET", 1000)
    regex = r"(?:a|[^a])*"
    _regex._MATCHERS.clear()
    for start in range(0x4E00, 0x4E00 + 5000, 50):
        assert _regex.fullmatch(regex, "".join(map(chr, range(start, start + 50))))
    dfa = _regex._dfa(regex, True, False)
    states = dfa._states.values()
    assert sum(len(s.next) + 1 + len(s.kernel) for s in states) <= _regex.CACHE_BUDGET


def test_threads_can_match_at_once():
    """Threads making and dropping matchers at once (the caches are shared): each answer is
    `re`'s, and no thread fails."""
    failures: list[str] = []

    def work(thread: int) -> None:
        try:
            for i in range(150):
                regex = f"a{thread}_{i}b|c"
                assert _regex.search(regex, f"xa{thread}_{i}b")
                assert _regex.match(f"(?:{regex})$", "c")
                assert _regex.first_match((f"z{i % 20}$", f"{regex}$"), "c") == 1
        except Exception as err:
            failures.append(repr(err))

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert not failures


def test_memory_per_distinct_regex_is_small():
    """A config of many distinct `rank_pattern` keys, each matched on a few names: each
    regex kept costs ≈ 20 KB (its literals' tests are shared with the others)."""
    keys = [rf"(.*\.)?(model\.layers\.{i}\.self_attn\.q_proj)$" for i in range(150)]
    names = [f"base_model.model.model.layers.{i}.self_attn.q_proj" for i in (3, 5)]
    _regex._MATCHERS.clear()
    for key in keys[:20]:  # the shared tests made
        [_regex.match(key, name) for name in names]
    tracemalloc.start()
    try:
        for key in keys[20:]:
            assert [_regex.match(key, name) for name in names] == [
                re.match(key, name) is not None for name in names
            ]
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert held / len(keys[20:]) < 30_000


@pytest.mark.parametrize(
    ("regex", "same"),
    [("(?=[ab])" * 150, "(?=[ab])"), ("(?:(?<=a)|(?!b)|.)*" * 100, ".*"),
     ("(?:(?=[ab.])[ab.])*" * 100, "[ab.]*"), ("(?=" * 40 + "a" + ")" * 40, "(?=a)")],
)  # fmt: skip
def test_many_lookarounds_cost_a_pass_each(regex, same):
    """Each lookaround is one pass over the name: the characters read are the name's length
    times one more than the lookarounds, the NFA states visited at most a small multiple of
    the name's length times the NFA's size; each answer is `re`'s on a regex of the same
    language (`re` backtracks exponentially on some of these)."""
    name = ("ab." * 200)[:512]
    looks = sum(regex.count(look) for look in ("(?=", "(?!", "(?<=", "(?<!"))
    for mine, theirs in ((_regex.fullmatch, re.fullmatch), (_regex.match, re.match),
                         (_regex.search, re.search)):  # fmt: skip
        _regex._MATCHERS.clear()
        _regex.Work.visits = _regex.Work.steps = 0
        assert mine(regex, name) == (theirs(same, name) is not None)
        assert _regex.Work.steps <= (len(name) + 1) * (1 + looks)
        assert _regex.Work.visits <= 4 * (len(name) + 1) * _regex.compiled(regex).size


def test_a_character_test_keeps_a_bounded_number_of_verdicts():
    """A class tested against thousands of distinct characters (a hostile name's) keeps at
    most `CACHED_VERDICTS` verdicts, and answers as `re` throughout; a plain literal keeps
    none (it compares)."""
    test = _regex._CharTest(_regex._regex_parser.parse(r"[\w-]")[0], re.UNICODE)
    literal = _regex._CharTest(_regex._regex_parser.parse("q")[0], re.UNICODE)
    for code in range(0x4E00, 0x4E00 + 3000, 7):
        char = chr(code)
        assert test(char) == (re.fullmatch(r"[\w-]", char) is not None)
        assert len(test.verdicts) <= _regex.CACHED_VERDICTS
        assert not literal(char)
    assert literal("q") and not literal.verdicts
LLAMA_NAMES = [f"model.layers.{i}.{part}" for i in (0, 7, 31)
               for part in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")]
LLAMA_NAMES += ["lm_head", "model.embed_tokens", "base_model.model.model.layers.12.mlp.up_proj"]
REAL = [r".*\.(q_proj|v_proj)", r"^(?!.*lm_head).*", r"q_proj|v_proj",
        r"(.*\.)?(layers\.\d+\.self_attn\.q_proj)$", r"(^|.*\.)lm_head($|\..*)"]  # fmt: skip
"""Regexes of real configs: `target_modules`, and PEFT's wrappings of a `rank_pattern` key
and of a `modules_to_save` entry (matched with `re.match`, not searched)."""
HOSTILE_LONG = [(r"(a|aa)*c", "a" * 45), (r"(.*)*x", "a" * 512), (r"(?:a?){4090}b", "a" * 40),
                (r"(.*\.)?(.*.*.*.*.*.*x)$", "a." * 150), ("(a|a)" * 30, "a" * 30),
                (r"(a+)+b", "a" * 40), (r".*.*.*.*.*.*x", "ab" * 60)]  # fmt: skip


def _run(matcher: Callable[..., object], *args: object) -> tuple[object, bool]:
    """`matcher(*args)`, and whether it ran a DFA (it read characters: `Work.steps`)."""
    _regex.Work.steps = 0
    found = matcher(*args)
    return found, _regex.Work.steps > 0


MATCHERS = [(_regex.fullmatch, re.fullmatch), (_regex.match, re.match),
            (_regex.search, re.search)]  # fmt: skip


def test_real_patterns_are_matched_by_re_and_hostile_ones_by_the_dfa():
    """The regexes of real configs (`REAL`) are matched by `re` itself on real module names,
    with `fullmatch`, `match`, `first_match` (and `search`, the `target_modules`); hostile
    ones on long names, on which `re` backtracks for seconds to hours, by the DFA. The
    answers are `re`'s (on the hostile ones, of regexes of the same language)."""
    for i, regex in enumerate(REAL):
        for name in LLAMA_NAMES:
            for mine, theirs in MATCHERS[: 3 if i < 3 else 2]:
                expected = theirs(regex, name) is not None
                assert _run(mine, regex, name) == (expected, False), (mine, regex, name)
            expected = 0 if re.match(regex, name) else None
            assert _run(_regex.first_match, (regex,), name) == (expected, False)
    same = {r"(a|aa)*c": r"a*c", r"(.*)*x": r".*x", r"(?:a?){4090}b": r"a{0,4090}b",
            r"(.*\.)?(.*.*.*.*.*.*x)$": r".*x\n?", "(a|a)" * 30: "a{30}", r"(a+)+b": "a+b",
            r".*.*.*.*.*.*x": ".*x"}  # fmt: skip
    for regex, name in HOSTILE_LONG:
        limits = [_regex._matcher(regex).re_limit(search) for search in (False, True)]
        assert max(limits) < len(name)  # checked first: `re` would not answer
        for mine, theirs in MATCHERS:
            expected = theirs(same[regex], name) is not None
            assert _run(mine, regex, name) == (expected, True), (mine, regex)
        expected = 0 if re.match(same[regex], name) else None
        assert _run(_regex.first_match, (regex,), name) == (expected, True)


def test_a_short_name_is_matched_by_re_where_its_bound_is_small():
    """`(a|aa)*c`, exponential in `re`, is matched by `re` itself on a short name, by the DFA
    on a longer one; `(.*)*x`, whose backtracking this bound does not model, always by the
    DFA."""
    assert _run(_regex.fullmatch, r"(a|aa)*c", "aaaaac") == (True, False)
    assert _run(_regex.fullmatch, r"(a|aa)*c", "a" * 30 + "c") == (True, True)
    assert _run(_regex.fullmatch, r"(.*)*x", "ax") == (True, True)


class _Backtracker:
    """A backtracking matcher over `re`'s parse of a regex (no flags; literals, `.`,
    classes of literals and ranges, `^ $ \\A \\Z \\b \\B`, groups, alternatives, greedy and
    lazy repeats, lookaheads and lookbehinds) that tries every way through the regex,
    whatever order `re` would take, counting its steps: one for each item entered (and each
    item of a class it tests), each repeat iteration attempted and ended, each alternative
    tried and ended, each way that reaches the regex's end; and two per group of the regex
    (`groups`: its start and end marks) where `re` saves the group marks to restore them on
    backtracking (each alternative tried, each repeat iteration attempted, each negative
    lookaround entered: `re` copies the marks set so far there)."""

    def __init__(self, text: str, limit: int, groups: int) -> None:
        self.text, self.limit, self.steps, self.marks = text, limit, 0, 2 * groups

    def ends(self, items: list, pos: int) -> Iterator[int]:
        """Each position at which a way through `items` from `pos` ends."""
        if not items:
            self.steps += 1
            yield pos
            return
        for middle in self.item(*items[0], pos):
            yield from self.ends(items[1:], middle)

    def char(self, op: object, argument: object, char: str) -> bool:
        if op in (_ops.LITERAL, _ops.NOT_LITERAL):
            return (char == chr(argument)) == (op is _ops.LITERAL)
        if op is _ops.ANY:
            return char != "\n"
        assert op is _ops.IN
        negate = argument[0][0] is _ops.NEGATE
        found = False
        for kind, value in argument[negate:]:
            self.steps += 1
            if kind is _ops.LITERAL:
                found |= char == chr(value)
            else:
                found |= value[0] <= ord(char) <= value[1]
        return found != negate

    def at(self, code: object, pos: int) -> bool:
        text = self.text
        word = [pos > 0 and (text[pos - 1].isalnum() or text[pos - 1] == "_"),
                pos < len(text) and (text[pos].isalnum() or text[pos] == "_")]  # fmt: skip
        return {
            _ops.AT_BEGINNING: pos == 0, _ops.AT_BEGINNING_STRING: pos == 0,
            _ops.AT_END: pos == len(text) or (pos == len(text) - 1 and text[pos] == "\n"),
            _ops.AT_END_STRING: pos == len(text), _ops.AT_BOUNDARY: word[0] != word[1],
            _ops.AT_NON_BOUNDARY: word[0] == word[1] and text != "",  # none in ""
        }[code]  # fmt: skip

    def item(self, op: object, argument: object, pos: int) -> Iterator[int]:
        self.steps += 1
        assert self.steps <= self.limit, "more steps than the bound"
        if op in (_ops.LITERAL, _ops.NOT_LITERAL, _ops.ANY, _ops.IN):
            if pos < len(self.text) and self.char(op, argument, self.text[pos]):
                yield pos + 1
        elif op is _ops.AT:
            if self.at(argument, pos):
                yield pos
        elif op is _ops.SUBPATTERN:
            yield from self.ends(list(argument[3]), pos)
        elif op is _ops.BRANCH:
            for branch in argument[1]:
                self.steps += 1 + self.marks
                yield from self.ends(list(branch), pos)
        elif op in (_ops.MAX_REPEAT, _ops.MIN_REPEAT):
            yield from self.repeat(*argument, pos, 0, -1)
        else:
            assert op in (_ops.ASSERT, _ops.ASSERT_NOT), op
            direction, body = argument
            self.steps += self.marks if op is _ops.ASSERT_NOT else 0
            start = pos if direction > 0 else pos - _regex_parser.SubPattern(
                _regex_parser.State(), list(body)).getwidth()[0]  # fmt: skip
            held = start >= 0 and any([True for _ in self.ends(list(body), start)])
            if held != (op is _ops.ASSERT_NOT):
                yield pos

    def repeat(
        self, low: int, high: int, body: list, pos: int, count: int, last: int
    ) -> Iterator[int]:
        """Each end of `body` repeated from `count` times (done, the last from `last`) to
        `low`…`high` times: past `low`, not again after an iteration that matched nothing
        (`re`'s guard against looping on the empty string)."""
        self.steps += 1
        if count >= low:
            yield pos
        if count < high and (count < low or pos != last):
            self.steps += 1 + self.marks
            for middle in self.ends(list(body), pos):
                yield from self.repeat(low, high, body, middle, count + 1, pos)

    def matches(self, items: list, start: int) -> bool:
        return any([True for _ in self.ends(items, start)])


backtracked = st.recursive(
    st.sampled_from(["a", "b", ".", "[ab]", "[^a]", "[a-b_]", "_", r"\.", "^", "$", r"\A",
                     r"\Z", r"\b", r"\B"]),
    lambda inner: st.one_of(
        st.tuples(inner, inner).map("".join),
        st.tuples(inner, inner).map("|".join),
        inner.map("({})".format),
        st.tuples(inner, st.sampled_from(REPEATS), st.booleans()).map(
            lambda p: f"(?:{p[0]}){p[1]}{'?' if p[2] else ''}"
        ),
        st.tuples(st.sampled_from(["=", "!"]), inner).map(lambda p: f"(?{p[0]}{p[1]})"),
        st.tuples(st.sampled_from(["<=", "<!"]), st.sampled_from(["a", "[ab]", "a.", r"\b"])).map(
            lambda p: f"(?{p[0]}{p[1]})"
        ),
    ),
    max_leaves=8,
)


def _bounds(pattern: str, text: str) -> tuple[int, int] | None:
    """The bounds (`_re_work`) of `pattern` on `text` with one start and with every start;
    None where `re` does not compile it or it has no bound."""
    try:
        parsed = _regex_parser.parse(pattern)
        re.compile(pattern)
    except re.error:
        return None
    tree = _regex._re_tree(parsed)
    if tree is None:
        return None
    return tuple(_regex._re_work(tree, len(text), search, 10**30) for search in (False, True))


def _check_bound(pattern: str, text: str, bounds: tuple[int, int]) -> None:
    """`_Backtracker` against `re` and within `bounds`, with one start and with every
    start."""
    items, compiled = list(_regex_parser.parse(pattern)), re.compile(pattern)
    first = _Backtracker(text, bounds[0], compiled.groups)
    assert first.matches(items, 0) == (compiled.match(text) is not None)
    every = _Backtracker(text, bounds[1], compiled.groups)
    found = [every.matches(items, start) for start in range(len(text) + 1)]
    assert any(found) == (compiled.search(text) is not None)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(backtracked, st.text("ab_.\n", max_size=9))
def test_the_bound_is_an_upper_bound_of_backtracking(pattern, text):
    """A matcher that backtracks through every way (`_Backtracker`, at least `re`'s work on
    any order of trying them) takes at most the steps the bound (`_re_work`) gives, with one
    start (`match`) and with every start (`search`); its answers are `re`'s."""
    bounds = _bounds(pattern, text)
    assume(bounds is not None and bounds[0] < 10**5)
    _check_bound(pattern, text, bounds)


@pytest.mark.parametrize(
    ("pattern", "text"),
    [("(?:a|a)(?:a|a)(?:a|a)(?:a|a)(?:a|a)b", "aaaaa"), ("(?:a|aa)*c", "a" * 9),
     ("(?:a+)+b", "a" * 4), (".*.*.*.*x", "a" * 8), ("(?:a|a){6}", "a" * 6),
     ("(?:(?:a|a)(?:a|a)){2,3}?b", "a" * 6), ("(?=(?:a|aa)*c)", "a" * 9),
     ("(?:a|a)*(?<=a)(?!(?:a|a)*c)", "a" * 5), ("(?:(?:ab|a)(?:ba|b))*", "ab" * 4 + "c"),
     ("(?:a|aa)*" + "(?!b)" * 100 + "c", "a" * 9),  # many ways on, each costly
     ("()" * 40 + "(?:" + "(?!b)" * 40 + "a)*c", "a" * 6),  # marks copied at each (?!b)
     ("()" * 40 + "(?:ab)*c", "ab" * 6)],  # two marks a group copied at each iteration
)  # fmt: skip
def test_the_bound_holds_where_re_backtracks_most(pattern, text):
    """`test_the_bound_is_an_upper_bound_of_backtracking` on regexes and names where `re`
    backtracks through many ways: nested repeats, repeated alternatives."""
    bounds = _bounds(pattern, text)
    assert bounds is not None and bounds[0] < 10**6
    _check_bound(pattern, text, bounds)


def test_a_deeply_nested_regex_is_answered_from_deep_in_the_stack():
    """A regex nested 300 groups deep, made at the top of the stack and first matched from
    deep within it, where walking it again for its bound overflows: the DFA answers."""
    regex = "(" * 300 + "a" + ")" * 300
    _regex._MATCHERS.clear()
    _regex.compiled(regex)

    def deep(levels: int) -> bool:
        return _regex.fullmatch(regex, "a") if levels == 0 else deep(levels - 1)

    assert deep(sys.getrecursionlimit() - 250)
