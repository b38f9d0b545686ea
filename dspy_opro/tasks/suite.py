"""A suite of small tasks whose accuracy, for a small model, depends on what the instruction says.

Every task is generated in code from a seed (nothing is downloaded), has one input field and one
output field (``answer``), and an exact metric: a rule that reads the reply, with no model in the
loop. Each one hides from the input something only the instruction can convey:

- ``json_record`` (format): "Tom is 40 years old and lives in Paris." -> a JSON object with the
  keys ``name``, ``age`` and ``city``;
- ``yes_no`` (format): "Is 7 greater than 4?" -> a reply that starts with yes or no;
- ``sentiment`` (format, label set): a one-sentence review -> the word positive or negative;
- ``plural`` (operation): a noun -> its plural;
- ``antonym`` (operation): a word -> its opposite;
- ``french_greeting`` (language): a first name -> a greeting in French that names the person.

`SUITE` maps each name to a `SuiteTask`, which draws deterministic, distinct examples
(`SuiteTask.make_dataset`, `SuiteTask.make_splits`), builds the program
(``dspy.Predict("<input> -> answer")``, `SuiteTask.make_program`) and holds the metric, the
instruction an optimizer starts from (`SuiteTask.start`) and the hand-written instructions whose
accuracies show how much the instruction matters (`SuiteTask.instructions`; measured by
``python benchmarks/task_suite.py``, figures in ``benchmarks/README.md``).

Every metric takes ``(example, prediction, trace=None)``, reads the prediction's ``answer``
field (or the prediction itself when it is a string) and returns 1.0 or 0.0; the example's own
``answer`` label always scores 1.0. Words are compared case-insensitively, with accents removed.
"""

from __future__ import annotations

import json
import random
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dspy

Draw = Callable[[random.Random], tuple[str, str]]


# --------------------------------------------------------------------------- reading replies
_WORD = re.compile(r"[a-z]+")


def reply_text(prediction: Any) -> str:
    """The reply a metric reads: the prediction's ``answer`` field, or the prediction itself."""
    value = getattr(prediction, "answer", prediction)
    return "" if value is None else str(value)


def reply_words(text: str) -> list[str]:
    """The words of ``text``: lower case, accents removed, letters only (``"Bonjour, Zoé!"`` -> bonjour, zoe)."""
    folded = unicodedata.normalize("NFKD", str(text)).encode("ascii", "ignore").decode("ascii").lower()
    return _WORD.findall(folded)


