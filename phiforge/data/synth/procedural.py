"""Procedural generators: training data that is correct by construction, no teacher needed.

- Python exercises (phi-1's CodeExercises shape: a function signature + docstring, then the solution), from a
  family of templates with randomized function names, argument names, constants and phrasings. Each comes with
  assert-based tests whose expected values are computed by an independent Python reference; the sandbox's check
  harness then runs solution + tests (`Exercise.check`), so a template bug cannot ship wrong data.
- Arithmetic and word problems with computed answers and a step-by-step (chain-of-thought) solution. Every
  step is an arithmetic expression that `verify_math` re-evaluates.

All randomness comes from the `random.Random` passed in: same seed, same exercise.
"""

from __future__ import annotations

import ast
import math
import operator
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from phiforge.sandbox import Check


@dataclass
class Exercise:
    """One Python exercise: `prompt` (signature + docstring) + `solution` (body) passes `tests`."""

    template: str
    entry_point: str
    prompt: str
    solution: str
    tests: str
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def code(self) -> str:
        """The complete function: what the model trains on."""
        return self.prompt + self.solution

    @property
    def program(self) -> str:
        """Function + tests as one program: exits 0 only when every assert holds."""
        return self.code + "\n\n" + self.tests + "\n"

    @property
    def check(self) -> Check:
        """Function, then tests, for the sandbox's check harness (how synth and `phiforge run` grade)."""
        from phiforge.sandbox import Check

        return Check(self.code, self.tests)


# Each template returns (names, args, doc, body, reference, inputs):
#   names: candidate function names; args: argument names; doc: docstring text; body: indented code lines;
#   reference: an independent Python function computing the expected result; inputs: test argument tuples.
Template = Callable[[random.Random], tuple[list[str], list[str], str, str, Callable, list[tuple]]]
TEMPLATES: dict[str, Template] = {}


def template(fn: Template) -> Template:
    TEMPLATES[fn.__name__.lstrip("_")] = fn
    return fn


WORDS = ["apple", "banana", "cherry", "delta", "echo", "forest", "garden", "harbor", "island", "jungle", "kettle", "lemon", "mango", "north", "ocean", "pepper", "quiet", "river", "stone", "tiger", "umbrella", "violet", "window", "yellow", "zebra", "cloud", "candle", "rocket", "puzzle", "marble", "pencil", "button", "ladder", "mirror", "pillow", "saddle", "tunnel", "wagon", "basket"]


def _words(rng: random.Random, lo: int = 2, hi: int = 6) -> list[str]:
    return [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]


def _ints(rng: random.Random, lo: int = -20, hi: int = 50, n_lo: int = 0, n_hi: int = 8) -> list[int]:
    return [rng.randint(lo, hi) for _ in range(rng.randint(n_lo, n_hi))]


def _pick(rng: random.Random, *options: str) -> str:
    return rng.choice(options)


@template
def _count_char(rng):
    ch = rng.choice("aeiorstn")
    s = _pick(rng, "text", "s", "word", "sentence")
    body = _pick(rng,
                 f"    count = 0\n    for c in {s}:\n        if c == {ch!r}:\n            count += 1\n    return count\n",
                 f"    return sum(1 for c in {s} if c == {ch!r})\n",
                 f"    return {s}.count({ch!r})\n")
    ins = [(" ".join(_words(rng)),) for _ in range(4)] + [("",)]
    return ([f"count_{ch}", f"count_letter_{ch}", f"num_{ch}_chars", f"how_many_{ch}"], [s],
            f"Return how many times the letter {ch!r} appears in {s}.", body,
            lambda x: x.count(ch), ins)


@template
def _count_vowels(rng):
    s = _pick(rng, "text", "s", "phrase")
    body = _pick(rng,
                 f"    total = 0\n    for c in {s}.lower():\n        if c in 'aeiou':\n            total += 1\n    return total\n",
                 f"    return sum(c in 'aeiou' for c in {s}.lower())\n")
    ins = [(" ".join(_words(rng)).title(),) for _ in range(4)] + [("",)]
    return (["count_vowels", "vowel_count", "number_of_vowels"], [s],
            f"Return the number of vowels (a, e, i, o, u, upper or lower case) in {s}.", body,
            lambda x: sum(c in "aeiouAEIOU" for c in x), ins)


@template
def _reverse_words(rng):
    s = _pick(rng, "sentence", "text", "line")
    body = _pick(rng, f"    return ' '.join(reversed({s}.split()))\n",
                 f"    words = {s}.split()\n    words.reverse()\n    return ' '.join(words)\n")
    ins = [(" ".join(_words(rng)),) for _ in range(4)]
    return (["reverse_words", "reversed_sentence", "flip_word_order"], [s],
            f"Return {s} with its words in reverse order, separated by single spaces.", body,
            lambda x: " ".join(reversed(x.split())), ins)


