"""A small, deterministic English corpus the repo makes itself, for training the embedded tiny model.

Everything is drawn from a seeded `random.Random`, so `make_corpus(n, seed)` returns the same list of
documents on every machine. Document kinds (weights in `_KINDS`):

  story      templated short stories: characters, places, objects, simple plots
  arithmetic "3 + 4 = 7." facts, in short runs
  counting   "Count from 5: 5, 6, 7, 8, 9." (up and down), "Count by twos: ..."
  calendar   days of the week / months of the year, in order, from a random start
  qa         "Q: What color is the sky? A: The sky is blue."
  echo       "Say it twice: red Tom cup. red Tom cup." (copying)
  chat       the same content in the ChatML-like instruct layout (see `chat_text`):
             <|im_start|>user\n{msg}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>

The corpus is deliberately small and regular so that a ~3M parameter model learns it in minutes and
its diffusion passes become confident (many positions of a block are determined by their context).
Documents are plain strings; chat documents contain the `<|im_start|>` / `<|im_end|>` markers.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass

IM_START, IM_END = "<|im_start|>", "<|im_end|>"

# ---- vocabulary ---------------------------------------------------------------------------------

GIRLS = ["Anna", "Lily", "Mia", "Zoe", "Emma", "Sara", "Lucy", "Nora", "Ella", "Ruby"]
BOYS = ["Tom", "Ben", "Sam", "Max", "Leo", "Jack", "Finn", "Noah", "Omar", "Luke"]
ANIMALS = ["cat", "dog", "bird", "fox", "rabbit", "duck", "frog", "horse", "cow", "bear"]
SOUNDS = {"cat": "meow", "dog": "woof", "bird": "tweet", "fox": "yip", "rabbit": "squeak",
          "duck": "quack", "frog": "ribbit", "horse": "neigh", "cow": "moo", "bear": "growl"}
PLACES = ["the park", "the forest", "the beach", "the garden", "the school", "the shop",
          "the river", "the farm", "the library", "the hill"]
COLORS = ["red", "blue", "green", "yellow", "pink", "black", "white", "orange", "purple", "brown"]
OBJECTS = ["ball", "kite", "hat", "book", "box", "cup", "toy car", "bike", "drum", "doll"]
FOODS = ["apple", "cake", "cookie", "banana", "sandwich", "pie", "pear", "orange", "carrot", "egg"]
HIDING = ["under the bed", "behind the door", "in the grass", "under a tree", "in a big box",
          "next to the sofa", "on the roof", "in the kitchen"]
FEELINGS = ["happy", "sad", "tired", "excited", "scared", "hungry", "proud", "sleepy"]
WEATHER = ["sunny", "rainy", "windy", "cold", "warm", "cloudy"]
ADJ = ["little", "big", "kind", "funny", "brave", "shy", "clever", "happy"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
FACTS = [  # (question, answer) pairs with fixed answers
    ("What color is the sky?", "The sky is blue."),
    ("What color is grass?", "Grass is green."),
    ("What color is snow?", "Snow is white."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("How many months are in a year?", "There are twelve months in a year."),
    ("How many legs does a dog have?", "A dog has four legs."),
    ("How many legs does a bird have?", "A bird has two legs."),
    ("What do cows drink?", "Cows drink water."),
    ("Where do fish live?", "Fish live in water."),
    ("What do bees make?", "Bees make honey."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("What is the opposite of big?", "The opposite of big is small."),
    ("What is the opposite of up?", "The opposite of up is down."),
    ("When do we sleep?", "We sleep at night."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("What is the capital of Spain?", "The capital of Spain is Madrid."),
]
GREETINGS = [
    ("Hello!", "Hello! How can I help you today?"),
    ("Hi!", "Hi! How can I help you today?"),
    ("Who are you?", "I am a tiny language model. I can tell stories, count and do simple sums."),
    ("Thank you!", "You are welcome!"),
    ("What can you do?", "I can tell short stories, count, add small numbers and answer simple questions."),
]


@dataclass
class _Cast:
    """The slots one story fills: a hero, a friend, an animal, an object, a place."""

    name: str
    he: str          # subject pronoun, "He" / "She"
    his: str         # possessive, "his" / "her"
    friend: str
    animal: str
    color: str
    obj: str
    place: str
    food: str


def _cast(r: random.Random) -> _Cast:
    girl = r.random() < 0.5
    name = r.choice(GIRLS if girl else BOYS)
    friend = r.choice([n for n in GIRLS + BOYS if n != name])
    return _Cast(name, "She" if girl else "He", "her" if girl else "his", friend, r.choice(ANIMALS),
                 r.choice(COLORS), r.choice(OBJECTS), r.choice(PLACES), r.choice(FOODS))


# ---- stories ------------------------------------------------------------------------------------

def _story_lost(c: _Cast, r: random.Random) -> str:
    return (f"{c.name} had a {c.color} {c.obj}. One day, {c.name} lost the {c.obj} near {c.place}. "
            f"{c.he} looked everywhere, but {c.he.lower()} could not find it. {c.name} was sad. "
            f"Then {c.friend} found the {c.obj} {r.choice(HIDING)}. "
            f"{c.name} said, \"Thank you, {c.friend}!\" They played with the {c.obj} all day.")


def _story_walk(c: _Cast, r: random.Random) -> str:
    adj = r.choice(ADJ)
    return (f"It was a {r.choice(WEATHER)} day. {c.name} and {c.friend} went to {c.place}. "
            f"There they saw a {adj} {c.animal}. The {c.animal} said, \"{SOUNDS[c.animal].capitalize()}!\" "
            f"{c.name} gave the {c.animal} a piece of {c.food}. The {c.animal} was {r.choice(FEELINGS)}. "
            f"{c.name} and {c.friend} went home and told everyone about the {adj} {c.animal}.")


def _story_share(c: _Cast, r: random.Random) -> str:
    n = r.randint(2, 6)
    return (f"{c.name} had {NUMBER_WORDS[n]} {c.food}s. {c.friend} had no {c.food}s. "
            f"{c.friend} was {r.choice(['sad', 'hungry'])}. {c.name} wanted to help, so "
            f"{c.he.lower()} gave one {c.food} to {c.friend}. Now {c.name} had {NUMBER_WORDS[n - 1]} "
            f"{c.food}s and {c.friend} had one. They were both happy. Sharing is good.")


def _story_pet(c: _Cast, r: random.Random) -> str:
    pet = r.choice(["Spot", "Bella", "Coco", "Milo", "Sunny", "Pip"])
    return (f"{c.name} had a {c.color} {c.animal} named {pet}. Every morning, {pet} said, "
            f"\"{SOUNDS[c.animal].capitalize()}!\" One day, {pet} ran to {c.place}. {c.name} ran after "
            f"{pet}. {c.he} found {pet} playing with a {c.obj}. {c.name} laughed and took {pet} home. "
            f"That night, {pet} slept next to {c.name}.")


def _story_try(c: _Cast, r: random.Random) -> str:
    skill = r.choice(["ride a bike", "swim", "read a book", "climb a tree", "bake a cake", "fly a kite"])
    return (f"{c.name} wanted to {skill}. The first time, {c.he.lower()} could not do it. "
            f"{c.name} was {r.choice(['sad', 'tired'])}, but {c.he.lower()} did not give up. "
            f"{c.friend} said, \"Try again, {c.name}!\" {c.name} tried again and again. "
            f"At last, {c.name} could {skill}. {c.he} was very proud.")


def _story_day(c: _Cast, r: random.Random) -> str:
    day = r.choice(DAYS)
    return (f"On {day}, {c.name} woke up early. {c.he} ate a {c.food} for breakfast. "
            f"Then {c.he.lower()} went to {c.place} with {c.friend}. They played with a {c.color} {c.obj}. "
            f"In the evening, {c.name} was {r.choice(['tired', 'sleepy', 'happy'])}. "
            f"{c.he} went to bed and dreamed about {c.place}.")


_STORIES = [_story_lost, _story_walk, _story_share, _story_pet, _story_try, _story_day]
def story(r: random.Random) -> str:
    text = r.choice(_STORIES)(_cast(r), r)
    opener = r.choice(["", "", "Once upon a time, ", "Here is a story. "])
    if opener.startswith("Once") and text.split()[0] not in GIRLS + BOYS:
        opener = ""  # "Once upon a time, " only reads well before a name
    return opener + text


# ---- numbers, calendar, facts -------------------------------------------------------------------

def sum_fact(r: random.Random) -> str:
    """One arithmetic fact: a + b (a, b in 0..10) or a - b with a non-negative result."""
    a, b = r.randint(0, 10), r.randint(0, 10)
    if r.random() < 0.6:
        return f"{a} + {b} = {a + b}."
    a, b = max(a, b), min(a, b)
    return f"{a} - {b} = {a - b}."


def arithmetic(r: random.Random) -> str:
    return " ".join(sum_fact(r) for _ in range(r.randint(3, 8)))


def count_list(r: random.Random) -> tuple[str, str]:
    """(instruction, answer) for a counting task."""
    kind = r.random()
    if kind < 0.55:
        start, n = r.randint(0, 30), r.randint(4, 10)
        return f"Count from {start}:", ", ".join(str(start + i) for i in range(n)) + "."
    if kind < 0.8:
        start, n = r.randint(8, 30), r.randint(4, 8)
        return f"Count down from {start}:", ", ".join(str(start - i) for i in range(n)) + "."
    start, n = r.randrange(0, 20, 2), r.randint(4, 8)
    return f"Count by twos from {start}:", ", ".join(str(start + 2 * i) for i in range(n)) + "."


def counting(r: random.Random) -> str:
    head, body = count_list(r)
    return f"{head} {body}"


def _seq(names: list[str], start: int, n: int) -> list[str]:
    return [names[(start + i) % len(names)] for i in range(n)]


def calendar(r: random.Random) -> str:
    if r.random() < 0.5:
        names, what = DAYS, "days of the week"
    else:
        names, what = MONTHS, "months of the year"
    kind = r.random()
    if kind < 0.3:
        return f"The {what} are " + ", ".join(names[:-1]) + f" and {names[-1]}."
    i = r.randrange(len(names))
    if kind < 0.65:
        return f"After {names[i]} comes {names[(i + 1) % len(names)]}. " \
               f"Before {names[i]} comes {names[i - 1]}."
    return ", ".join(_seq(names, i, r.randint(3, 7))) + "."


def qa_pair(r: random.Random) -> tuple[str, str]:
    kind = r.random()
    if kind < 0.3:
        return r.choice(FACTS)
    if kind < 0.5:
        a, b = r.randint(0, 10), r.randint(0, 10)
        return f"What is {a} + {b}?", f"{a} + {b} = {a + b}."
    if kind < 0.65:
        animal = r.choice(ANIMALS)
        article = "an" if animal[0] in "aeiou" else "a"
        return f"What does {article} {animal} say?", f"{article.capitalize()} {animal} says {SOUNDS[animal]}."
    if kind < 0.8:
        names = DAYS if r.random() < 0.5 else MONTHS
        i = r.randrange(len(names))
        return f"What comes after {names[i]}?", f"{names[(i + 1) % len(names)]} comes after {names[i]}."
    c = _cast(r)
    return f"What color is {c.name}'s {c.obj}?", f"{c.name}'s {c.obj} is {c.color}."


def qa(r: random.Random) -> str:
    return " ".join("Q: {} A: {}".format(*qa_pair(r)) for _ in range(r.randint(1, 3)))


def echo_words(r: random.Random) -> str:
    """3 to 8 random words (names, animals, colors, objects, foods, days, numbers) for a copying task."""
    pool = GIRLS + BOYS + ANIMALS + COLORS + OBJECTS + FOODS + DAYS + [str(i) for i in range(20)]
    return " ".join(r.choice(pool) for _ in range(r.randint(3, 8)))


def echo(r: random.Random) -> str:
    """A short random word list said twice: pure copying, which teaches the model to reuse its context."""
    words = echo_words(r)
    return f"Say it twice: {words}. {words}."


# ---- chat ---------------------------------------------------------------------------------------

def chat_text(turns: list[tuple[str, str]]) -> str:
    """ChatML-like layout, as the tokenizer's chat_template renders it (without the BOS)."""
    out = []
    for user, assistant in turns:
        out.append(f"{IM_START}user\n{user}{IM_END}\n{IM_START}assistant\n{assistant}{IM_END}")
    return "\n".join(out)


