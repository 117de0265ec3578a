"""Matching of Python regexes with exactly `re`'s answer in bounded time: linear in the
name's length, or by `re` itself where a bound on its backtracking is small.

`re` backtracks: on some patterns (`(a|aa)*c`, `(.*)*x`) it takes time exponential in the
string's length, with no limit. Whether a regex matches a string is the same question
whichever way the matcher walks the pattern (greedy or lazy repeats, the order of
alternatives change which match `re` reports, not whether there is one), so here a regex
is parsed by `re`'s own parser, turned into a Thompson NFA and run as a DFA built lazily,
one state (a set of NFA states) at a time, its transitions cached (RE2's approach): each
character of the name costs one cached step, or on a miss a pass over the NFA, so
matching takes time linear in the name's length times the NFA's size.

The answer is `re`'s exactly because the pieces are `re`'s: each single-character item
(a literal, a class, `.`, a category) is tested by `re` itself, compiled alone with its
effective flags (`IGNORECASE` with Unicode case folding, `ASCII`, `DOTALL`, scoped
`(?i:…)`); each zero-width assertion (`^ $ \\A \\Z \\b \\B`) is a predicate of the
position, held where `re` finds it in the whole name (`\\A`, `\\Z`, and `^`, `$` outside
`MULTILINE`, at the ends, as `re` defines them); a lookahead or lookbehind is a predicate
computed for every position in one pass of its own automaton (a lookahead's reversed,
right to left). The DFA's transitions are keyed by the predicates that hold at the
position.

Where `re` itself is quick, it answers (in C, 5–30× faster than the DFA stepped in
Python): from the parsed regex a bound on the steps of `re`'s backtracking (the operations
of its engine: items entered, characters and class items tested, marks saved where it may
backtrack) on a name of `n` characters is computed (`_paths_and_work`, checked in the tests
against a backtracker that tries every way; the ways through a sequence multiply,
through alternatives add up, through a repeat of a body of `p` ways add up to `Σ pᵏ` over
the iterations the name's length allows, `n + 1` for `.*`; a lookaround is atomic; `search`
tries `n + 1` starts), and a name is handed to `re` where the bound is at most `RE_STEPS`
(≈ a few milliseconds), else to the DFA; a repeat without end of a body that can match
the empty string (`(.*)*`) always goes to the DFA. The longest name `re` takes is found
once per regex, so the choice costs a comparison per name; real patterns
(`.*\\.(q_proj|v_proj)`, PEFT's `(.*\\.)?(key)$`) are handed to `re` on names of 150 to
4,096 characters, hostile ones (`(a|aa)*c`: exponential in `re`) on a dozen at most.

Refused (`RegexError`), as no linear-time matcher answers them exactly: backreferences
(`\\1`, `(?P=name)`), conditionals (`(?(1)…|…)`), atomic groups (`(?>…)`) and
possessive repeats (`*+`); and an NFA of more than `MAX_STATES` states (counted repeats
`{m,n}` expand into `n` copies).
"""

from __future__ import annotations

import re
import sys
import threading
from collections.abc import Callable, Sequence

if sys.version_info >= (3, 11):
    from re import _compiler as _regex_compiler
    from re import _constants as _ops
    from re import _parser as _regex_parser
else:  # the same modules under their old names
    import sre_compile as _regex_compiler
    import sre_constants as _ops
    import sre_parse as _regex_parser

MAX_STATES = 2**13
"""The most NFA states a regex may need (its lookaheads and lookbehinds included): about
one per character, enough for a regex listing module names as long as
`lowrank._checks.MAX_PATTERN_LENGTH`; a counted repeat `x{m,n}` takes `n` copies of `x`.
The time to match a name is at most about its length times this many steps."""
CACHE_BUDGET = 2**18
"""NFA states that one matcher's cached DFA states and transitions may hold together before
they are flushed (rebuilt on demand, as RE2 does)."""


class RegexError(ValueError):
    """A regex this module does not match: not one `re` compiles, one holding a construct
    with no exact linear-time matching, one too large, or (`layer_index`) one whose answer
    is ambiguous. The message completes a sentence naming the regex."""


class Work:
    """The matcher's work, counted for tests that bound it: `steps`, characters read by DFA
    runs; `visits`, NFA states visited building DFA states and transitions on cache
    misses."""

    steps = 0
    visits = 0


_CHAR, _SPLIT, _ASSERT, _MATCH = range(4)  # the kinds of NFA state
_SINGLE = frozenset((_ops.LITERAL, _ops.NOT_LITERAL, _ops.ANY, _ops.IN, _ops.CATEGORY))
_REPEATS = frozenset((_ops.MAX_REPEAT, _ops.MIN_REPEAT))
_UNSUPPORTED = {
    _ops.GROUPREF: "a backreference (\\1, (?P=name))",
    _ops.GROUPREF_EXISTS: "a conditional ((?(1)…|…))",
    **{
        getattr(_ops, name): what
        for name, what in (("ATOMIC_GROUP", "an atomic group ((?>…))"),
                           ("POSSESSIVE_REPEAT", "a possessive repeat (*+, ++, ?+, {m,n}+)"))
        if hasattr(_ops, name)  # new in Python 3.11
    },
}  # fmt: skip
_TYPE_FLAGS = re.ASCII | re.LOCALE | re.UNICODE
_DEAD = frozenset()
_ACCEPTED = frozenset((-1,))  # a run that has matched already (`match`, `search`)
_STOPS = frozenset((_DEAD, _ACCEPTED))