@template
def _is_palindrome(rng):
    s = _pick(rng, "text", "s", "word")
    body = _pick(rng, f"    cleaned = [c.lower() for c in {s} if c.isalnum()]\n    return cleaned == cleaned[::-1]\n",
                 f"    cleaned = ''.join(c.lower() for c in {s} if c.isalnum())\n"
                 f"    i, j = 0, len(cleaned) - 1\n    while i < j:\n        if cleaned[i] != cleaned[j]:\n"
                 f"            return False\n        i += 1\n        j -= 1\n    return True\n")

    def ref(x):
        c = [ch.lower() for ch in x if ch.isalnum()]
        return c == c[::-1]
    pals = ["Racecar", "A man, a plan, a canal: Panama", "level", "No lemon, no melon", "abcba"]
    ins = [(rng.choice(pals),), (" ".join(_words(rng)),), (rng.choice(WORDS),), ("",)]
    return (["is_palindrome", "check_palindrome", "reads_same_backwards"], [s],
            f"Return True if {s} reads the same forwards and backwards, ignoring case and non-alphanumeric "
            "characters.", body, ref, ins)


@template
def _sum_multiples(rng):
    k = rng.randint(2, 7)
    xs = _pick(rng, "numbers", "values", "nums")
    body = _pick(rng, f"    total = 0\n    for x in {xs}:\n        if x % {k} == 0:\n            total += x\n    return total\n",
                 f"    return sum(x for x in {xs} if x % {k} == 0)\n")
    ins = [(_ints(rng),) for _ in range(4)] + [([],)]
    names = {2: ["sum_evens", "sum_even_numbers", "total_of_evens"]}.get(
        k, [f"sum_multiples_of_{k}", f"total_divisible_by_{k}", f"add_multiples_{k}"])
    return (names, [xs], f"Return the sum of the elements of {xs} that are divisible by {k}.", body,
            lambda v: sum(x for x in v if x % k == 0), ins)


@template
def _filter_above(rng):
    xs = _pick(rng, "numbers", "scores", "values")
    t = _pick(rng, "threshold", "limit", "cutoff")
    body = _pick(rng, f"    return [x for x in {xs} if x > {t}]\n",
                 f"    result = []\n    for x in {xs}:\n        if x > {t}:\n            result.append(x)\n    return result\n")
    ins = [(_ints(rng), rng.randint(-5, 30)) for _ in range(5)]
    return (["filter_above", "greater_than", "keep_large_values", "values_over"], [xs, t],
            f"Return a new list with the elements of {xs} that are strictly greater than {t}, in order.", body,
            lambda v, th: [x for x in v if x > th], ins)


@template
def _running_sum(rng):
    xs = _pick(rng, "numbers", "values", "deltas")
    body = _pick(rng, f"    result = []\n    total = 0\n    for x in {xs}:\n        total += x\n        result.append(total)\n    return result\n",
                 f"    result = []\n    for i, x in enumerate({xs}):\n        result.append(x if i == 0 else result[-1] + x)\n    return result\n")

    def ref(v):
        out, t = [], 0
        for x in v:
            t += x
            out.append(t)
        return out
    return (["running_sum", "prefix_sums", "cumulative_total"], [xs],
            f"Return the running totals of {xs}: element i is the sum of the first i + 1 elements.", body, ref,
            [(_ints(rng),) for _ in range(4)] + [([],)])


@template
def _value_range(rng):
    xs = _pick(rng, "numbers", "readings", "values")
    body = _pick(rng, f"    if not {xs}:\n        return 0\n    return max({xs}) - min({xs})\n",
                 f"    if not {xs}:\n        return 0\n    lo = hi = {xs}[0]\n    for x in {xs}:\n        lo = min(lo, x)\n        hi = max(hi, x)\n    return hi - lo\n")
    return (["value_range", "spread", "max_minus_min"], [xs],
            f"Return the difference between the largest and the smallest element of {xs} (0 for an empty list).",
            body, lambda v: max(v) - min(v) if v else 0, [(_ints(rng, n_lo=1),) for _ in range(4)] + [([],)])


@template
def _word_frequencies(rng):
    s = _pick(rng, "text", "document", "sentence")
    body = _pick(rng, f"    counts = {{}}\n    for word in {s}.lower().split():\n        counts[word] = counts.get(word, 0) + 1\n    return counts\n",
                 f"    counts = {{}}\n    for word in {s}.lower().split():\n        if word not in counts:\n            counts[word] = 0\n        counts[word] += 1\n    return counts\n")

    def ref(x):
        d: dict[str, int] = {}
        for w in x.lower().split():
            d[w] = d.get(w, 0) + 1
        return d
    ins = [(" ".join(_words(rng, 3, 9)).title(),) for _ in range(3)] + [("",)]
    return (["word_frequencies", "count_words", "word_histogram"], [s],
            f"Return a dictionary mapping each lower-cased word of {s} to the number of times it occurs.", body,
            ref, ins)


@template
def _second_largest(rng):
    xs = _pick(rng, "numbers", "values", "scores")
    body = _pick(rng, f"    distinct = sorted(set({xs}))\n    if len(distinct) < 2:\n        return None\n    return distinct[-2]\n",
                 f"    first = second = None\n    for x in set({xs}):\n        if first is None or x > first:\n            first, second = x, first\n"
                 f"        elif second is None or x > second:\n            second = x\n    return second\n")

    def ref(v):
        d = sorted(set(v))
        return d[-2] if len(d) >= 2 else None
    return (["second_largest", "runner_up", "next_to_max"], [xs],
            f"Return the second largest distinct value in {xs}, or None if there is no such value.", body, ref,
            [(_ints(rng, n_lo=1),) for _ in range(4)] + [([5, 5],)])