def repeat_sentence(r: random.Random) -> str:
    """One short sentence for the chat copying task ("Repeat after me: ...")."""
    c = _cast(r)
    return r.choice([f"{c.name} has a {c.color} {c.obj}.", f"The {c.animal} is in {c.place}.",
                     f"{c.name} and {c.friend} like {c.food}s.", ", ".join(_seq(DAYS, r.randrange(7), 3)) + "."])


def chat_turn(r: random.Random) -> tuple[str, str]:
    kind = r.random()
    if kind < 0.2:
        c = _cast(r)
        ask = r.choice([f"Tell me a story about {c.name}.", "Tell me a story.",
                        f"Tell me a story about a {c.animal}.", "Write a short story."])
        if "about a " in ask:  # make the story actually star that animal
            fn = r.choice([_story_walk, _story_pet])
        else:
            fn = r.choice(_STORIES)
        return ask, fn(c, r)
    if kind < 0.4:
        a, b = r.randint(0, 10), r.randint(0, 10)
        return r.choice([f"What is {a} + {b}?", f"Add {a} and {b}.", f"{a} + {b} = ?"]), f"{a} + {b} = {a + b}."
    if kind < 0.6:
        head, body = count_list(r)
        return head.rstrip(":") + ".", body
    if kind < 0.7:
        names, what = (DAYS, "days of the week") if r.random() < 0.5 else (MONTHS, "months of the year")
        return f"List the {what}.", ", ".join(names[:-1]) + f" and {names[-1]}."
    if kind < 0.82:
        return qa_pair(r)
    if kind < 0.92:  # plain copying: the answer repeats part of the request
        said = repeat_sentence(r)
        return f"Repeat after me: {said}", said
    return r.choice(GREETINGS)


def chat(r: random.Random) -> str:
    return chat_text([chat_turn(r) for _ in range(1 if r.random() < 0.85 else 2)])


# ---- the corpus ---------------------------------------------------------------------------------

# Document weights; stories are long, so by tokens they are still about a third of the corpus.
_KINDS = [(story, 0.17), (arithmetic, 0.09), (counting, 0.11), (calendar, 0.07), (qa, 0.11), (echo, 0.07),
          (chat, 0.38)]


def document(r: random.Random) -> str:
    x, acc = r.random(), 0.0
    for fn, w in _KINDS:
        acc += w
        if x < acc:
            return fn(r)
    return _KINDS[-1][0](r)


def iter_documents(seed: int = 0) -> Iterator[str]:
    """An endless stream of documents, the same for a given seed on every machine."""
    r = random.Random(seed)
    while True:
        yield document(r)


def make_corpus(n_docs: int, seed: int = 0) -> list[str]:
    """The first `n_docs` documents of `iter_documents(seed)`."""
    return list(itertools.islice(iter_documents(seed), n_docs))