def _combined(flags: int, added: int, removed: int) -> int:
    """The flags inside a group `(?added-removed:…)` within `flags`, as `re` combines them:
    a type flag added (`a`, `u`, `L`) replaces the type flag in force."""
    if added & _TYPE_FLAGS:
        flags &= ~_TYPE_FLAGS
    return (flags | added) & ~removed


def _compile_one(item: tuple, flags: int) -> re.Pattern:
    """`re`'s compiled pattern of the one parsed `item` under `flags`."""
    state = _regex_parser.State()
    state.flags = flags
    return _regex_compiler.compile(_regex_parser.SubPattern(state, [item]), 0)


class _Cache:
    """Values by key, the newest last, at most `limit` in total `cost` (the oldest dropped
    first). Two threads may match at once: it is changed under a lock."""

    def __init__(self, limit: int, cost: Callable[[object], int]) -> None:
        self.limit, self.cost = limit, cost
        self._values: dict[object, object] = {}
        self._held = 0
        self._lock = threading.Lock()

    def get(self, key: object) -> object:
        """The value of `key`, now the newest; `_MISSING` where there is none."""
        with self._lock:
            value = self._values.pop(key, _MISSING)
            if value is not _MISSING:
                self._values[key] = value
            return value

    def put(self, key: object, value: object) -> None:
        """Keeps `value` as `key`'s, the newest, dropping the oldest beyond `limit`."""
        cost = self.cost(value)
        with self._lock:
            old = self._values.pop(key, _MISSING)
            if old is not _MISSING:
                self._held -= self.cost(old)
            while self._values and self._held + cost > self.limit:
                self._held -= self.cost(self._values.pop(next(iter(self._values))))
            self._values[key] = value
            self._held += cost

    def clear(self) -> None:
        with self._lock:
            self._values.clear()
            self._held = 0


_MISSING = object()


CACHED_VERDICTS = 2**8
"""The verdicts one `_CharTest` keeps (then forgets them all): with `CACHED_TESTS` tests,
at most about 2²⁰ in all, whatever characters hostile names hold."""


class _CharTest:
    """Whether a character matches one single-character item (a literal, a class, `.`, a
    category) under its flags, as `re` decides (compiled on first use), each verdict
    cached; a literal without `IGNORECASE` is the one character it names, compared."""

    def __init__(self, item: tuple, flags: int) -> None:
        self.item, self.flags = item, flags
        self.pattern: re.Pattern | None = None
        self.verdicts: dict[str, bool] = {}
        exact = item[0] is _ops.LITERAL and not flags & re.IGNORECASE
        self.exact = chr(item[1]) if exact else None

    def __call__(self, char: str) -> bool:
        if self.exact is not None:
            return char == self.exact
        verdict = self.verdicts.get(char)
        if verdict is None:
            if self.pattern is None:
                self.pattern = _compile_one(self.item, self.flags)
            verdict = self.pattern.fullmatch(char) is not None
            if len(self.verdicts) >= CACHED_VERDICTS:
                self.verdicts.clear()
            self.verdicts[char] = verdict
        return verdict


CACHED_TESTS = 2**12
_TESTS = _Cache(CACHED_TESTS, lambda _: 1)
"""The `_CharTest`s made last by their items and flags, shared by all regexes (the same
literals and classes recur in a config's regexes)."""


def _char_test(op: object, argument: object, flags: int) -> _CharTest:
    """The `_CharTest` of the single-character item `(op, argument)` under `flags`."""
    key = (op, tuple(argument) if op is _ops.IN else argument, flags)
    test = _TESTS.get(key)
    if test is _MISSING:
        test = _CharTest((op, argument), flags)
        _TESTS.put(key, test)
    return test


class _Anchor:
    """A zero-width assertion (`^ $ \\A \\Z \\b \\B`) under its flags: the positions of a
    text where it holds, found by `re` itself (those of `\\A`, `\\Z`, and of `^` and `$`
    outside `MULTILINE`, written out: the start; the end, and for `$` before a final
    newline)."""

    def __init__(self, code: object, flags: int) -> None:
        self.pattern = _compile_one((_ops.AT, code), flags)
        multiline = flags & re.MULTILINE
        self.kind = {
            _ops.AT_BEGINNING_STRING: "start", _ops.AT_END_STRING: "end",
            _ops.AT_BEGINNING: None if multiline else "start",
            _ops.AT_END: None if multiline else "end or final newline",
        }.get(code)  # fmt: skip

    def positions(self, text: str) -> list[int]:
        if self.kind == "start":
            return [0]
        if self.kind == "end":
            return [len(text)]
        if self.kind is not None:
            return [len(text) - 1, len(text)] if text.endswith("\n") else [len(text)]
        return [found.start() for found in self.pattern.finditer(text)]


class _Budget:
    """The NFA states a regex may still add (`MAX_STATES` in all, or `regexes` times it for
    an automaton of that many regexes run together, each within `MAX_STATES`: its time per
    name is then at most theirs one after another; and at most `CACHED_STATES`, the memory
    it may hold)."""

    def __init__(self, regexes: int = 1) -> None:
        self.left = min(MAX_STATES * regexes, max(MAX_STATES, CACHED_STATES))


