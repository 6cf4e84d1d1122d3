"""
The memory world: a small, offline, TinyStories-like world of kids, pets, toys, colours, foods, places and numbers,
from which we generate everything the nano model trains on (the default dataset, no download needed):

    stories       pre-training text                        "Once upon a time, there was a girl named Mia. ..."
    interactions  single-turn SFT records {query, answer}  "Mia has a red ball. What colour is Mia's ball?" -> "red"
    episodes      multi-turn memory episodes               turn 1 tells a fact, distractor turns follow, the last
                                                           turn asks for it: "What colour is Mia's ball?" -> "red"

    python -m data.memory_world --out_dir data/cache/world

Episode kinds: long-range (the probe returns to the turn-1 fact over distractors about other people), cumulative
(every turn adds a fact about the same person; the probe asks for one of them) and overwrite (a later turn changes
the value; the latest value wins). The test split holds out (name, slot, value) combinations: no training episode
ever asks for them, though every word occurs in training, so test recall measures memory, not vocabulary.
"""

import hashlib
import json
import os
import random
import re
import time

import cli

GIRLS = ["Mia", "Lily", "Anna", "Lucy", "Emma", "Zoe", "Sara", "Ella", "Ruby", "Amy", "Lola", "Kate", "Nina", "Rosa",
         "Ivy", "Maya", "Jade", "Grace", "Molly", "Eva"]
BOYS = ["Tom", "Ben", "Sam", "Max", "Leo", "Jack", "Tim", "Finn", "Noah", "Jake", "Owen", "Dan", "Hugo", "Eli", "Alex",
        "Luke", "Paul", "Theo", "Ryan", "Oscar"]
NAMES = GIRLS + BOYS
PET_NAMES = ["Spot", "Fluffy", "Rex", "Bella", "Coco", "Daisy", "Buddy", "Milo", "Pip", "Sunny", "Bubbles", "Shadow",
             "Ziggy", "Peanut", "Biscuit", "Pepper"]
ANIMALS = ["cat", "dog", "fish", "bird", "rabbit", "frog", "duck", "turtle"]
TOYS = ["ball", "kite", "car", "doll", "hat", "bike", "boat", "drum", "train", "robot", "balloon", "truck"]
COLOURS = ["red", "blue", "green", "yellow", "pink", "purple", "orange", "white", "black", "brown"]
FOODS = ["cake", "apples", "soup", "pizza", "cookies", "bread", "carrots", "rice", "pie", "eggs", "cheese", "bananas"]
PLACES = ["park", "beach", "farm", "forest", "school", "garden", "zoo", "lake", "shop", "castle", "library", "hill"]
THINGS = ["stickers", "shells", "stones", "books", "coins", "flowers", "crayons", "marbles"]
NUMBERS = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]

