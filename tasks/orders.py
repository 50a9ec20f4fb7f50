"""The demo task: turn a customer's free-text order into one JSON object.

    "Hi! 3 large pepperoni pizzas to 12 Oak Street please"
    -> {"item": "pepperoni pizza", "quantity": 3, "size": "large", "deliver_to": "12 Oak Street"}

The generator is deterministic (one seed, one output). Test examples use items, street names and
sentence templates that never appear in training, so a test score measures what the model learned,
not what it memorised. Run ``python -m tasks.orders data/orders`` to write the splits.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

from lorakit.files.atomic import atomic_write_text

SPLIT_SIZES = {"train": 2000, "val": 100, "test": 200}
SEED = 20261122

def plural_of(noun: str) -> str:
    """English plural of the nouns used here (not of every English noun)."""
    if noun.endswith(("s", "x", "ch", "sh")) or noun in ("potato", "tomato"):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    if noun.endswith("f"):
        return noun[:-1] + "ves"
    return noun + "s"


# Items are built as modifiers + a noun, so training shows thousands of distinct items and the model
# learns to copy and singularise the phrase rather than memorise a menu. Train and test share no
# noun: every test item is new as a whole. Shops sell more than food, so neither do the nouns.
_TRAIN_NOUN_WORDS = """
    pizza burrito burger latte muffin sandwich taco croissant smoothie donut salad pie bagel milkshake
    wrap quesadilla bowl tart cookie roll melt slider box parfait waffle crepe bun baguette pastry
    cupcake soda espresso soup flatbread lasagna omelette curry peach brioche cappuccino sub meatball
    noodle cake cheesecake biscuit cracker sausage pickle potato tomato mango cherry lemon lime apple
    pear plum melon avocado carrot onion pepper cucumber radish bean lentil
    candle notebook pencil marker eraser stapler folder envelope battery charger cable lamp bulb mug
    cup plate glass bottle jar towel blanket pillow sock glove scarf hat shirt jacket umbrella backpack
    wallet watch ring bracelet necklace brush comb razor sponge bucket hammer wrench drill screwdriver
    nail bolt rope ladder tile brick plank chair stool table shelf basket crate tray vase frame poster
    sticker puzzle kite ball racket helmet skateboard ticket voucher rose tulip daisy orchid cactus fern
    bao arepa tamale samosa strudel eclair profiterole beignet churro knish latke bruschetta focaccia
    pupusa tostada gordita chimichanga enchilada fajita burek pastel onigiri katsu tempura yakitori
    bibimbap pho ramekin souffle clafoutis madeleine financier palmier kouign-amann babka
    challah bialy rugelach hamantasch baklava halva lokum mochi daifuku dorayaki taiyaki
    mooncake tteok kimbap laksa rendang satay lumpia siopao ensaimada pandesal empanadita coxinha
    pastizzi ftira borek gozleme lahmacun pide manti khachapuri pelmeni vareniki syrniki
    kolache kringle stollen lebkuchen pfeffernuss speculoos stroopwafel oliebol poffertje frikandel
    gadget widget sprocket gizmo doohickey thermos kettle skillet ladle spatula whisk colander grater
    teapot saucer goblet tumbler flask canteen lantern torch compass binocular tripod easel canvas
