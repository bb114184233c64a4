"""Template-based instruction pool.

Builds short, simple instructions by filling templates with slot values
(animals, countries, foods, jobs, small numbers, ...).  The output is fully
deterministic: every combination of slot values is rendered, and when a
template produces more than its ``limit`` instructions, a subset is picked
with a fresh ``random.Random(0)`` per template.

Each item is a dict ``{"instruction", "input", "task", "template"}`` where
``task`` uses the same labels as the handwritten pool and ``template`` is the
short id of the template that produced it.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

TASKS: tuple[str, ...] = (
    "explain",
    "list",
    "rewrite",
    "summarize",
    "classify",
    "math",
    "code",
    "advice",
    "facts",
    "creative",
    "compare",
    "howto",
)


def _article(noun: str) -> str:
    """Return ``noun`` preceded by "a" or "an"."""
    return ("an " if noun[:1].lower() in "aeiou" else "a ") + noun


@dataclass(frozen=True)
class Template:
    """One instruction template and the slot values used to fill it.

    ``text`` is a ``str.format`` pattern.  Besides each slot name, the key
    ``a_<slot>`` gives a string slot value with its indefinite article, and
    tuple values can be indexed (``{pair[0]}``).  ``check`` can reject
    slot combinations (e.g. to keep subtraction results positive).
    """

    id: str
    task: str
    text: str
    slots: Mapping[str, Sequence[Any]]
    limit: int = 25
    check: Callable[[dict[str, Any]], bool] | None = None

    def render(self) -> list[str]:
        """Render the (possibly subsampled) instructions for this template."""
        names = list(self.slots)
        texts: list[str] = []
        seen: set[str] = set()
        for values in itertools.product(*(self.slots[n] for n in names)):
            combo = dict(zip(names, values))
            if self.check is not None and not self.check(combo):
                continue
            fields = dict(combo)
            for key, value in combo.items():
                if isinstance(value, str):
                    fields[f"a_{key}"] = _article(value)
            text = self.text.format(**fields)
            if text not in seen:
                seen.add(text)
                texts.append(text)
        if len(texts) > self.limit:
            rng = random.Random(0)
            keep = set(rng.sample(range(len(texts)), self.limit))
            texts = [t for i, t in enumerate(texts) if i in keep]
        return texts


COUNTRIES = (
    "Japan",
    "Italy",
    "Mexico",
    "Egypt",
    "Kenya",
    "Brazil",
    "Canada",
    "India",
    "Australia",
    "Spain",
    "Germany",
    "Peru",
    "Thailand",
    "Morocco",
    "Norway",
    "Greece",
    "Vietnam",
    "Argentina",
    "South Korea",
    "Portugal",
    "Ireland",
    "New Zealand",
    "Chile",
    "Ghana",
    "Sweden",
    "Poland",
    "Indonesia",
    "Nigeria",
    "Colombia",
    "France",
)


ANIMALS = (
    "elephants",
    "dolphins",
    "owls",
    "penguins",
    "giraffes",
    "kangaroos",
    "octopuses",
    "honeybees",
    "wolves",
    "koalas",
    "sharks",
    "frogs",
    "sea turtles",
    "bats",
    "eagles",
    "camels",
    "polar bears",
    "squirrels",
    "ants",
    "whales",
    "foxes",
    "horses",
    "parrots",
    "snakes",
    "butterflies",
    "rabbits",
    "crocodiles",
    "hedgehogs",
    "zebras",
    "lions",
    "cheetahs",
    "gorillas",
    "hummingbirds",
    "beavers",
    "flamingos",
    "pandas",
)


PARENT_ANIMALS = (
    "elephants",
    "dolphins",
    "penguins",
    "kangaroos",
    "wolves",
    "koalas",
    "bats",
    "eagles",
    "polar bears",
    "whales",
    "foxes",
    "horses",
    "lions",
    "gorillas",
    "beavers",
    "pandas",
    "cheetahs",
    "owls",
    "seahorses",
)


ANIMALS_ONE = (
    "frog",
    "salmon",
    "crocodile",
    "owl",
    "lizard",
    "shark",
    "salamander",
    "tortoise",
    "ostrich",
    "seal",
    "eel",
    "toad",
    "hawk",
    "snake",
    "goat",
    "tuna",
    "platypus",
    "newt",
    "chicken",
    "kangaroo",
    "seahorse",
    "turtle",
    "hamster",
)


JOBS = (
    "nurse",
    "pilot",
    "librarian",
    "electrician",
    "veterinarian",
    "chef",
    "firefighter",
    "architect",
    "dentist",
    "farmer",
    "plumber",
    "journalist",
    "software developer",
    "teacher",
    "pharmacist",
    "carpenter",
    "accountant",
    "park ranger",
    "translator",
    "photographer",
    "mechanic",
    "baker",
    "lawyer",
    "scientist",
    "graphic designer",
    "zookeeper",
    "dietitian",
    "bus driver",
    "tailor",
    "lifeguard",
)


SPORTS = (
    "soccer",
    "basketball",
    "tennis",
    "volleyball",
    "baseball",
    "table tennis",
    "badminton",
    "golf",
    "cricket",
    "ice hockey",
    "rugby",
    "handball",
)


HOBBIES = (
    "gardening",
    "painting",
    "knitting",
    "hiking",
    "playing chess",
    "swimming",
    "yoga",
    "keeping a journal",
    "bird watching",
    "photography",
    "baking",
    "cycling",
    "learning a musical instrument",
    "rock climbing",
    "dancing",
    "volunteering",
    "fishing",
    "pottery",
    "running",
    "woodworking",
)


DEVICES = (
    "a microwave oven",
    "a bicycle",
    "a thermometer",
    "a solar panel",
    "a compass",
    "an elevator",
    "a washing machine",
    "a camera",
    "a smoke detector",
    "a light bulb",
    "a toaster",
    "a battery",
    "a vacuum cleaner",
    "an electric kettle",
    "a traffic light",
    "a calculator",
    "a wind turbine",
    "a hot air balloon",
    "a parachute",
    "a touch screen",
    "a dishwasher",
    "a zipper",
    "a pressure cooker",
    "a seatbelt",
    "an escalator",
    "a submarine",
    "a lock",
)


CONCEPTS = (
    "static electricity",
    "friction",
    "evaporation",
    "recycling",
    "erosion",
    "democracy",
    "magnetism",
    "electricity",
    "digestion",
    "supply and demand",
    "germs",
    "camouflage",
    "hibernation",
    "echoes",
    "shadows",
    "the greenhouse effect",
    "compound interest",
    "pollination",
    "time zones",
    "fractions",
    "percentages",
    "tides",
)


HABITS = (
    "taking short walks after meals",
    "drinking water",
    "eating fruit",
    "stretching",
    "walking every day",
    "wearing sunscreen",
    "taking breaks from screens",
    "eating foods with fiber",
    "spending time outdoors",
    "laughing",
    "cooking at home",
    "having regular checkups",
    "flossing your teeth",
    "keeping a regular bedtime",
    "eating slowly",
    "taking the stairs",
    "meditating",
)


FOODS = (
    "cheese",
    "bread",
    "chocolate",
    "honey",
    "butter",
    "yogurt",
    "olive oil",
    "sugar",
    "rice",
    "pasta",
    "tea",
    "coffee",
    "tofu",
    "maple syrup",
    "peanut butter",
    "popcorn",
    "salt",
    "vanilla",
    "cinnamon",
    "ketchup",
)


INGREDIENTS = (
    "eggs",
    "potatoes",
    "rice",
    "chickpeas",
    "lentils",
    "spinach",
    "mushrooms",
    "bananas",
    "oats",
    "tomatoes",
    "cheese",
    "zucchini",
    "pasta",
    "apples",
    "sweet potatoes",
)


ELEMENTS = (
    "oxygen",
    "iron",
    "silver",
    "carbon",
    "hydrogen",
    "sodium",
    "copper",
    "helium",
    "nitrogen",
    "calcium",
    "zinc",
    "potassium",
    "lead",
    "tin",
    "neon",
    "sulfur",
    "aluminum",
    "chlorine",
    "magnesium",
)


PLANETS = (
    "Mercury",
    "Venus",
    "Earth",
    "Mars",
    "Jupiter",
    "Saturn",
    "Uranus",
    "Neptune",
)


NAMES = (
    "Anna",
    "Ben",
    "Carlos",
    "Dina",
    "Emma",
    "Farid",
    "Grace",
    "Hiro",
    "Ivy",
    "Jack",
    "Leila",
    "Omar",
    "Priya",
    "Sam",
    "Tom",
    "Yuki",
)


SHOP_ITEMS = (
    "rulers",
    "notebooks",
    "apples",
    "muffins",
    "erasers",
    "stickers",
    "lemons",
    "candles",
    "postcards",
    "bananas",
    "cupcakes",
    "markers",
)


SNACKS = ("cookies", "grapes", "strawberries", "crackers", "candies", "nuts")


VEHICLES = ("car", "bus", "train", "truck", "boat")


CHEAP_ITEMS = (
    "sandwich",
    "book",
    "toy car",
    "T-shirt",
    "lunch box",
    "kite",
    "puzzle",
    "notebook",
    "cap",
    "umbrella",
)


BLUNT = (
    "Send me the file.",
    "Move your car.",
    "Answer my email.",
    "Be quiet.",
    "Fix this now.",
    "Give me a discount.",
    "Call me back.",
    "Stop talking.",
    "Clean your room.",
    "Hurry up.",
    "Turn the music down.",
    "Bring me some water.",
    "Don't touch my desk.",
    "Tell me the price.",
    "Wait outside.",
    "Finish the report today.",
    "Show me your ticket.",
)


WORDY = (
    "The meeting has been rescheduled to a subsequent date.",
    "Please ensure that all windows are securely fastened prior to departure.",
    "The municipality will commence road repairs in the forthcoming week.",
    "Individuals who wish to participate must submit an application.",
    "Kindly refrain from utilizing mobile devices in the library.",
    "The vehicle ceased functioning due to an insufficient quantity of fuel.",
    "Our objective is to facilitate communication between departments.",
    "Precipitation is anticipated throughout the afternoon.",
    "The canine exhibited considerable fatigue following the excursion.",
    "Consumption of fresh produce is beneficial to one's wellbeing.",
    "The establishment will remain closed for the duration of the holidays.",
    "Participants should retain their receipts for future reference.",
    "The instructor requested that the pupils commence the examination.",
)


CASUAL = (
    "Hey, can you send me that stuff?",
    "Thanks a bunch for the help!",
    "I'm gonna be late, sorry.",
    "That idea is super cool.",
    "Can't make it to the meeting, something came up.",
    "What's up with the delay?",
    "Got your message, will check it out.",
    "We need more cash for the project.",
    "The new guy is really good at his job.",
    "Let's grab lunch and talk about it.",
    "I kinda messed up the numbers.",
    "No worries, we'll fix it tomorrow.",
    "Drop me a line when you're free.",
    "The boss wants it done ASAP.",
)


PRESENT = (
    "She walks her dog every morning.",
    "We eat dinner at seven.",
    "The children play in the park.",
    "He writes a letter to his grandmother.",
    "I take the bus to work.",
    "They sing in the school choir.",
    "The bakery sells fresh bread.",
    "My brother fixes old bikes.",
    "The river floods every spring.",
    "We watch a movie on Friday night.",
    "The teacher explains the lesson.",
    "I buy vegetables at the market.",
    "The wind blows the leaves away.",
    "She teaches us how to swim.",
)


PLAIN = (
    "The bus is late",
    "We are having soup for dinner",
    "It is going to rain tomorrow",
    "The library closes at eight",
    "My cat is asleep on the sofa",
    "The team won the match",
    "I lost my umbrella",
    "The cake is ready",
    "Our neighbor bought a new car",
    "The park is full of people today",
)


SPEAKERS = (
    "a pirate",
    "a news reporter",
    "a sports commentator",
    "a fairy tale narrator",
    "a friendly tour guide",
)


STORIES = (
    "Goldilocks and the Three Bears",
    "Snow White",
    "Jack and the Beanstalk",
    "The Ugly Duckling",
    "Hansel and Gretel",
    "The Boy Who Cried Wolf",
    "Pinocchio",
    "The Lion and the Mouse",
    "The Ant and the Grasshopper",
    "The Princess and the Pea",
    "Rapunzel",
    "Sleeping Beauty",
    "The Gingerbread Man",
    "The Little Mermaid",
    "The Emperor's New Clothes",
    "Robin Hood",
    "The Fox and the Grapes",
    "Puss in Boots",
    "Rumpelstiltskin",
    "The Frog Prince",
)


PROCESSES = (
    "a seed grows into a plant",
    "bees make honey",
    "the heart pumps blood through the body",
    "a river carves a valley over time",
    "a tadpole grows into a frog",
    "old paper gets recycled",
    "bread is made from wheat",
    "a letter travels through the mail",
    "the Moon causes ocean tides",
    "food is digested in the body",
    "cheese is made from milk",
    "glass is made from sand",
    "electricity reaches our homes",
    "a volcano erupts",
    "a package gets delivered after you order it online",
    "a chick hatches from an egg",
)


INVENTIONS = (
    "the bicycle",
    "the telephone",
    "the printing press",
    "the light bulb",
    "paper money",
    "the airplane",
    "the camera",
    "the radio",
    "the computer",
    "the wheel",
    "the compass",
    "the television",
    "the steam engine",
    "the car",
    "the calendar",
)


PRODUCE = (
    "a carrot",
    "a strawberry",
    "a cucumber",
    "a pumpkin",
    "an avocado",
    "broccoli",
    "a bell pepper",
    "a lemon",
    "an eggplant",
    "a pear",
    "celery",
    "a cherry",
    "an onion",
    "a peach",
    "cabbage",
    "a potato",
    "a watermelon",
    "a radish",
)


REVIEWS = (
    "The pasta was delicious and the staff were so kind.",
    "My package arrived broken and nobody answered my emails.",
    "Best haircut I have had in years!",
    "The movie was boring and far too long.",
    "Great headphones, the sound is clear and they feel light.",
    "The room smelled of smoke and the shower was cold.",
    "Our guide was funny and knew so much about the city.",
    "The app crashes every time I open it.",
    "I love this backpack, it fits everything I need.",
    "The coffee was weak and overpriced.",
    "Fast delivery, and the shoes fit perfectly.",
    "The book started well, but the ending made no sense.",
    "The kids had a wonderful time at the zoo.",
    "The chair broke after two weeks.",
    "Friendly staff, clean rooms, and a great view of the sea.",
    "I waited an hour and my order was still wrong.",
    "This blender is powerful and easy to clean.",
    "The concert was too loud and the seats were uncomfortable.",
    "A cozy little cafe with the best cinnamon rolls in town.",
    "The instructions were confusing and a piece was missing.",
)


HEADLINES = (
    "Heavy snow expected across the north this weekend",
    "Scientists discover a new species of frog in the rainforest",
    "Local bakery opens its third shop downtown",
    "Young striker scores twice in cup final",
    "Researchers send a small robot to explore the ocean floor",
    "Strong winds and rain to hit the coast on Monday",
    "Tech company reports record sales this quarter",
    "Tennis star wins her first major title",
    "New telescope captures images of distant galaxies",
    "Sunny and warm days ahead for the holiday week",
    "Coffee prices rise as harvest shrinks",
    "Marathon runner breaks the course record",
    "Study finds that dogs can recognize human emotions",
    "Car maker plans to hire five hundred new workers",
    "Thick fog delays morning flights at the airport",
    "Swimming team qualifies for the national championship",
)


SUBSTANCES = (
    "water",
    "iron",
    "oxygen",
    "milk",
    "table salt",
    "honey",
    "butter",
    "helium",
    "sand",
    "olive oil",
    "carbon dioxide",
    "mercury",
    "candle wax",
    "vinegar",
    "copper",
    "nitrogen",
)


THINGS = (
    "a mushroom",
    "a rock",
    "a cloud",
    "an oak tree",
    "a candle flame",
    "a seed",
    "a river",
    "coral",
    "a feather",
    "moss",
    "a robot",
    "a snail",
    "a plastic bottle",
    "yeast",
    "seaweed",
)


LIST_RESULTS = (
    "only the even ones",
    "the sum of the odd ones",
    "how many of them are greater than ten",
    "the numbers in reverse order",
    "a new list with each number doubled",
    "how many zeros it contains",
    "the numbers sorted from largest to smallest",
    "the first negative number, or None if there is none",
    "True if all of them are positive",
    "the numbers that are divisible by three",
    "a running total at each position",
    "the product of the first and last numbers",
    "each number rounded to the nearest whole number",
    "the average of the numbers above zero",
)


UNIT_PAIRS = (
    ("meters", "centimeters"),
    ("hours", "minutes"),
    ("kilograms", "pounds"),
    ("inches", "centimeters"),
    ("liters", "milliliters"),
    ("days", "hours"),
    ("dollars", "cents"),
    ("feet", "meters"),
    ("weeks", "days"),
    ("grams", "kilograms"),
    ("ounces", "grams"),
    ("Celsius", "Kelvin"),
    ("years", "months"),
    ("minutes", "seconds"),
)


STRING_OPS = (
    "returns it in uppercase",
    "counts the spaces in it",
    "returns its first three characters",
    "checks whether it ends with a question mark",
    "removes every digit from it",
    "doubles every letter in it",
    "returns how many different characters it contains",
    "replaces each space with a dash",
    "swaps its first and last characters",
    'checks whether it contains the word "hello"',
    "returns every second character",
    "counts how many of its words start with the letter a",
    "returns True if it is all lowercase",
    "adds an exclamation mark to the end",
)


PRINT_TARGETS = (
    "the even numbers from 2 to 20",
    "the numbers from 10 down to 1",
    "the first five multiples of 3",
    'each letter of the word "python" on its own line',
    "the cubes of the numbers 1 to 5",
    "a row of ten stars",
    "the numbers from 1 to 50 that can be divided by 5",
    "a triangle of stars that is five rows tall",
    "the name of each day of the week",
    'a countdown from 5 followed by the word "Liftoff!"',
    '"Hello, world!" three times',
    "today's date",
)


CONDITIONS = (
    "a number is divisible by both 3 and 5",
    "an email address contains exactly one @ sign",
    "a list contains any duplicates",
    "a number is between 1 and 100",
    "two strings have the same length",
    "a sentence ends with a period",
    "a word appears in a list of banned words",
    "three side lengths can form a triangle",
    "all the letters in a word are different",
    "a number is a perfect square",
    "a phrase reads the same backward when spaces are ignored",
    "a dictionary is empty",
)


PETS = (
    "rabbit",
    "hamster",
    "goldfish",
    "parrot",
    "turtle",
    "cat",
    "dog",
    "guinea pig",
    "canary",
    "lizard",
    "hedgehog",
)


SITUATIONS = (
    "I am stuck in traffic",
    "I have too much homework",
    "a customer is rude to me",
    "my flight is delayed",
    "I have to speak in front of a crowd",
    "my computer crashes right before a deadline",
    "I get lost in a new city",
    "my team loses an important game",
    "I am waiting for test results",
    "my little brother keeps annoying me",
    "I burn dinner in front of guests",
    "I miss my bus",
)


POEM_TOPICS = (
    "the first snowfall of the year",
    "a city at night",
    "an old bicycle",
    "the smell of fresh bread",
    "a lighthouse",
    "a busy bee",
    "a rainy Monday",
    "a grandmother's garden",
    "the desert at noon",
    "a paper boat",
    "a sleepy kitten",
    "the last day of summer",
    "a mountain lake",
    "a shooting star",
    "a mug of hot cocoa",
)


CHARACTERS = (
    "a shy dragon",
    "a curious robot",
    "an old fisherman",
    "a brave little mouse",
    "a lonely lighthouse keeper",
    "a young inventor",
    "a talking cat",
    "a clumsy wizard",
)


PLOTS = (
    "finds a secret door",
    "loses something important",
    "makes an unexpected friend",
    "enters a baking contest",
    "gets lost in a big city",
    "learns to swim",
    "discovers a hidden garden",
)


BUSINESSES = (
    "a bike repair shop",
    "a pet grooming salon",
    "a small bookstore",
    "an ice cream truck",
    "a yoga studio",
    "a family-run pizza place",
    "a car wash",
    "a flower shop",
    "a dentist's office",
    "a music school",
    "a recycling center",
    "a camping gear store",
    "a farmers' market",
    "a laundromat",
    "a juice bar",
)


PLACES = (
    "a snowy forest at night",
    "a crowded train station at rush hour",
    "an empty beach in winter",
    "a bakery early in the morning",
    "a library on a quiet afternoon",
    "a city rooftop at sunset",
    "an old attic full of boxes",
    "a mountain village after a storm",
    "a night market in summer",
    "a school playground during recess",
    "a farm at dawn",
    "a desert under a full moon",
    "a coral reef under the sea",
    "a cozy cabin during a blizzard",
    "a busy airport on a holiday weekend",
)


HAIKU_SUBJECTS = (
    "a frog in a pond",
    "morning fog",
    "cherry blossoms",
    "a winter moon",
    "a summer storm",
    "fresh snow",
    "a quiet library",
    "the first spring rain",
    "a cat sitting by the window",
    "a falling star",
    "waves on the shore",
    "a cup of green tea",
    "a busy city street",
    "an old tree",
)


LETTER_PAIRS = (
    ("a cat", "the dog next door"),
    ("a tree", "the wind"),
    ("the Moon", "the Sun"),
    ("a child", "their future self"),
    ("a sock", "its lost partner"),
    ("a student", "a favorite author"),
    ("a goldfish", "the cat that watches its bowl"),
    ("a snowman", "the spring"),
)


ANIMAL_PAIRS = (
    ("lions", "tigers"),
    ("rabbits", "hares"),
    ("dolphins", "sharks"),
    ("bees", "wasps"),
    ("horses", "donkeys"),
    ("owls", "hawks"),
    ("seals", "sea lions"),
    ("llamas", "alpacas"),
    ("turtles", "tortoises"),
    ("wolves", "pet dogs"),
    ("crows", "ravens"),
    ("cheetahs", "leopards"),
    ("apes", "monkeys"),
    ("ducks", "geese"),
    ("mice", "rats"),
)


FOOD_PAIRS = (
    ("butter", "olive oil"),
    ("honey", "sugar"),
    ("apples", "pears"),
    ("yogurt", "ice cream"),
    ("pasta", "rice"),
    ("oatmeal", "breakfast cereal"),
    ("potatoes", "sweet potatoes"),
    ("cow's milk", "oat milk"),
    ("green tea", "black tea"),
    ("dark chocolate", "milk chocolate"),
    ("white bread", "whole wheat bread"),
    ("fresh fruit", "fruit juice"),
    ("chicken", "beef"),
    ("lentils", "beans"),
)


TRANSPORT = ("car", "train", "bus", "bicycle", "plane", "boat")


SPORT_PAIRS = (
    ("tennis", "badminton"),
    ("rugby", "American football"),
    ("baseball", "cricket"),
    ("ice hockey", "field hockey"),
    ("table tennis", "tennis"),
    ("volleyball", "beach volleyball"),
    ("handball", "basketball"),
    ("golf", "mini golf"),
    ("skiing", "snowboarding"),
    ("running", "walking"),
    ("boxing", "karate"),
    ("swimming", "water polo"),
)


JOB_PAIRS = (
    ("a nurse", "a doctor"),
    ("a chef", "a baker"),
    ("a pilot", "a flight attendant"),
    ("an architect", "an engineer"),
    ("a plumber", "an electrician"),
    ("a journalist", "a novelist"),
    ("a teacher", "a private tutor"),
    ("a lawyer", "a judge"),
    ("a dentist", "a dental hygienist"),
    ("a farmer", "a gardener"),
)


DISHES = (
    "a vegetable soup",
    "a cheese omelet",
    "oatmeal",
    "a grilled cheese sandwich",
    "a tomato pasta sauce",
    "roasted potatoes",
    "a fruit smoothie",
    "fried rice",
    "banana bread",
    "hummus",
    "popcorn on the stove",
    "a fruit salad",
    "chocolate chip cookies",
    "garlic bread",
    "iced tea",
    "mashed potatoes",
    "a vegetable stir-fry",
)


DIRTY_THINGS = (
    "a cast iron pan",
    "a bathroom mirror",
    "white sneakers",
    "a microwave",
    "a fish tank",
    "a laptop screen",
    "a hairbrush",
    "a yoga mat",
    "a reusable water bottle",
    "a wooden cutting board",
    "an oven",
    "a stained carpet",
    "a pair of glasses",
    "a bicycle chain",
    "kitchen tiles",
)


SKILLS = (
    "play the guitar",
    "swim",
    "draw faces",
    "type faster",
    "ride a bike",
    "knit a scarf",
    "write code in Python",
    "ski",
    "bake bread",
    "speak in public",
    "play the piano",
    "cook healthy meals",
    "do a cartwheel",
    "read music",
)


PLANTS = (
    "basil",
    "strawberries",
    "mint",
    "sunflowers",
    "cherry tomatoes",
    "lettuce",
    "chili peppers",
    "an avocado tree from a seed",
    "potatoes in a large bag",
    "carrots",
    "garlic",
    "a lemon tree",
    "succulents",
    "parsley",
    "spring onions",
)


CHORES = (
    "set up a tent",
    "sew on a loose button",
    "hang a picture on the wall",
    "unclog a kitchen sink",
    "change a car tire",
    "reset a Wi-Fi router",
    "pack a suitcase neatly",
    "iron a shirt",
    "make a bed neatly",
    "repot a houseplant",
    "sharpen a kitchen knife",
    "polish leather shoes",
    "put together a flat-pack bookshelf",
    "write a cover letter",
    "clean up after a party",
)


def _pairs(items: Sequence[str]) -> list[tuple[str, str]]:
    """All unordered pairs of ``items``, in a fixed order."""
    return list(itertools.combinations(items, 2))


TEMPLATES: tuple[Template, ...] = (
    # explain
    Template("exp_device", "explain", "Explain how {device} works in simple terms.", {"device": DEVICES}),
    Template(
        "exp_concept", "explain", "Explain the idea of {concept} to a ten-year-old.", {"concept": CONCEPTS}
    ),
    Template("exp_habit", "explain", "Why is {habit} good for your health?", {"habit": HABITS}),
    Template("exp_job", "explain", "What does {a_job} do during a normal workday?", {"job": JOBS}),
    Template(
        "exp_food",
        "explain",
        "Explain where {food} comes from and how it gets to our table.",
        {"food": FOODS},
    ),
    Template("exp_rules", "explain", "Explain the basic rules of {sport}.", {"sport": SPORTS}),
    Template(
        "exp_young", "explain", "Explain how {animal} take care of their young.", {"animal": PARENT_ANIMALS}
    ),
    # list
    Template("list_animal_facts", "list", "List three facts about {animal}.", {"animal": ANIMALS}),
    Template(
        "list_country_foods", "list", "List three traditional foods from {country}.", {"country": COUNTRIES}
    ),
    Template("list_job_skills", "list", "List four skills that a good {job} needs.", {"job": JOBS}),
    Template(
        "list_sport_gear",
        "list",
        "What equipment do you need to play {sport}? Give a short list.",
        {"sport": SPORTS},
    ),
    Template("list_hobby_benefits", "list", "Name three benefits of {hobby}.", {"hobby": HOBBIES}),
    Template(
        "list_dishes", "list", "List three simple dishes you can make with {food}.", {"food": INGREDIENTS}
    ),
    Template("list_places", "list", "Name three places worth visiting in {country}.", {"country": COUNTRIES}),
    # facts
    Template(
        "facts_capital",
        "facts",
        "Which city is the capital of {country}?",
        {"country": tuple(c for c in COUNTRIES if c not in ("France", "Japan"))},
    ),
    Template("facts_continent", "facts", "Which continent is {country} in?", {"country": COUNTRIES}),
    Template("facts_diet", "facts", "What do {animal} usually eat?", {"animal": ANIMALS}),
    Template("facts_lifespan", "facts", "How long do {animal} usually live?", {"animal": ANIMALS}),
    Template("facts_symbol", "facts", "What is the chemical symbol for {element}?", {"element": ELEMENTS}),
    Template("facts_planet", "facts", "Tell me two facts about the planet {planet}.", {"planet": PLANETS}),
    Template(
        "facts_planet_size",
        "facts",
        "Is {planet} bigger or smaller than Earth?",
        {"planet": tuple(p for p in PLANETS if p != "Earth")},
    ),
    # math
    Template(
        "math_price",
        "math",
        "A shop sells {item} for {p} dollars each. How much do {n} {item} cost?",
        {"item": SHOP_ITEMS, "p": range(2, 10), "n": range(2, 10)},
        limit=30,
    ),
    Template(
        "math_give",
        "math",
        "{name} has {a} {item} and gives {b} to a friend. How many {item} does {name} have left?",
        {"name": NAMES, "item": SHOP_ITEMS, "a": range(6, 21), "b": range(2, 10)},
        limit=30,
        check=lambda c: c["a"] > c["b"],
    ),
    Template(
        "math_share",
        "math",
        "{name} shares {a} {snack} equally among {b} friends. How many {snack} does each friend get?",
        {"name": NAMES, "snack": SNACKS, "a": range(6, 31), "b": range(2, 7)},
        check=lambda c: c["a"] % c["b"] == 0 and c["a"] > c["b"],
    ),
    Template(
        "math_speed",
        "math",
        "A {vehicle} travels at {s} kilometers per hour. How far does it go in {h} hours?",
        {"vehicle": VEHICLES, "s": (20, 30, 40, 50, 60), "h": range(2, 6)},
        check=lambda c: (c["vehicle"], c["s"], c["h"]) != ("car", 60, 3),
    ),
    Template(
        "math_save",
        "math",
        "{name} saves {p} dollars every week. How much money will {name} have saved after {n} weeks?",
        {"name": NAMES, "p": range(2, 11), "n": range(3, 13)},
        check=lambda c: (c["p"], c["n"]) != (5, 10),
    ),
    Template(
        "math_area",
        "math",
        "A rectangle is {a} centimeters long and {b} centimeters wide. What is its area?",
        {"a": range(3, 13), "b": range(2, 10)},
        check=lambda c: c["a"] > c["b"],
    ),
    Template(
        "math_perimeter",
        "math",
        "What is the perimeter of a rectangle that is {a} meters long and {b} meters wide?",
        {"a": range(3, 13), "b": range(2, 10)},
        check=lambda c: c["a"] > c["b"],
    ),
    Template(
        "math_change",
        "math",
        "{name} buys {a_item} for {p} dollars and pays with a {bill}-dollar bill. "
        "How much change does {name} get back?",
        {"name": NAMES, "item": CHEAP_ITEMS, "p": range(2, 19), "bill": (10, 20)},
        check=lambda c: c["p"] < c["bill"],
    ),
    Template(
        "math_pages",
        "math",
        "A book has {a} pages. If {name} reads {b} pages each day, "
        "how many days will it take to finish the book?",
        {"name": NAMES, "a": range(40, 201, 20), "b": (5, 10, 20)},
        check=lambda c: c["a"] % c["b"] == 0,
    ),
    Template(
        "math_add",
        "math",
        "Add {a} and {b}. What is the total?",
        {"a": range(11, 50), "b": range(3, 30)},
        limit=20,
    ),
    Template(
        "math_mul",
        "math",
        "Multiply {a} by {b}.",
        {"a": range(2, 13), "b": range(2, 13)},
        limit=20,
        check=lambda c: c["a"] != c["b"],
    ),
    # rewrite
    Template("rw_polite", "rewrite", 'Rewrite this sentence so it sounds more polite: "{s}"', {"s": BLUNT}),
    Template("rw_plain", "rewrite", 'Say this in plain, everyday English: "{s}"', {"s": WORDY}),
    Template("rw_formal", "rewrite", 'Make this sentence sound more formal: "{s}"', {"s": CASUAL}),
    Template("rw_past", "rewrite", 'Change this sentence to the past tense: "{s}"', {"s": PRESENT}),
    Template(
        "rw_voice",
        "rewrite",
        'Rewrite "{s}" as if {who} were saying it.',
        {"s": PLAIN, "who": SPEAKERS},
        limit=30,
    ),
    # summarize
    Template(
        "sum_story",
        "summarize",
        'Summarize the story of "{story}" in {k} sentences.',
        {"story": STORIES, "k": ("two", "three")},
    ),
    Template(
        "sum_process", "summarize", "Summarize in a few sentences how {process}.", {"process": PROCESSES}
    ),
    Template(
        "sum_history",
        "summarize",
        "Summarize the history of {invention} in a few sentences.",
        {"invention": INVENTIONS},
    ),
    # classify
    Template(
        "cls_animal",
        "classify",
        "Is {a_animal} a mammal, a bird, a reptile, a fish, or an amphibian?",
        {"animal": ANIMALS_ONE},
    ),
    Template("cls_produce", "classify", "Is {produce} a fruit or a vegetable?", {"produce": PRODUCE}),
    Template(
        "cls_parity", "classify", "Is {n} an even number or an odd number?", {"n": range(11, 100)}, limit=20
    ),
    Template(
        "cls_prime",
        "classify",
        "Is {n} a prime number? Explain briefly.",
        {"n": tuple(n for n in range(2, 61) if n != 17)},
    ),
    Template("cls_review", "classify", 'Is this review positive or negative? "{r}"', {"r": REVIEWS}),
    Template(
        "cls_headline",
        "classify",
        'Which topic fits this headline best: sports, science, business, or weather? "{h}"',
        {"h": HEADLINES},
    ),
    Template(
        "cls_state",
        "classify",
        "At room temperature, is {substance} a solid, a liquid, or a gas?",
        {"substance": SUBSTANCES},
    ),
    Template("cls_living", "classify", "Is {thing} a living thing or a non-living thing?", {"thing": THINGS}),
    # code
    Template(
        "code_list",
        "code",
        "Write a Python function that takes a list of numbers and returns {r}.",
        {"r": LIST_RESULTS},
    ),
    Template(
        "code_convert",
        "code",
        "Write a Python function that converts {pair[0]} to {pair[1]}.",
        {"pair": UNIT_PAIRS},
    ),
    Template(
        "code_string", "code", "Write a Python function that takes a string and {op}.", {"op": STRING_OPS}
    ),
    Template("code_print", "code", "Write a Python program that prints {t}.", {"t": PRINT_TARGETS}),
    Template("code_check", "code", "Write a Python function that checks whether {c}.", {"c": CONDITIONS}),
    # advice
    Template(
        "adv_hobby",
        "advice",
        "I want to start {hobby}. What advice would you give a beginner?",
        {"hobby": HOBBIES},
    ),
    Template(
        "adv_travel",
        "advice",
        "What should I know before visiting {country} for the first time?",
        {"country": COUNTRIES},
    ),
    Template(
        "adv_career",
        "advice",
        "What advice would you give to someone who wants to become {a_job}?",
        {"job": JOBS},
    ),
    Template("adv_pet", "advice", "What are some tips for taking care of a pet {pet}?", {"pet": PETS}),
    Template("adv_calm", "advice", "How can I stay calm when {s}?", {"s": SITUATIONS}),
    # creative
    Template("cre_poem", "creative", "Write a short poem about {topic}.", {"topic": POEM_TOPICS}),
    Template(
        "cre_story",
        "creative",
        "Write a short story about {who} who {plot}.",
        {"who": CHARACTERS, "plot": PLOTS},
        limit=35,
    ),
    Template("cre_slogan", "creative", "Write a catchy slogan for {biz}.", {"biz": BUSINESSES}),
    Template("cre_describe", "creative", "Describe {place} in three vivid sentences.", {"place": PLACES}),
    Template("cre_haiku", "creative", "Write a haiku about {subject}.", {"subject": HAIKU_SUBJECTS}),
    Template(
        "cre_letter", "creative", "Write a short letter from {pair[0]} to {pair[1]}.", {"pair": LETTER_PAIRS}
    ),
    # compare
    Template(
        "cmp_animals",
        "compare",
        "What are the main differences between {pair[0]} and {pair[1]}?",
        {"pair": ANIMAL_PAIRS},
    ),
    Template(
        "cmp_foods",
        "compare",
        "Compare {pair[0]} and {pair[1]} in terms of taste and nutrition.",
        {"pair": FOOD_PAIRS},
    ),
    Template(
        "cmp_transport",
        "compare",
        "What are the pros and cons of traveling by {pair[0]} compared with traveling by {pair[1]}?",
        {"pair": _pairs(TRANSPORT)},
    ),
    Template("cmp_sports", "compare", "How is {pair[0]} different from {pair[1]}?", {"pair": SPORT_PAIRS}),
    Template(
        "cmp_jobs",
        "compare",
        "How is the job of {pair[0]} different from the job of {pair[1]}?",
        {"pair": JOB_PAIRS},
    ),
    # howto
    Template("how_make", "howto", "How do I make {dish}? Give simple steps.", {"dish": DISHES}),
    Template("how_clean", "howto", "What is the best way to clean {thing}?", {"thing": DIRTY_THINGS}),
    Template("how_learn", "howto", "How can I learn to {skill} as a complete beginner?", {"skill": SKILLS}),
    Template("how_grow", "howto", "How do I grow {plant} at home?", {"plant": PLANTS}),
    Template("how_chore", "howto", "What steps should I follow to {chore}?", {"chore": CHORES}),
)


def templated_instructions() -> list[dict]:
    """Return the deterministic list of distinct templated instructions.

    Items are ordered by template, then by slot combination.  Duplicates
    (compared case-insensitively after stripping) are dropped, keeping the
    first occurrence.
    """
    items: list[dict] = []
    seen: set[str] = set()
    for template in TEMPLATES:
        for text in template.render():
            key = text.strip().casefold()
            if key in seen:
                continue
            seen.add(key)
            items.append(
                {
                    "instruction": text,
                    "input": "",
                    "task": template.task,
                    "template": template.id,
                }
            )
    return items