# A slot is something a person has exactly one value for. "thing" names which one (the colour *of the ball*), so a
# person holds one fact per (slot, thing). {p} person, {x} thing, {v} value.
SLOTS = {
    "colour": dict(things=TOYS, values=COLOURS, fact="{p} has a {v} {x}.",
                   change=["Now {p}'s {x} is {v}.", "{p} painted the {x} {v}."], probe="What colour is {p}'s {x}?"),
    "pet": dict(things=ANIMALS, values=PET_NAMES, fact="{p} has a {x} called {v}.",
                change=["{p} gave the {x} a new name. Now the {x} is called {v}."],
                probe="What is the name of {p}'s {x}?"),
    "food": dict(things=[None], values=FOODS, fact="{p}'s favourite food is {v}.",
                 change=["Now {p}'s favourite food is {v}.", "{p} changed. Now {p}'s favourite food is {v}."],
                 probe="What is {p}'s favourite food?"),
    "place": dict(things=[None], values=PLACES, fact="{p} is at the {v}.",
                  change=["Now {p} is at the {v}.", "{p} walked to the {v}. Now {p} is at the {v}."],
                  probe="Where is {p}?"),
    "count": dict(things=THINGS, values=NUMBERS, fact="{p} has {v} {x}.",
                  change=["Now {p} has {v} {x}."], probe="How many {x} does {p} have?"),
    "friend": dict(things=[None], values=NAMES, fact="{p}'s best friend is {v}.",
                   change=["Now {p}'s best friend is {v}."], probe="Who is {p}'s best friend?"),
}
# More ways to say each fact and ask each question. The world's own phrasing is the slot's "fact" / "probe";
# "varied" training worlds also use the first list; the second list is held out: only the paraphrase rows of the
# evaluation use it, so they measure whether the memory holds the fact rather than the sentence.
PHRASINGS = {
    "colour": dict(facts=["{p}'s {x} is {v}.", "The {x} of {p} is {v}."],
                   facts_held_out=["{p} owns a {v} {x}.", "{p} keeps a {v} {x} at home."],
                   probes=["Which colour is {p}'s {x}?", "What is the colour of {p}'s {x}?"],
                   probes_held_out=["Tell me the colour of {p}'s {x}.", "{p}'s {x} is which colour?"]),
    "pet": dict(facts=["{p}'s {x} is called {v}.", "The name of {p}'s {x} is {v}."],
                facts_held_out=["{p} owns a {x} named {v}.", "{p} looks after a {x} whose name is {v}."],
                probes=["What is {p}'s {x} called?", "What did {p} call the {x}?"],
                probes_held_out=["Tell me the name of {p}'s {x}.", "{p}'s {x} has which name?"]),
    "food": dict(facts=["{p} likes {v} best.", "The food {p} likes most is {v}."],
                 facts_held_out=["{p} loves eating {v} more than anything.", "Of all foods, {p} prefers {v}."],
                 probes=["Which food does {p} like best?", "What does {p} like to eat most?"],
                 probes_held_out=["Tell me {p}'s favourite food.", "What food does {p} love most of all?"]),
    "place": dict(facts=["{p} is at the {v} today.", "You can find {p} at the {v}."],
                  facts_held_out=["{p} is spending the day at the {v}.", "{p} went to the {v} and stayed there."],
                  probes=["Where is {p} today?", "At which place is {p}?"],
                  probes_held_out=["Tell me where {p} is.", "{p} is at which place?"]),
    "count": dict(facts=["The number of {x} {p} has is {v}.", "{p} collected {v} {x}."],
                  facts_held_out=["{p} counted {v} {x} in the box.", "There are {v} {x} in {p}'s bag."],
                  probes=["What is the number of {x} {p} has?", "How many {x} has {p} got?"],
                  probes_held_out=["Tell me how many {x} {p} has.", "{p} has how many {x}?"]),
    "friend": dict(facts=["{v} is {p}'s best friend.", "The best friend of {p} is {v}."],
                   facts_held_out=["{p} likes {v} more than any other friend.", "{p} calls {v} the best friend ever."],
                   probes=["Who is the best friend of {p}?", "Which kid is {p}'s best friend?"],
                   probes_held_out=["Tell me the name of {p}'s best friend.", "{p}'s best friend is who?"]),
}
# canonical: the world's own sentences only; varied: those and PHRASINGS' training lists (drawn with the world's rng);
# held-out: PHRASINGS' held-out lists only, picked by a hash of the fact, so that a held-out test file has the same
# draws as its canonical twin; held-out-questions: only the questions held out
PHRASING_MODES = ("canonical", "varied", "held-out", "held-out-questions")

KEYS = [(slot, x) for slot, spec in SLOTS.items() for x in spec["things"]]  # every (slot, thing) a person can have

ACKS = ["That is nice.", "How fun!", "I will remember that.", "Good to know.", "Okay!", "Thank you for telling me.",
        "I like that.", "Wow!"]
CHAT = [("Hi!", "Hello! How are you?"), ("Hello!", "Hi! What do you want to talk about?"),
        ("How are you?", "I am happy. Thank you!"), ("What is your name?", "I am a small robot that likes stories."),
        ("Thank you!", "You are welcome!"), ("What can you do?", "I can tell stories and remember what you tell me."),
        ("Good night!", "Good night! Sleep well."), ("Do you like stories?", "Yes! I love stories."),
        ("What colour is the sky?", "blue"), ("What colour is the grass?", "green"),
        ("How many legs does a dog have?", "four"), ("What does a cat say?", "meow"),
        ("Is the sun hot?", "yes"), ("Can a fish fly?", "no")]


def is_test(name, slot, value):
    """The held-out rule: about 1 in 5 (name, slot, value) combinations belong to the test split."""
    h = hashlib.md5(f"{name}|{slot}|{value}".encode()).digest()
    return h[0] % 5 == 0


def articles(text):
    """a -> an before a vowel ("an orange kite")."""
    return re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", text)