class _Program:
    """A Thompson NFA of parsed regex items, matching left to right, or right to left with
    `reverse` (the items' order reversed: a lookahead's body is run so); its states are
    `kind[i]` (`_CHAR`: consumes a character `arg[i]` accepts, then `out[i]`; `_SPLIT`:
    goes to each of `out[i]`; `_ASSERT`: goes to `out[i]` where predicate `arg[i]` holds;
    `_MATCH`), its start `start`, its `predicates` (`_Anchor`s, `_Look`s)."""

    def __init__(
        self, parts: Sequence[tuple[Sequence, int]], reverse: bool, budget: _Budget
    ) -> None:
        self.kind: list[int] = []
        self.arg: list[object] = []
        self.out: list[object] = []
        self.predicates: list[_Anchor | _Look] = []
        self._anchors: dict[tuple[object, int], int] = {}
        self._budget = budget
        starts = [
            self._build(items, flags, self._add(_MATCH, tag, None), reverse)
            for tag, (items, flags) in enumerate(parts)
        ]
        self.start = starts[0] if len(starts) == 1 else self._add(_SPLIT, None, tuple(starts))

    @property
    def size(self) -> int:
        """NFA states, those of its lookaheads and lookbehinds included."""
        return len(self.kind) + sum(p.program.size for p in self.predicates if isinstance(p, _Look))

    def _add(self, kind: int, arg: object, out: object) -> int:
        if self._budget.left <= 0:
            raise RegexError(
                f"needs more than {MAX_STATES} automaton states (a counted repeat x{{m,n}} "
                "takes n copies of x)"
            )
        self._budget.left -= 1
        self.kind.append(kind)
        self.arg.append(arg)
        self.out.append(out)
        return len(self.kind) - 1

    def _build(self, items: Sequence, flags: int, after: int, reverse: bool) -> int:
        """The start of `items` (parsed), each then `after`."""
        for op, argument in list(items) if reverse else list(items)[::-1]:
            after = self._item(op, argument, flags, after, reverse)
        return after

    def _item(self, op: object, argument: object, flags: int, after: int, reverse: bool) -> int:
        if op in _SINGLE:
            return self._add(_CHAR, _char_test(op, argument, flags), after)
        if op is _ops.BRANCH:
            starts = tuple(self._build(b, flags, after, reverse) for b in argument[1])
            return self._add(_SPLIT, None, starts)
        if op is _ops.SUBPATTERN:  # (group, flags added, flags removed, body)
            _, added, removed, body = argument
            return self._build(body, _combined(flags, added, removed), after, reverse)
        if op in _REPEATS:  # greedy or lazy alike: the same strings match
            return self._repeat(*argument, flags, after, reverse)
        if op is _ops.AT:
            return self._add(_ASSERT, self._anchor(argument, flags), after)
        if op is _ops.FAILURE:  # (?!) or (?<!) (Python 3.13 parses them so): no way on
            return self._add(_SPLIT, None, ())
        if op in (_ops.ASSERT, _ops.ASSERT_NOT):  # (direction, body)
            direction, body = argument
            look = _Look(body, flags, direction > 0, op is _ops.ASSERT_NOT, self._budget)
            self.predicates.append(look)
            return self._add(_ASSERT, len(self.predicates) - 1, after)
        what = _UNSUPPORTED.get(op, f"the construct {op}")
        raise RegexError(
            f"holds {what}, which no matcher answers exactly in time linear in the name's "
            "length; write the regex without it"
        )

    def _repeat(
        self, low: int, high: int, body: Sequence, flags: int, after: int, reverse: bool
    ) -> int:
        """`body{low,high}` then `after`: `low` copies, then `high − low` optional ones
        (`x(x)?` nested), or one looping copy for an unbounded `high`."""
        if high == _ops.MAXREPEAT:
            loop = self._add(_SPLIT, None, ())
            first = self._build(body, flags, loop, reverse)
            self.out[loop] = (first, after)
            after = loop if low == 0 else first
            low = max(low - 1, 0)
        else:
            end = after
            for _ in range(high - low):
                after = self._add(_SPLIT, None, (self._build(body, flags, after, reverse), end))
        for _ in range(low):
            after = self._build(body, flags, after, reverse)
        return after

    def _anchor(self, code: object, flags: int) -> int:
        """The index of the predicate of assertion `code` under `flags` (one per kind)."""
        key = (code, flags)
        if key not in self._anchors:
            self.predicates.append(_Anchor(code, flags))
            self._anchors[key] = len(self.predicates) - 1
        return self._anchors[key]

    def masks(self, text: str) -> dict[int, int]:
        """`{position: the predicates holding there as bits}` (bit `k`: `predicates[k]`)
        for each position of `text` (0 to `len(text)`) where one holds."""
        masks: dict[int, int] = {}
        for bit, predicate in enumerate(self.predicates):
            for i in predicate.positions(text):
                masks[i] = masks.get(i, 0) | 1 << bit
        return masks

    def closure(self, kernel: frozenset[int], mask: int) -> tuple[tuple, frozenset[int]]:
        """The states reached from `kernel` without reading a character at a position where
        the predicates `mask` holds: `(((test, next states), …), the parts matched)`, the
        character states grouped by their test, the parts (of `parts`) by their index."""
        kind, arg, out = self.kind, self.arg, self.out
        seen, stack, chars = set(kernel), list(kernel), []
        pop, push, add = stack.pop, stack.append, seen.add
        matched = []
        while stack:
            state = pop()
            what = kind[state]
            if what == _SPLIT:
                for nxt in out[state]:
                    if nxt not in seen:
                        add(nxt)
                        push(nxt)
            elif what == _CHAR:
                chars.append(state)
            elif what == _ASSERT:
                nxt = out[state]
                if mask >> arg[state] & 1 and nxt not in seen:
                    add(nxt)
                    push(nxt)
            else:
                matched.append(arg[state])
        by_test: dict[Callable[[str], bool], list[int]] = {}
        for state in chars:
            by_test.setdefault(arg[state], []).append(out[state])
        Work.visits += len(seen)
        tests = tuple((test, tuple(states)) for test, states in by_test.items())
        return tests, frozenset(matched) if matched else _DEAD