@template
def _fizzbuzz(rng):
    a, b = rng.sample([2, 3, 4, 5, 7], 2)
    wa, wb = rng.sample(["Fizz", "Buzz", "Bang", "Pop", "Zap", "Boom"], 2)
    n = _pick(rng, "n", "limit", "count")
    body = (f"    result = []\n    for i in range(1, {n} + 1):\n        word = ''\n        if i % {a} == 0:\n            word += {wa!r}\n"
            f"        if i % {b} == 0:\n            word += {wb!r}\n        result.append(word or str(i))\n    return result\n")

    def ref(m):
        return [(("" if i % a else wa) + ("" if i % b else wb)) or str(i) for i in range(1, m + 1)]
    return ([f"{wa.lower()}_{wb.lower()}", "fizzbuzz_variant", f"say_{wa.lower()}"], [n],
            f"Return a list of strings for 1..{n}: {wa!r} for multiples of {a}, {wb!r} for multiples of {b}, "
            f"both words joined for multiples of both, otherwise the number itself.", body, ref,
            [(rng.randint(1, 25),) for _ in range(3)] + [(0,)])


@template
def _gcd(rng):
    a, b = rng.sample(["a", "b", "x", "y", "m", "n"], 2)
    body = _pick(rng, f"    {a}, {b} = abs({a}), abs({b})\n    while {b}:\n        {a}, {b} = {b}, {a} % {b}\n    return {a}\n",
                 f"    {a}, {b} = abs({a}), abs({b})\n    if {b} == 0:\n        return {a}\n    return {_pick(rng, 'greatest_common_divisor')}({b}, {a} % {b})\n")
    names = ["greatest_common_divisor"] if "greatest_common_divisor(" in body else ["gcd", "greatest_common_divisor", "highest_common_factor"]
    ins = [(rng.randint(0, 200), rng.randint(1, 200)) for _ in range(4)] + [(rng.randint(1, 50) * 6, 0)]
    return (names, [a, b], f"Return the greatest common divisor of the integers {a} and {b} (Euclid's algorithm).",
            body, lambda p, q: math.gcd(p, q), ins)


@template
def _factorial(rng):
    n = _pick(rng, "n", "k", "count")
    body = _pick(rng, f"    result = 1\n    for i in range(2, {n} + 1):\n        result *= i\n    return result\n",
                 f"    if {n} <= 1:\n        return 1\n    return {n} * factorial({n} - 1)\n")
    names = ["factorial"] if "factorial(" in body else ["factorial", "product_up_to", "fact"]
    return (names, [n], f"Return {n}! (the product 1 * 2 * ... * {n}); 0! is 1.", body, math.factorial,
            [(rng.randint(0, 12),) for _ in range(4)] + [(0,)])


@template
def _fibonacci(rng):
    f0, f1 = rng.choice([(0, 1), (1, 1), (2, 1), (1, 3)])
    n = _pick(rng, "n", "index", "k")
    body = f"    a, b = {f0}, {f1}\n    for _ in range({n}):\n        a, b = b, a + b\n    return a\n"

    def ref(m):
        a, b = f0, f1
        for _ in range(m):
            a, b = b, a + b
        return a
    return (["nth_fibonacci", "fib", "sequence_term", "lucas_like"], [n],
            f"Return term {n} (counting from 0) of the sequence that starts {f0}, {f1} and in which every later "
            "term is the sum of the two before it.", body, ref, [(rng.randint(0, 25),) for _ in range(4)] + [(0,)])


@template
def _is_prime(rng):
    n = _pick(rng, "n", "number", "value")
    body = _pick(rng, f"    if {n} < 2:\n        return False\n    i = 2\n    while i * i <= {n}:\n        if {n} % i == 0:\n            return False\n        i += 1\n    return True\n",
                 f"    if {n} < 2:\n        return False\n    return all({n} % d for d in range(2, int({n} ** 0.5) + 1))\n")

    def ref(m):
        return m >= 2 and all(m % d for d in range(2, m))
    return (["is_prime", "check_prime", "prime_test"], [n], f"Return True if {n} is a prime number.", body, ref,
            [(rng.randint(-3, 120),) for _ in range(5)] + [(rng.choice([2, 3, 5, 7, 11, 97]),)])


@template
def _digit_sum(rng):
    n = _pick(rng, "n", "number", "value")
    body = _pick(rng, f"    return sum(int(d) for d in str(abs({n})))\n",
                 f"    {n} = abs({n})\n    total = 0\n    while {n} > 0:\n        total += {n} % 10\n        {n} //= 10\n    return total\n")
    return (["digit_sum", "sum_of_digits", "add_digits"], [n], f"Return the sum of the decimal digits of {n} (sign ignored).",
            body, lambda m: sum(int(d) for d in str(abs(m))), [(rng.randint(-9999, 99999),) for _ in range(4)] + [(0,)])


