"""The hard mode of ``make_data.py``: SQuAD-format data on which a fine-tuned small encoder is far
from perfect, so that compression methods can be told apart.

What makes it hard, on purpose:

- long paragraphs (four to six entities, 120-250 tokens: longer than one 128-token window);
- distractors of the answer's type: every paragraph holds several people, years, cities,
  professions; relatives share a surname; a person has a birth city *and* a city they moved to;
- coreference: later facts about an entity use a pronoun or "the company", not the name;
- paraphrased questions: validation asks with wordings training never uses;
- unseen answer types: validation also asks about mountains (heights in metres, mountain ranges)
  and ships (lengths, shipyards, home ports), which training never shows.

Everything is generated from syllables and fixed word lists with a seeded ``random.Random``: the
same seed gives the same data on every machine, and the data has no licence constraints.
"""

from __future__ import annotations

import random
from typing import Callable

SYLLABLES = ["ka", "lo", "ri", "ven", "mar", "tis", "dor", "el", "an", "bru", "sel", "qui", "ra", "tho",
             "mi", "gal", "ost", "ur", "pen", "das", "lia", "vor", "ne", "sha", "bel", "cor", "fin", "ha",
             "zu", "mek", "tal", "orn", "bi", "sut", "ley", "gro", "pha", "wen", "isk", "mo"]
FIRST = {"f": ["Ada", "Clara", "Elena", "Greta", "Ines", "Keiko", "Maya", "Olga", "Rosa", "Tova", "Vera",
               "Xenia", "Zora", "Amara", "Celia", "Hanna", "Irene", "Lena", "Nadia", "Selma"],
         "m": ["Boris", "Dmitri", "Farid", "Hugo", "Jonas", "Lars", "Nils", "Pavel", "Samir", "Ugo", "Wim",
               "Yusuf", "Bjorn", "Dario", "Emil", "Goran", "Ivo", "Karl", "Milan", "Oskar"]}
PROFESSIONS = ["painter", "chemist", "architect", "violinist", "engineer", "novelist", "botanist", "surgeon",
               "astronomer", "sculptor", "historian", "pilot", "economist", "photographer", "cartographer",
               "glassblower", "mathematician", "librarian"]
INDUSTRIES = ["shipbuilding", "software", "textiles", "glassware", "pharmaceuticals", "railways", "publishing",
              "optics", "furniture", "telescopes", "ceramics", "printing presses"]
RELATIVES = ["brother", "sister", "cousin"]

# Question wordings: training uses the first list, validation the second (never seen in training).
Q = {
    "born_year": (["When was {n} born?", "In what year was {n} born?"],
                  ["{n} came into the world in which year?", "What is the birth year of {n}?"]),
    "born_city": (["Where was {n} born?", "In which town was {n} born?"],
                  ["What is the birthplace of {n}?", "{n} was a native of which town?"]),
    "job": (["What was the profession of {n}?", "What did {n} work as?"],
            ["What was {n}'s occupation?", "{n} earned a living as what?"]),
    "moved_city": (["Where did {n} move to?", "To which city did {n} move?"],
                   ["In which city did {n} settle later?", "{n} relocated to which city?"]),
    "moved_year": (["When did {n} move to {c}?", "In what year did {n} move to {c}?"],
                   ["{n} settled in {c} in which year?", "What year did {n} relocate to {c}?"]),
    "country": (["In which country is {n}?", "{n} is a city in which country?"],
                ["Which country does {n} belong to?", "{n} lies in what country?"]),
    "population": (["How many people live in {n}?", "What is the population of {n}?"],
                   ["How many inhabitants does {n} have?", "What is the number of residents of {n}?"]),
    "river": (["Which river flows through {n}?", "On which river does {n} lie?"],
              ["What river runs through {n}?", "{n} stands on what river?"]),
    "founded_city": (["When was {n} founded?", "In which year was {n} founded?"],
                     ["{n} dates back to which year?", "What year saw the founding of {n}?"]),
    "founder": (["Who founded {n}?", "Who was the founder of {n}?"],
                ["{n} was started by whom?", "Who set up {n}?"]),
    "founded_company": (["When was {n} founded?", "In which year was {n} founded?"],
                        ["{n} was established in what year?", "Since which year has {n} existed?"]),
    "headquarters": (["Where are the headquarters of {n}?", "In which city is {n} based?"],
                     ["Where does {n} have its main offices?", "{n} is headquartered in which city?"]),
    "industry": (["What industry is {n} known for?", "What does {n} make?"],
                 ["In what line of business is {n}?", "{n} is famous for which trade?"]),
    # Validation only: unseen kinds and answer types.
    "height": (None, ["How high is {n}?", "What is the height of {n}?"]),
    "range": (None, ["Which mountain range is {n} part of?", "In which range does {n} stand?"]),
    "ascent_year": (None, ["When was {n} first climbed?", "In which year was {n} first climbed?"]),
    "climber": (None, ["Who first climbed {n}?", "Who made the first ascent of {n}?"]),
    "length": (None, ["How long is the {n}?", "What is the length of the {n}?"]),
    "shipyard": (None, ["Which shipyard built the {n}?", "Who built the {n}?"]),
    "port": (None, ["What is the home port of the {n}?", "Where is the {n} based?"]),
    "launched": (None, ["When was the {n} launched?", "In which year was the {n} launched?"]),
}

