"""The words the orders generator (tasks/orders.py) builds messages from, split into the pools each
split draws on: training, validation (its own nouns, streets and sentence frames, so that its loss
measures what generalises) and test (again its own). No test noun, street or frame occurs in training
or validation; tests/tasks/test_orders.py checks it.

Frames are sentence shapes: {order} is the quantity-size-item phrase, {address} an address, {time}
a time of day.
"""

from __future__ import annotations


def words(text: str) -> list[str]:
    return list(dict.fromkeys(text.split()))  # in order, each once


# Nouns: the head of an item ("pepperoni pizza" -> pizza). Multi-word heads are joined by "_" here.
TRAIN_NOUNS = words("""
    pizza burrito burger latte muffin sandwich taco croissant smoothie donut salad pie bagel milkshake
    wrap quesadilla bowl tart cookie roll melt slider box parfait waffle crepe bun baguette pastry
    cupcake soda espresso soup flatbread lasagna omelette curry peach brioche cappuccino sub meatball
    noodle cake cheesecake biscuit cracker sausage pickle potato tomato mango cherry lemon lime apple
    pear plum melon avocado carrot onion pepper cucumber radish bean lentil loaf sundae float shake
    candle notebook pencil marker eraser stapler folder envelope battery charger cable lamp bulb mug
    cup plate glass bottle jar towel blanket pillow sock glove scarf hat shirt jacket umbrella backpack
    wallet watch ring bracelet necklace brush comb razor sponge bucket hammer wrench drill screwdriver
    bao arepa tamale samosa strudel eclair profiterole beignet churro knish latke bruschetta focaccia
    pupusa tostada gordita chimichanga enchilada fajita burek pastel onigiri katsu tempura yakitori
    bibimbap pho souffle clafoutis madeleine financier palmier babka challah bialy rugelach baklava
    mochi daifuku dorayaki taiyaki mooncake kimbap satay lumpia ensaimada coxinha pastizzi borek
    gozleme lahmacun pide manti khachapuri pelmeni vareniki kolache kringle stollen stroopwafel
    thermos kettle skillet ladle spatula whisk teapot saucer tumbler flask lantern compass tripod
    americano mocha macchiato frappuccino chai lassi juice lemonade cola tea coffee cider
    toastie panino quiche frittata risotto biryani korma masala tikka dal naan paratha roti
    hot_dog flat_white cold_brew spring_roll egg_roll fish_taco club_sandwich sausage_roll pad_thai
    """)
VAL_NOUNS = words("""
    gnocchi ravioli tortellini crumpet shortbread flapjack cinnamon_twist pasty tiramisu
    galette dosa idli vada katsudon udon soba gyro souvlaki pita hummus_wrap
    kofta blintz pakora dolma tamago arancino cannolo sfogliatella zeppola bombolone cornetto piadina
    panzerotto pasticcio lokma simit canele trifle pavlova scotch_egg bannock oatcake johnnycake congee
    wonton jiaozi mandu char_siu_bun tteok hotteok stromboli muffaletta po_boy hoagie grinder poutine
    tourtiere sopapilla alfajor knafeh kunafa basbousa maamoul halva
    """)  # 64 nouns: a validation score is not decided by how a handful of them tokenize
TEST_NOUNS = words("""
    calzone empanada dumpling frappe turnover pretzel kebab scone pancake panini macaroon bisque
    cortado croquette brownie gyoza
    """)

# Made-up nouns, built from syllables: the model must copy and singularise a word it has never seen,
# token by token, not snap to the nearest one it knows (training only).
SYLLABLES = words("ba ko ri ta lu mi zen pa do vu ne sa go fi ru tem bal cor nis lor ket mun")

MODIFIERS_TRAIN = words("""
    pepperoni chicken veggie iced blueberry ham beef chocolate almond mango glazed cheese cherry pumpkin
    sesame vanilla strawberry falafel spicy lemon garlic oatmeal cinnamon peach tuna bbq honey maple
    turkey salmon hazelnut pesto double vegan gluten-free smoked greek hawaiian mocha mini jumbo plain
    classic everything sourdough wholemeal seeded toasted grilled crispy roasted frozen fresh hot cold
    sweet sour mint ginger chilli paneer mushroom spinach feta halloumi bacon sausage egg cajun
    teriyaki katsu tandoori korean mexican italian french thai japanese british american organic
    """)
# Modifiers with digits in them: an item's digits are not its quantity ("2 12-inch pizzas" is 2).
DIGIT_MODIFIERS_TRAIN = words("7-grain 3-cheese 12-inch 5-spice 4-berry 2-layer 10-piece 9-inch 3-bean 6-seed")
DIGIT_MODIFIERS_TEST = words("8-inch 4-cheese 20-piece 2-egg")
MODIFIERS_TEST = words("""
    raspberry cheddar lamb shrimp pork matcha caramel apple butter salted banana steak coconut lobster
    oat fudge tofu pistachio walnut
    """)