@template
def _caesar(rng):
    k = rng.randint(1, 25)
    s = _pick(rng, "message", "text", "plain")
    body = (f"    result = []\n    for c in {s}:\n        if c.islower():\n            result.append(chr((ord(c) - ord('a') + {k}) % 26 + ord('a')))\n"
            f"        elif c.isupper():\n            result.append(chr((ord(c) - ord('A') + {k}) % 26 + ord('A')))\n"
            f"        else:\n            result.append(c)\n    return ''.join(result)\n")

    def ref(x):
        return "".join(chr((ord(c) - 97 + k) % 26 + 97) if "a" <= c <= "z" else
                       chr((ord(c) - 65 + k) % 26 + 65) if "A" <= c <= "Z" else c for c in x)
    return ([f"caesar_shift_{k}", "caesar_encrypt", f"rotate_letters_{k}"], [s],
            f"Shift every letter of {s} {k} places forward in the alphabet (wrapping around, keeping case); "
            "other characters stay as they are.", body, ref, [(" ".join(_words(rng)).capitalize() + "!",) for _ in range(4)])


@template
def _dedupe(rng):
    xs = _pick(rng, "items", "values", "sequence")
    body = _pick(rng, f"    seen = set()\n    result = []\n    for x in {xs}:\n        if x not in seen:\n            seen.add(x)\n            result.append(x)\n    return result\n",
                 f"    return list(dict.fromkeys({xs}))\n")
    return (["remove_duplicates", "unique_in_order", "dedupe"], [xs],
            f"Return the elements of {xs} without repeats, keeping the first occurrence of each in order.", body,
            lambda v: list(dict.fromkeys(v)), [(_ints(rng, 0, 6),) for _ in range(3)] + [(_words(rng, 3, 8),)])


@template
def _chunk(rng):
    xs, k = _pick(rng, "items", "values"), _pick(rng, "size", "k", "width")
    body = _pick(rng, f"    return [{xs}[i:i + {k}] for i in range(0, len({xs}), {k})]\n",
                 f"    chunks = []\n    for i in range(0, len({xs}), {k}):\n        chunks.append({xs}[i:i + {k}])\n    return chunks\n")
    return (["chunk", "split_into_groups", "batches_of"], [xs, k],
            f"Split {xs} into consecutive lists of length {k}; the last one may be shorter.", body,
            lambda v, m: [v[i:i + m] for i in range(0, len(v), m)],
            [(_ints(rng, 0, 9, 0, 11), rng.randint(1, 4)) for _ in range(4)])


@template
def _flatten(rng):
    xs = _pick(rng, "nested", "groups", "rows")
    body = _pick(rng, f"    return [x for group in {xs} for x in group]\n",
                 f"    result = []\n    for group in {xs}:\n        result.extend(group)\n    return result\n")
    return (["flatten", "flatten_once", "concat_lists"], [xs],
            f"Return one list with the elements of every list in {xs}, in order.", body,
            lambda v: [x for g in v for x in g], [([_ints(rng, 0, 9, 0, 3) for _ in range(rng.randint(0, 4))],) for _ in range(4)])


@template
def _merge_sorted(rng):
    a, b = _pick(rng, "left", "first", "xs"), _pick(rng, "right", "second", "ys")
    body = (f"    result = []\n    i = j = 0\n    while i < len({a}) and j < len({b}):\n        if {a}[i] <= {b}[j]:\n"
            f"            result.append({a}[i])\n            i += 1\n        else:\n            result.append({b}[j])\n            j += 1\n"
            f"    result.extend({a}[i:])\n    result.extend({b}[j:])\n    return result\n")
    return (["merge_sorted", "merge_two_sorted_lists", "combine_sorted"], [a, b],
            f"Merge the sorted lists {a} and {b} into one sorted list (without calling sort).", body,
            lambda p, q: sorted(p + q), [(sorted(_ints(rng)), sorted(_ints(rng))) for _ in range(4)])


@template
def _capitalize_words(rng):
    s = _pick(rng, "title", "text", "name")
    body = _pick(rng, f"    return ' '.join(w[:1].upper() + w[1:].lower() for w in {s}.split())\n",
                 f"    words = []\n    for w in {s}.split():\n        words.append(w[0].upper() + w[1:].lower())\n    return ' '.join(words)\n")
    return (["capitalize_words", "title_case", "headline"], [s],
            f"Return {s} with the first letter of every word upper case and the rest lower case.", body,
            lambda x: " ".join(w[:1].upper() + w[1:].lower() for w in x.split()),
            [(" ".join(w.upper() if rng.random() < .3 else w for w in _words(rng)),) for _ in range(4)])


@template
def _sort_by_length(rng):
    xs = _pick(rng, "words", "names", "items")
    rev = rng.random() < 0.5
    key = "(-len(w), w)" if rev else "(len(w), w)"
    order = "longest first" if rev else "shortest first"
    body = f"    return sorted({xs}, key=lambda w: {key})\n"
    return (["sort_by_length", "order_by_size", "length_sorted"], [xs],
            f"Return {xs} sorted by length ({order}), breaking ties alphabetically.", body,
            lambda v: sorted(v, key=lambda w: (-len(w), w) if rev else (len(w), w)), [(_words(rng, 0, 7),) for _ in range(4)])


