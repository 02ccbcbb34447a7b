"""The quickstart's bundled datasets, and the checks that score what the model learned.

    python -m tunesmith.quickstart.data [--out DIR]   # rewrites data/*.jsonl byte for byte

Pure Python, no model, no network: every file under ``data/`` is regenerated from the
tables below with ``random.Random(0)`` and compared byte for byte in the tests.

The task is built so that each training stage has one large, measurable effect:

1. **SFT teaches a house format** the base model never produces on its own. Every
   assistant answer is exactly two lines::

       ANSWER: Paris
       WHY: The capital of France is Paris. France is a country in Europe. ...

   In SFT data the WHY line is deliberately long (3–5 sentences, 45–80 words), so that
   the SFT model learns the format *and* a verbose habit.
2. **DPO teaches concision.** On other questions of the same types, ``chosen`` keeps the
   format with a one-sentence WHY of at most 15 words; ``rejected`` keeps the same
   ANSWER line with a long WHY written exactly as the SFT data writes them — the habit the
   SFT model actually has. (A first version used a differently worded "rambling" WHY: DPO
   then learned to avoid that filler while the SFT model's own long style, which the
   pairs never showed it, stayed: held-out reward accuracy 1.0, generations unchanged.)
   Both halves hold the format, so the preference is about length only and DPO has no
   reason to unlearn the format.
3. **Held-out prompts** (again other questions) measure, for base, SFT and DPO alike:

   - format rate — ``format_ok``: the stripped response matches ``^ANSWER: .+\\nWHY: .+``.
     Expected: base ≈ 0, SFT and DPO high.
   - concise rate — ``concise_ok``: format OK *and* the explanation has ≤ 20 words
     (``CONCISE_MAX_WORDS``; the chosen WHYs have ≤ 15, the long ones ≥ 45, so the
     threshold sits in the gap). Expected: SFT low, DPO high.
   - answer accuracy — the ANSWER line (``answer_of``) contains the reference after SQuAD
     normalisation. Each eval record carries ``"method": "contains"``, so
     ``score_suite("accuracy", records, [answer_of(r) or "" for r in responses])`` scores it.

Questions come from twelve everyday types (``TYPES``) whose answers the generator knows
for sure: looked up in a fixed table (capitals, opposites, colours, plurals, definitions)
or computed (arithmetic, unit conversions, letter counts, comparisons, calendar order).
The three splits are disjoint by *fact*, not only by wording: each type's facts are
shuffled once and dealt out — eval first, then DPO, then SFT — so "3 km in metres" and
"3000 metres in km" never sit in different splits. Types with fewer facts than records
(colours, definitions) reuse a split's own facts under different question templates.

Sizes (defaults of ``generate``) fit the time budget: 320 SFT conversations, 256
preference pairs, 48 eval prompts (4 per type).
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.evaluate.instructions import count_sentences, words

DATA_DIR = Path(__file__).parent / "data"
FILES = {"sft": "sft_train.jsonl", "dpo": "dpo_train.jsonl", "eval": "eval_prompts.jsonl"}

LONG_WORDS = (45, 80)          # SFT WHY and rejected WHY: words, inclusive
LONG_SENTENCES = (3, 5)        # SFT WHY: sentences, inclusive
SHORT_MAX_WORDS = 15           # chosen WHY: one sentence of at most this many words
CONCISE_MAX_WORDS = 20         # the concise metric's limit: between 15 and 45, so neither side is borderline

# --- metrics: pure functions on a generated response -----------------------------------

# "ANSWER: <text>\nWHY: <text>" at the start of the stripped response. Case-sensitive, one
# space after each colon, and each part must hold a non-space character. Lines after the
# WHY line still match (the metric's regex is a prefix match); concise_ok counts them.
_FORMAT = re.compile(r"ANSWER: ([^\n]*\S[^\n]*)\nWHY: ([^\n]*\S.*)", re.DOTALL)


def format_ok(text: str) -> bool:
    """Whether ``text``, stripped, starts with an ``ANSWER: …`` line followed by a ``WHY: …`` line.

    Leading/trailing whitespace is ignored; ``answer:`` in lower case, a missing WHY line,
    a blank line between the two or an empty part fail. Extra lines after the WHY line pass
    (they count against ``concise_ok`` instead).
    """
    return _FORMAT.match(text.strip()) is not None


def why_of(text: str) -> str | None:
    """The explanation of a well-formatted response: everything after ``WHY: ``, stripped,
    including any lines after it; None when ``format_ok`` fails."""
    m = _FORMAT.match(text.strip())
    return m.group(2).strip() if m else None


def concise_ok(text: str, max_words: int = CONCISE_MAX_WORDS) -> bool:
    """``format_ok`` and the explanation (``why_of``) has at most ``max_words`` words.

    Words are counted as in the instruction-following checks (``instructions.words``: runs
    of letters/digits). Text after the WHY line counts too, so a short WHY followed by a
    rambling paragraph is not concise.
    """
    why = why_of(text)
    return why is not None and len(words(why)) <= max_words


def answer_of(text: str) -> str | None:
    """The short answer on the first line of the stripped response when that line starts
    with ``ANSWER: `` (case-sensitive), stripped; None otherwise. The WHY line is not
    required, so accuracy does not depend on the rest of the format."""
    first = text.strip().split("\n", 1)[0]
    if not first.startswith("ANSWER: "):
        return None
    return first[len("ANSWER: "):].strip() or None


def house_answer(answer: str, why: str) -> str:
    """An assistant answer in the house format."""
    return f"ANSWER: {answer}\nWHY: {why}"


# --- facts -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Fact:
    """One question-and-answer fact, with every phrasing the generator may use for it.

    ``questions`` are interchangeable wordings; ``short`` are one-sentence WHYs (only those
    within ``SHORT_MAX_WORDS`` are used); ``core`` opens every long WHY, in order; ``extra``
    are optional fact-specific sentences a long WHY may add.
    """

    key: str
    answer: str
    questions: tuple[str, ...]
    short: tuple[str, ...]
    core: tuple[str, ...]
    extra: tuple[str, ...] = ()


def cap(s: str) -> str:
    return s[:1].upper() + s[1:]


CAPITALS = [  # (country as written mid-sentence, capital, where it is)
    ("France", "Paris", "Europe"), ("Germany", "Berlin", "Europe"), ("Italy", "Rome", "Europe"),
    ("Spain", "Madrid", "Europe"), ("Portugal", "Lisbon", "Europe"),
    ("the United Kingdom", "London", "Europe"), ("Ireland", "Dublin", "Europe"),
    ("the Netherlands", "Amsterdam", "Europe"), ("Belgium", "Brussels", "Europe"),
    ("Austria", "Vienna", "Europe"), ("Poland", "Warsaw", "Europe"),
    ("the Czech Republic", "Prague", "Europe"), ("Hungary", "Budapest", "Europe"),
    ("Greece", "Athens", "Europe"), ("Sweden", "Stockholm", "Europe"), ("Norway", "Oslo", "Europe"),
    ("Denmark", "Copenhagen", "Europe"), ("Finland", "Helsinki", "Europe"),
    ("Iceland", "Reykjavik", "Europe"), ("Ukraine", "Kyiv", "Europe"), ("Romania", "Bucharest", "Europe"),
    ("Bulgaria", "Sofia", "Europe"), ("Serbia", "Belgrade", "Europe"), ("Croatia", "Zagreb", "Europe"),
    ("Russia", "Moscow", "both Europe and Asia"), ("Turkey", "Ankara", "both Europe and Asia"),
    ("Egypt", "Cairo", "Africa"), ("Kenya", "Nairobi", "Africa"), ("Nigeria", "Abuja", "Africa"),
    ("Ghana", "Accra", "Africa"), ("Ethiopia", "Addis Ababa", "Africa"), ("Morocco", "Rabat", "Africa"),
    ("Uganda", "Kampala", "Africa"), ("Japan", "Tokyo", "Asia"), ("China", "Beijing", "Asia"),
    ("South Korea", "Seoul", "Asia"), ("India", "New Delhi", "Asia"), ("Pakistan", "Islamabad", "Asia"),
    ("Bangladesh", "Dhaka", "Asia"), ("Thailand", "Bangkok", "Asia"), ("Vietnam", "Hanoi", "Asia"),
    ("the Philippines", "Manila", "Asia"), ("Malaysia", "Kuala Lumpur", "Asia"), ("Iran", "Tehran", "Asia"),
    ("Iraq", "Baghdad", "Asia"), ("Saudi Arabia", "Riyadh", "Asia"), ("Afghanistan", "Kabul", "Asia"),
    ("Nepal", "Kathmandu", "Asia"), ("Australia", "Canberra", "Oceania"),
    ("New Zealand", "Wellington", "Oceania"), ("Canada", "Ottawa", "North America"),
    ("Mexico", "Mexico City", "North America"), ("Cuba", "Havana", "the Caribbean"),
    ("Jamaica", "Kingston", "the Caribbean"), ("Argentina", "Buenos Aires", "South America"),
    ("Chile", "Santiago", "South America"), ("Peru", "Lima", "South America"),
    ("Venezuela", "Caracas", "South America"), ("Ecuador", "Quito", "South America"),
    ("Uruguay", "Montevideo", "South America"),
]

# (word, opposite, whether the opposite's own opposite is unambiguously the word)
OPPOSITES = [
    ("hot", "cold", True), ("up", "down", True), ("day", "night", True), ("wet", "dry", True),
    ("full", "empty", True), ("rich", "poor", True), ("strong", "weak", True), ("inside", "outside", True),
    ("push", "pull", True), ("first", "last", True), ("above", "below", True), ("true", "false", True),
    ("always", "never", True), ("clean", "dirty", True), ("loud", "quiet", True), ("north", "south", True),
    ("east", "west", True), ("yes", "no", True), ("buy", "sell", True), ("asleep", "awake", True),
    ("alive", "dead", True), ("friend", "enemy", True), ("male", "female", True), ("love", "hate", True),
    ("black", "white", True), ("arrive", "depart", True), ("remember", "forget", True),
    ("accept", "reject", True), ("cheap", "expensive", True), ("smooth", "rough", True),
    ("deep", "shallow", True), ("wide", "narrow", True), ("before", "after", True), ("more", "less", True),
    ("maximum", "minimum", True), ("increase", "decrease", True), ("inhale", "exhale", True),
    ("visible", "invisible", True), ("possible", "impossible", True), ("happy", "sad", True),
    ("fast", "slow", True), ("early", "late", True), ("open", "closed", True), ("entrance", "exit", True),
    ("give", "take", True), ("come", "go", True), ("question", "answer", True), ("add", "subtract", True),
    ("tall", "short", False), ("big", "small", False), ("long", "short", False), ("young", "old", False),
    ("heavy", "light", False), ("soft", "hard", False), ("thick", "thin", False), ("win", "lose", False),
    ("begin", "end", False),
]

COLOURS = [  # (thing, colour, verb)
    ("grass", "green", "is"), ("the sky on a clear day", "blue", "is"), ("fresh snow", "white", "is"),
    ("a ripe banana", "yellow", "is"), ("coal", "black", "is"), ("a ripe tomato", "red", "is"),
    ("a ripe lemon", "yellow", "is"), ("milk", "white", "is"), ("blood", "red", "is"),
    ("a carrot", "orange", "is"), ("a pumpkin", "orange", "is"), ("milk chocolate", "brown", "is"),
    ("a polar bear's fur", "white", "is"), ("a crow", "black", "is"), ("a lime", "green", "is"),
    ("a ripe strawberry", "red", "is"), ("an emerald", "green", "is"), ("a ruby", "red", "is"),
    ("a flamingo", "pink", "is"), ("an aubergine", "purple", "is"), ("a cucumber's skin", "green", "is"),
    ("a stop sign", "red", "is"), ("cotton wool", "white", "is"), ("soot", "black", "is"),
    ("a ripe cherry", "red", "is"), ("a ripe blueberry", "blue", "is"), ("an orange", "orange", "is"),
    ("lettuce", "green", "is"), ("a raven", "black", "is"), ("broccoli", "green", "is"),
    ("a garden pea", "green", "is"), ("a zebra", "black and white", "is"),
    ("a giant panda", "black and white", "is"), ("an egg yolk", "yellow", "is"), ("table salt", "white", "is"),
    ("the flesh of an avocado", "green", "is"), ("a canary", "yellow", "is"),
    ("a dandelion flower", "yellow", "is"), ("a lavender flower", "purple", "is"),
    ("a sunflower's petals", "yellow", "are"), ("a cooked lobster", "red", "is"),
    ("the keys of a piano", "black and white", "are"), ("mint leaves", "green", "are"),
    ("a pine tree's needles", "green", "are"), ("charcoal", "black", "is"),
    ("a penguin", "black and white", "is"), ("the planet Mars", "red", "is"),
    ("a school bus in the United States", "yellow", "is"), ("a tennis ball", "yellow", "is"),
    ("a fresh basil leaf", "green", "is"),
]

LETTER_WORDS = (
    "cat dog sun tree book fish bird moon star milk house apple water green table chair bread river "
    "cloud horse tiger lemon piano pizza garden window yellow orange purple school friend pencil rabbit "
    "monkey bottle castle planet guitar candle doctor button island forest winter summer spring autumn "
    "jacket carpet market letter rainbow kitchen blanket chicken library mountain elephant sandwich "
    "triangle computer dinosaur umbrella butterfly telephone chocolate adventure beautiful strawberry "
    "basketball"
).split()

PLURALS = [  # (singular, plural, rule)
    *((w, w + "s", "s") for w in "cat dog book tree car apple pencil chair horse egg bird house friend flower".split()),
    *((w, w + "es", "es") for w in "box bus dish church fox brush watch glass class kiss wish bench match".split()),
    *((w, w + "es", "oes") for w in "potato tomato hero".split()),
    *((w, w[:-1] + "ies", "ies") for w in "baby city party lady story berry puppy family country cherry".split()),
    *((w, w + "s", "vowel_y") for w in "day key toy boy monkey donkey".split()),
    ("leaf", "leaves", "ves"), ("knife", "knives", "ves"), ("wolf", "wolves", "ves"), ("wife", "wives", "ves"),
    ("life", "lives", "ves"), ("half", "halves", "ves"), ("shelf", "shelves", "ves"), ("loaf", "loaves", "ves"),
    *((w, w + "s", "f_s") for w in "roof chief cliff".split()),
    ("child", "children", "irregular"), ("mouse", "mice", "irregular"), ("man", "men", "irregular"),
    ("woman", "women", "irregular"), ("tooth", "teeth", "irregular"), ("foot", "feet", "irregular"),
    ("goose", "geese", "irregular"), ("person", "people", "irregular"), ("ox", "oxen", "irregular"),
    *((w, w, "same") for w in "sheep deer moose aircraft".split()),
]

PLURAL_RULES = {
    "s": 'Most English nouns form the plural by adding -s, and "{s}" follows that rule.',
    "es": 'Nouns ending in s, x, z, ch or sh usually add -es, so "{s}" becomes "{p}".',
    "oes": 'Some nouns ending in o, such as "{s}", add -es to make the plural.',
    "ies": 'Nouns ending in a consonant followed by y change the y to i and add -es, so "{s}" becomes "{p}".',
    "vowel_y": 'When a vowel comes before the final y, as in "{s}", you simply add -s.',
    "ves": 'Many nouns ending in f or fe change that ending to -ves, so "{s}" becomes "{p}".',
    "f_s": 'Not every noun ending in f changes to -ves, and "{s}" simply adds -s.',
    "irregular": 'The noun "{s}" is irregular, so its plural does not follow the usual rule of adding -s.',
    "same": 'The noun "{s}" is one of the few whose plural is exactly the same as the singular.',
}

DEFINITIONS = [  # (term with article, description, a true example sentence)
    ("a noun", "a word that names a person, place or thing", 'For example, "dog", "city" and "teacher" are nouns.'),
    ("a verb", "a word that names an action or a state", 'For example, "run", "eat" and "be" are verbs.'),
    ("an adjective", "a word that describes a noun", 'For example, in "a red ball" the word "red" is an adjective.'),
    ("an adverb", "a word that describes a verb, an adjective or another adverb",
     'For example, in "she runs quickly" the word "quickly" is an adverb.'),
    ("a pronoun", "a word used in place of a noun", 'For example, "she", "it" and "they" are pronouns.'),
    ("a synonym", "a word that means the same as another word", 'For example, "big" is a synonym of "large".'),
    ("an antonym", "a word that means the opposite of another word",
     'For example, "ancient" is an antonym of "modern".'),
    ("a vowel", "one of the letters a, e, i, o and u", "Most English words contain at least one vowel."),
    ("a consonant", "a letter of the alphabet that is not a vowel", 'For example, "b", "t" and "m" are consonants.'),
    ("a triangle", "a flat shape with three straight sides", "Its three angles always add up to 180 degrees."),
    ("a square", "a flat shape with four equal sides and four right angles",
     "A square is a special kind of rectangle."),
    ("a pentagon", "a flat shape with five straight sides", "The name comes from the Greek word for five."),
    ("a hexagon", "a flat shape with six straight sides", "The cells of a honeycomb are a famous example of hexagons."),
    ("an octagon", "a flat shape with eight straight sides", "Many stop signs are shaped like an octagon."),
    ("a decagon", "a flat shape with ten straight sides", "The name comes from the Greek word for ten."),
    ("a prime number", "a whole number above 1 divisible only by 1 and itself",
     "For example, 2, 3, 5, 7 and 11 are prime numbers."),
    ("an even number", "a whole number that divides by 2 with no remainder",
     "For example, 4, 10 and 36 are even numbers."),
    ("an odd number", "a whole number that leaves a remainder when divided by 2",
     "For example, 3, 7 and 15 are odd numbers."),
    ("the sum", "the result of adding numbers together", "For example, the sum of 2 and 3 is 5."),
    ("the product", "the result of multiplying numbers together", "For example, the product of 4 and 5 is 20."),
    ("a right angle", "an angle of exactly 90 degrees", "The corners of a square are all right angles."),
    ("the radius", "the distance from the centre of a circle to its edge",
     "The radius is half as long as the diameter."),
    ("the diameter", "a straight line across a circle through its centre",
     "The diameter is twice as long as the radius."),
    ("the circumference", "the distance all the way around a circle",
     "It can be found by multiplying the diameter by pi."),
    ("a herbivore", "an animal that eats only plants", "Cows, rabbits and deer are herbivores."),
    ("a carnivore", "an animal that eats only meat", "Lions and tigers are carnivores."),
    ("an omnivore", "an animal that eats both plants and meat", "Bears and humans are omnivores."),
    ("a puppy", "a young dog", "A puppy grows up to become an adult dog."),
    ("a kitten", "a young cat", "A kitten grows up to become an adult cat."),
    ("a calf", "a young cow", "Young elephants and whales are also called calves."),
    ("a lamb", "a young sheep", "A lamb grows up to become an adult sheep."),
    ("a foal", "a young horse", "A foal grows up to become an adult horse."),
    ("a tadpole", "a young frog that lives in water and has a tail",
     "A tadpole grows legs and loses its tail as it becomes a frog."),
    ("a duckling", "a young duck", "A duckling grows up to become an adult duck."),
    ("a gosling", "a young goose", "A gosling grows up to become an adult goose."),
    ("a cub", "a young bear", "Young lions and foxes are also called cubs."),
    ("a geologist", "a scientist who studies rocks", "Geologists also study how mountains and volcanoes form."),
    ("an astronomer", "a scientist who studies stars and planets", "Astronomers often use telescopes in their work."),
    ("a botanist", "a scientist who studies plants", "Botanists study how plants grow and how they are related."),
    ("a zoologist", "a scientist who studies animals", "Zoologists study how animals live and behave."),
    ("an island", "a piece of land with water all around it", "Madagascar and Iceland are examples of islands."),
    ("a peninsula", "a piece of land almost surrounded by water", "Italy and Florida are well-known peninsulas."),
    ("ice", "frozen water", "Pure water freezes into ice at 0 degrees Celsius."),
    ("a decade", "a period of ten years", "There are ten decades in a century."),
    ("a century", "a period of one hundred years", "The 20th century was the years from 1901 to 2000."),
    ("a millennium", "a period of one thousand years", "There are ten centuries in a millennium."),
    ("a fortnight", "a period of two weeks", "A fortnight is 14 days long."),
    ("a week", "a period of seven days", "There are 52 full weeks in a year."),
    ("a leap year", "a year with 366 days", "The extra day in a leap year is 29 February."),
]

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth",
            "tenth", "eleventh", "twelfth"]

# (family, big unit singular/plural, small unit singular/plural, small units per big unit, values in big units)
CONVERSIONS = [
    ("length", ("kilometre", "kilometres"), ("metre", "metres"), 1000, range(2, 26)),
    ("time", ("hour", "hours"), ("minute", "minutes"), 60, range(2, 13)),
    ("mass", ("kilogram", "kilograms"), ("gram", "grams"), 1000, range(2, 26)),
]


def _capital_facts(rng: random.Random) -> list[Fact]:
    return [Fact(
        key=country, answer=city,
        questions=(f"What is the capital of {country}?", f"What is the capital city of {country}?",
                   f"Which city is the capital of {country}?", f"Name the capital of {country}."),
        short=(f"{city} is the capital of {country}.", f"The capital city of {country} is {city}."),
        core=(f"The capital of {country} is {city}.", f"{cap(country)} is a country in {where}."),
        extra=(f"So when someone asks for the capital city of {country}, the answer is {city}.",
               f"The question only asks for the name of the city, which is {city}."),
    ) for country, city, where in CAPITALS]


def _pairs(rng: random.Random, n: int, lo: int, hi: int, ok: Callable[[int, int], bool]) -> list[tuple[int, int]]:
    """``n`` distinct unordered pairs from [lo, hi] that pass ``ok``, sampled (the full
    grid would be up to 500k pairs for ``larger``)."""
    seen: dict[tuple[int, int], None] = {}
    while len(seen) < n:
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        if ok(a, b) and (min(a, b), max(a, b)) not in seen:
            seen[(min(a, b), max(a, b))] = None
    return list(seen)


_POOL = 60  # facts sampled for the computed types: at least eval + DPO + SFT records of one type (52)


def _addition_facts(rng: random.Random) -> list[Fact]:
    facts = []
    for x, y in _pairs(rng, _POOL, 2, 99, lambda a, b: True):
        a, b = (x, y) if rng.random() < 0.5 else (y, x)
        s = a + b
        facts.append(Fact(
            key=f"{x}+{y}", answer=str(s),
            questions=(f"What is {a} + {b}?", f"What is {a} plus {b}?", f"Add {a} and {b}.",
                       f"What do you get when you add {a} and {b}?"),
            short=(f"{a} plus {b} equals {s}.", f"Adding {a} and {b} gives {s}."),
            core=(f"To find the answer we add {a} and {b} together.", f"{a} plus {b} equals {s}."),
            extra=(f"We can check it by subtracting: {s} minus {b} gives back {a}.",
                   f"The order does not matter in addition, so {b} plus {a} is also {s}."),
        ))
    return facts


def _subtraction_facts(rng: random.Random) -> list[Fact]:
    facts = []
    for b, a in _pairs(rng, _POOL, 2, 99, lambda p, q: p != q and max(p, q) >= 10):
        d = a - b
        facts.append(Fact(
            key=f"{a}-{b}", answer=str(d),
            questions=(f"What is {a} - {b}?", f"What is {a} minus {b}?", f"Subtract {b} from {a}.",
                       f"What do you get when you take {b} away from {a}?"),
            short=(f"{a} minus {b} equals {d}.", f"Taking {b} away from {a} leaves {d}."),
            core=(f"To find the answer we take {b} away from {a}.", f"{a} minus {b} equals {d}."),
            extra=(f"We can check it by adding: {d} plus {b} gives back {a}.",),
        ))
    return facts


def _multiplication_facts(rng: random.Random) -> list[Fact]:
    facts = []
    for x in range(2, 13):  # the times tables: 66 unordered pairs
        for y in range(x, 13):
            a, b = (x, y) if rng.random() < 0.5 else (y, x)
            p = a * b
            facts.append(Fact(
                key=f"{x}*{y}", answer=str(p),
                questions=(f"What is {a} * {b}?", f"What is {a} times {b}?", f"Multiply {a} by {b}.",
                           f"What is {a} multiplied by {b}?"),
                short=(f"{a} times {b} equals {p}.", f"Multiplying {a} by {b} gives {p}."),
                core=(f"Multiplying {a} by {b} means adding up {b} groups of {a}.", f"So {a} times {b} equals {p}."),
                extra=(f"We can check it by dividing: {p} divided by {b} is {a}.",
                       f"The order does not matter in multiplication, so {b} times {a} is also {p}."),
            ))
    return facts


def _conversion_facts(rng: random.Random) -> list[Fact]:
    facts = []
    for family, (big1, big), (_, small), factor, values in CONVERSIONS:
        for v in values:
            x = v * factor
            if rng.random() < 0.5:  # big → small: multiply
                have, want, result = f"{v} {big}", small, f"{x} {small}"
                step = f"To change {big} into {small} we multiply by {factor}, and {v} times {factor} is {x}."
                short2 = f"Multiplying {v} by {factor} gives {x} {small}."
            else:  # small → big: divide
                have, want, result = f"{x} {small}", big, f"{v} {big}"
                step = f"To change {small} into {big} we divide by {factor}, and {x} divided by {factor} is {v}."
                short2 = f"Dividing {x} by {factor} gives {v} {big}."
            facts.append(Fact(
                key=f"{family}:{v}", answer=result,
                questions=(f"How many {want} are in {have}?", f"Convert {have} to {want}.",
                           f"What is {have} in {want}?"),
                short=(f"One {big1} is {factor} {small}, so {have} is {result}.", short2),
                core=(f"One {big1} is equal to {factor} {small}.", step, f"So {have} is the same as {result}."),
            ))
    return facts


def _opposite_facts(rng: random.Random) -> list[Fact]:
    facts = []
    for a, b, both in OPPOSITES:
        w, o = (b, a) if both and rng.random() < 0.5 else (a, b)
        facts.append(Fact(
            key=f"{a}/{b}", answer=o,
            questions=(f'What is the opposite of "{w}"?', f'What is the opposite of the word "{w}"?',
                       f'Give the opposite of "{w}".', f'What word means the opposite of "{w}"?'),
            short=(f'The opposite of "{w}" is "{o}".', f'"{cap(o)}" is the opposite of "{w}".'),
            core=(f'The opposite of "{w}" is "{o}".',
                  f'Words with opposite meanings are called antonyms, so "{w}" and "{o}" are antonyms.'),
            extra=(f'You can see the contrast by putting the two words side by side: "{w}" and "{o}".',),
        ))
    return facts


def _colour_facts(rng: random.Random) -> list[Fact]:
    return [Fact(
        key=thing, answer=colour,
        questions=(f"What colour {be} {thing}?", f"What is the colour of {thing}?", f"Which colour {be} {thing}?"),
        short=(f"{cap(thing)} {be} {colour}.", f"The colour of {thing} is {colour}."),
        core=(f"{cap(thing)} {be} {colour}.",),
        extra=(f"That is the colour most people picture when they think of {thing}.",
               f"So the short answer to the question is simply {colour}."),
    ) for thing, colour, be in COLOURS]


def _letter_count_facts(rng: random.Random) -> list[Fact]:
    return [Fact(
        key=w, answer=str(len(w)),
        questions=(f'How many letters are in the word "{w}"?', f'How many letters does the word "{w}" have?',
                   f'Count the letters in the word "{w}".'),
        short=(f'The word "{w}" has {len(w)} letters.', f'Counting each letter of "{w}" gives {len(w)}.'),
        core=(f'Spelling "{w}" out letter by letter gives {"-".join(w)}.', f"That makes {len(w)} letters in total."),
        extra=(f'The word starts with "{w[0]}" and ends with "{w[-1]}".',),
    ) for w in LETTER_WORDS]


def _larger_facts(rng: random.Random) -> list[Fact]:
    facts = []
    for m, big in _pairs(rng, _POOL, 2, 999, lambda a, b: a != b):
        a, b = (m, big) if rng.random() < 0.5 else (big, m)
        facts.append(Fact(
            key=f"{m}<{big}", answer=str(big),
            questions=(f"Which is larger, {a} or {b}?", f"Which number is bigger: {a} or {b}?",
                       f"Of {a} and {b}, which is greater?"),
            short=(f"{big} is larger than {m}.", f"{big} is greater than {m} by {big - m}."),
            core=(f"{big} is larger than {m}.", f"The difference between them is {big - m}."),
            extra=(f"On a number line, {big} sits further to the right than {m}.",),
        ))
    return facts


_WEEK = "The days of the week go Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday."
_YEAR = ("The months of the year go January, February, March, April, May, June, July, August, "
         "September, October, November and December.")


def _calendar_facts(rng: random.Random) -> list[Fact]:
    facts = []
    for i, d in enumerate(DAYS):
        nxt, prv = DAYS[(i + 1) % 7], DAYS[(i - 1) % 7]
        facts.append(Fact(
            key=f"day+1:{d}", answer=nxt,
            questions=(f"What day comes after {d}?", f"Which day of the week follows {d}?",
                       f"If today is {d}, what day is tomorrow?"),
            short=(f"{nxt} comes right after {d}.", f"The day after {d} is {nxt}."),
            core=(_WEEK, f"In the weekly cycle, {nxt} comes right after {d}."),
        ))
        facts.append(Fact(
            key=f"day-1:{d}", answer=prv,
            questions=(f"What day comes before {d}?", f"Which day of the week comes just before {d}?",
                       f"If today is {d}, what day was yesterday?"),
            short=(f"{prv} comes right before {d}.", f"The day before {d} is {prv}."),
            core=(_WEEK, f"In the weekly cycle, {prv} comes right before {d}."),
        ))
        for n in range(2, 6):
            seq = [DAYS[(i + k) % 7] for k in range(1, n + 1)]
            facts.append(Fact(
                key=f"day+{n}:{d}", answer=seq[-1],
                questions=(f"What day is it {n} days after {d}?", f"If today is {d}, what day will it be in {n} days?",
                           f"What day of the week is {n} days after {d}?"),
                short=(f"Counting {n} days forward from {d} lands on {seq[-1]}.",
                       f"{seq[-1]} is {n} days after {d}."),
                core=(f"Counting forward {n} days from {d} gives {', '.join(seq[:-1])} and {seq[-1]}.",
                      f"So {n} days after {d} it is {seq[-1]}."),
                extra=(_WEEK,),
            ))
    for i, m in enumerate(MONTHS):
        nxt, prv, o = MONTHS[(i + 1) % 12], MONTHS[(i - 1) % 12], ORDINALS[i]
        facts.append(Fact(
            key=f"month+1:{m}", answer=nxt,
            questions=(f"What month comes after {m}?", f"Which month follows {m}?", f"What is the month after {m}?"),
            short=(f"{nxt} comes right after {m}.", f"The month after {m} is {nxt}."),
            core=(_YEAR, f"In the yearly cycle, {nxt} comes right after {m}."),
        ))
        facts.append(Fact(
            key=f"month-1:{m}", answer=prv,
            questions=(f"What month comes before {m}?", f"Which month comes just before {m}?",
                       f"What is the month before {m}?"),
            short=(f"{prv} comes right before {m}.", f"The month before {m} is {prv}."),
            core=(_YEAR, f"In the yearly cycle, {prv} comes right before {m}."),
        ))
        facts.append(Fact(
            key=f"month#{i + 1}", answer=m,
            questions=(f"What is the {o} month of the year?", f"Which month is month number {i + 1} of the year?",
                       f"Which month comes {o} in the year?"),
            short=(f"{m} is the {o} month of the year.", f"Month number {i + 1} of the year is {m}."),
            core=(_YEAR, f"Counting from January, the {o} month is {m}."),
        ))
    return facts


def _plural_facts(rng: random.Random) -> list[Fact]:
    return [Fact(
        key=s, answer=p,
        questions=(f'What is the plural of "{s}"?', f'What is the plural form of the word "{s}"?',
                   f'Give the plural of "{s}".'),
        short=(f'The plural of "{s}" is "{p}".', f'In the plural, "{s}" becomes "{p}".'),
        core=(f'The plural of "{s}" is "{p}".', PLURAL_RULES[rule].format(s=s, p=p)),
    ) for s, p, rule in PLURALS]


def _definition_facts(rng: random.Random) -> list[Fact]:
    facts = []
    for term, desc, example in DEFINITIONS:
        bare = term.split(" ", 1)[1] if term.split(" ", 1)[0] in ("a", "an", "the") else term
        facts.append(Fact(
            key=bare, answer=term,
            questions=(f"What do we call {desc}?", f"What is the word for {desc}?", f"What is the name for {desc}?"),
            short=(f"{cap(term)} is {desc}.", f'The word for {desc} is "{bare}".'),
            core=(f"{cap(term)} is {desc}.", example),
        ))
    return facts


# Type → (fact builder, sentences any long WHY of that type may add). Order is the order
# counts are dealt in, so it is part of the generated files.
TYPES: dict[str, tuple[Callable[[random.Random], list[Fact]], tuple[str, ...]]] = {
    "capital": (_capital_facts, (
        "Capital cities are often marked on maps with a star or a special symbol.",
        "Learning capital cities is a common part of geography lessons in school.",
        "Most countries have one official capital city, although a few have more than one.")),
    "addition": (_addition_facts, (
        "Addition combines two amounts into a single total.",
        "Checking a sum with subtraction is a good habit for catching small mistakes.")),
    "subtraction": (_subtraction_facts, (
        "Subtraction finds the difference between two numbers.",
        "In subtraction the order matters, because swapping the numbers changes the result.")),
    "multiplication": (_multiplication_facts, (
        "Multiplication is a quick way to add up equal groups.",
        "Knowing the times tables up to 12 makes problems like this quick to solve.")),
    "conversion": (_conversion_facts, (
        "Converting units changes the number but not the actual amount being measured.",
        "To go from a bigger unit to a smaller one we multiply, and to go back we divide.")),
    "opposite": (_opposite_facts, (
        "Learning opposites in pairs helps people remember both words at once.",
        "Antonyms are useful for describing differences clearly and simply.",
        "Many everyday words have a clear opposite, like this one.")),
    "colour": (_colour_facts, (
        "Colour words are a simple way to describe and recognise everyday things.",
        "Children often learn colour names by pointing at familiar objects like this one.",
        "The colour we see is the colour of the light an object reflects.")),
    "letter_count": (_letter_count_facts, (
        "Counting letters one at a time avoids skipping or double counting any of them.",
        "A letter that appears twice in a word is counted twice.",
        "Spaces and punctuation marks are not letters, so they are never counted.")),
    "larger": (_larger_facts, (
        "To compare two whole numbers, first compare how many digits they have, "
        "then compare digit by digit from the left.",
        "Among positive whole numbers, one with more digits is always the larger one.")),
    "calendar": (_calendar_facts, (
        "The order of the days never changes, and after Sunday the week starts again with Monday.",
        "A year has twelve months, and after December the year starts again with January.")),
    "plural": (_plural_facts, (
        "A plural is the form of a noun used when talking about more than one of something.",
        "English has a few spelling rules for plurals, plus some irregular nouns that simply have to be memorised.")),
    "definition": (_definition_facts, (
        "Knowing the exact word for something makes speaking and writing clearer.",
        "The question gives a description, and the answer is the word that matches it.")),
}

# Sentences any long WHY may add, whatever the type.
COMMON = (
    "The short answer above gives the result on its own, and this explanation shows where it comes from.",
    "Writing the reasoning out step by step makes the answer easy to check.",
    "It is always a good idea to double-check an answer like this before relying on it.",
)

# --- explanations ----------------------------------------------------------------------


def short_why(rng: random.Random, fact: Fact) -> str:
    """One sentence of at most ``SHORT_MAX_WORDS`` words (a chosen WHY)."""
    fits = [s for s in fact.short if len(words(s)) <= SHORT_MAX_WORDS]
    if not fits:
        raise AssertionError(f"no short explanation of {fact.key!r} fits {SHORT_MAX_WORDS} words")
    return rng.choice(fits)


def long_why(rng: random.Random, fact: Fact, general: tuple[str, ...]) -> str:
    """The fact's core sentences plus optional ones until 45–80 words in 3–5 sentences (an SFT WHY)."""
    lo, hi = LONG_WORDS
    for _ in range(100):
        pool = list(fact.extra + general + COMMON)
        rng.shuffle(pool)
        sents = list(fact.core)
        n = sum(len(words(s)) for s in sents)
        for s in pool:
            if n >= lo or len(sents) >= LONG_SENTENCES[1]:
                break
            if n + len(words(s)) <= hi:
                sents.append(s)
                n += len(words(s))
        text = " ".join(sents)
        if lo <= len(words(text)) <= hi and LONG_SENTENCES[0] <= count_sentences(text) <= LONG_SENTENCES[1]:
            return text
    raise AssertionError(f"cannot build a long explanation for {fact.key!r}")