def phrase(own, varied, held_out, phrasing, rng, key):
    """One template for a sentence: the world's own, one of the varied (rng) or one of the held-out (hash of key)."""
    if phrasing == "varied":
        return rng.choice([own] + varied)
    if phrasing == "held-out":
        return held_out[hashlib.md5("|".join(map(str, key)).encode()).digest()[0] % len(held_out)]
    return own


def fact_text(p, slot, x, v, change=False, rng=None, phrasing="canonical"):
    spec, more = SLOTS[slot], PHRASINGS[slot]
    if change:  # a change is told in several ways already ("Now ...", "... painted the ...")
        template = rng.choice(spec["change"])
    else:
        template = phrase(spec["fact"], more["facts"], more["facts_held_out"], phrasing, rng, (p, slot, x, v))
    return articles(template.format(p=p, x=x, v=v))


def probe_text(p, slot, x, rng=None, phrasing="canonical"):
    more = PHRASINGS[slot]
    phrasing = "held-out" if phrasing == "held-out-questions" else phrasing
    return phrase(SLOTS[slot]["probe"], more["probes"], more["probes_held_out"], phrasing, rng, (p, slot, x)).format(
        p=p, x=x)


def random_value(rng, p, slot, avoid=(), people=NAMES):
    """A value for p's slot, not in avoid. Best friends come from people, and nobody is their own best friend."""
    values = [v for v in SLOTS[slot]["values"] if v != p and v not in avoid and (slot != "friend" or v in people)]
    return rng.choice(values)


def random_fact(rng, people):
    """A fact (person, slot, thing, value) that mentions nobody outside people."""
    p, (slot, x) = rng.choice(people), rng.choice(KEYS)
    return p, slot, x, random_value(rng, p, slot, people=people)


# ----------------------------------------------------------------------------------------------------------------
# stories (pre-training)

def make_story(rng, names=NAMES, p=None):
    """One short TinyStories-like story about p (or someone random) and a friend (names: who may appear)."""
    p = p or rng.choice(names)
    q = rng.choice([q for q in names if q != p])
    kid = "girl" if p in GIRLS else "boy"
    toy, colour, place = rng.choice(TOYS), rng.choice(COLOURS), rng.choice(PLACES)
    animal, pet, food = rng.choice(ANIMALS), rng.choice(PET_NAMES), rng.choice(FOODS)
    n, things, place2 = rng.choice(NUMBERS), rng.choice(THINGS), rng.choice(PLACES)
    intro = rng.choice([f"Once upon a time, there was a {kid} named {p}.",
                        f"{p} was a little {kid} who lived near the {place}.",
                        f"One day, {p} went to the {place}.",
                        f"There once was a happy {kid} called {p}."])
    middle = [f"{p} had a {colour} {toy}.",
              f"{p} had a {animal} named {pet}. {pet} liked to play with {p}.",
              f"{p} loved to eat {food}.",
              f"{p} and {q} played with the {toy} at the {place}.",
              f"{p} found {n} {things} near the {place2}.",
              f"{q} was {p}'s best friend.",
              f"\"Look at my {colour} {toy}!\" said {p}.",
              f"{q} asked, \"What colour is your {toy}?\" {p} said, \"It is {colour}.\"",
              f"{q} asked, \"Where are you going?\" {p} said, \"To the {place2}.\"",
              f"{q} asked, \"How many {things} do you have?\" {p} said, \"I have {n}.\"",
              "The sun was warm and the sky was blue.",
              f"Then it started to rain, so {p} and {q} went home.",
              f"{p} lost the {toy}, but {q} helped to find it.",
              f"The {animal} ran to the {place2} and {p} ran after it.",
              f"{p} shared the {food} with {q}. They were very happy.",
              f"{p} felt sad, but then {q} came and gave {p} a hug."]
    ending = rng.choice(["The end.", f"From that day on, {p} and {q} were best friends.",
                         f"{p} smiled and went to sleep.", "It was a very happy day.",
                         f"{p} said, \"Thank you, {q}!\""])
    return articles(" ".join([intro] + rng.sample(middle, rng.randint(3, 6)) + [ending]))


def make_stories(n, seed):
    """n short stories for pre-training."""
    rng = random.Random(seed)
    return [make_story(rng) for _ in range(n)]


# ----------------------------------------------------------------------------------------------------------------
# single-turn interactions (SFT)