# Two-part fillings: "ham and cheese croissant", "cheese and onion pasty".
PAIRS = [("ham", "cheese"), ("cheese", "onion"), ("egg", "bacon"), ("spinach", "feta"), ("peanut butter", "jam"),
         ("pepperoni", "mushroom"), ("salt", "pepper"), ("cheese", "tomato"),
         ("sausage", "egg"), ("bacon", "lettuce"), ("chicken", "leek"), ("steak", "ale")]

STREET_NAMES_TRAIN = words("""
    Oak Maple Pine Cedar Elm Birch Willow Harbor Harbour Lake Hill Mill Park River Sunset Highland
    Church Market Spring Forest Meadow Chestnut Walnut Franklin Lincoln Washington Jefferson Madison
    Union Bridge Station Orchard Kingston Victoria Queen Albert Baker Canal Castle Chapel Cherry_Tree
    Green High Holly Ivy Rose Rowan Primrose Abbey Acacia Beech Bluebell Clarence Commerce Coney
    Corn Dock Fir_Tree Fleet Glen Grove Hope King Larch Lime Lotus Mulberry Old Oxford Regent Riverside
    School Station_Approach St_John's Temple Ocean Pacific West_23rd East_9th North South Fifth Main
    """)
STREET_NAMES_VAL = words("Poplar Heather Ashdown Fernbank Elder Wisteria Clover Quarry")
STREET_NAMES_TEST = words("Juniper Magnolia Sycamore Hawthorn Linden Alder Cypress Larkspur Bayview Ridgecrest "
                          "Foxglove Thornbury")
# Kinds of street, with their usual abbreviations.
STREET_KINDS = ["Street", "St", "Avenue", "Ave", "Road", "Rd", "Lane", "Drive", "Dr", "Boulevard", "Blvd", "Court",
                "Ct", "Way", "Place", "Close", "Grove", "Walk", "Terrace", "Crescent", "Mews", "Square", "Gardens",
                "Row", "Hill", "Parade"]
# Streets whose name needs no kind after it (training only).
WHOLE_STREETS = ["Eastway", "Southgate", "Westbourne", "Northfield", "Highgate", "Parkway", "The Circle", "The Green",
                 "Cornmarket", "Broadwalk", "The Strand", "Sheepcote"]
# Before or after the street: where in the building, and the town.
UNITS_BEFORE = ["Flat {n}", "flat {n}", "Apt {n}{l}", "Apartment {n}{l}", "apartment {n}{l}", "Unit {n}",
                "Suite {n}00", "Room {n}"]
UNITS_AFTER = ["Apt {n}{l}", "apt {n}", "Flat {n}", "Flat {l}", "Unit {n}", "Suite {n}00", "{o} floor",
               "Floor {n}", "room {n}0{n}", "Level {n}", "Building {l}", "Gate {n}", "Stand {n}"]
ORDINALS = ["2nd", "3rd", "4th", "5th", "11th", "14th", "22nd"]
TOWNS = words("Springfield Riverton Fairview Greenville Bristol Oakland Dover Leeds Ludlow Whitby Poole Chelsea "
              "Toronto Sydney Miami Hoboken Cambridge Bramley Ashford Liverpool")
POSTCODES = ["BH15 1AB", "L1 9BH", "SW1A 2AA", "M4 5JD", "90210", "10001", "EH1 1YZ"]

# Sentence frames, split three ways. Each split keeps a couple of shapes of every kind to itself.
ORDER_FRAMES_TRAIN = [
    "can I get {order}?", "can i get {order}", "I'd like {order}.", "I want {order}.", "please send {order}.",
    "{order}, please.", "{order} please", "could I order {order}?", "I'll have {order}.", "I need {order}.",
    "need {order}", "get me {order}.", "we'd like {order}.", "order for {order}.", "{order} for me.",
    "can you do {order}?", "I would like to order {order}.", "put me down for {order}.", "let me get {order}.",
    "lemme get {order}", "Order: {order}.", "I'll take {order}.", "we'll have {order}.", "Could I have {order}?",
    "could we get {order}?", "can u do {order} pls", "I'd love {order}.", "we need {order}.", "just {order}.",
    "Can I order {order}?", "I want to order {order}.", "Please can I have {order}?", "{order}",
    "could you send {order}?", "i'd like to get {order}", "Can we have {order}?", "ORDER: {order}",
]
ORDER_FRAMES_VAL = ["Could you do {order}?", "I'm ordering {order}.", "Might I get {order}?",
                    "we're after {order}.", "Fancy sending {order}?"]