"""
TRAIN_NOUNS = [(noun, plural_of(noun)) for noun in _TRAIN_NOUN_WORDS.split()]
TEST_NOUNS = [
    ("calzone", "calzones"), ("empanada", "empanadas"), ("dumpling", "dumplings"), ("frappe", "frappes"),
    ("turnover", "turnovers"), ("pretzel", "pretzels"), ("kebab", "kebabs"), ("scone", "scones"),
    ("pancake", "pancakes"), ("panini", "paninis"), ("macaroon", "macaroons"), ("bisque", "bisques"),
    ("cortado", "cortados"), ("croquette", "croquettes"), ("brownie", "brownies"), ("gyoza", "gyozas"),
]
TRAIN_MODIFIERS = [
    "pepperoni", "chicken", "veggie", "iced", "blueberry", "ham", "beef", "chocolate", "almond", "mango",
    "glazed", "cheese", "cherry", "pumpkin", "sesame", "vanilla", "strawberry", "falafel", "spicy", "lemon",
    "garlic", "oatmeal", "cinnamon", "pulled pork", "peach", "tuna", "bbq", "honey", "maple", "turkey",
    "salmon", "hazelnut", "pesto", "double", "vegan", "gluten-free", "smoked", "greek", "hawaiian", "mocha",
]
TEST_MODIFIERS = [
    "raspberry", "cheddar", "lamb", "shrimp", "pork", "matcha", "caramel", "apple", "butter", "salted",
    "banana", "steak", "coconut", "lobster", "oat", "egg", "fudge", "tofu", "pistachio", "walnut",
]

TRAIN_STREETS = [
    "Oak", "Maple", "Pine", "Cedar", "Elm", "Birch", "Willow", "Harbor", "Lake", "Hill",
    "Mill", "Park", "River", "Sunset", "Highland", "Church", "Market", "Spring", "Forest",
    "Meadow", "Chestnut", "Walnut", "Franklin", "Lincoln", "Washington", "Jefferson",
    "Madison", "Union", "Bridge", "Station", "Orchard", "Kingston", "Victoria", "Queen",
]
TEST_STREETS = [
    "Juniper", "Magnolia", "Sycamore", "Hawthorn", "Linden", "Alder", "Cypress", "Larkspur",
    "Bayview", "Ridgecrest", "Foxglove", "Thornbury",
]
STREET_KINDS = ["Street", "Avenue", "Road", "Lane", "Drive", "Boulevard", "Court", "Way", "Place"]
TOWNS = ["Springfield", "Riverton", "Fairview", "Greenville", "Bristol", "Oakland", "Dover"]

SIZES = ["small", "medium", "large"]
NUMBER_WORDS = [
    "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
    "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
    "twenty",
]

# Top-level sentence frames. {order} is the quantity-size-item phrase; {address} an address.
ORDER_FRAMES_TRAIN = [
    "can I get {order}?", "I'd like {order}.", "I want {order}.", "please send {order}.",
    "{order}, please.", "could I order {order}?", "I'll have {order}.", "I need {order}.",
    "get me {order}.", "we'd like {order}.", "order for {order}.", "{order} for me.",
    "can you do {order}?", "I would like to order {order}.", "put me down for {order}.",
    "let me get {order}.",
]
ORDER_FRAMES_TEST = [
    "could you bring {order}?", "I'm after {order}.", "we're hoping to get {order}.",
    "requesting {order}.", "may I please have {order}?",
]
DELIVERY_FRAMES_TRAIN = [
    "Deliver to {address}.", "Send it to {address}.", "My address is {address}.",
    "Bring it to {address}.", "Delivery to {address} please.", "Address: {address}.",
    "Drop it off at {address}.", "I'm at {address}.", "Ship to {address}.",
    "It goes to {address}.",
]
DELIVERY_FRAMES_TEST = [
    "You can find me at {address}.", "Please deliver it over to {address}.",
    "Have it brought to {address}.",
]
PICKUP_FRAMES_TRAIN = [
    "I'll pick it up.", "For pickup.", "I'll collect it myself.", "Pickup please.",
    "I'll swing by to grab it.", "No delivery, I'll come get it.",
]
PICKUP_FRAMES_TEST = ["I'll come by the store for it.", "Collection in person, thanks."]
GREETINGS = ["", "", "", "Hi! ", "Hello. ", "Hey there. ", "Good evening! ", "Hi team! ", "Morning! "]
# Chatter with numbers in it, so a quantity has to be read from the order, not from any digit.
CHATTER = [
    "", "", "", "", " Thanks!", " Thank you so much.", " It's for my son's 7th birthday.",
    " We are 4 people but that's fine.", " My last order was #5521.", " Please ring twice.",
    " Call me at 555-0142 if needed.", " Can it be there by 6pm?", " Cheers.",
    " The door code is 2468.",
]


@dataclass(frozen=True)
class Pools:
    """The items, streets and frames one split draws from."""

    nouns: list[tuple[str, str]]
    modifiers: list[str]
    streets: list[str]
    order_frames: list[str]
    delivery_frames: list[str]
    pickup_frames: list[str]


TRAIN_POOLS = Pools(TRAIN_NOUNS, TRAIN_MODIFIERS, TRAIN_STREETS, ORDER_FRAMES_TRAIN, DELIVERY_FRAMES_TRAIN, PICKUP_FRAMES_TRAIN)
TEST_POOLS = Pools(TEST_NOUNS, TRAIN_MODIFIERS + TEST_MODIFIERS, TEST_STREETS, ORDER_FRAMES_TEST, DELIVERY_FRAMES_TEST, PICKUP_FRAMES_TEST)


def make_example(rng: random.Random, pools: Pools) -> dict:
    """One chat example: the customer's message as the user turn, the JSON as the assistant turn."""
    singular, plural = _item(rng, pools)
    quantity, quantity_text = _quantity(rng, singular)
    noun = singular if quantity == 1 else plural
    if rng.random() < 0.1:  # some customers capitalise; the answer is lowercase all the same
        noun = noun.title()
    size = rng.choice([*SIZES, None])
    order = _order_phrase(rng, quantity_text, noun, size)

    roll = rng.random()
    address = _address(rng, pools.streets) if roll < 0.6 else None
    if address is not None:
        where = rng.choice(pools.delivery_frames).format(address=address)
    else:
        where = rng.choice(pools.pickup_frames) if roll < 0.85 else ""

    sentence = rng.choice(pools.order_frames).format(order=order)
    sentence = sentence[0].upper() + sentence[1:]
    parts = [sentence, where] if rng.random() < 0.75 or not where else [where, sentence]
    message = rng.choice(GREETINGS) + " ".join(p for p in parts if p) + rng.choice(CHATTER)
    answer = {"item": singular, "quantity": quantity, "size": size, "deliver_to": address}
    return {"messages": [
        {"role": "user", "content": message},
        {"role": "assistant", "content": json.dumps(answer)},
    ]}