Fact = tuple[str, str, str, dict]  # (relation, entity name in the question, answer, extra question slots)


def _a(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _word(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(parts)).capitalize()


class Names:
    """Unique fictional names; train and validation draw from disjoint sets (one shared ``used``)."""

    def __init__(self, rng: random.Random, used: set[str]) -> None:
        self.rng, self.used = rng, used

    def unique(self, make: Callable[[], str]) -> str:
        for _ in range(2000):
            name = make()
            if name not in self.used:
                self.used.add(name)
                return name
        raise RuntimeError("ran out of names")

    def word(self, suffix: str = "") -> str:
        return self.unique(lambda: _word(self.rng, self.rng.choice([2, 2, 3])) + suffix)

    def surname(self) -> str:
        return self.word()

    def city(self) -> str:
        return self.unique(lambda: _word(self.rng, self.rng.choice([2, 3])))

    def country(self) -> str:
        return self.unique(lambda: _word(self.rng, 2) + self.rng.choice(["ia", "and", "ora", "istan"]))

    def company(self) -> str:
        return self.unique(lambda: _word(self.rng, 2) + self.rng.choice([" Works", " Industries", " & Sons", " Labs"]))

    def river(self) -> str:
        return self.word(" River")


def _people(names: Names, rng: random.Random) -> tuple[list[str], list[Fact]]:
    """Two relatives with the same surname: every answer has a distractor of its type."""
    surname = names.surname()
    sentences, facts = [], []
    first_sex = rng.choice("fm")
    relation = rng.choice(RELATIVES)
    for k in range(2):
        sex = first_sex if k == 0 else ("m" if relation == "brother" else "f" if relation == "sister" else rng.choice("fm"))
        name = f"{rng.choice(FIRST[sex])} {surname}"
        while any(name == f[1] for f in facts):
            name = f"{rng.choice(FIRST[sex])} {surname}"
        pronoun = "she" if sex == "f" else "he"
        born_city, moved_city = names.city(), names.city()
        year = rng.randint(1801, 1960)
        moved = year + rng.randint(18, 40)
        job = rng.choice(PROFESSIONS)
        possessive = "her" if first_sex == "f" else "his"
        start = name if k == 0 else f"{possessive.capitalize()} {relation} {name}"
        middle = name if k == 0 else f"{possessive} {relation} {name}"
        own = "her" if sex == "f" else "his"
        sentences.append(rng.choice([
            f"{start} was born in {born_city} in {year} and trained as {_a(job)}.",
            f"{start}, born in {year} in {born_city}, became a well-known {job}.",
            f"Born in {born_city} in {year}, {middle} worked as {_a(job)} for most of {own} life.",
        ]))
        sentences.append(rng.choice([
            f"In {moved} {pronoun} moved to {moved_city}.",
            f"{pronoun.capitalize()} settled in {moved_city} in {moved}, far from {born_city}.",
        ]))
        facts += [("born_year", name, str(year), {}), ("born_city", name, born_city, {}), ("job", name, job, {}),
                  ("moved_city", name, moved_city, {}), ("moved_year", name, str(moved), {"c": moved_city})]
    return sentences, facts


def _city(names: Names, rng: random.Random) -> tuple[list[str], list[Fact]]:
    city, country, river = names.city(), names.country(), names.river()
    population = f"{rng.randint(2, 950)},{rng.randint(0, 999):03d}"
    founded = str(rng.randint(900, 1850))
    sentences = [
        rng.choice([f"{city} is a city in {country} with about {population} inhabitants.",
                    f"With a population of {population}, {city} is one of the larger cities of {country}."]),
        rng.choice([f"The {river} flows through {city}, which was founded in {founded}.",
                    f"Founded in {founded}, the city lies on the banks of the {river}."]),
    ]
    facts = [("country", city, country, {}), ("population", city, population, {}), ("river", city, river, {}),
             ("founded_city", city, founded, {})]
    return sentences, facts


def _company(names: Names, rng: random.Random) -> tuple[list[str], list[Fact]]:
    company, city = names.company(), names.city()
    founder = f"{rng.choice(FIRST[rng.choice('fm')])} {names.surname()}"
    year, industry = str(rng.randint(1850, 2015)), rng.choice(INDUSTRIES)
    sentences = [
        rng.choice([f"{company} was founded by {founder} in {year}.", f"In {year}, {founder} founded {company}."]),
        rng.choice([f"The company, which works in {industry}, has its headquarters in {city}.",
                    f"Its headquarters are in {city}, and it is known for {industry}."]),
    ]
    facts = [("founder", company, founder, {}), ("founded_company", company, year, {}),
             ("headquarters", company, city, {}), ("industry", company, industry, {})]
    return sentences, facts


def _mountain(names: Names, rng: random.Random) -> tuple[list[str], list[Fact]]:
    mountain = "Mount " + names.word()
    mountain_range = "the " + names.word(" Range")
    height = f"{rng.randint(1, 8)},{rng.randint(0, 999):03d} metres"
    year = str(rng.randint(1780, 1990))
    climber = f"{rng.choice(FIRST[rng.choice('fm')])} {names.surname()}"
    sentences = [
        rng.choice([f"{mountain}, the highest peak of {mountain_range}, rises to {height}.",
                    f"Rising to {height}, {mountain} is part of {mountain_range}."]),
        rng.choice([f"It was first climbed in {year} by {climber}.", f"{climber} made the first ascent in {year}."]),
    ]
    facts = [("height", mountain, height, {}), ("range", mountain, mountain_range, {}),
             ("ascent_year", mountain, year, {}), ("climber", mountain, climber, {})]
    return sentences, facts


def _ship(names: Names, rng: random.Random) -> tuple[list[str], list[Fact]]:
    ship = names.word(" " + rng.choice(["Star", "Queen", "Spirit", "Venture"]))
    shipyard, port = names.company(), names.city()
    length, year = f"{rng.randint(40, 330)} metres", str(rng.randint(1850, 2010))
    sentences = [
        rng.choice([f"The {ship}, a vessel {length} long, was launched in {year} by {shipyard}.",
                    f"{shipyard} launched the {ship} in {year}; the ship is {length} long."]),
        rng.choice([f"Her home port is {port}.", f"The ship sails from her home port of {port}."]),
    ]
    facts = [("length", ship, length, {}), ("shipyard", ship, shipyard, {}), ("port", ship, port, {}),
             ("launched", ship, year, {})]
    return sentences, facts


SEEN_KINDS = [_people, _city, _company]
UNSEEN_KINDS = [_mountain, _ship]


def make_hard_split(n_paragraphs: int, seed: int, used: set[str], prefix: str, validation: bool,
                    questions_per_paragraph: int = 4, unseen_share: float = 0.35,
                    paraphrase_share: float = 1.0) -> dict:
    """One split in SQuAD v1.1 JSON. With ``validation``, ``paraphrase_share`` of the questions on
    known kinds use wordings training never uses, and ``unseen_share`` of the paragraphs open with
    an entity of a kind training never shows (two of their questions are about it)."""
    rng = random.Random(seed)
    names = Names(rng, used)
    data, count = [], 0
    for p in range(n_paragraphs):
        unseen = validation and rng.random() < unseen_share
        blocks = []
        for b in range(rng.randint(3, 4)):
            pool = UNSEEN_KINDS if unseen and b == 0 else SEEN_KINDS
            blocks.append(rng.choice(pool)(names, rng))
        rng.shuffle(blocks)
        sentences = [s for sents, _ in blocks for s in sents]
        context = " ".join(sentences)
        # Questions only about facts whose answer occurs once in the context, so that the gold
        # span is unambiguous (distractors are of the same type, never the same string).
        unique = [[f for f in facts if context.count(f[2]) == 1] for _, facts in blocks]
        new_kind = [f for facts in unique for f in facts if Q[f[0]][0] is None]
        known = [f for facts in unique for f in facts if Q[f[0]][0] is not None]
        first = rng.sample(new_kind, k=min(2, len(new_kind)))
        picked = first + rng.sample(known, k=min(questions_per_paragraph - len(first), len(known)))
        qas = []
        for relation, name, answer, slots in picked:
            train_q, dev_q = Q[relation]
            paraphrase = train_q is None or (validation and rng.random() < paraphrase_share)
            question = rng.choice(dev_q if paraphrase else train_q).format(n=name, **slots)
            start = context.index(answer)
            qas.append({"id": f"{prefix}-{count:05d}", "question": question,
                        "answers": [{"text": answer, "answer_start": start}]})
            count += 1
        data.append({"title": f"{prefix}-{p}", "paragraphs": [{"context": context, "qas": qas}]})
    return {"version": "hf_oto-synthetic-hard-1.0", "data": data}