ORDER_FRAMES_TEST = ["could you bring {order}?", "I'm after {order}.", "we're hoping to get {order}.",
                     "requesting {order}.", "may I please have {order}?"]

DELIVERY_FRAMES_TRAIN = [
    "Deliver to {address}.", "Send it to {address}.", "My address is {address}.", "Bring it to {address}.",
    "Delivery to {address} please.", "Address: {address}.", "Drop it off at {address}.", "I'm at {address}.",
    "Ship to {address}.", "It goes to {address}.", "we're at {address}.", "Delivery address: {address}.",
    "I live at {address}.", "deliver to {address} pls", "to {address}.", "{address}.", "Sending to {address}.",
    "address is {address}", "Deliver it to {address} please.", "send to {address}", "It's {address}.",
    "Please deliver to {address}.", "We are at {address}.", "Can it go to {address}?",
    # Words after the address that are not part of it: a time, or a note for the driver.
    "Deliver to {address} {time}.", "Send it to {address} {time} please", "Bring it to {address}, {remark}.",
    "to {address}, {remark}", "{address} - {remark}.", "Drop it at {address} {remark}",
]
DELIVERY_FRAMES_VAL = ["Leave it at {address}.", "Our place is {address}.", "Get it over to {address}.",
                       "Leave it at {address} {time}.", "Get it over to {address}, {remark}."]
# Notes for the driver, written after the address (never part of it). No phrase here occurs in
# data/orders/real.jsonl beyond single common words (tests/tasks/test_orders.py checks it).
REMARKS_TRAIN = ["ring twice please", "the red door", "round the back", "by the side gate", "knock loudly",
                 "leave it on the step", "opposite the park", "next to the pharmacy", "the house with the green gate",
                 "thanks", "cheers x", "asap", "no rush", "ta"]
REMARKS_VAL = ["green door on the right", "near the church", "just leave it with the neighbour", "cheers in advance"]
DELIVERY_FRAMES_TEST = ["You can find me at {address}.", "Please deliver it over to {address}.",
                        "Have it brought to {address}."]

PICKUP_FRAMES_TRAIN = [
    "I'll pick it up.", "For pickup.", "I'll collect it myself.", "Pickup please.", "I'll swing by to grab it.",
    "No delivery, I'll come get it.", "for pick up", "For collection please.", "to collect", "to go",
    "to take away.", "Takeaway please.", "I'll come in.", "will collect {time}.", "pick up {time}.",
    "I'll grab it {time}.", "We'll pop in {time}.", "Collecting {time}.", "I'll be there {time} to pick up.",
    "Curbside pickup please.", "for pickup {time}", "we'll collect", "I'll pop in for it.",
]
PICKUP_FRAMES_VAL = ["Grabbing it on my way past.", "Collecting in person {time}."]
PICKUP_FRAMES_TEST = ["I'll come by the store for it.", "Collection in person, thanks."]

TIMES = ["at 7:45", "at 5:30", "by 6pm", "in 10 mins", "in 20 minutes", "around 12:15", "at half 12", "at 2",
         "tomorrow at 9am", "on Saturday at 11", "after 4", "before 8:30", "in 15", "around 6ish", "at noon"]
GREETINGS = ["", "", "", "", "Hi! ", "Hello. ", "Hey there. ", "Good evening! ", "Hi team! ", "Morning! ", "hi ",
             "Hiya, ", "Hello,\n\n", "Dear team, ", "Yo, ", "Good afternoon. ", "hey!! ", "Evening! ", "Hi there, "]
# Chatter with numbers in it: a quantity has to be read from the order, not from any digit.
CHATTER = [
    "Thanks!", "Thank you so much.", "It's for my son's 7th birthday.", "We are 4 people but that's fine.",
    "My last order was #5521.", "Please ring twice.", "Call me at 555-0142 if needed.", "Can it be there by 6pm?",
    "Cheers.", "The door code is 2468.", "It's $14.99 each, right?", "I've got a $20 note.", "Tel 01233 555 789.",
    "Order ref 4471.", "Gate code is 1984.", "My number is 07700 900123.", "Table for 4 was full, so this instead.",
    "My kids are 5 and 8.", "We're on the 3rd floor, there's a lift.", "Paying cash.", "thx", "ty x",
    "Many thanks, Helen", "Kind regards, Mr P. Jones", "Name is Sam.", "Order under Dave.", "It's £2.50 each, yes?",
    "We've ordered from you 3 times before!", "Don't ring the bell, the baby's asleep.", "Plate 7XYZ123.",
]
NUMBER_WORDS = words("one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
                     "sixteen seventeen eighteen nineteen twenty")
SIZES = ["small", "medium", "large"]
