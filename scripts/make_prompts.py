"""Regenerate trainer/assets/prompts.jsonl, the demo's prompt set: short questions with checkable answers.

Run once from the repository root: ``python scripts/make_prompts.py``. The output is deterministic.
Arithmetic and unit-conversion answers are computed here, never typed; the facts are hand-checked. The
questions are easy on purpose: the demo model (SmolLM2-135M-Instruct) should be right some of the time.
Capitals are the current official ones; countries with split or contested capitals are left out.
Opposites avoid words with two opposites ("light", "hard", "old", "right") and common sentence words
("answer"), which the rubric would take for a conflicting answer.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "trainer" / "assets" / "prompts.jsonl"

Row = tuple[str, str, list[str]]  # (question or subject, answer, aliases)


def _table(text: str) -> list[Row]:
    """Parse lines "<question or subject> => <answer> | <alias> | ..." into rows."""
    rows = []
    for line in text.strip().splitlines():
        key, answers = line.split(" => ")
        answer, *aliases = answers.split(" | ")
        rows.append((key, answer, aliases))
    return rows


# Countries (as written in the question) => capital | aliases
CAPITALS = _table("""
France => Paris
Italy => Rome
Germany => Berlin
Spain => Madrid
Portugal => Lisbon
the United Kingdom => London
Ireland => Dublin
Belgium => Brussels
Austria => Vienna
Poland => Warsaw
the Czech Republic => Prague
Hungary => Budapest
Greece => Athens
Sweden => Stockholm
Norway => Oslo
Denmark => Copenhagen
Finland => Helsinki
Iceland => Reykjavik
Russia => Moscow
Ukraine => Kyiv | Kiev
Romania => Bucharest
Bulgaria => Sofia
Serbia => Belgrade
Croatia => Zagreb
Turkey => Ankara
Japan => Tokyo
China => Beijing | Peking
South Korea => Seoul
India => New Delhi | Delhi
Pakistan => Islamabad
Bangladesh => Dhaka
Thailand => Bangkok
Vietnam => Hanoi
the Philippines => Manila
Iran => Tehran
Iraq => Baghdad
Saudi Arabia => Riyadh
Afghanistan => Kabul
Egypt => Cairo
Kenya => Nairobi
Ethiopia => Addis Ababa
Nigeria => Abuja
Ghana => Accra
Morocco => Rabat
Algeria => Algiers
Uganda => Kampala
Zimbabwe => Harare
Canada => Ottawa
the United States => Washington, D.C. | Washington | Washington DC
Mexico => Mexico City
Cuba => Havana
Argentina => Buenos Aires
Brazil => Brasília | Brasilia
Chile => Santiago
Peru => Lima
Colombia => Bogotá | Bogota
Venezuela => Caracas
Australia => Canberra
New Zealand => Wellington
Nepal => Kathmandu
Mongolia => Ulaanbaatar | Ulan Bator
Lebanon => Beirut
Jordan => Amman
Qatar => Doha
""")

# Word => opposite | aliases
OPPOSITES = _table("""
hot => cold
cold => hot
big => small | little
small => big | large
fast => slow
slow => fast | quick
happy => sad | unhappy
sad => happy
young => old
tall => short
wet => dry
dry => wet
full => empty
empty => full
early => late
push => pull
pull => push
win => lose
rich => poor
poor => rich
strong => weak
weak => strong
loud => quiet | soft
thick => thin
wide => narrow
high => low
low => high
first => last
buy => sell
sell => buy
love => hate
north => south
south => north
east => west
west => east
above => below | beneath | under
inside => outside
before => after
always => never
clean => dirty
heavy => light
cheap => expensive
friend => enemy | foe
boy => girl
man => woman
king => queen
awake => asleep
alive => dead
remember => forget
increase => decrease
maximum => minimum
possible => impossible
deep => shallow
entrance => exit
top => bottom
summer => winter
sunrise => sunset
day => night
black => white
""")

# Question => answer | aliases
COLOURS = _table("""
What colour is the sky on a clear day? => blue
What colour is grass? => green
What colour is snow? => white
What colour is a ripe banana? => yellow
What colour is coal? => black
What colour is a ripe strawberry? => red
What colour is a carrot? => orange
What colour is milk? => white
What colour is blood? => red
What colour is a lemon? => yellow
What colour is milk chocolate? => brown
What colour is a pumpkin? => orange
What colour is a flamingo? => pink
What colour is a polar bear's fur? => white
What colour is a crow? => black
What colour is an emerald? => green
What colour is a ruby? => red
What colour is the yolk of a hen's egg? => yellow
What colour do you get when you mix blue and yellow? => green
What colour do you get when you mix red and yellow? => orange
What colour do you get when you mix red and blue? => purple | violet
What colour do you get when you mix red and white? => pink
What colour do you get when you mix black and white? => grey | gray
What colour is a stop sign? => red
Which traffic light colour means go? => green
Which traffic light colour means stop? => red
What colour are most leaves in summer? => green
What colour is a ripe tomato? => red
What colour is a lime? => green
What colour is charcoal? => black
What colour is a school bus in the United States? => yellow
What colour are clouds on a sunny day? => white
What colour is a raven? => black
What colour is a blueberry? => blue
What colour is an elephant? => grey | gray
What colour is a canary? => yellow
What colour is a cucumber? => green
What colour is a tangerine? => orange
What colour is a cooked lobster? => red
What colour is a dandelion flower? => yellow
""")

ANIMALS = _table("""
What is a baby cat called? => kitten
What is a baby dog called? => puppy | pup
What is a baby cow called? => calf
What is a baby sheep called? => lamb
What is a baby horse called? => foal | colt | filly
What is a baby goat called? => kid
What is a baby frog called? => tadpole
What is a baby kangaroo called? => joey
What is a baby duck called? => duckling
What is a baby swan called? => cygnet
What is a baby bear called? => cub
What is a baby lion called? => cub
What is a baby deer called? => fawn
What is a baby goose called? => gosling
What is a baby pig called? => piglet
What is a baby owl called? => owlet
What is a baby chicken called? => chick
Which animal says moo? => cow
Which animal says oink? => pig
Which animal says baa? => sheep
Which animal says quack? => duck
Which animal says meow? => cat
Which animal has a long trunk? => elephant
Which animal is known as the king of the jungle? => lion
What is the tallest animal in the world? => giraffe
What is the largest animal in the world? => blue whale
What is the fastest land animal? => cheetah
Which striped animal looks like a horse? => zebra
Which Australian animal hops and carries its baby in a pouch? => kangaroo
Which black and white bird cannot fly and lives in Antarctica? => penguin
Which insect makes honey? => bee | honeybee | bees
Which eight-legged animal spins webs? => spider
Which sea animal has eight arms? => octopus
Which animal is called man's best friend? => dog
What is a group of wolves called? => pack
What is a group of lions called? => pride
What is a group of sheep called? => flock | herd
Which desert animal has a hump? => camel
What is the largest bird in the world? => ostrich
Which mammal can fly? => bat
""")

FACTS = _table("""
How many legs does a spider have? => 8
How many legs does an insect have? => 6
How many days are in a week? => 7
How many months are in a year? => 12
How many days are in a leap year? => 366
How many continents are there? => 7
How many sides does a triangle have? => 3
How many sides does a square have? => 4
How many sides does a hexagon have? => 6
How many sides does an octagon have? => 8
How many degrees are in a right angle? => 90
How many degrees are in a full circle? => 360
How many wheels does a bicycle have? => 2
How many colours are in a rainbow? => 7
How many hearts does an octopus have? => 3
How many planets are in our solar system? => 8
How many players does a soccer team have on the field? => 11
How many strings does a standard guitar have? => 6
How many bones are in the adult human body? => 206
How many letters are in the English alphabet? => 26
At what temperature in Celsius does water boil at sea level? => 100
At what temperature in Celsius does water freeze? => 0
At what temperature in Fahrenheit does water freeze? => 32
What is the square root of 81? => 9
What is the square root of 144? => 12
What is the largest planet in our solar system? => Jupiter
Which planet is known as the Red Planet? => Mars
Which planet is closest to the Sun? => Mercury
Which planet is famous for its large rings? => Saturn
What is the name of our galaxy? => the Milky Way | Milky Way
What is the largest ocean on Earth? => the Pacific Ocean | Pacific
What is the largest continent? => Asia
What is the largest country by area? => Russia
What is the chemical symbol for gold? => Au
What is the chemical formula for water? => H2O
What gas do plants take in from the air to make food? => carbon dioxide | CO2
What gas do humans need to breathe? => oxygen
What is frozen water called? => ice
Which organ pumps blood around the body? => the heart | heart
What is the hardest natural substance? => diamond
Which metal is liquid at room temperature? => mercury
Who wrote Romeo and Juliet? => William Shakespeare | Shakespeare
Who painted the Mona Lisa? => Leonardo da Vinci | da Vinci | Leonardo
Who was the first person to walk on the Moon? => Neil Armstrong | Armstrong
Who developed the theory of relativity? => Albert Einstein | Einstein
What language is mainly spoken in Brazil? => Portuguese
What language is mainly spoken in Mexico? => Spanish
What is the currency of Japan? => the yen | yen
In which country are the pyramids of Giza? => Egypt
In which country is the Eiffel Tower? => France
What is the tallest mountain in the world? => Mount Everest | Everest
What do bees make? => honey
What is the main ingredient of guacamole? => avocado | avocados
Which musical instrument has 88 keys? => piano
What is the plural of mouse? => mice
What is the plural of child? => children
What is the plural of goose? => geese
What is the plural of tooth? => teeth
""")

# (from unit, to unit, factor): "How many <to> are in <n> <from>?" -> n * factor
UNITS = [
    ("meters", "centimeters", 100),
    ("kilometers", "meters", 1000),
    ("centimeters", "millimeters", 10),
    ("kilograms", "grams", 1000),
    ("liters", "milliliters", 1000),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("days", "hours", 24),
    ("weeks", "days", 7),
    ("years", "months", 12),
    ("feet", "inches", 12),
    ("yards", "feet", 3),
    ("pounds", "ounces", 16),
    ("gallons", "quarts", 4),
    ("dollars", "cents", 100),
    ("dozen", "eggs", 12),
    ("decades", "years", 10),
    ("centuries", "years", 100),
]
UNITS_PER_KIND = 3  # 18 kinds x 3 quantities = 54 questions

ARITHMETIC_PER_OP = 16  # 4 operations x 16 = 64 questions


OPERATIONS = {"+": int.__add__, "-": int.__sub__, "times": int.__mul__, "divided by": int.__floordiv__}


def operands(op: str, rng: random.Random) -> tuple[int, int]:
    """Two small operands for ``op``; a division always comes out whole."""
    if op == "+":
        return rng.randint(2, 50), rng.randint(2, 50)
    if op == "-":
        a = rng.randint(12, 99)
        return a, rng.randint(2, a - 3)
    if op == "times":
        return rng.randint(2, 12), rng.randint(2, 12)
    divisor, quotient = rng.randint(2, 10), rng.randint(2, 12)
    return divisor * quotient, divisor


def arithmetic(rng: random.Random) -> list[Row]:
    """Easy two-operand questions; the answer never equals an operand (so it cannot be an echo)."""
    rows = []
    for op, compute in OPERATIONS.items():
        seen: set[tuple[int, int]] = set()
        while len(seen) < ARITHMETIC_PER_OP:
            a, b = operands(op, rng)
            value = compute(a, b)
            if value in (a, b) or (a, b) in seen:
                continue
            seen.add((a, b))
            rows.append((f"What is {a} {op} {b}?", str(value), []))
    return rows


def unit_conversions(rng: random.Random) -> list[Row]:
    """UNITS_PER_KIND questions per unit pair, quantities 2-9."""
    rows = []
    for from_unit, to_unit, factor in UNITS:
        for n in sorted(rng.sample(range(2, 10), UNITS_PER_KIND)):
            rows.append((f"How many {to_unit} are in {n} {from_unit}?", str(n * factor), []))
    return rows


def main() -> None:
    rng = random.Random(20240601)
    categories = {
        "capital": [(f"What is the capital of {country}?", city, aka) for country, city, aka in CAPITALS],
        "arithmetic": arithmetic(rng),
        "unit_conversion": unit_conversions(rng),
        "opposite": [(f"What is the opposite of {word}?", other, aka) for word, other, aka in OPPOSITES],
        "colour": COLOURS,
        "animal": ANIMALS,
        "fact": FACTS,
    }
    lines = []
    for category, rows in categories.items():
        assert len({prompt for prompt, _, _ in rows}) == len(rows), f"duplicate prompt in {category}"
        for i, (prompt, answer, aliases) in enumerate(rows, start=1):
            row = {"id": f"{category}-{i:03d}", "prompt": prompt, "answer": answer, "aliases": aliases}
            lines.append(json.dumps(row | {"category": category}, ensure_ascii=False))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n", encoding="utf-8")
    counts = ", ".join(f"{category} {len(rows)}" for category, rows in categories.items())
    print(f"wrote {len(lines)} prompts to {OUT}: {counts}")


if __name__ == "__main__":
    main()