# How the world talks - two levers of the memory experiments (README), passed down as **style:
#   acks_only  a turn that tells facts is answered with an acknowledgement only, not with an echo of the facts (in the
#              chat flow a model that echoes can echo a wrong value, and then it writes that into its memory)
#   binding    the share of question turns that give one slot to two people (binding_question)


def tell_turn(rng, facts, acks_only=False, **_):
    """Telling facts: the answer repeats them and acknowledges (or only acknowledges)."""
    text, ack = " ".join(facts), rng.choice(ACKS)
    return {"query": text, "answer": ack if acks_only else f"{text} {ack}"}


def story_turn(rng, names=NAMES):
    if rng.random() < 0.5:
        query = rng.choice(["Tell me a story.", "Can you tell me a short story?"])
        return {"query": query, "answer": make_story(rng, names)}
    p = rng.choice(names)
    return {"query": f"Tell me a story about {p}.", "answer": make_story(rng, names, p)}


def question_turn(rng, names=NAMES, split="train", binding=0.0, phrasing="canonical", **_):
    """Facts and a question about one of them, answerable from the query alone; the answer is one word."""
    if binding and rng.random() < binding:
        r = binding_question(rng, split, names, phrasing)
        return {"query": r["query"], "answer": r["answer"]}
    while True:
        facts = [random_fact(rng, names) for _ in range(rng.randint(1, 3))]
        p, slot, x, v = rng.choice(facts)
        if is_test(p, slot, v) == (split == "test") and len({(f[0], f[1], f[2]) for f in facts}) == len(facts):
            break
    query = " ".join(fact_text(*f, rng=rng, phrasing=phrasing) for f in facts) + " " + probe_text(p, slot, x, rng,
                                                                                                   phrasing)
    return {"query": query, "answer": v}


def binding_question(rng, split="train", names=NAMES, phrasing="canonical"):
    """Two people with the same slot and different values in one message, then a question about one of them:
    answerable from the message alone, if the model binds each value to its person."""
    while True:
        p, q = rng.sample(names, 2)
        slot = rng.choice(list(SLOTS))
        x = rng.choice(SLOTS[slot]["things"])
        vp = random_value(rng, p, slot, avoid=(q,))
        vq = random_value(rng, q, slot, avoid=(vp, p))
        if is_test(p, slot, vp) == (split == "test"):
            break
    facts = [fact_text(p, slot, x, vp, rng=rng, phrasing=phrasing), fact_text(q, slot, x, vq, rng=rng, phrasing=phrasing)]
    rng.shuffle(facts)
    return {"query": " ".join(facts) + " " + probe_text(p, slot, x, rng, phrasing), "answer": vp, "name": p, "slot": slot,
            "thing": x}


def make_incontext(n, seed, split="test"):
    """n binding questions as zero-distance episodes (no earlier turns; the probe is the whole conversation):
    the decoder's own ceiling, with nothing to remember."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        r = binding_question(rng, split)
        out.append(dict(r, interactions=[], gold=r["answer"], distance=0, kind="in-context", binding=True))
    return out


SPAN_LAYOUTS = ("turns, one person", "turns, several people", "one turn, one person", "one turn, several people")


def make_span(n, seed, ks=(1, 2, 4, 8), split="test", phrasing="canonical", **style):
    """
    Span episodes: k facts, then a question about one of them; how many facts does the STM keep? n per (layout, k).
    Layouts: the facts come one per turn (the probe follows the k-th turn) or all k in the first turn; they are all
    about one person, or each about a different person (who may share a slot: binding matters).
    """
    rng, out = random.Random(seed), []
    for layout in SPAN_LAYOUTS:
        for k in ks:
            for _ in range(n):
                while True:
                    people = [rng.choice(NAMES)] * k if "one person" in layout else rng.sample(NAMES, k)
                    keys = rng.sample(KEYS, k)  # a person never gets two values for one (slot, thing)
                    facts = [(p, slot, x, random_value(rng, p, slot)) for p, (slot, x) in zip(people, keys)]
                    i = rng.randrange(k)  # the probed fact
                    p, slot, x, gold = facts[i]
                    if is_test(p, slot, gold) == (split == "test"):
                        break
                texts = [fact_text(*f, rng=rng, phrasing=phrasing) for f in facts]
                turns = [tell_turn(rng, texts, **style)] if layout.startswith("one turn") else \
                    [tell_turn(rng, [t], **style) for t in texts]
                out.append({"query": turns[0]["query"], "answer": turns[0]["answer"],
                            "interactions": turns[1:] + [{"query": probe_text(p, slot, x, rng, phrasing),
                                                          "answer": gold}],
                            "gold": gold, "distance": len(turns), "kind": "span", "layout": layout, "k": k,
                            "name": p, "slot": slot, "thing": x, "binding": False, "rivals": {}})
    return out


def chat_turn(rng):
    query, answer = rng.choice(CHAT)
    return {"query": query, "answer": answer}


def make_interactions(n, seed, phrasing="canonical", **style):
    """n single-turn {query, answer} records: telling facts, questions answerable from the query, stories, chat."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.3:
            facts = [random_fact(rng, NAMES) for _ in range(rng.randint(1, 2))]
            out.append(tell_turn(rng, [fact_text(*f, rng=rng, phrasing=phrasing) for f in facts], **style))
        elif r < 0.7:
            out.append(question_turn(rng, phrasing=phrasing, **style))
        elif r < 0.85:
            out.append(story_turn(rng))
        else:
            out.append(chat_turn(rng))
    return out