def _item(rng: random.Random, pools: Pools) -> tuple[str, str]:
    """(singular, plural) of an item: zero, one or two modifiers before a food noun."""
    singular, plural = rng.choice(pools.nouns)
    count = rng.choices([0, 1, 2], weights=[15, 65, 20])[0]
    words = " ".join(rng.sample(pools.modifiers, count))
    return (f"{words} {singular}", f"{words} {plural}") if words else (singular, plural)


def _quantity(rng: random.Random, singular: str) -> tuple[int, str]:
    """(value, how the customer wrote it): digits, an English word, "a dozen", "a pair of", "a"/"an"."""
    kind = rng.random()
    if kind < 0.35:
        value = rng.randint(1, 24)
        return value, str(value)
    if kind < 0.75:
        value = rng.randint(1, 20)
        return value, NUMBER_WORDS[value - 1]
    if kind < 0.83:
        return 12, "a dozen"
    if kind < 0.91:
        return 2, "a pair of"
    return 1, "an" if singular[0] in "aeiou" else "a"


def _order_phrase(rng: random.Random, quantity: str, noun: str, size: str | None) -> str:
    if size is None:
        return f"{quantity} {noun}"
    if quantity in ("a", "an"):  # the article follows the size word: "a large", not "an large"
        quantity = "an" if size[0] in "aeiou" else "a"
    form = rng.randrange(4)
    if form == 0:
        return f"{quantity} {size} {noun}"
    if form == 1:
        return f"{quantity} {noun}, {size}"
    if form == 2:
        return f"{quantity} {noun} in {size}"
    return f"{quantity} {noun} (size {size})"


def _address(rng: random.Random, streets: list[str]) -> str:
    street = f"{rng.randint(1, 999)} {rng.choice(streets)} {rng.choice(STREET_KINDS)}"
    form = rng.random()
    if form < 0.6:
        return street
    if form < 0.8:
        return f"{street}, Apt {rng.randint(1, 40)}{rng.choice('ABCD')}"
    return f"{street}, {rng.choice(TOWNS)}"


def generate(sizes: dict[str, int] | None = None, seed: int = SEED) -> dict[str, list[dict]]:
    """Every split, deterministically: {"train": [...], "val": [...], "test": [...]}.
    Validation draws from the training pools (it guides training); test from the unseen ones."""
    sizes = sizes or SPLIT_SIZES
    rng = random.Random(seed)
    splits: dict[str, list[dict]] = {}
    for split, count in sizes.items():
        pools = TEST_POOLS if split == "test" else TRAIN_POOLS
        seen: set[str] = set()
        examples: list[dict] = []
        while len(examples) < count:
            example = make_example(rng, pools)
            message = example["messages"][0]["content"]
            if message not in seen:  # no duplicate messages within a split
                seen.add(message)
                examples.append(example)
        splits[split] = examples
    return splits


def write_splits(directory: Path, sizes: dict[str, int] | None = None) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, examples in generate(sizes).items():
        paths[split] = directory / f"{split}.jsonl"
        atomic_write_text(paths[split], "".join(json.dumps(e) + "\n" for e in examples))
    return paths


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "data/orders")
    for split, path in write_splits(target).items():
        print(f"{split:<6} {path}")