class _State:
    """A DFA state: a set of NFA states (`kernel`, before its closure), its transitions
    (`next`: the state after a character, keyed by the character where no predicate holds,
    else by `(mask, character)`) and its closures by mask (`closures`)."""

    __slots__ = ("closures", "kernel", "next")

    def __init__(self, kernel: frozenset[int]) -> None:
        self.kernel = kernel
        self.next: dict[object, _State] = {}
        self.closures: dict[int, tuple[tuple, frozenset[int]]] = {}


class _Dfa:
    """`program` run as a DFA built lazily: its states are sets of NFA states (`_State`),
    its transitions cached per (state, predicates holding, character). Anchored at the
    start position, or not (`search`: the start state joins every state); with
    `collapse`, a state whose closure matches steps to the state `_ACCEPTED` (`match`,
    `search`: the answer is known). The cache holds at most `CACHE_BUDGET` NFA states and
    transitions; beyond, it is emptied (a run goes on from the states it holds). The states
    `dead` and `accepted` outlive a flush: runs recognize them by identity."""

    def __init__(self, program: _Program, anchored: bool, collapse: bool) -> None:
        self.program, self.anchored, self.collapse = program, anchored, collapse
        self.dead, self.accepted = _State(_DEAD), _State(_ACCEPTED)
        self._flush()

    def _flush(self) -> None:
        self._states: dict[frozenset[int], _State] = {_DEAD: self.dead, _ACCEPTED: self.accepted}
        self._held = 2
        self.start = self._state(frozenset((self.program.start,)))

    def _state(self, kernel: frozenset[int]) -> _State:
        """The state of `kernel`, made on first use."""
        state = self._states.get(kernel)
        if state is None:
            self._held += 1 + len(kernel)
            if self._held > CACHE_BUDGET:
                self._flush()
            state = self._states[kernel] = _State(kernel)
        return state

    def _closure(self, state: _State, mask: int) -> tuple[tuple, frozenset[int]]:
        found = state.closures.get(mask)
        if found is None:
            found = state.closures[mask] = self.program.closure(state.kernel, mask)
            self._held += 1 + sum(len(states) for _, states in found[0])
        return found

    def _next(self, state: _State, mask: int, char: str) -> _State:
        """The state after `state` reads `char` at a position where `mask` holds."""
        tests, accept = self._closure(state, mask)
        if accept and self.collapse:
            kernel = _ACCEPTED
        else:
            reached = {self.program.start} if not self.anchored else set()
            for test, states in tests:
                if test(char):
                    reached.update(states)
            Work.visits += len(tests) + len(reached)
            kernel = frozenset(reached)
        self._held += 1  # the transition
        if self._held > CACHE_BUDGET:
            self._flush()
        following = state.next[(mask, char) if mask else char] = self._state(kernel)
        return following

    def _verdict(self, state: _State, mask: int) -> bool:
        """Whether a run that ends in `state` at a position where `mask` holds matches."""
        if state.kernel in _STOPS:
            return bool(state.kernel)
        return bool(self._closure(state, mask)[1])

    def accepts(self, text: str) -> bool:
        """Whether the run over `text` matches: at its end, or (`collapse`) anywhere."""
        masks = self.program.masks(text)
        Work.steps += len(text)
        state, dead, accepted = self.start, self.dead, self.accepted
        end, start = len(text), 0
        for stop in [*sorted(i for i in masks if i < end), end]:
            for char in text[start:stop]:  # where no predicate holds
                nxt = state.next.get(char)
                state = self._next(state, 0, char) if nxt is None else nxt
                if state is dead or state is accepted:
                    return self._verdict(state, 0)
            if stop == end:
                break
            mask, char = masks[stop], text[stop]
            nxt = state.next.get((mask, char))
            state = self._next(state, mask, char) if nxt is None else nxt
            if state is dead or state is accepted:
                return self._verdict(state, 0)
            start = stop + 1
        return self._verdict(state, masks.get(end, 0))

    def hits(self, text: str, masks: dict[int, int], start: int = 0) -> list[int]:
        """The positions of `text` (from `start`) at which the run from `start` matches,
        `masks` the predicates holding at each position (`_Program.masks`)."""
        Work.steps += len(text) - start
        state, dead, found = self.start, self.dead, []
        for i in range(start, len(text) + 1):
            mask = masks.get(i, 0)
            if (state.closures.get(mask) or self._closure(state, mask))[1]:
                found.append(i)
            if i == len(text) or state is dead:
                break
            char = text[i]
            nxt = state.next.get((mask, char) if mask else char)
            state = self._next(state, mask, char) if nxt is None else nxt
        return found

    def final(self, text: str, masks: dict[int, int], start: int) -> frozenset[int]:
        """The parts matched at the end of `text` by the run from `start` (none where it
        dies before)."""
        Work.steps += len(text) - start
        state, dead = self.start, self.dead
        for i in range(start, len(text)):
            mask, char = masks.get(i, 0), text[i]
            nxt = state.next.get((mask, char) if mask else char)
            state = self._next(state, mask, char) if nxt is None else nxt
            if state is dead:
                return _DEAD
        return self._closure(state, masks.get(len(text), 0))[1]