# ----------------------------------------------------------------------------------------------------------------
# memory episodes (memory-attention pre-training, SMAT, MRL, evaluation)

def distractor_turn(rng, names, phrasing="canonical", **style):
    """A turn about other people (names excludes the probed person), or a story, or chat."""
    r = rng.random()
    if r < 0.45:
        facts = [random_fact(rng, names) for _ in range(rng.randint(1, 2))]
        return tell_turn(rng, [fact_text(*f, rng=rng, phrasing=phrasing) for f in facts], **style)
    if r < 0.75:
        # the split of a distractor's question does not matter: it is answered from its own query
        return question_turn(rng, names, split="test" if rng.random() < 0.2 else "train", phrasing=phrasing, **style)
    if r < 0.9:
        return story_turn(rng, names)
    return chat_turn(rng)


def make_episode(rng, d, kind, split, phrasing="canonical", **style):
    """One episode, or None when the random draw does not fit the split (the caller draws again)."""
    p = rng.choice(NAMES)
    others = [q for q in NAMES if q != p]
    rivals = {}  # the wrong answers that matter, for preference pairs (DMPO): whose value, and which value
    if kind == "cumulative":
        # every turn before the probe adds one fact about p; the probe asks for one of them
        facts = [(p, slot, x, random_value(rng, p, slot)) for slot, x in rng.sample(KEYS, min(d, len(KEYS)))]
        turns = [tell_turn(rng, [fact_text(*f, rng=rng, phrasing=phrasing)], **style) for f in facts]
        turns += [distractor_turn(rng, others, phrasing, **style) for _ in range(d - len(turns))]  # only if d > len(KEYS)
        eligible = [(slot, x, v) for _, slot, x, v in facts if is_test(p, slot, v) == (split == "test")]
        if not eligible:
            return None
        slot, x, gold = rng.choice(eligible)
        binding = False
    else:
        # probe every slot equally often (colour has 12 things, food one)
        slot = rng.choice(list(SLOTS))
        x = rng.choice(SLOTS[slot]["things"])
        slot2, x2 = rng.choice([k for k in KEYS if k != (slot, x)])
        value = random_value(rng, p, slot)
        first = [fact_text(p, slot, x, value, rng=rng, phrasing=phrasing)]
        # a second fact in turn 1: another fact about p, or the same slot for someone else (binding matters)
        q = rng.choice(others)
        second = (p, slot2, x2, random_value(rng, p, slot2)) if rng.random() < 0.5 else \
            (q, slot, x, random_value(rng, q, slot, people=others))
        first.insert(rng.randint(0, 1), fact_text(*second, rng=rng, phrasing=phrasing))
        binding = second[0] != p and second[3] != value  # two people, one slot, two values: whose was it?
        if binding:
            rivals["binding"] = second[3]  # the other person's value
        gold, seen = value, [value]
        changes = []
        if kind == "overwrite":
            # 1 or 2 changes before the probe; with d = 1 the change is told in turn 1 itself
            n_changes = 1 if d <= 2 else rng.randint(1, 2)
            changes = sorted(rng.sample(range(1, d), n_changes)) if d > 1 else [0]
        turns = [None] * d
        for t in changes:
            gold = random_value(rng, p, slot, avoid=seen)  # a new value each time, so turn 1 never holds the answer
            seen.append(gold)
            sentence = fact_text(p, slot, x, gold, change=True, rng=rng)
            if t == 0:
                first.append(sentence)
            else:
                turns[t] = tell_turn(rng, [sentence], **style)
        if changes:
            rivals["overwrite"] = seen[-2]  # the value before the last change
        rivals = {k: v for k, v in rivals.items() if v != gold}  # a change can give p the other person's value
        turns[0] = tell_turn(rng, first, **style)
        turns = [t or distractor_turn(rng, others, phrasing, **style) for t in turns]
    if is_test(p, slot, gold) != (split == "test"):
        return None
    return {"query": turns[0]["query"], "answer": turns[0]["answer"],
            "interactions": turns[1:] + [{"query": probe_text(p, slot, x, rng, phrasing), "answer": gold}],
            "gold": gold, "distance": d, "kind": kind, "name": p, "slot": slot, "thing": x, "binding": binding,
            "rivals": rivals}