# --- generation ------------------------------------------------------------------------


def _spread(n: int, k: int, from_end: bool = False) -> list[int]:
    """``n`` split over ``k`` parts as evenly as possible; the remainder goes to the first
    parts (or the last, so two splits' remainders land on different types)."""
    counts = [n // k + (1 if i < n % k else 0) for i in range(k)]
    return counts[::-1] if from_end else counts


def _deal(facts: list[Fact], n_eval: int, n_dpo: int, n_sft: int) -> tuple[list[Fact], list[Fact], list[Fact]]:
    """Disjoint fact lists for eval (``n_eval`` facts), DPO and SFT. With fewer facts than
    records the rest is split in proportion to the record counts and reused."""
    if len(facts) < n_eval + 2:
        raise AssertionError(f"{len(facts)} facts cannot cover {n_eval} eval prompts plus DPO and SFT")
    ev, rest = facts[:n_eval], facts[n_eval:]
    if len(rest) >= n_dpo + n_sft:
        return ev, rest[:n_dpo], rest[n_dpo:n_dpo + n_sft]
    k = min(len(rest) - 1, max(1, round(len(rest) * n_dpo / (n_dpo + n_sft))))
    return ev, rest[:k], rest[k:]


def _questions(rng: random.Random, facts: list[Fact], n: int) -> list[tuple[Fact, str]]:
    """``n`` (fact, question) pairs cycling through ``facts``; a fact met again gets its next
    wording, so questions within a split stay distinct while wordings last."""
    start = {f.key: rng.randrange(len(f.questions)) for f in facts}
    out = []
    for i in range(n):
        f = facts[i % len(facts)]
        out.append((f, f.questions[(start[f.key] + i // len(facts)) % len(f.questions)]))
    return out


def generate(n_sft: int = 320, n_dpo: int = 256, n_eval: int = 48, seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """The three datasets as lists of records (see the module docstring); same arguments,
    same records.

    - ``sft``: ``{"messages": [user, assistant], "type"}``, assistant in the house format
      with a long WHY.
    - ``dpo``: ``{"prompt", "chosen", "rejected", "type"}`` strings; same ANSWER line,
      chosen WHY ≤ 15 words, rejected WHY the SFT style (45–80 words, 3–5 sentences).
    - ``eval``: ``{"id", "prompt", "reference", "method": "contains", "type"}``, an
      accuracy suite for ``evaluate.scoring.load_suite``.

    Each split cycles through the types in order; the extra records of SFT go to the
    first types, those of DPO to the last, and eval gets ``n_eval // 12`` (+1) per type.
    """
    rng = random.Random(seed)
    k = len(TYPES)
    per_sft, per_dpo, per_eval = _spread(n_sft, k), _spread(n_dpo, k, from_end=True), _spread(n_eval, k)
    sft, dpo, ev = [], [], []
    for t, (build, general), ns, nd, ne in zip(TYPES, TYPES.values(), per_sft, per_dpo, per_eval):
        facts = build(rng)
        rng.shuffle(facts)
        ev_f, dpo_f, sft_f = _deal(facts, ne, nd, ns)
        for f, q in _questions(rng, sft_f, ns):
            answer = house_answer(f.answer, long_why(rng, f, general))
            sft.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer}],
                        "type": t})
        for f, q in _questions(rng, dpo_f, nd):
            dpo.append({"prompt": q, "chosen": house_answer(f.answer, short_why(rng, f)),
                        # rejected: the long WHY the SFT stage taught — the behaviour DPO should remove
                        "rejected": house_answer(f.answer, long_why(rng, f, general)), "type": t})
        for f, q in _questions(rng, ev_f, ne):
            ev.append({"prompt": q, "reference": f.answer, "method": "contains", "type": t})
    rng.shuffle(sft)
    rng.shuffle(dpo)
    rng.shuffle(ev)
    ev = [{"id": f"q{i:03d}", **r} for i, r in enumerate(ev, 1)]
    return {"sft": sft, "dpo": dpo, "eval": ev}


def dumps(records: list[dict[str, Any]]) -> str:
    """JSONL text: one object per line in the records' own key order, UTF-8 as is, trailing newline."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def write(out_dir: str | Path = DATA_DIR, **sizes: int) -> dict[str, Path]:
    """Generate (``generate(**sizes)``) and write the three files under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, records in generate(**sizes).items():
        paths[split] = out / FILES[split]
        paths[split].write_text(dumps(records), encoding="utf-8", newline="\n")
    return paths


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tunesmith.quickstart.data",
                                description="Regenerate the quickstart's bundled datasets.")
    p.add_argument("--out", default=str(DATA_DIR), help=f"output folder (default: {DATA_DIR})")
    args = p.parse_args(argv)
    for split, path in write(args.out).items():
        n = sum(1 for _ in path.open(encoding="utf-8"))
        print(f"{split:5s} {n:4d} records  {path}")


if __name__ == "__main__":
    main()