def first_json_object(text: str) -> Any:
    """The first JSON object (``{...}``) in ``text`` that parses, or None."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


# --------------------------------------------------------------------------- the task type
@dataclass(frozen=True)
class SuiteTask:
    """One task of the suite.

    Attributes:
        name: The registry name (``SUITE[name]``).
        conveys: What the instruction must convey: ``"format"``, ``"operation"`` or ``"language"``.
        summary: One line on what the task asks.
        input_field: The name of the program's single input field.
        instructions: Hand-written instructions by role (``start``, ``neutral``, ``good`` and
            others), for measuring how much the instruction matters; ``start`` is the one an
            optimizer starts from (`start`).
        metric: ``metric(example, prediction, trace=None) -> 1.0 | 0.0``.
        draw: Draws one ``(input, answer)`` pair from a ``random.Random``.
        capacity: How many distinct inputs ``draw`` can produce (None: far more than any split needs).
    """

    name: str
    conveys: str
    summary: str
    input_field: str
    instructions: dict[str, str]
    metric: Callable[..., float]
    draw: Draw
    capacity: int | None = None

    @property
    def start(self) -> str:
        """The instruction an optimizer starts from: about the task, silent on what matters."""
        return self.instructions["start"]

    @property
    def signature(self) -> str:
        """The program's signature string, ``"<input_field> -> answer"``."""
        return f"{self.input_field} -> answer"

    def make_dataset(self, n: int, seed: int = 0) -> list[dspy.Example]:
        """``n`` examples with distinct inputs, the same for the same seed.

        A longer dataset from the same seed starts with the shorter one.

        Args:
            n: How many examples.
            seed: Random seed.

        Returns:
            DSPy examples with the input field and the ``answer`` label.

        Raises:
            ValueError: ``n`` is negative or more than the task has distinct inputs.
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if self.capacity is not None and n > self.capacity:
            raise ValueError(f"task {self.name!r} has {self.capacity} distinct inputs; {n} were asked for")
        rng = random.Random(f"{self.name}:{seed}")
        examples: list[dspy.Example] = []
        seen: set[str] = set()
        attempts = 0
        while len(examples) < n:
            attempts += 1
            if attempts > 200 * n + 1000:
                raise ValueError(f"could not draw {n} distinct examples for task {self.name!r}")
            text, answer = self.draw(rng)
            if text in seen:
                continue
            seen.add(text)
            examples.append(dspy.Example(**{self.input_field: text, "answer": answer}).with_inputs(self.input_field))
        return examples

    def make_splits(
        self, n_train: int, n_val: int, n_test: int = 0, seed: int = 0
    ) -> tuple[list[dspy.Example], list[dspy.Example], list[dspy.Example]]:
        """Disjoint train, validation and test sets, cut from one seeded draw.

        Args:
            n_train: Training examples.
            n_val: Validation examples.
            n_test: Test examples.
            seed: Random seed.

        Returns:
            ``(train, val, test)``; no input appears in two of them.
        """
        examples = self.make_dataset(n_train + n_val + n_test, seed)
        return examples[:n_train], examples[n_train : n_train + n_val], examples[n_train + n_val :]

    def make_program(self, instructions: str | None = None) -> dspy.Predict:
        """A fresh ``dspy.Predict`` for the task, with the given instructions (None keeps DSPy's default).

        Args:
            instructions: The signature's instructions.

        Returns:
            The program.
        """
        signature = dspy.Signature(self.signature)
        if instructions is not None:
            signature = signature.with_instructions(instructions)
        return dspy.Predict(signature)


# --------------------------------------------------------------------------- word lists
FIRST_NAMES = (
    "Aaron Adam Alan Alice Amber Amy Anna Arthur Ben Bella Beth Bill Bruce Carl Carol Chloe Chris Clara "
    "Dan Daisy David Diana Dylan Eddie Ella Emma Eric Eva Felix Fiona Frank Fred Gary George Grace Hannah "
    "Harry Helen Henry Holly Ian Isaac Iris Jack Jake James Jane Jason Jenny Jess John Julia Kate Kevin "
    "Kim Laura Leo Liam Lily Lisa Lucy Luke Mark Martin Mary Max Mia Mike Molly Nancy Nina Noah Olga "
    "Oliver Oscar Owen Paul Peter Phil Rachel Ralph Rita Rob Rose Ruby Ryan Sam Sara Sean Simon Sophie "
    "Steve Susan Ted Tina Tom Tony Uma Vera Victor Wendy Will Yara Zoe"
).split()

CITIES = (
    "Paris London Rome Berlin Madrid Vienna Lisbon Dublin Oslo Prague Athens Warsaw Cairo Tokyo Boston "
    "Chicago Toronto Sydney Denver Seattle Miami Dallas Austin Geneva Milan"
).split()

# Nouns and their plurals: regular, -es, -ies, -ves, irregular.
PLURALS = {
    **{
        word: word + "s"
        for word in (
            "cat dog car tree book pen cup bird door chair table house river apple flower hat shoe sock ring bell "
            "lamp coat bag desk road ship star cloud lake hill bike train plane boat egg frog duck horse cow goat "
            "pig rock girl boy hand nose ear eye key coin map card shirt window garden bottle candle pencil rabbit "
            "tiger lion snake spoon plate cake drum kite"
        ).split()
    },
    **{
        word: word + "es"
        for word in (
            "box bus fox dish brush church watch glass class kiss match bench wish beach peach dress lunch "
            "potato tomato hero echo"
        ).split()
    },
    **{
        word: word[:-1] + "ies"
        for word in "baby city lady party story berry cherry puppy family country penny pony fly".split()
    },
    "leaf": "leaves",
    "wolf": "wolves",
    "knife": "knives",
    "wife": "wives",
    "shelf": "shelves",
    "half": "halves",
    "loaf": "loaves",
    "calf": "calves",
    "life": "lives",
    "thief": "thieves",
    "child": "children",
    "man": "men",
    "woman": "women",
    "mouse": "mice",
    "foot": "feet",
    "tooth": "teeth",
    "goose": "geese",
    "person": "people",
    "ox": "oxen",
    "cactus": "cacti",
}

# Pairs of opposites; a word that has several (old: new, young) accepts each.
_OPPOSITE_PAIRS = (
    "hot cold|big small|fast slow|happy sad|up down|open closed|light dark|new old|young old|tall short|"
    "long short|high low|rich poor|strong weak|hard soft|wet dry|full empty|clean dirty|early late|good bad|"
    "easy difficult|easy hard|loud quiet|thick thin|heavy light|wide narrow|deep shallow|near far|left right|"
    "right wrong|push pull|win lose|buy sell|love hate|give take|day night|black white|true false|"
    "begin end|start finish|first last|top bottom|front back|inside outside|above below|before after|"
    "always never|alive dead|awake asleep|safe dangerous|cheap expensive|sweet sour|smooth rough|sharp dull|"
    "friend enemy|come go|arrive leave|laugh cry|remember forget|accept refuse|north south|east west|"
    "summer winter|boy girl|king queen|brother sister|question answer|entrance exit|float sink|war peace|"
    "success failure|increase decrease|more less|many few|polite rude|kind cruel|busy free|found lost|"
    "noisy quiet|simple complex|wild tame|ancient modern|inner outer|major minor|sunny cloudy"
)
ANTONYMS: dict[str, tuple[str, ...]] = {}
for _pair in _OPPOSITE_PAIRS.split("|"):
    _a, _b = _pair.split()
    ANTONYMS[_a] = (*ANTONYMS.get(_a, ()), _b)
    ANTONYMS[_b] = (*ANTONYMS.get(_b, ()), _a)

_REVIEW_SUBJECTS = (
    "food",
    "movie",
    "hotel",
    "service",
    "staff",
    "book",
    "phone",
    "room",
    "concert",
    "game",
    "coffee",
    "show",
    "trip",
    "museum",
    "restaurant",
    "laptop",
    "class",
    "park",
    "music",
    "app",
)
_POSITIVE = ("great", "wonderful", "excellent", "lovely", "amazing", "fantastic", "pleasant", "perfect", "superb")
_NEGATIVE = ("terrible", "awful", "horrible", "boring", "disappointing", "poor", "dreadful", "bad", "useless")
_POSITIVE_CLOSINGS = ("I would go again.", "I loved every minute.", "Highly recommended.", "I will be back.")
_NEGATIVE_CLOSINGS = ("I want my money back.", "Never again.", "I would not recommend it.", "What a waste of time.")


# --------------------------------------------------------------------------- generators
def _draw_json(rng: random.Random) -> tuple[str, str]:
    name, age, city = rng.choice(FIRST_NAMES), rng.randint(18, 80), rng.choice(CITIES)
    template = rng.choice(
        (
            "{name} is {age} years old and lives in {city}.",
            "{name} lives in {city} and is {age} years old.",
            "At {age}, {name} lives in {city}.",
        )
    )
    text = template.format(name=name, age=age, city=city)
    return text, json.dumps({"name": name, "age": age, "city": city})


def _draw_yes_no(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(range(1, 100), 2)
    relation = rng.choice(("greater than", "less than", "larger than", "smaller than"))
    bigger = relation in ("greater than", "larger than")
    return f"Is {a} {relation} {b}?", "yes" if (a > b) == bigger else "no"


def _draw_sentiment(rng: random.Random) -> tuple[str, str]:
    positive = rng.random() < 0.5
    adjectives, closings = (_POSITIVE, _POSITIVE_CLOSINGS) if positive else (_NEGATIVE, _NEGATIVE_CLOSINGS)
    subject = rng.choice(_REVIEW_SUBJECTS)
    first, second = rng.sample(adjectives, 2)
    template = rng.choice(
        (
            "The {s} was {a} and {b}.",
            "The {s} was {a}. {c}",
            "What a {a} {s}! {c}",
            "I found the {s} {a}, really {b}.",
        )
    )
    return template.format(s=subject, a=first, b=second, c=rng.choice(closings)), "positive" if positive else "negative"


def _draw_plural(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(sorted(PLURALS))
    return word, PLURALS[word]


def _draw_antonym(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(sorted(ANTONYMS))
    return word, ANTONYMS[word][0]


def _draw_greeting(rng: random.Random) -> tuple[str, str]:
    name = rng.choice(FIRST_NAMES)
    return name, f"Bonjour, {name} !"


# --------------------------------------------------------------------------- metrics
def json_record_metric(example: Any, prediction: Any, trace: Any = None) -> float:
    """1.0 when the reply's first JSON object has exactly the keys name, age and city with the right values.

    Values are compared as text, case-insensitively (``40`` and ``"40"`` are the same age).
    """
    found = first_json_object(reply_text(prediction))
    gold = json.loads(example.answer)
    if not isinstance(found, dict) or set(found) != set(gold):
        return 0.0
    return float(all(str(found[k]).strip().lower() == str(v).lower() for k, v in gold.items()))


def yes_no_metric(example: Any, prediction: Any, trace: Any = None) -> float:
    """1.0 when the reply's first word is the gold yes or no."""
    words = reply_words(reply_text(prediction))
    return float(bool(words) and words[0] == example.answer)


def sentiment_metric(example: Any, prediction: Any, trace: Any = None) -> float:
    """1.0 when the first of the words positive / negative in the reply is the gold label."""
    labels = [w for w in reply_words(reply_text(prediction)) if w in ("positive", "negative")]
    return float(bool(labels) and labels[0] == example.answer)


def plural_metric(example: Any, prediction: Any, trace: Any = None) -> float:
    """1.0 when the gold plural appears as a word of the reply."""
    return float(example.answer in reply_words(reply_text(prediction)))


def antonym_metric(example: Any, prediction: Any, trace: Any = None) -> float:
    """1.0 when an opposite of the input word (any of `ANTONYMS`) appears as a word of the reply."""
    accepted = set(ANTONYMS.get(example.word, ())) | {example.answer}
    return float(bool(accepted & set(reply_words(reply_text(prediction)))))


def french_greeting_metric(example: Any, prediction: Any, trace: Any = None) -> float:
    """1.0 when the reply contains the word bonjour and the person's name."""
    words = reply_words(reply_text(prediction))
    return float("bonjour" in words and reply_words(example.name)[0] in words)


# --------------------------------------------------------------------------- the registry
_TASKS = (
    SuiteTask(
        name="json_record",
        conveys="format",
        summary="a sentence about a person -> a JSON object with the keys name, age and city",
        input_field="text",
        instructions={
            "start": "Extract the information from the text.",
            "neutral": "Answer the question.",
            "good": "Convert the text to JSON with the keys name, age and city.",
            "good, other wording": 'Reply with a JSON object like {"name": ..., "age": ..., "city": ...}.',
        },
        metric=json_record_metric,
        draw=_draw_json,
    ),
    SuiteTask(
        name="yes_no",
        conveys="format",
        summary="a comparison of two numbers as a question -> a reply starting with yes or no",
        input_field="question",
        instructions={
            "start": "Compare the two numbers.",
            "neutral": "Answer the question.",
            "good": "Answer with yes or no.",
            "good, other wording": "Start your reply with Yes or No.",
        },
        metric=yes_no_metric,
        draw=_draw_yes_no,
    ),
    SuiteTask(
        name="sentiment",
        conveys="format",
        summary="a one-sentence review -> the word positive or negative",
        input_field="review",
        instructions={
            "start": "Read the review.",
            "neutral": "Answer the question.",
            "good": "The sentiment of this review is",
            "good, other wording": "Is the review positive or negative?",
        },
        metric=sentiment_metric,
        draw=_draw_sentiment,
    ),
    SuiteTask(
        name="plural",
        conveys="operation",
        summary="a noun -> its plural",
        input_field="word",
        instructions={
            "start": "Rewrite the word.",
            "neutral": "Answer the question.",
            "good": "Write the plural of the word.",
            "wrong operation": "Give the opposite of the word.",
        },
        metric=plural_metric,
        draw=_draw_plural,
        capacity=len(PLURALS),
    ),
    SuiteTask(
        name="antonym",
        conveys="operation",
        summary="a word -> its opposite",
        input_field="word",
        instructions={
            "start": "Give a word related to this word.",
            "neutral": "Answer the question.",
            "good": "What is the opposite of this word?",
            "wrong operation": "Write the plural of the word.",
        },
        metric=antonym_metric,
        draw=_draw_antonym,
        capacity=len(ANTONYMS),
    ),
    SuiteTask(
        name="french_greeting",
        conveys="language",
        summary="a first name -> a greeting in French that names the person",
        input_field="name",
        instructions={
            "start": "Greet the person.",
            "neutral": "Answer the question.",
            "good": "Say hello in French.",
            "good, other wording": "Greet the person by name in French.",
        },
        metric=french_greeting_metric,
        draw=_draw_greeting,
        capacity=len(FIRST_NAMES),
    ),
)

SUITE: dict[str, SuiteTask] = {task.name: task for task in _TASKS}


def get_task(name: str) -> SuiteTask:
    """The suite task called ``name``.

    Raises:
        KeyError: No such task; the message lists the names.
    """
    try:
        return SUITE[name]
    except KeyError:
        raise KeyError(f"unknown suite task {name!r}; choose from {sorted(SUITE)}") from None