def make_episodes(n, seed, distances=(1, 2, 4, 8, 16), kinds=("long-range", "cumulative", "overwrite"),
                  split="train", **style):
    """
    n memory episodes {query, answer, interactions, gold, distance, kind, name, slot, thing, binding, rivals}.
    (query, answer) is the first turn (it tells the facts); interactions holds distance turns, the last being the
    probe, whose answer is the gold word. rivals: the wrong answers that matter, {"binding": the other person's
    value, "overwrite": the value before the change}, where the episode has them. Kinds and distances cycle
    evenly. split="test" only asks for held-out (name, slot, value) combinations (is_test), split="train" never
    does.
    long-range: turn 1 tells the fact (and one more), distance - 1 turns about other people follow.
    cumulative: each of the distance turns before the probe tells one more fact about the person; the probe asks
                for any of them (so the fact is between 1 and distance turns old).
    overwrite:  like long-range, but 1 or 2 later turns change the value ("Now Mia's ball is blue."); the gold is
                the last one. With distance 1 the change is told in turn 1 itself.
    """
    assert split in ("train", "test")
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind, d = kinds[i % len(kinds)], distances[(i // len(kinds)) % len(distances)]
        ep = None
        while ep is None:
            ep = make_episode(rng, d, kind, split, **style)
        out.append(ep)
    return out


# ----------------------------------------------------------------------------------------------------------------
# files

def write_jsonl(records, path):
    """One JSON object per line, written atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def episode_text(ep):
    return [ep["query"], ep["answer"]] + [s for t in ep["interactions"] for s in (t["query"], t["answer"])]


def build_world(out_dir, seed=1337, n_stories=50_000, n_interactions=20_000, n_episodes=20_000, n_test_episodes=2_000,
                vocab_size=2048, val_fraction=0.05, **style):
    """
    Write stories.txt, interactions.jsonl, episodes_train.jsonl, episodes_test.jsonl, incontext_test.jsonl,
    span_test.jsonl, binding_test.jsonl, paraphrase_test.jsonl, paraphrase_questions_test.jsonl, tokenizer.tiktoken (trained on the
    stories, interactions and episodes) and train.bin / val.bin of the stories. Files that exist are kept
    (resumable). style: how the world talks (acks_only, binding, phrasing; see tell_turn and PHRASING_MODES).
    """
    # imported here so that the generator above needs nothing but the stdlib
    from data.tinystories import SEPARATOR, iter_stories, tokenize_to_bin
    from data.tokenizer import Tokenizer, save_ranks, train_bpe

    os.makedirs(out_dir, exist_ok=True)
    path = lambda name: os.path.join(out_dir, name)
    t0 = time.time()
    if not os.path.exists(path("stories.txt")):
        tmp = path("stories.txt.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(f"\n{SEPARATOR}\n".join(make_stories(n_stories, seed)) + "\n")
        os.replace(tmp, path("stories.txt"))
    jobs = [("interactions.jsonl", lambda: make_interactions(n_interactions, seed + 1, **style)),
            ("episodes_train.jsonl", lambda: make_episodes(n_episodes, seed + 2, split="train", **style)),
            # the test split asks the same questions whatever the training data's binding share
            ("episodes_test.jsonl", lambda: make_episodes(n_test_episodes, seed + 3, split="test",
                                                          **dict(style, binding=0.0, phrasing="canonical"))),
            ("incontext_test.jsonl", lambda: make_incontext(max(1, n_test_episodes // 10), seed + 4, split="test")),
            ("span_test.jsonl", lambda: make_span(max(1, n_test_episodes // 20), seed + 5, split="test",
                                                  **dict(style, binding=0.0, phrasing="canonical"))),
            # the binding row's own episodes: long-range ones whose turn 1 gives the probed slot to two people
            ("binding_test.jsonl", lambda: [ep for ep in make_episodes(
                n_test_episodes, seed + 6, kinds=("long-range",), split="test",
                **dict(style, binding=0.0, phrasing="canonical")) if ep["binding"]]),
            # the test episodes again, reworded in phrasings that training never uses (the same draws)
            ("paraphrase_test.jsonl", lambda: make_episodes(n_test_episodes, seed + 3, split="test",
                                                            **dict(style, binding=0.0, phrasing="held-out"))),
            ("paraphrase_questions_test.jsonl", lambda: make_episodes(
                n_test_episodes, seed + 3, split="test", **dict(style, binding=0.0, phrasing="held-out-questions")))]
    for name, make in jobs:
        if not os.path.exists(path(name)):
            write_jsonl(make(), path(name))
    print(f"generated the world's text in {time.time() - t0:.1f}s")

    stories = list(iter_stories(path("stories.txt")))
    if not os.path.exists(path("tokenizer.tiktoken")):
        t0 = time.time()
        texts = stories + [s for r in read_jsonl(path("interactions.jsonl")) for s in (r["query"], r["answer"])]
        for name in ("episodes_train.jsonl", "episodes_test.jsonl"):
            texts += [s for ep in read_jsonl(path(name)) for s in episode_text(ep)]
        ranks = train_bpe(texts, vocab_size)
        save_ranks(path("tokenizer.tiktoken"), ranks)
        print(f"trained the tokenizer (vocab {len(ranks) + 8}) on {len(texts):,} texts in {time.time() - t0:.1f}s")
    tok = Tokenizer.from_file(path("tokenizer.tiktoken"))
    n_val = max(1, int(len(stories) * val_fraction))
    tokenize_to_bin(stories[:-n_val], tok, path("train.bin"))
    tokenize_to_bin(stories[-n_val:], tok, path("val.bin"))
    return out_dir


def main(argv):
    parser = cli.ArgumentParser(description="Generate the offline memory world (stories, SFT, episodes).")
    parser.add_argument("--out_dir", default="data/cache/world")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--n_stories", type=int, default=50_000)
    parser.add_argument("--n_interactions", type=int, default=20_000)
    parser.add_argument("--n_episodes", type=int, default=20_000)
    parser.add_argument("--n_test_episodes", type=int, default=2_000)
    parser.add_argument("--vocab_size", type=int, default=2048)
    # the defaults are the levers that measured best (README, "Making memory bind"); --echo --binding=0 is the old world
    parser.add_argument("--echo", action="store_true", help="fact turns are answered by an echo of the facts and an "
                        "acknowledgement (default: the acknowledgement only)")
    parser.add_argument("--binding", type=float, default=0.5, help="share of training question turns that are binding "
                        "questions (two people, one slot)")
    parser.add_argument("--phrasing", default="canonical", choices=["canonical", "varied"], help="varied: training "
                        "facts and questions also come in other phrasings (never the paraphrase rows' held-out ones)")
    args = parser.parse_args(argv)
    # every distance (5) and kind (3) at least twice, so that the validation split has each
    cli.check(vars(args), n_stories=cli.at_least(100), n_interactions=cli.at_least(50),
              n_episodes=cli.at_least(300), n_test_episodes=cli.at_least(30),
              vocab_size=cli.at_least(264), binding=cli.between(0, 1))
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        raise cli.UserError(f"--out_dir {args.out_dir} is a file, not a folder")
    t0 = time.time()
    build_world(args.out_dir, args.seed, args.n_stories, args.n_interactions, args.n_episodes,
                args.n_test_episodes, args.vocab_size, acks_only=not args.echo, binding=args.binding,
                phrasing=args.phrasing)
    print(f"memory world ready in {args.out_dir} ({time.time() - t0:.1f}s):")
    for name in sorted(os.listdir(args.out_dir)):
        print(f"  {name:24s} {os.path.getsize(os.path.join(args.out_dir, name)) / 1e6:8.2f} MB")


if __name__ == "__main__":
    cli.run(main)