@template
def _group_by_initial(rng):
    xs = _pick(rng, "words", "names")
    body = _pick(rng, f"    groups = {{}}\n    for w in {xs}:\n        groups.setdefault(w[0], []).append(w)\n    return groups\n",
                 f"    groups = {{}}\n    for w in {xs}:\n        if w[0] not in groups:\n            groups[w[0]] = []\n        groups[w[0]].append(w)\n    return groups\n")

    def ref(v):
        g: dict[str, list[str]] = {}
        for w in v:
            g.setdefault(w[0], []).append(w)
        return g
    return (["group_by_first_letter", "index_by_initial", "bucket_words"], [xs],
            f"Return a dictionary from first letter to the list of words in {xs} starting with it, in order.",
            body, ref, [(_words(rng, 0, 8),) for _ in range(4)])


@template
def _count_bits(rng):
    n = _pick(rng, "n", "value", "mask")
    body = _pick(rng, f"    count = 0\n    while {n}:\n        count += {n} & 1\n        {n} >>= 1\n    return count\n",
                 f"    return bin({n}).count('1')\n")
    return (["count_set_bits", "popcount", "ones_in_binary"], [n],
            f"Return the number of 1 bits in the binary form of the non-negative integer {n}.", body,
            lambda m: bin(m).count("1"), [(rng.randint(0, 5000),) for _ in range(4)] + [(0,)])


@template
def _convert_temperature(rng):
    c = _pick(rng, "celsius", "degrees", "temp_c")
    d = rng.randint(0, 2)
    body = f"    return round({c} * 9 / 5 + 32, {d})\n"
    return (["celsius_to_fahrenheit", "to_fahrenheit", "c_to_f"], [c],
            f"Convert {c} (degrees Celsius) to degrees Fahrenheit, rounded to {d} decimal places.", body,
            lambda x: round(x * 9 / 5 + 32, d), [(rng.randint(-40, 120) + rng.choice([0, 0.5, 0.25]),) for _ in range(4)])


@template
def _rotate(rng):
    xs, k = _pick(rng, "items", "values"), _pick(rng, "steps", "k", "shift")
    body = f"    if not {xs}:\n        return []\n    {k} %= len({xs})\n    return {xs}[-{k}:] + {xs}[:-{k}] if {k} else list({xs})\n"

    def ref(v, m):
        if not v:
            return []
        m %= len(v)
        return v[-m:] + v[:-m] if m else list(v)
    return (["rotate_right", "shift_list", "rotate"], [xs, k],
            f"Return {xs} rotated {k} positions to the right (elements falling off the end wrap to the front).",
            body, ref, [(_ints(rng, 0, 9), rng.randint(0, 10)) for _ in range(4)] + [([], 3)])


@template
def _longest_word(rng):
    s = _pick(rng, "sentence", "text")
    body = _pick(rng, f"    best = ''\n    for w in {s}.split():\n        if len(w) > len(best):\n            best = w\n    return best\n",
                 f"    return max({s}.split(), key=len, default='')\n")

    def ref(x):
        best = ""
        for w in x.split():
            if len(w) > len(best):
                best = w
        return best
    return (["longest_word", "find_longest_word", "biggest_word"], [s],
            f"Return the longest word in {s} (the first one if several tie; '' for no words).", body, ref,
            [(" ".join(_words(rng)),) for _ in range(4)] + [("",)])


@template
def _run_length(rng):
    s = _pick(rng, "text", "data", "s")
    body = (f"    result = []\n    i = 0\n    while i < len({s}):\n        j = i\n        while j < len({s}) and {s}[j] == {s}[i]:\n"
            f"            j += 1\n        result.append(f'{{{s}[i]}}{{j - i}}')\n        i = j\n    return ''.join(result)\n")

    def ref(x):
        out, i = [], 0
        while i < len(x):
            j = i
            while j < len(x) and x[j] == x[i]:
                j += 1
            out.append(f"{x[i]}{j - i}")
            i = j
        return "".join(out)
    ins = ["".join(rng.choice("ab") * rng.randint(1, 4) for _ in range(rng.randint(1, 5))) for _ in range(4)]
    return (["run_length_encode", "compress", "rle"], [s],
            f"Run-length encode {s}: each run of a repeated character becomes the character followed by the run "
            "length, e.g. 'aaab' -> 'a3b1'.", body, ref, [(x,) for x in ins] + [("",)])


@template
def _mean(rng):
    xs = _pick(rng, "numbers", "marks", "samples")
    d = rng.randint(0, 3)
    body = f"    if not {xs}:\n        return 0.0\n    return round(sum({xs}) / len({xs}), {d})\n"
    return (["mean", "average", "arithmetic_mean"], [xs],
            f"Return the mean of {xs} rounded to {d} decimal places (0.0 for an empty list).", body,
            lambda v: round(sum(v) / len(v), d) if v else 0.0, [(_ints(rng, 0, 100, 1),) for _ in range(4)] + [([],)])


@template
def _count_in_range(rng):
    xs, lo, hi = _pick(rng, "numbers", "values"), _pick(rng, "low", "lo", "start"), _pick(rng, "high", "hi", "stop")
    body = _pick(rng, f"    return sum(1 for x in {xs} if {lo} <= x <= {hi})\n",
                 f"    count = 0\n    for x in {xs}:\n        if {lo} <= x <= {hi}:\n            count += 1\n    return count\n")
    ins = []
    for _ in range(4):
        a = rng.randint(-10, 20)
        ins.append((_ints(rng), a, a + rng.randint(0, 25)))
    return (["count_in_range", "count_between", "how_many_within"], [xs, lo, hi],
            f"Return how many elements x of {xs} satisfy {lo} <= x <= {hi}.", body,
            lambda v, a, b: sum(1 for x in v if a <= x <= b), ins)