class _Look:
    """A lookahead (`ahead`) or lookbehind, positive or `negate`d: the positions of a text
    where it holds, from one unanchored pass of its body's automaton (a lookahead's
    reversed, over the reversed text: it holds where its body matches a part starting
    there; a lookbehind where its body, of one width in `re`, matches a part ending
    there)."""

    def __init__(
        self, body: Sequence, flags: int, ahead: bool, negate: bool, budget: _Budget
    ) -> None:
        self.ahead, self.negate = ahead, negate
        self.program = _Program([(body, flags)], ahead, budget)
        self.dfa = _Dfa(self.program, anchored=False, collapse=False)

    def positions(self, text: str) -> list[int]:
        masks = self.program.masks(text)
        if self.ahead:
            end = len(text)
            reversed_masks = {end - i: mask for i, mask in masks.items()}
            hits = [end - i for i in self.dfa.hits(text[::-1], reversed_masks)]
        else:
            hits = self.dfa.hits(text, masks)
        if not self.negate:
            return hits
        held = set(hits)
        return [i for i in range(len(text) + 1) if i not in held]


def _parse(regex: str) -> _regex_parser.SubPattern:
    """`regex` parsed by `re`, once `re` has compiled it (`RegexError` otherwise)."""
    try:
        re.compile(regex)
        return _regex_parser.parse(regex)
    except (re.error, OverflowError, RecursionError) as err:  # a{10**11}; nested too deep
        raise RegexError(f"is not a valid regular expression: {err}") from None


def _program(items: Sequence, flags: int, reverse: bool = False) -> _Program:
    try:
        return _Program([(items, flags)], reverse, _Budget())
    except RecursionError:
        raise RegexError("nests groups too deeply to be matched") from None


def _end_anchored(regex: str) -> tuple[list, int, bool] | None:
    """`(items, flags, newline)` for a regex whose last item (outside any group) is `$`
    (outside `MULTILINE`) or `\\Z`: the items before it, its flags, and whether it also
    holds before a final newline (`$`); None for another regex. Such a regex matches a
    prefix of a name only up to its end (or its final newline)."""
    parsed = _parse(regex)
    items, flags = list(parsed), parsed.state.flags
    if not items or items[-1][0] is not _ops.AT:
        return None
    code = items[-1][1]
    if code is _ops.AT_END_STRING or (code is _ops.AT_END and not flags & re.MULTILINE):
        return items[:-1], flags, code is _ops.AT_END
    return None


class _Backward:
    """End-anchored regexes (`_end_anchored`) as `re.match` matches them, run backwards:
    from the name's end (and its final newline, for those ending in `$`) to its start, each
    regex's items fully matched; the run of a pattern of literal words (PEFT's
    `(.*\\.)?(key)$`) dies within a few characters on most names."""

    def __init__(self, tails: Sequence[tuple[list, int, bool]]) -> None:
        self.newline = [newline for _, _, newline in tails]
        parts = [(items, flags) for items, flags, _ in tails]
        self.program = _Program(parts, True, _Budget(len(parts)))
        self.size = self.program.size
        self.dfa = _Dfa(self.program, anchored=True, collapse=False)

    def matched(self, name: str) -> frozenset[int]:
        """The indices of the regexes that match a prefix of `name`."""
        end = len(name)
        masks = {end - i: mask for i, mask in self.program.masks(name).items()}
        text = name[::-1]
        found = self.dfa.final(text, masks, 0)
        if name.endswith("\n"):
            before = self.dfa.final(text, masks, 1)
            found |= {i for i in before if self.newline[i]}
        return found


RE_STEPS = 10**6
"""The most steps of `re`'s backtracking (`_re_work`: its engine's operations, one a few
nanoseconds) that a bound must admit on a name for `re` itself to match it; beyond, or
where no bound is known, the name is matched by the DFA."""
MAX_RE_LENGTH = 2**12
"""The longest name `re` itself may match (a longer one is matched by the DFA)."""


class _Unbounded(Exception):
    """A construct whose backtracking in `re` has no bound here: a repeat without end of a
    body that can match the empty string (`(a?)*`, `(.*)*`: `re` stops it by comparing
    positions, not modelled here), or a construct outside those `_work_tree` takes."""


def _work_tree(items: Sequence, mark: int) -> tuple[object, int]:
    """`(tree, shortest width)` of parsed `items` for `_paths_and_work`: an int `c` for a
    part with one way through and `c` steps of work; `("seq", parts)`, `("alt", parts,
    mark)`, `("rep", low, high, width, body, mark)`, `("look", body, mark)`, `("fail",)`.
    `mark`: the steps `re` takes at a point it may backtrack to: three, and one per mark of
    a group that it saves there and restores on backtracking (two per group: its start and
    end; copied memory, a step per pointer, as `re` copies all those set).
    Parts of one way through (a group or lookaround around an int) are summed into an int:
    the same bound, walked faster."""
    parts: list[object] = []
    width = 0
    for op, argument in items:
        if op in _SINGLE:  # one step; a class tests its items in turn
            part, part_width = 2 + len(argument) if op is _ops.IN else 1, 1
        elif op is _ops.AT:
            part, part_width = 2, 0
        elif op is _ops.SUBPATTERN:  # marks its start, and its end on each way through
            tree, part_width = _work_tree(argument[3], mark)
            part = 2 + tree if isinstance(tree, int) else ("seq", (1, tree, 1))
        elif op is _ops.BRANCH:
            branches = [_work_tree(branch, mark) for branch in argument[1]]
            part = ("alt", tuple(tree for tree, _ in branches), mark)
            part_width = min(branch_width for _, branch_width in branches)
        elif op in _REPEATS:
            low, high, body = argument
            tree, body_width = _work_tree(body, mark)
            if high == _ops.MAXREPEAT and body_width == 0:
                raise _Unbounded
            part, part_width = ("rep", low, high, body_width, tree, mark), low * body_width
        elif op in (_ops.ASSERT, _ops.ASSERT_NOT):  # an int body: "look" worked out here
            tree, part_width = _work_tree(argument[1], mark)[0], 0
            part = 4 + mark + tree if isinstance(tree, int) else ("look", tree, mark)
        elif op is _ops.FAILURE:
            part, part_width = ("fail",), 0
        else:
            raise _Unbounded
        if isinstance(part, int) and parts and isinstance(parts[-1], int):
            parts[-1] += part
        else:
            parts.append(part)
        width += part_width
    if len(parts) == 1:
        return parts[0], width
    return ("seq", tuple(parts)) if parts else 0, width


