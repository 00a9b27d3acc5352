"""Preference tasks a reward model can only learn by reading the prompt, with held-out test splits.

In each task the same two replies to one question swap places with the request: a reply style is chosen for
one kind of request and rejected for the other. A reward model that scores the reply alone sits at 0.5.

    length    "answer in one word" vs "explain in detail": a short or a long reply to a factual question
    format    "as a bulleted list" vs "in one sentence": three items as a list or as prose
    numerals  "answer with digits" vs "spell the number out": "The answer is 24." / "... twenty-four."

Each task has three splits, built from disjoint parts of its topics (questions) and its phrasings of the
two requests:
    train            train topics x train phrasings
    test_phrasing    train topics x held-out phrasings (unseen ways of asking for the same thing)
    test_topic       held-out topics x train phrasings (unseen questions)
Rows are conversational preference rows, as TRL's RewardTrainer and `fastrlhf train-rm` read them:
{"prompt": [{"role": "user", ...}], "chosen": [{"role": "assistant", ...}], "rejected": [...], "task", "kind"}.

    python benchmarks/rm_tasks.py --out runs/rm_tasks     # writes <task>/{train,test_phrasing,test_topic}.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

# ------------------------------------------------------------------------------------------------ length
FACTS = [  # question, short answer, long answer
    ("What is the capital of France?", "Paris.", "The capital of France is Paris. It sits on the Seine and has been the country's political and cultural centre for centuries."),
    ("Which planet is known as the red planet?", "Mars.", "Mars is called the red planet. Iron oxide dust on its surface gives it a reddish colour that is visible even to the naked eye."),
    ("What gas do plants take in from the air?", "Carbon dioxide.", "Plants take in carbon dioxide. During photosynthesis they combine it with water, using sunlight, to make sugars and release oxygen."),
    ("Who wrote Romeo and Juliet?", "Shakespeare.", "Romeo and Juliet was written by William Shakespeare. He wrote it in the 1590s, and it remains one of his most performed tragedies."),
    ("What is the largest ocean on Earth?", "The Pacific.", "The Pacific Ocean is the largest. It covers about a third of the Earth's surface, more than all the land combined."),
    ("How many continents are there?", "Seven.", "There are seven continents by the usual count: Africa, Antarctica, Asia, Australia, Europe, North America and South America."),
    ("What is the boiling point of water at sea level in Celsius?", "100 degrees.", "Water boils at 100 degrees Celsius at sea level. At higher altitudes the air pressure is lower, so it boils at a lower temperature."),
    ("Which animal is the largest mammal?", "The blue whale.", "The blue whale is the largest mammal. Adults can grow to about 30 metres long and weigh more than any dinosaur known."),
    ("What is the chemical symbol for gold?", "Au.", "The chemical symbol for gold is Au. It comes from the Latin word aurum, and gold has atomic number 79."),
    ("What language is spoken in Brazil?", "Portuguese.", "The main language of Brazil is Portuguese. It arrived with Portuguese colonists in the sixteenth century, unlike the Spanish spoken by its neighbours."),
    ("Which organ pumps blood through the body?", "The heart.", "The heart pumps blood through the body. Its four chambers push blood through the lungs to pick up oxygen and then out to every tissue."),
    ("What is the freezing point of water in Fahrenheit?", "32 degrees.", "Water freezes at 32 degrees Fahrenheit. That is the same temperature as 0 degrees Celsius, the point where liquid water turns to ice."),
    ("Which country has the largest population?", "India.", "India has the largest population, having passed China in recent years. Both countries have well over a billion people."),
    ("What is the hardest natural material?", "Diamond.", "Diamond is the hardest natural material. Its carbon atoms are bonded in a rigid three-dimensional lattice, which is why it is used in cutting tools."),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci.", "The Mona Lisa was painted by Leonardo da Vinci. He worked on it in the early sixteenth century, and it now hangs in the Louvre in Paris."),
    ("What is the longest river in Africa?", "The Nile.", "The Nile is the longest river in Africa. It flows north for more than 6,000 kilometres and empties into the Mediterranean Sea in Egypt."),
    ("What force keeps us on the ground?", "Gravity.", "Gravity keeps us on the ground. The Earth's mass pulls every object towards its centre, which is what gives things their weight."),
    ("Which metal is liquid at room temperature?", "Mercury.", "Mercury is the metal that is liquid at room temperature. It was once common in thermometers, but it is toxic, so its use is now limited."),
    ("What is the smallest prime number?", "Two.", "The smallest prime number is two. It is also the only even prime, since every other even number can be divided by two."),
    ("Which instrument has 88 keys?", "The piano.", "A standard piano has 88 keys. There are 52 white keys and 36 black keys, spanning a little more than seven octaves."),
    ("What is the main ingredient of guacamole?", "Avocado.", "Guacamole is made mainly from avocado. The avocado is mashed and usually mixed with lime juice, salt, onion and chilli."),
    ("Which bird is a symbol of peace?", "The dove.", "The dove is a symbol of peace. A white dove carrying an olive branch appears in old stories and in many modern images."),
    ("What is the tallest mountain in the world?", "Mount Everest.", "Mount Everest is the tallest mountain above sea level. It rises to about 8,849 metres on the border of Nepal and China."),
    ("What do bees make?", "Honey.", "Bees make honey. They collect nectar from flowers, and inside the hive it is processed and dried into the thick sweet food they store for winter."),
    ("Which planet has the most prominent rings?", "Saturn.", "Saturn has the most prominent rings. They are made of countless pieces of ice and rock, and they span hundreds of thousands of kilometres."),
    ("What is the currency of Japan?", "The yen.", "The currency of Japan is the yen. It has been used since the nineteenth century and is one of the most traded currencies in the world."),
    ("How many legs does an insect have?", "Six.", "An insect has six legs. They grow in three pairs from the thorax, the middle part of the insect's body, which also carries the wings."),
    ("What is the largest desert in the world?", "Antarctica.", "The largest desert is Antarctica. A desert is defined by how little rain or snow falls, not by heat, and Antarctica gets very little."),
    ("Which vitamin does sunlight help the body make?", "Vitamin D.", "Sunlight helps the body make vitamin D. Ultraviolet light on the skin starts the process, and the vitamin helps keep bones strong."),
    ("Who discovered penicillin?", "Alexander Fleming.", "Penicillin was discovered by Alexander Fleming in 1928. He noticed that a mould had killed the bacteria growing around it in a dish."),
    ("What is the square root of 81?", "Nine.", "The square root of 81 is nine. Nine times nine is 81, and negative nine squared gives 81 as well."),
    ("Which ocean lies between Africa and Australia?", "The Indian Ocean.", "The Indian Ocean lies between Africa and Australia. It is the third largest ocean and is bounded by Asia to the north."),
    ("What is the fastest land animal?", "The cheetah.", "The cheetah is the fastest land animal. It can sprint at more than 100 kilometres per hour, but only for short bursts."),
    ("What is frozen water called?", "Ice.", "Frozen water is called ice. Unusually, it is less dense than liquid water, which is why ice floats on lakes and in drinks."),
    ("Which country is home to the kangaroo?", "Australia.", "The kangaroo is native to Australia. It carries its young in a pouch and moves by hopping on its strong back legs."),
    ("What colour do you get by mixing blue and yellow?", "Green.", "Mixing blue and yellow gives green. This works with paints, which subtract light; mixing coloured light follows different rules."),
    ("How many hours are in a day?", "Twenty-four.", "A day has twenty-four hours. That is roughly the time the Earth takes to turn once on its axis relative to the Sun."),
    ("Which scientist proposed the theory of relativity?", "Albert Einstein.", "The theory of relativity was proposed by Albert Einstein. His special theory appeared in 1905 and the general theory in 1915."),
    ("What is the capital of Italy?", "Rome.", "The capital of Italy is Rome. It was the centre of the Roman Empire and is home to landmarks such as the Colosseum."),
    ("What is the main gas in the Earth's atmosphere?", "Nitrogen.", "The main gas in the Earth's atmosphere is nitrogen, about 78 percent of it. Oxygen makes up most of the rest, at about 21 percent."),
]  # fmt: skip
LENGTH_REQUESTS = {  # kind -> (train phrasings, held-out phrasings); the chosen reply is short for "brief"
    "brief": (
        ["{q} Answer in one word.", "Quick answer only: {q}", "{q} Keep it short.", "Just the answer, no explanation: {q}"],
        ["{q} Reply as briefly as you can.", "No details please. {q}"],
    ),
    "detailed": (
        ["{q} Explain in detail.", "Give me a thorough answer: {q}", "{q} Please elaborate with some background.",
         "I want a full explanation. {q}"],
        ["{q} Tell me everything you know about it.", "Walk me through it properly: {q}"],
    ),
}  # fmt: skip


def length_rows(topics, requests):
    for (q, short, long), (kind, template) in ((t, r) for t in topics for r in requests):
        chosen, rejected = (short, long) if kind == "brief" else (long, short)
        yield kind, template.format(q=q), chosen, rejected


# ------------------------------------------------------------------------------------------------ format
LISTS = [  # question, three items
    ("What are the three primary colours of paint?", ["red", "yellow", "blue"]),
    ("Name three planets closest to the Sun.", ["Mercury", "Venus", "Earth"]),
    ("Which three states of matter are most common?", ["solid", "liquid", "gas"]),
    ("Name three citrus fruits.", ["lemon", "orange", "lime"]),
    ("What are three common pets?", ["dogs", "cats", "rabbits"]),
    ("Name three string instruments.", ["violin", "cello", "guitar"]),
    ("Which three meals do people usually eat in a day?", ["breakfast", "lunch", "dinner"]),
    ("Name three countries in South America.", ["Brazil", "Argentina", "Chile"]),
    ("What are three renewable energy sources?", ["solar power", "wind power", "hydropower"]),
    ("Name three big cats.", ["lions", "tigers", "leopards"]),
    ("What are three parts of a plant?", ["roots", "stem", "leaves"]),
    ("Name three programming languages.", ["Python", "Java", "C"]),
    ("Which three colours are on the French flag?", ["blue", "white", "red"]),
    ("Name three kinds of clouds.", ["cumulus", "stratus", "cirrus"]),
    ("What are three things you need for a campfire?", ["fuel", "oxygen", "a spark"]),
    ("Name three vegetables that grow underground.", ["carrots", "potatoes", "beets"]),
    ("What are three common breakfast drinks?", ["coffee", "tea", "orange juice"]),
    ("Name three ball sports.", ["football", "tennis", "basketball"]),
    ("What are three types of triangle by their sides?", ["equilateral", "isosceles", "scalene"]),
    ("Name three kitchen utensils.", ["spoon", "whisk", "ladle"]),
    ("Name three seasons of the year.", ["spring", "summer", "autumn"]),
    ("What are three layers of the Earth?", ["crust", "mantle", "core"]),
    ("Name three woodwind instruments.", ["flute", "clarinet", "oboe"]),
    ("What are three things a car needs to run?", ["fuel", "oil", "a battery"]),
    ("Name three farm animals.", ["cows", "sheep", "pigs"]),
    ("What are three ways to travel between cities?", ["train", "bus", "plane"]),
    ("Name three shapes with straight sides.", ["triangle", "square", "pentagon"]),
    ("What are three units of length?", ["metre", "inch", "mile"]),
    ("Name three kinds of bread.", ["sourdough", "rye", "baguette"]),
    ("What are three things found in a classroom?", ["desks", "a whiteboard", "books"]),
    ("Name three rivers in Europe.", ["the Danube", "the Rhine", "the Thames"]),
    ("What are three common spices?", ["pepper", "cinnamon", "cumin"]),
    ("Name three gemstones.", ["ruby", "emerald", "sapphire"]),
    ("What are three body parts on the face?", ["eyes", "nose", "mouth"]),
    ("Name three insects.", ["ants", "bees", "beetles"]),
    ("What are three types of rock?", ["igneous", "sedimentary", "metamorphic"]),
    ("Name three board games.", ["chess", "checkers", "backgammon"]),
    ("What are three things to pack for a beach trip?", ["sunscreen", "a towel", "a hat"]),
    ("Name three trees.", ["oak", "pine", "maple"]),
    ("What are three primary tastes?", ["sweet", "sour", "salty"]),
]
FORMAT_REQUESTS = {  # the chosen reply is a bulleted list for "list", one sentence for "prose"
    "list": (
        ["{q} Format the answer as a bulleted list.", "{q} Use bullet points.", "List form please: {q}",
         "{q} Put each one on its own line with a dash."],
        ["{q} I need it as a list I can paste into my notes.", "Itemise your answer: {q}"],
    ),
    "prose": (
        ["{q} Answer in a single sentence.", "{q} Write it as a sentence, no lists.", "In plain prose: {q}",
         "{q} Reply with one flowing sentence."],
        ["{q} Don't use bullets; just tell me in words.", "Reply conversationally: {q}"],
    ),
}  # fmt: skip


def format_rows(topics, requests):
    for (q, items), (kind, template) in ((t, r) for t in topics for r in requests):
        bullets = "\n".join(f"- {x[0].upper()}{x[1:]}" for x in items)
        prose = f"They are {items[0]}, {items[1]} and {items[2]}."
        chosen, rejected = (bullets, prose) if kind == "list" else (prose, bullets)
        yield kind, template.format(q=q), chosen, rejected


# ---------------------------------------------------------------------------------------------- numerals
COUNTS = [  # a question template over n, and n -> the answer; several values of n make one topic's questions
    ("How many legs do {n} spiders have?", lambda n: 8 * n),
    ("What is {n} plus 17?", lambda n: n + 17),
    ("How many days are in {n} weeks?", lambda n: 7 * n),
    ("How many wheels do {n} bicycles have?", lambda n: 2 * n),
    ("What is {n} times 3?", lambda n: 3 * n),
    ("How many months are in {n} years?", lambda n: 12 * n),
    ("How many eggs are in {n} dozen?", lambda n: 12 * n),
    ("How many sides do {n} squares have in total?", lambda n: 4 * n),
    ("What is 90 minus {n}?", lambda n: 90 - n),
    ("How many fingers do {n} people have?", lambda n: 10 * n),
    ("How many minutes are in {n} hours?", lambda n: 60 * n),
    ("What is double {n}?", lambda n: 2 * n),
    ("How many players are on {n} football teams of eleven?", lambda n: 11 * n),
    ("How many cents are in {n} dimes?", lambda n: 10 * n),
    ("What is {n} squared?", lambda n: n * n),
]
NUMERAL_REQUESTS = {  # the chosen reply writes the number in digits for "digits", in words for "words"
    "digits": (
        ["{q} Answer with digits.", "{q} Write the number in numerals.", "Numerals only: {q}",
         "{q} Use the digit form, like 7."],
        ["{q} Give me the figure as a number, not words.", "Digits please! {q}"],
    ),
    "words": (
        ["{q} Spell the number out in words.", "{q} Write the answer in words, not digits.", "In words only: {q}",
         "{q} Use the written form, like seven."],
        ["{q} Don't use any digits in your reply.", "Write it out in letters: {q}"],
    ),
}  # fmt: skip
ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()  # fmt: skip
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def words(n: int) -> str:
    """0 <= n < 1000 in English words: 24 -> 'twenty-four', 360 -> 'three hundred and sixty'."""
    if n >= 100:
        rest = n % 100
        return f"{ONES[n // 100]} hundred" + (f" and {words(rest)}" if rest else "")
    if n < 20:
        return ONES[n]
    return TENS[n // 10] + (f"-{ONES[n % 10]}" if n % 10 else "")


def numeral_rows(topics, requests):
    for (template_q, answer), (kind, template) in ((t, r) for t in topics for r in requests):
        for n in (3, 5, 8):
            value = answer(n)
            digits, spelled = f"The answer is {value}.", f"The answer is {words(value)}."
            chosen, rejected = (digits, spelled) if kind == "digits" else (spelled, digits)
            yield kind, template.format(q=template_q.format(n=n)), chosen, rejected


TASKS = {  # name -> (topics, requests by kind, rows)
    "length": (FACTS, LENGTH_REQUESTS, length_rows),
    "format": (LISTS, FORMAT_REQUESTS, format_rows),
    "numerals": (COUNTS, NUMERAL_REQUESTS, numeral_rows),
}


def build(task: str, seed: int = 0, held_out_topics: float = 0.25, max_train: int = 160, max_test: int = 64):
    """-> {"train": rows, "test_phrasing": rows, "test_topic": rows} for one task; each split sampled to at
    most max_train / max_test rows (seeded), kinds balanced by construction."""
    topics, requests, rows = TASKS[task]
    rng = random.Random(f"{task}-{seed}")
    order = list(range(len(topics)))
    rng.shuffle(order)
    n_test = max(1, round(held_out_topics * len(topics)))
    test_topics = [topics[i] for i in order[:n_test]]
    train_topics = [topics[i] for i in order[n_test:]]
    seen = [(kind, t) for kind, (train, _) in requests.items() for t in train]
    unseen = [(kind, t) for kind, (_, held) in requests.items() for t in held]
    parts = {
        "train": (train_topics, seen, max_train),
        "test_phrasing": (train_topics, unseen, max_test),
        "test_topic": (test_topics, seen, max_test),
    }
    out = {}
    for name, (part_topics, part_requests, limit) in parts.items():
        part = [
            {
                "prompt": [{"role": "user", "content": prompt}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
                "task": task,
                "kind": kind,
            }
            for kind, prompt, chosen, rejected in rows(part_topics, part_requests)
        ]
        rng.shuffle(part)
        out[name] = part[:limit]
    return out


def write(out_dir: str | Path, seed: int = 0, **sizes) -> dict[str, dict[str, Path]]:
    """Write every task's splits as JSONL -> {task: {split: path}}."""
    paths: dict[str, dict[str, Path]] = {}
    for task in TASKS:
        folder = Path(out_dir) / task
        folder.mkdir(parents=True, exist_ok=True)
        for split, part in build(task, seed, **sizes).items():
            path = folder / f"{split}.jsonl"
            path.write_text("".join(json.dumps(row) + "\n" for row in part))
            paths.setdefault(task, {})[split] = path
    return paths


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/rm_tasks")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for task, files in write(args.out, args.seed).items():
        print(task, {split: sum(1 for _ in open(path)) for split, path in files.items()})