@template
def _matrix_transpose(rng):
    m = _pick(rng, "matrix", "grid", "rows")
    body = _pick(rng, f"    if not {m}:\n        return []\n    return [[row[j] for row in {m}] for j in range(len({m}[0]))]\n",
                 f"    if not {m}:\n        return []\n    return [list(col) for col in zip(*{m})]\n")

    def mk():
        r, c = rng.randint(1, 4), rng.randint(1, 4)
        return [[rng.randint(0, 9) for _ in range(c)] for _ in range(r)]
    return (["transpose", "transpose_matrix", "flip_rows_and_columns"], [m],
            f"Return the transpose of {m}, a rectangular list of lists (rows become columns).", body,
            lambda g: [list(c) for c in zip(*g)] if g else [], [(mk(),) for _ in range(4)] + [([],)])


def _format_doc(doc: str, indent: str = "    ") -> str:
    import textwrap

    lines = textwrap.wrap(doc, width=96 - len(indent))
    if len(lines) == 1:
        return f'{indent}"""{lines[0]}"""\n'
    return f'{indent}"""' + f"\n{indent}".join(lines) + f'\n{indent}"""\n'


# Templates `phiforge run` never trains on: exercises made from them measure generalization to new tasks, while
# new seeds of the training templates only measure in-distribution skill. Chosen to span strings, lists, loops
# and arithmetic, so the held-out set is neither all easy nor all hard.
HELDOUT_TEMPLATES: frozenset[str] = frozenset(
    {"caesar", "chunk", "count_in_range", "capitalize_words", "run_length", "second_largest"})


def training_templates() -> list[str]:
    """The templates `phiforge run` may train on: every template but `HELDOUT_TEMPLATES`, sorted."""
    return sorted(set(TEMPLATES) - HELDOUT_TEMPLATES)


def python_exercise(rng: random.Random, name: str | None = None, kind: str | None = None,
                    templates: list[str] | None = None) -> Exercise:
    """One exercise from a random (or the named `kind`) template; `name` forces the function name and
    `templates` limits the random choice (default: all templates)."""
    kind = kind or rng.choice(sorted(templates) if templates is not None else sorted(TEMPLATES))
    names, args, doc, body, ref, inputs = TEMPLATES[kind](rng)
    fname = name or rng.choice(names)
    if name is None and rng.random() < 0.3:  # more distinct names, as phi-1's CodeExercises constrained them
        fname = f"{fname}_{rng.choice(['v2', 'fast', 'simple', 'list', 'basic', 'impl'])}"
    if f"{names[0]}(" in body and fname != names[0]:  # a recursive body calls itself by its own name
        body = body.replace(f"{names[0]}(", f"{fname}(")
    prompt = f"def {fname}({', '.join(args)}):\n" + _format_doc(doc)
    tests = "\n".join(f"assert {fname}({', '.join(repr(a) for a in inp)}) == {ref(*inp)!r}" for inp in inputs)
    return Exercise(template=kind, entry_point=fname, prompt=prompt, solution=body, tests=tests,
                    params={"args": args, "n_tests": len(inputs)})


# ---------------------------------------------------------------------------------------------- math


@dataclass
class MathProblem:
    """A word / arithmetic problem with a worked solution: every step is `expr = value`."""

    template: str
    question: str
    steps: list[tuple[str, str, Any]]  # (explanation, expression, value)
    answer: Any

    @property
    def solution(self) -> str:
        lines = [f"{text}: {expr} = {_fmt(val)}." for text, expr, val in self.steps]
        return "\n".join(lines) + f"\nThe answer is {_fmt(self.answer)}."

    @property
    def text(self) -> str:
        return f"Question: {self.question}\nAnswer: Let's think step by step.\n{self.solution}\n#### {_fmt(self.answer)}"


def _fmt(v: Any) -> str:
    if isinstance(v, Fraction):
        return str(v.numerator) if v.denominator == 1 else f"{v.numerator}/{v.denominator}"
    if isinstance(v, float):
        return f"{v:.2f}".rstrip("0").rstrip(".")
    return str(v)


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}