def _geometric(base: int, count: int, cap: int) -> int:
    """`base⁰ + … + base^(count−1)`, at most `cap`."""
    if count <= 0:
        return 0
    if base <= 1:
        return min(cap, count if base else 1)
    if count > cap.bit_length():
        return cap
    return min(cap, (base**count - 1) // (base - 1))


def _power(base: int, exponent: int, cap: int) -> int:
    """`base^exponent`, at most `cap`."""
    if base > 1 and exponent > cap.bit_length():
        return cap
    return min(cap, base**exponent)


def _paths_and_work(tree: object, n: int, cap: int) -> tuple[int, int]:
    """`(paths, work)` of `tree` (`_work_tree`) on a name of `n` characters, each at most
    `cap`: from one entry into the part, `re`'s backtracking goes on past it at most
    `paths` times (the rest of the regex is tried once per way through it) and spends at
    most `work` steps within it.

    A sequence: the ways multiply, and each part is entered once per way through those
    before it. Alternatives: the ways add up, each ending in a step. A repeat `{low,high}`
    of a body of `p` ways and `w` characters at least: at most `k = high`, or `n // w`
    where `w > 0`, iterations succeed; the `j`-th is entered `pʲ⁻¹` times (one more
    attempted), `re` decides `Σ_{j≤k} pʲ` times whether to go on (a step saving the marks),
    and the rest is tried after each way through `low` to `k` iterations: `Σ_{low≤j≤k} pʲ`
    ways (a repeat of one character, `.*`, has `n + 1`). A lookahead or lookbehind is
    matched to its end where it is reached, the marks saved around it (`re` copies them
    there for a negative one, within a repeat, however short the body),
    and `re` goes on once (it is atomic)."""
    if isinstance(tree, int):
        return 1, min(cap, tree)
    kind = tree[0]
    if kind == "seq":
        paths, work = 1, 0
        for part in tree[1]:
            part_paths, part_work = _paths_and_work(part, n, cap)
            work = min(cap, work + paths * part_work)
            paths = min(cap, paths * part_paths)
        return paths, work
    if kind == "alt":
        paths, work, mark = 0, 1, tree[2]
        for part in tree[1]:
            part_paths, part_work = _paths_and_work(part, n, cap)
            paths = min(cap, paths + part_paths)
            work = min(cap, work + mark + part_work + part_paths)
        return paths, work
    if kind == "rep":
        _, low, high, width, body, mark = tree
        body_paths, body_work = _paths_and_work(body, n, cap)
        most = high if width == 0 else min(high, n // width)
        entered = _geometric(body_paths, min(high, most + 1), cap)
        decided = _geometric(body_paths, most + 1, cap)
        start = 0 if low > most else _power(body_paths, low, cap)
        paths = min(cap, start * _geometric(body_paths, most - low + 1, cap))
        return paths, min(cap, 3 + entered * (body_work + 1) + decided * (mark + 2) + paths)
    if kind == "look":
        _, body, mark = tree
        body_paths, body_work = _paths_and_work(body, n, cap)
        return 1, min(cap, 3 + mark + body_work + body_paths)
    return 0, 1  # "fail"


def _re_work(tree: object, n: int, search: bool, cap: int) -> int:
    """A bound on the steps of `re`'s backtracking matching regex `tree` (`_work_tree`) on a
    name of `n` characters, at most `cap`: `match` or `fullmatch` (one start), or `search`
    (`n + 1` starts)."""
    paths, work = _paths_and_work(tree, n, cap)
    whole = min(cap, 4 + work + paths)  # setting up; each way through tested at the end
    return min(cap, (n + 1) * (whole + 1)) if search else whole


def _changes_flags(items: Sequence) -> bool:
    """Whether parsed `items` hold a group that changes flags (`(?a:…)`, `(?-i:…)`)."""
    for op, argument in items:
        if op is _ops.SUBPATTERN:
            bodies = [argument[3]] if not (argument[1] or argument[2]) else None
        elif op is _ops.BRANCH:
            bodies = argument[1]
        elif op in _REPEATS:
            bodies = [argument[2]]
        elif op in (_ops.ASSERT, _ops.ASSERT_NOT):
            bodies = [argument[1]]
        else:
            bodies = []
        if bodies is None or any(map(_changes_flags, bodies)):
            return True
    return False


def _re_tree(parsed: _regex_parser.SubPattern) -> object:
    """The `_work_tree` of `parsed`, None where it has none or is nested too deep to be
    walked (from where it is first matched: then `_paths_and_work`, as deep, is not
    reached)."""
    try:
        return _work_tree(parsed, 3 + 2 * (parsed.state.groups - 1))[0]  # less group 0
    except (_Unbounded, RecursionError):
        return None


def _re_limit(parsed: _regex_parser.SubPattern, search: bool) -> int:
    """The longest name (at most `MAX_RE_LENGTH`; −1: none) on which `re` itself matches
    `parsed` within `RE_STEPS` steps by `_re_work`, with `search` or else with `match` or
    `fullmatch` (none with `search` where a group changes flags: `re.search` misses some
    matches there, see `search`)."""
    tree = _re_tree(parsed)
    if tree is None or (search and _changes_flags(parsed)):
        return -1
    if _re_work(tree, MAX_RE_LENGTH, search, RE_STEPS + 1) <= RE_STEPS:
        return MAX_RE_LENGTH  # most real patterns: one walk
    good, bad = -1, MAX_RE_LENGTH  # the work grows with n: bisected
    while bad - good > 1:
        middle = (good + bad) // 2
        if _re_work(tree, middle, search, RE_STEPS + 1) <= RE_STEPS:
            good = middle
        else:
            bad = middle
    return good


class _Matcher:
    """A regex's NFA (`program`) and its DFAs, made on first use: by `(anchored, collapse)`
    (`_Dfa`), backwards where it is end-anchored (`backward`, None where not), and as
    PEFT's layer index regex (`layer`); `re`'s own `pattern`, and the longest names it
    matches (`limits`: with `match` or `fullmatch`, with `search`; None: not found
    yet)."""

    def __init__(self, regex: str) -> None:
        parsed = _parse(regex)
        self.program = _program(parsed, parsed.state.flags)
        self.size = self.program.size
        self.parsed, self.pattern = parsed, re.compile(regex)
        self.limits: list[int | None] = [None, None]
        self.dfas: dict[tuple[bool, bool], _Dfa] = {}
        self.layer: _LayerIndex | None = None
        self.backward: _Backward | bool | None = False  # False: not made yet

    def re_limit(self, search: bool) -> int:
        """The longest name `re` itself matches (`_re_limit`, found on first use), with
        `search` or else with `match` or `fullmatch`."""
        limit = self.limits[search]
        if limit is None:
            limit = self.limits[search] = _re_limit(self.parsed, search)
        return limit

    def dfa(self, anchored: bool, collapse: bool) -> _Dfa:
        found = self.dfas.get((anchored, collapse))
        if found is None:
            found = self.dfas[(anchored, collapse)] = _Dfa(self.program, anchored, collapse)
        return found


CACHED_STATES = 2**18
_MATCHERS = _Cache(CACHED_STATES, lambda matcher: matcher.size)
"""The matchers of the regexes matched last: at most `CACHED_STATES` NFA states in all
(≈ 0.5 KB each with their DFAs' few states: ≈ 130 MB), so that a config's thousands of
`rank_pattern` keys stay compiled."""


def compiled(regex: str) -> _Program:
    """The NFA of `regex` (`_matcher`), or `RegexError` (see the module doc)."""
    return _matcher(regex).program


def _matcher(regex: str) -> _Matcher:
    """`regex`'s `_Matcher`, kept in `_MATCHERS`."""
    found = _MATCHERS.get(regex)
    if found is _MISSING:
        found = _Matcher(regex)
        _MATCHERS.put(regex, found)
    return found


def _dfa(regex: str, anchored: bool, collapse: bool) -> _Dfa:
    return _matcher(regex).dfa(anchored, collapse)


def fullmatch(regex: str, name: str) -> bool:
    """Whether `re.fullmatch(regex, name)` matches (`RegexError` for a regex refused)."""
    matcher = _matcher(regex)
    if len(name) <= matcher.re_limit(False):
        return matcher.pattern.fullmatch(name) is not None
    return matcher.dfa(True, False).accepts(name)


def match(regex: str, name: str) -> bool:
    """Whether `re.match(regex, name)` matches: a prefix of `name` (`_Backward` for an
    end-anchored regex)."""
    matcher = _matcher(regex)
    if len(name) <= matcher.re_limit(False):
        return matcher.pattern.match(name) is not None
    if matcher.backward is False:
        tail = _end_anchored(regex)
        try:
            matcher.backward = None if tail is None else _Backward([tail])
        except RecursionError:  # nested too deep to build again: forwards only
            matcher.backward = None
    if matcher.backward is not None:
        return bool(matcher.backward.matched(name))
    return matcher.dfa(True, True).accepts(name)


def search(regex: str, name: str) -> bool:
    """Whether `re.search(regex, name)` matches: a part of `name` anywhere. (`re.search`
    misses a match where the regex starts with a class under a scoped type flag, `(?a:\\W)`
    on `'é'`, `(?a)(?u:\\w)` on `'é'`: it scans for a first character under the regex's
    global flags, a CPython bug; here, as `re.match` at some position, it matches.)"""
    matcher = _matcher(regex)
    if len(name) <= matcher.re_limit(True):
        return matcher.pattern.search(name) is not None
    return matcher.dfa(False, True).accepts(name)


FEW_REGEXES = 4
"""`first_match` runs at most this many regexes by `re` itself, one after another, where
each admits the name (`_re_limit`): for so few, faster than their backward automaton."""


class _ByRe:
    """Regexes as `re` compiles them (`patterns`), the longest name that each admits
    (`limit`, `_re_limit` with `match`), their NFA states (`size`)."""

    def __init__(self, regexes: Sequence[str]) -> None:
        matchers = [_matcher(regex) for regex in regexes]
        self.patterns = [matcher.pattern for matcher in matchers]
        self.limit = min((matcher.re_limit(False) for matcher in matchers), default=MAX_RE_LENGTH)
        self.size = sum(matcher.size for matcher in matchers)


def _backward(regexes: Sequence[str]) -> _Backward | None:
    """The `_Backward` of `regexes` where all are end-anchored and fit in one automaton."""
    tails = [_end_anchored(regex) for regex in regexes]
    try:
        return _Backward(tails) if None not in tails else None
    except (RegexError, RecursionError):  # too large together
        return None


CACHED_FIRSTS = 16
_FIRSTS = _Cache(
    CACHED_STATES,
    lambda found: max(CACHED_STATES // CACHED_FIRSTS, found.size if found else 0),
)
"""`first_match`'s `_ByRe` or automaton (None: there is none) by their regexes, the last:
at most `CACHED_FIRSTS`, and at most `CACHED_STATES` NFA states in all."""


def first_match(regexes: tuple[str, ...], name: str) -> int | None:
    """The index of the first of `regexes` that `re.match` matches on `name`, None if none:
    by `re` itself where they are at most `FEW_REGEXES` and each admits the name
    (`_re_limit`); else in one backward pass over `name` where all are end-anchored (PEFT's
    `rank_pattern` keys, `(.*\\.)?(key)$`) and need at most `CACHED_STATES` states together;
    else each in turn (`match`)."""
    found = _FIRSTS.get(regexes)
    if found is _MISSING:
        found = _ByRe(regexes) if len(regexes) <= FEW_REGEXES else _backward(regexes)
        _FIRSTS.put(regexes, found)
    if isinstance(found, _ByRe) and len(name) <= found.limit:
        return next((i for i, pattern in enumerate(found.patterns) if pattern.match(name)), None)
    if not isinstance(found, _Backward):
        return next((i for i, regex in enumerate(regexes) if match(regex, name)), None)
    matched = found.matched(name)
    return min(matched) if matched else None


def literal(regex: str) -> tuple[str, bool] | None:
    """`(text, anchored)` where `regex` matches exactly the string `text` and nothing else,
    at the name's start only with `anchored` (a leading `^` outside `MULTILINE`, or `\\A`):
    a run of literal characters (`layers\\.0\\.q_proj`, `re.escape` of a name) with no
    flag that changes them (`IGNORECASE`); None for any other regex (`RegexError` for one
    that is none)."""
    parsed = _parse(regex)
    items, flags = list(parsed), parsed.state.flags
    if flags & re.IGNORECASE:
        return None
    anchored = bool(items) and items[0][0] is _ops.AT and (
        items[0][1] is _ops.AT_BEGINNING_STRING
        or (items[0][1] is _ops.AT_BEGINNING and not flags & re.MULTILINE)
    )
    rest = items[1:] if anchored else items
    if not all(op is _ops.LITERAL for op, _ in rest):
        return None
    return "".join(chr(code) for _, code in rest), anchored


_LAYER = r"(?:^|.*?\.)\.(?P<idx>\d+)\."
"""PEFT's regex for a layer index after `layers_pattern` (pasted between its two parts)."""


def _shape(item: tuple) -> str:
    """`item` (parsed) as text, a group's number left out."""
    op, argument = item
    if op is _ops.SUBPATTERN:
        return repr((op, argument[1:]))
    return repr(item)


class _LayerIndex:
    """PEFT's layer index regex `(?:^|.*?\\.)<pattern>\\.(?P<idx>\\d+)\\.` in parts: the
    prefix, the pattern's items, the suffix that reads the index (`layer_index`)."""

    def __init__(self, regex: str) -> None:
        parsed = _parse(regex)
        items, reference = list(parsed), list(_regex_parser.parse(_LAYER))
        group = parsed.state.groupdict.get("idx")
        suffix = items[-3:]
        if (
            len(items) < 4
            or _shape(items[0]) != _shape(reference[0])
            or list(map(_shape, suffix)) != list(map(_shape, reference[1:]))
            or suffix[1][1][0] != group
        ):
            raise RegexError(
                f"does not end in the layer index on every match of PEFT's regex {regex!r} "
                "(a '|' outside any group splits it: write (?:a|b))"
            )
        flags = parsed.state.flags
        self.prefix = _Dfa(_program(items[:1], flags), anchored=True, collapse=False)
        self.rest = _Look(items[1:], flags, True, False, _Budget())
        self.middle = _Dfa(_program(items[1:-3], flags), anchored=True, collapse=False)
        self.suffix = _Dfa(_program(suffix, flags), anchored=True, collapse=False)

    def index(self, name: str) -> int | None:
        """The index `re.match(regex, name)["idx"]` reads (None where it matches nothing):
        the match `re` finds starts its pattern at the first position the prefix reaches
        (0, then after each dot in turn) from which the rest matches; it is the index
        after any end of the pattern there followed by one, if they agree (`RegexError`
        where they do not: `re`'s choice would depend on the order it tries them)."""
        can = set(self.rest.positions(name))
        starts = self.prefix.hits(name, self.prefix.program.masks(name))
        start = next((p for p in starts if p in can), None)
        if start is None:
            return None
        indices, masks = set(), self.suffix.program.masks(name)
        for end in self.middle.hits(name, self.middle.program.masks(name), start):
            for after in self.suffix.hits(name, masks, end):
                indices.add(int(name[end + 1 : after - 1]))
        if len(indices) > 1:
            raise RegexError(
                f"can end at several places in module {name!r}, each followed by a layer "
                f"index ({', '.join(map(str, sorted(indices)))}): which one PEFT reads depends "
                "on the order its matcher tries them"
            )
        return indices.pop()


def layer_regex(regex: str) -> _LayerIndex:
    """`regex`, PEFT's layer index regex around a `layers_pattern`, in parts, or
    `RegexError`."""
    matcher = _matcher(regex)
    if matcher.layer is None:
        try:
            matcher.layer = _LayerIndex(regex)
        except RecursionError:
            raise RegexError("nests groups too deeply to be matched") from None
    return matcher.layer


def layer_index(regex: str, name: str) -> int | None:
    """The layer index `re.match(regex, name)` reads in its group `idx` (`layer_regex`),
    None where it does not match."""
    return layer_regex(regex).index(name)
