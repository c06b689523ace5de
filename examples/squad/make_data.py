"""Generate the small SQuAD-format data set the example ships with (offline default).

Each paragraph states facts about two or three fictional people, cities or companies; questions
ask for one fact of one of them, so a model has to match the entity, not only the relation. Names
are built from syllables, so the data has no licence constraints. Train and validation use
disjoint entities.

    python examples/squad/make_data.py --out examples/squad/data

``--hard`` writes the hard variant (``hard_data.py``: long paragraphs, distractors of the answer's
type, paraphrased validation questions, answer types training never shows), the QA task of
``bench/compare.py``, which generates the same data in memory:

    python examples/squad/make_data.py --hard --out data/hard
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hard_data import make_hard_split  # noqa: E402

SYLLABLES = ["ka", "lo", "ri", "ven", "mar", "tis", "dor", "el", "an", "bru", "sel", "qui", "ra", "tho",
             "mi", "gal", "ost", "ur", "pen", "das", "lia", "vor", "ne", "sha", "bel", "cor", "fin", "ha"]
FIRST = ["Ada", "Boris", "Clara", "Dmitri", "Elena", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Keiko",
         "Lars", "Maya", "Nils", "Olga", "Pavel", "Quinn", "Rosa", "Samir", "Tova", "Ugo", "Vera", "Wim",
         "Xenia", "Yusuf", "Zora", "Amara", "Bjorn", "Celia", "Dario"]
PROFESSIONS = ["painter", "chemist", "architect", "violinist", "engineer", "novelist", "botanist",
               "surgeon", "astronomer", "sculptor", "historian", "pilot", "economist", "photographer"]
INDUSTRIES = ["shipbuilding", "software", "textiles", "glassware", "pharmaceuticals", "railways",
              "publishing", "optics", "furniture", "telescopes"]


def _word(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(parts)).capitalize()


class World:
    """Fictional entities; the two splits draw from disjoint name pools."""

    def __init__(self, rng: random.Random, used: set[str]) -> None:
        self.rng = rng
        self.used = used

    def unique(self, make) -> str:
        for _ in range(1000):
            name = make()
            if name not in self.used:
                self.used.add(name)
                return name
        raise RuntimeError("ran out of names")

    def country(self) -> str:
        return self.unique(lambda: _word(self.rng, 2) + self.rng.choice(["ia", "and", "ora", "istan"]))

    def city(self) -> str:
        return self.unique(lambda: _word(self.rng, self.rng.choice([2, 3])))

    def person(self) -> str:
        return self.unique(lambda: f"{self.rng.choice(FIRST)} {_word(self.rng, 2)}")

    def company(self) -> str:
        return self.unique(lambda: _word(self.rng, 2) + self.rng.choice([" Works", " Industries", " & Sons", " Labs"]))


def _person_facts(w: World, rng: random.Random) -> tuple[list[str], list[tuple[str, str]]]:
    name, city, year, job = w.person(), w.city(), str(rng.randint(1801, 1999)), rng.choice(PROFESSIONS)
    sentence = rng.choice([
        f"{name} was born in {city} in {year} and worked as a {job}.",
        f"Born in {year} in {city}, {name} became a well-known {job}.",
        f"The {job} {name} was born in the town of {city} in {year}.",
    ])
    questions = [
        (rng.choice([f"When was {name} born?", f"In what year was {name} born?"]), year),
        (rng.choice([f"Where was {name} born?", f"In which town was {name} born?"]), city),
        (rng.choice([f"What was the profession of {name}?", f"What did {name} work as?"]), job),
    ]
    return [sentence], questions


def _city_facts(w: World, rng: random.Random) -> tuple[list[str], list[tuple[str, str]]]:
    city, country = w.city(), w.country()
    population = f"{rng.randint(2, 950)},{rng.randint(0, 999):03d}"
    river = _word(rng, 2) + " River"
    sentences = [
        rng.choice([f"{city} is a city in {country} with about {population} inhabitants.",
                    f"With a population of {population}, {city} is one of the larger cities of {country}."]),
        rng.choice([f"The {river} flows through {city}.", f"{city} lies on the banks of the {river}."]),
    ]
    questions = [
        (rng.choice([f"In which country is {city}?", f"{city} is a city in which country?"]), country),
        (rng.choice([f"How many people live in {city}?", f"What is the population of {city}?"]), population),
        (rng.choice([f"Which river flows through {city}?", f"On which river does {city} lie?"]), river),
    ]
    return sentences, questions


def _company_facts(w: World, rng: random.Random) -> tuple[list[str], list[tuple[str, str]]]:
    company, founder, city = w.company(), w.person(), w.city()
    year, industry = str(rng.randint(1850, 2015)), rng.choice(INDUSTRIES)
    sentences = [
        rng.choice([f"{company} was founded by {founder} in {year}.",
                    f"In {year}, {founder} founded {company}."]),
        rng.choice([f"The company, which works in {industry}, has its headquarters in {city}.",
                    f"Its headquarters are in {city}, and it is known for {industry}."]),
    ]
    questions = [
        (rng.choice([f"Who founded {company}?", f"Who was the founder of {company}?"]), founder),
        (rng.choice([f"When was {company} founded?", f"In which year was {company} founded?"]), year),
        (rng.choice([f"Where are the headquarters of {company}?", f"In which city is {company} based?"]), city),
        (f"What industry is {company} known for?", industry),
    ]
    return sentences, questions


KINDS = [_person_facts, _city_facts, _company_facts]
HARD_SIZES = (900, 150)  # train / validation paragraphs of the hard variant


def make_split(n_paragraphs: int, seed: int, used: set[str], prefix: str) -> dict:
    rng = random.Random(seed)
    world = World(rng, used)
    data = []
    count = 0
    for p in range(n_paragraphs):
        kind = rng.choice(KINDS)
        facts = [kind(world, rng) for _ in range(rng.randint(2, 3))]
        sentences = [s for sents, _ in facts for s in sents]
        context = " ".join(sentences)
        qas = []
        for sents, questions in facts:
            for question, answer in rng.sample(questions, k=min(2, len(questions))):
                block = " ".join(sents)
                start = context.index(block) + block.index(answer)
                assert context[start:start + len(answer)] == answer
                qas.append({"id": f"{prefix}-{count:05d}", "question": question,
                            "answers": [{"text": answer, "answer_start": start}]})
                count += 1
        data.append({"title": f"{prefix}-{p}", "paragraphs": [{"context": context, "qas": qas}]})
    return {"version": "hf_oto-synthetic-1.0", "data": data}


def make_splits(hard: bool = False, train_paragraphs: int | None = None,
                validation_paragraphs: int | None = None) -> dict[str, dict]:
    """``{"train": ..., "validation": ...}`` in SQuAD v1.1 JSON; deterministic (fixed seeds)."""
    used: set[str] = set()
    if hard:
        return {"train": make_hard_split(train_paragraphs or HARD_SIZES[0], 0, used, "train", validation=False),
                "validation": make_hard_split(validation_paragraphs or HARD_SIZES[1], 1, used, "validation",
                                              validation=True)}
    return {"train": make_split(train_paragraphs or 700, 0, used, "train"),
            "validation": make_split(validation_paragraphs or 80, 1, used, "validation")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "data"))
    parser.add_argument("--train_paragraphs", type=int, default=None, help="default 700 (hard: 900)")
    parser.add_argument("--validation_paragraphs", type=int, default=None, help="default 80 (hard: 150)")
    parser.add_argument("--hard", action="store_true", help="the hard variant (see hard_data.py)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for split, data in make_splits(args.hard, args.train_paragraphs, args.validation_paragraphs).items():
        path = os.path.join(args.out, f"{split}.json")
        with open(path, "w") as f:
            json.dump(data, f, indent=0)
        questions = sum(len(p["qas"]) for d in data["data"] for p in d["paragraphs"])
        print(f"{path}: {len(data['data'])} paragraphs, {questions} questions")


if __name__ == "__main__":
    main()