def safe_eval(expr: str) -> Fraction:
    """Evaluate an arithmetic expression (numbers, + - * / // % **, parentheses) exactly, with Fractions."""
    def ev(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return Fraction(str(node.value))
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return Fraction(_OPS[type(node.op)](ev(node.left), ev(node.right)))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        raise ValueError(f"not arithmetic: {ast.dump(node)}")
    return ev(ast.parse(expr.replace("×", "*").replace("÷", "/"), mode="eval"))


def verify_math(p: MathProblem) -> bool:
    """Every step's expression evaluates to its stated value, and the answer is the last step's value."""
    try:
        for _, expr, val in p.steps:
            if safe_eval(expr) != Fraction(str(val)):
                return False
        return bool(p.steps) and Fraction(str(p.answer)) == Fraction(str(p.steps[-1][2]))
    except (ValueError, ZeroDivisionError, SyntaxError):
        return False


NAMES = ["Ava", "Ben", "Chloe", "Daniel", "Emma", "Farid", "Grace", "Hiro", "Isla", "Jamal", "Kira", "Leo", "Maya", "Noah", "Olga", "Priya", "Quinn", "Rosa", "Sam", "Tariq", "Uma", "Victor", "Wen", "Ximena", "Yusuf", "Zoe"]
ITEMS = [("apple", "apples"), ("pencil", "pencils"), ("sticker", "stickers"), ("marble", "marbles"),
         ("cookie", "cookies"), ("book", "books"), ("card", "cards"), ("shell", "shells"), ("stamp", "stamps")]
MathTemplate = Callable[[random.Random], MathProblem]
MATH_TEMPLATES: dict[str, MathTemplate] = {}


def math_template(fn: MathTemplate) -> MathTemplate:
    MATH_TEMPLATES[fn.__name__.lstrip("_")] = fn
    return fn


@math_template
def _collect(rng):
    n, (_, items) = rng.choice(NAMES), rng.choice(ITEMS)
    a, packs, per, give = rng.randint(3, 40), rng.randint(2, 6), rng.randint(3, 12), rng.randint(1, 20)
    s1 = packs * per
    s2 = a + s1
    s3 = s2 - give
    q = (f"{n} has {a} {items}. {n} buys {packs} packs with {per} {items} in each pack, then gives {give} {items} "
         f"to a friend. How many {items} does {n} have now?")
    return MathProblem("collect", q, [(f"{items.capitalize()} bought", f"{packs} * {per}", s1),
                                      (f"{items.capitalize()} before giving any away", f"{a} + {s1}", s2),
                                      (f"{items.capitalize()} left", f"{s2} - {give}", s3)], s3)


@math_template
def _shopping(rng):
    n = rng.choice(NAMES)
    price_a, qa = rng.randint(2, 15), rng.randint(1, 6)
    price_b, qb = rng.randint(1, 9), rng.randint(1, 8)
    total = price_a * qa + price_b * qb
    paid = (total // 10 + 1) * 10 + rng.choice([0, 10, 20])
    ta, tb = price_a * qa, price_b * qb
    q = (f"{n} buys {qa} notebooks at ${price_a} each and {qb} pens at ${price_b} each, and pays with ${paid}. "
         "How much change does " + n + " get, in dollars?")
    return MathProblem("shopping", q, [("Cost of the notebooks", f"{qa} * {price_a}", ta),
                                       ("Cost of the pens", f"{qb} * {price_b}", tb),
                                       ("Total cost", f"{ta} + {tb}", total),
                                       ("Change", f"{paid} - {total}", paid - total)], paid - total)


@math_template
def _distance(rng):
    n = rng.choice(NAMES)
    v1, t1, v2, t2 = rng.randint(20, 90), rng.randint(1, 4), rng.randint(10, 60), rng.randint(1, 3)
    d1, d2 = v1 * t1, v2 * t2
    q = (f"{n} drives at {v1} km per hour for {t1} hours, then at {v2} km per hour for {t2} hours. "
         "How many kilometers does " + n + " travel in total?")
    return MathProblem("distance", q, [("Distance in the first part", f"{v1} * {t1}", d1),
                                       ("Distance in the second part", f"{v2} * {t2}", d2),
                                       ("Total distance", f"{d1} + {d2}", d1 + d2)], d1 + d2)


@math_template
def _share(rng):
    (_, items), k = rng.choice(ITEMS), rng.randint(2, 9)
    total = k * rng.randint(2, 15) + rng.randint(0, k - 1)
    each, rest = total // k, total % k
    q = (f"{total} {items} are shared equally among {k} children, and the ones that cannot be shared equally are "
         "kept in a box. How many " + items + " are in the box?")
    return MathProblem("share", q, [("Each child gets", f"{total} // {k}", each),
                                    ("Given out in total", f"{each} * {k}", each * k),
                                    ("Left for the box", f"{total} - {each * k}", rest)], rest)


@math_template
def _discount(rng):
    price, pct = rng.randint(2, 40) * 5, rng.choice([10, 20, 25, 30, 40, 50])
    off = Fraction(price * pct, 100)
    q = f"A jacket costs ${price}. It is on sale for {pct}% off. What is the sale price in dollars?"
    return MathProblem("discount", q, [("The discount", f"{price} * {pct} / 100", off),
                                       ("The sale price", f"{price} - {_fmt(off)}", price - off)], price - off)


@math_template
def _fence(rng):
    w, h, cost = rng.randint(3, 30), rng.randint(3, 30), rng.randint(2, 12)
    per = 2 * (w + h)
    q = (f"A rectangular garden is {w} m long and {h} m wide. Fencing costs ${cost} per meter. What does it cost "
         "to fence the whole garden, in dollars?")
    return MathProblem("fence", q, [("Length plus width", f"{w} + {h}", w + h),
                                    ("The perimeter", f"2 * {w + h}", per),
                                    ("The cost", f"{per} * {cost}", per * cost)], per * cost)


@math_template
def _ages(rng):
    a, b = rng.sample(NAMES, 2)
    age_b, diff, years = rng.randint(3, 30), rng.randint(1, 25), rng.randint(1, 15)
    age_a = age_b + diff
    q = (f"{a} is {diff} years older than {b}. {b} is {age_b} years old. How old will {a} be in {years} years?")
    return MathProblem("ages", q, [(f"{a}'s age now", f"{age_b} + {diff}", age_a),
                                   (f"{a}'s age in {years} years", f"{age_a} + {years}", age_a + years)], age_a + years)


@math_template
def _average(rng):
    n = rng.choice(NAMES)
    k = rng.randint(3, 5)
    scores = [rng.randint(50, 100) for _ in range(k - 1)]
    target = rng.randint(60, 95)
    last = target * k - sum(scores)
    if not 0 <= last <= 100:
        last = rng.randint(50, 100)
    scores.append(last)
    total = sum(scores)
    avg = Fraction(total, k)
    q = f"{n}'s scores on {k} tests are {', '.join(map(str, scores))}. What is the average score?"
    return MathProblem("average", q, [("Sum of the scores", " + ".join(map(str, scores)), total),
                                      ("Average", f"{total} / {k}", avg)], avg)


@math_template
def _time(rng):
    start_h, start_m = rng.randint(6, 14), rng.choice([0, 10, 15, 20, 30, 40, 45])
    dur = rng.randint(20, 200)
    total = start_h * 60 + start_m + dur
    q = (f"A train leaves at {start_h}:{start_m:02d} and the trip takes {dur} minutes. "
         "At how many minutes past midnight does it arrive?")
    return MathProblem("time", q, [("Departure in minutes past midnight", f"{start_h} * 60 + {start_m}", start_h * 60 + start_m),
                                   ("Arrival", f"{start_h * 60 + start_m} + {dur}", total)], total)


@math_template
def _fraction_of_group(rng):
    d = rng.choice([2, 3, 4, 5, 6, 8])
    num = rng.randint(1, d - 1)
    total = d * rng.randint(2, 12)
    part = total * num // d
    q = f"There are {total} students in a class and {num}/{d} of them walk to school. How many do not walk?"
    return MathProblem("fraction_of_group", q, [("Students who walk", f"{total} * {num} / {d}", part),
                                                ("Students who do not walk", f"{total} - {part}", total - part)], total - part)


@math_template
def _interest(rng):
    p, r, t = rng.randint(1, 50) * 100, rng.randint(1, 9), rng.randint(1, 5)
    i = Fraction(p * r * t, 100)
    q = (f"You put ${p} in a savings account that pays {r}% simple interest per year. How much money is in the "
         f"account after {t} years, in dollars?")
    return MathProblem("interest", q, [("Interest per year", f"{p} * {r} / 100", Fraction(p * r, 100)),
                                       (f"Interest for {t} years", f"{_fmt(Fraction(p * r, 100))} * {t}", i),
                                       ("Final amount", f"{p} + {_fmt(i)}", p + i)], p + i)


@math_template
def _long_multiplication(rng):
    a, b = rng.randint(12, 999), rng.randint(12, 99)
    tens, ones = b // 10 * 10, b % 10
    q = f"Compute {a} × {b}."
    return MathProblem("long_multiplication", q, [(f"Split {b} into {tens} + {ones}, first", f"{a} * {tens}", a * tens),
                                                  ("Then", f"{a} * {ones}", a * ones),
                                                  ("Add the partial products", f"{a * tens} + {a * ones}", a * b)], a * b)


@math_template
def _long_division(rng):
    d = rng.randint(3, 19)
    qv, r = rng.randint(10, 300), rng.randint(0, d - 1)
    n = d * qv + r
    q = f"Divide {n} by {d}. Give the remainder."
    return MathProblem("long_division", q, [("The quotient", f"{n} // {d}", qv),
                                            ("Quotient times divisor", f"{qv} * {d}", qv * d),
                                            ("The remainder", f"{n} - {qv * d}", r)], r)


@math_template
def _add_fractions(rng):
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    x, y = rng.randint(1, a - 1), rng.randint(1, b - 1)
    lcm = a * b // math.gcd(a, b)
    fa, fb = x * (lcm // a), y * (lcm // b)
    s = Fraction(x, a) + Fraction(y, b)
    q = f"Compute {x}/{a} + {y}/{b} and simplify."
    return MathProblem("add_fractions", q, [("Common denominator (least common multiple)", f"{a} * {b} // {math.gcd(a, b)}", lcm),
                                            (f"{x}/{a} in {lcm}ths", f"{x} * {lcm // a}", fa),
                                            (f"{y}/{b} in {lcm}ths", f"{y} * {lcm // b}", fb),
                                            ("Sum, simplified", f"({fa} + {fb}) / {lcm}", s)], s)


@math_template
def _order_of_operations(rng):
    a, b, c, d = (rng.randint(1, 12) for _ in range(4))
    q = f"Evaluate {a} + {b} × ({c} + {d})."
    return MathProblem("order_of_operations", q, [("Parentheses first", f"{c} + {d}", c + d),
                                                  ("Then multiplication", f"{b} * {c + d}", b * (c + d)),
                                                  ("Then addition", f"{a} + {b * (c + d)}", a + b * (c + d))], a + b * (c + d))


def math_problem(rng: random.Random, kind: str | None = None) -> MathProblem:
    """One problem from a random (or the named `kind`) template."""
    kind = kind or rng.choice(sorted(MATH_TEMPLATES))
    return MATH_TEMPLATES[kind](rng)
