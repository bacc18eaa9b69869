"""Curated word lists for the ``pos`` task: short, common, lowercase words with a single part of speech.

Every word below was chosen so that it cannot be read as one of the other five tags:
nouns that are not also verbs or adjectives (no "run", "light", "monkey", "pencil"); verbs in the simple past,
mostly irregular forms whose participle differs ("ate"/"eaten"), so they cannot act as adjectives (no
"broke", "woke", "stole", "spoke"); adjectives that are not verbs or nouns (no "calm", "empty", "cold");
adverbs in ``-ly`` that are not also adjectives (no "early", "kindly", "daily"); prepositions that are not
nouns, verbs or adjectives (no "near", "past", "up", "down", "like", "inside"); and pronouns in their subject
or object forms (no possessive determiners such as "his", "her", "mine"). Nouns are singular.

The lists are disjoint and none contains a function word of :data:`FUNCTION_WORDS`; the tests check both.
"""

from __future__ import annotations

NOUNS: tuple[str, ...] = (
    "elephant", "teacher", "giraffe", "student", "kitchen", "village", "uncle", "tiger", "sister",
    "brother", "farmer", "dentist", "river", "mountain", "island", "carrot", "banana", "apple", "onion",
    "potato", "tomato", "violin", "guitar", "airplane", "dragon", "donkey", "zebra", "lion", "penguin",
    "dolphin", "spider", "museum", "library", "hospital", "bakery", "ocean", "planet", "girl", "woman",
    "princess", "sailor", "artist", "aunt", "cousin", "tourist", "turtle", "cookie", "pizza", "umbrella",
    "wallet", "necklace", "basket", "jacket", "sweater", "teapot", "sofa", "notebook", "airport",
    "theater", "volcano", "cottage", "daughter", "professor", "scientist", "poet", "musician", "chef",
)  # fmt: skip

VERBS: tuple[str, ...] = (
    "ate", "wrote", "sang", "drank", "rode", "froze", "chose", "took", "knew", "threw", "drew", "wore",
    "tore", "forgot", "shook", "sank", "rang", "hid", "forgave", "gave", "grew", "blew", "shrank", "swam",
    "ran", "began", "flew", "swore", "bought", "brought", "caught", "taught", "fought", "sought", "kept",
    "swept", "heard", "met", "held", "told", "sent", "stung", "swung", "wove", "dug", "mistook",
)  # fmt: skip

ADJECTIVES: tuple[str, ...] = (
    "happy", "tiny", "huge", "angry", "clever", "lazy", "noisy", "gentle", "polite", "rude", "famous",
    "curious", "hungry", "thirsty", "sleepy", "lucky", "funny", "shiny", "fluffy", "tall", "beautiful",
    "ugly", "strong", "proud", "jealous", "nervous", "careful", "wise", "silly", "greedy", "grumpy",
    "dusty", "rusty", "sticky", "smelly", "wooden", "golden", "ancient", "modern", "enormous",
    "delicious", "dangerous", "gigantic", "sad", "cheerful", "elegant", "fierce", "gloomy", "helpful",
)  # fmt: skip

ADVERBS: tuple[str, ...] = (
    "quickly", "slowly", "quietly", "happily", "sadly", "loudly", "gently", "carefully", "eagerly",
    "nervously", "proudly", "rudely", "politely", "bravely", "calmly", "angrily", "softly", "suddenly",
    "rarely", "secretly", "silently", "lazily", "greedily", "boldly", "wisely", "cheerfully", "patiently",
    "gracefully", "clumsily", "foolishly", "generously", "hastily", "joyfully", "neatly", "noisily",
    "playfully", "sharply", "sleepily", "smoothly", "swiftly", "tightly", "warmly", "wildly", "easily",
    "briefly", "firmly", "fiercely", "gladly", "hungrily", "anxiously", "cautiously", "curiously",
)  # fmt: skip

# Prepositions that take a singular object ("among"/"between" need plurals and are left out).
PREPOSITIONS: tuple[str, ...] = (
    "about", "above", "across", "after", "against", "along", "alongside", "amid", "around", "at", "atop",
    "before", "below", "beneath", "beside", "besides", "beyond", "by", "despite", "during", "from", "in",
    "into", "of", "on", "onto", "over", "through", "throughout", "toward", "towards", "under",
    "underneath", "until", "upon", "via", "with", "within", "without", "unlike", "aboard", "versus",
)  # fmt: skip

# Pronouns usable as a sentence subject, and as the object of a verb or preposition (the two overlap).
SUBJECT_PRONOUNS: tuple[str, ...] = (
    "he", "she", "we", "they", "you", "it", "someone", "somebody", "something", "anyone", "anybody",
    "anything", "everyone", "everybody", "everything", "nobody", "nothing", "yours", "hers", "ours",
    "theirs", "none", "whoever", "thou", "ye",
)  # fmt: skip

OBJECT_PRONOUNS: tuple[str, ...] = (
    "me", "him", "us", "them", "you", "it", "someone", "somebody", "something", "anyone", "anybody",
    "anything", "everyone", "everybody", "everything", "nobody", "nothing", "yours", "hers", "ours",
    "theirs", "none", "whomever", "thee", "myself", "yourself", "himself", "herself", "itself",
    "ourselves", "yourselves", "themselves", "oneself", "themself", "thyself",
)  # fmt: skip

PRONOUNS: tuple[str, ...] = tuple(dict.fromkeys(SUBJECT_PRONOUNS + OBJECT_PRONOUNS))

# Words that fill non-answer slots (determiners and the conjunction); never an answer except under null.
DETERMINERS: tuple[str, ...] = ("the", "a", "an")
CONJUNCTIONS: tuple[str, ...] = ("and",)
FUNCTION_WORDS: tuple[str, ...] = DETERMINERS + CONJUNCTIONS

LEXICON: dict[str, tuple[str, ...]] = {
    "noun": NOUNS,
    "verb": VERBS,
    "adjective": ADJECTIVES,
    "adverb": ADVERBS,
    "preposition": PREPOSITIONS,
    "pronoun": PRONOUNS,
}
"""Part of speech (the ``pos`` concept names) -> its words."""
