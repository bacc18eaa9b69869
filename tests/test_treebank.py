"""Treebank readers and the treebank tasks (``pos-treebank``, ``first-last-treebank``).

Readers and errors are tested on small inline texts; the pools, answers and reuse rates also on the English
Web Treebank's dev and test files when they are present (``/work/shared/data/ud-english-ewt``).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter, defaultdict
from pathlib import Path

import conllu
import numpy as np
import pytest

from conceptprobe.prompts import build_prompts, reuse_stats
from conceptprobe.tasks import NULL_CONCEPT, get_task
from conceptprobe.tasks import treebank as tb

EWT = Path(__file__).resolve().parents[2] / "shared" / "data" / "ud-english-ewt"
needs_ewt = pytest.mark.skipif(not EWT.is_dir(), reason=f"{EWT} is absent")
SIX = ("noun", "verb", "adjective", "adverb", "preposition", "pronoun")
UPOS = {
    "noun": "NOUN",
    "verb": "VERB",
    "adjective": "ADJ",
    "adverb": "ADV",
    "preposition": "ADP",
    "pronoun": "PRON",
}


def _conllu(*rows: str, text: str | None = None, sent_id: str = "s") -> str:
    head = f"# sent_id = {sent_id}\n" + (f"# text = {text}\n" if text is not None else "")
    lines = []
    for row in rows:
        tid, form, upos, xpos = row.split()
        lines.append("\t".join([tid, form, "_", upos, xpos, "_", "_", "_", "_", "_"]))
    return head + "\n".join(lines) + "\n\n"


def _w(i: int, form: str, upos: str, xpos: str) -> str:
    return f"{i} {form} {upos} {xpos}"


S1 = _conllu(
    *(
        _w(i, f, u, x)
        for i, (f, u, x) in enumerate(
            [
                ("She", "PRON", "PRP"),
                ("quickly", "ADV", "RB"),
                ("read", "VERB", "VBD"),
                ("the", "DET", "DT"),
                ("old", "ADJ", "JJ"),
                ("book", "NOUN", "NN"),
                ("in", "ADP", "IN"),
                ("the", "DET", "DT"),
                ("garden", "NOUN", "NN"),
                (".", "PUNCT", "."),
            ],
            start=1,
        )
    ),
    text="She quickly read the old book in the garden.",
    sent_id="s1",
)
S2 = _conllu(
    *(
        _w(i, f, u, x)
        for i, (f, u, x) in enumerate(
            [
                ("In", "ADP", "IN"),
                ("the", "DET", "DT"),
                ("morning", "NOUN", "NN"),
                (",", "PUNCT", ","),
                ("he", "PRON", "PRP"),
                ("often", "ADV", "RB"),
                ("drinks", "VERB", "VBZ"),
                ("hot", "ADJ", "JJ"),
                ("tea", "NOUN", "NN"),
                (".", "PUNCT", "."),
            ],
            start=1,
        )
    ),
    text="In the morning, he often drinks hot tea.",
    sent_id="s2",
)
# An empty node (2.1) tagged NOUN before the first real noun: skipped, so the first noun is "house".
S3 = _conllu(
    "1 They PRON PRP",
    "2 never ADV RB",
    "2.1 ghost NOUN NN",
    "3 sold VERB VBD",
    "4 their PRON PRP$",
    "5 big ADJ JJ",
    "6 house NOUN NN",
    "7 near ADP IN",
    "8 the DET DT",
    "9 river NOUN NN",
    "10 . PUNCT .",
    text="They never sold their big house near the river.",
    sent_id="s3",
)
# The first verb "gon" sits inside the multiword token "gonna": the sentence is dropped.
S4 = _conllu(
    "1-2 I'm _ _",
    "1 I PRON PRP",
    "2 'm AUX VBP",
    "3-4 gonna _ _",
    "3 gon VERB VBG",
    "4 na PART TO",
    "5 paint VERB VB",
    "6 a DET DT",
    "7 red ADJ JJ",
    "8 door NOUN NN",
    "9 at ADP IN",
    "10 home NOUN NN",
    "11 soon ADV RB",
    "12 . PUNCT .",
    text="I'm gonna paint a red door at home soon.",
    sent_id="s4",
)
S5 = _conllu(  # no adverb: dropped
    "1 We PRON PRP",
    "2 saw VERB VBD",
    "3 a DET DT",
    "4 small ADJ JJ",
    "5 dog NOUN NN",
    "6 in ADP IN",
    "7 the DET DT",
    "8 park NOUN NN",
    text="We saw a small dog in the park",
    sent_id="s5",
)
S6 = _conllu(  # no "# text": the forms joined by spaces
    "1 Yesterday NOUN NN",
    "2 we PRON PRP",
    "3 happily ADV RB",
    "4 ate VERB VBD",
    "5 green ADJ JJ",
    "6 apples NOUN NNS",
    "7 under ADP IN",
    "8 a DET DT",
    "9 tree NOUN NN",
    sent_id="s6",
)
# A multiword token ("don't") that holds no answer: kept, but "do" and "n't" are not whole words (never null).
S7 = _conllu(
    "1 You PRON PRP",
    "2 really ADV RB",
    "3-4 don't _ _",
    "3 do AUX VBP",
    "4 n't PART RB",
    "5 eat VERB VB",
    "6 cold ADJ JJ",
    "7 soup NOUN NN",
    "8 at ADP IN",
    "9 night NOUN NN",
    "10 . PUNCT .",
    text="You really don't eat cold soup at night.",
    sent_id="s7",
)
MINI = S1 + S2 + S3 + S4 + S5 + S6 + S7
EXPECTED = {  # written by hand: the first word of each part of speech
    "She quickly read the old book in the garden.": ("book", "read", "old", "quickly", "in", "She"),
    "In the morning, he often drinks hot tea.": ("morning", "drinks", "hot", "often", "In", "he"),
    "They never sold their big house near the river.": ("house", "sold", "big", "never", "near", "They"),
    "Yesterday we happily ate green apples under a tree": (
        "Yesterday",
        "ate",
        "green",
        "happily",
        "under",
        "we",
    ),
    "You really don't eat cold soup at night.": ("soup", "eat", "cold", "really", "at", "You"),
}


@pytest.fixture()
def mini(tmp_path: Path) -> Path:
    path = tmp_path / "mini.conllu"
    path.write_text(MINI, encoding="utf-8")
    return path


# ---------------------------------------------------------------- readers


def test_read_conllu_skips_multiword_tokens_and_empty_nodes() -> None:
    sentences = tb.read_conllu(S3 + S4 + S6)
    assert [s.text for s in sentences] == [
        "They never sold their big house near the river.",
        "I'm gonna paint a red door at home soon.",
        "Yesterday we happily ate green apples under a tree",
    ]
    assert "ghost" not in sentences[0].forms and len(sentences[0].forms) == 10
    assert sentences[1].forms[:4] == ("I", "'m", "gon", "na")  # syntactic words, not "I'm"/"gonna"
    assert sentences[1].upos[2] == "VERB" and sentences[1].xpos[2] == "VBG"


def test_read_ptb_one_sentence_per_line() -> None:
    text = "She/PRP quickly/RB read/VBD the/DT old/JJ book/NN ./.\nHe/PRP ran/VBD 1\\/2/CD mile/NN ./.\n"
    a, b = tb.read_ptb(text)
    assert a.text == "She quickly read the old book ." and a.xpos[:3] == ("PRP", "RB", "VBD")
    assert a.upos == (None,) * 7
    assert b.forms == ("He", "ran", "1/2", "mile", ".")


def test_read_ptb_blocks_like_pos_files() -> None:
    text = (
        "\n======================================\n\n"
        "[ Pierre/NNP Vinken/NNP ]\n,/, \n[ 61/CD years/NNS ]\nold/JJ ,/, will/MD join/VB \n"
        "[ the/DT board/NN ]\nas/IN \n[ a/DT nonexecutive/JJ director/NN ]\n./. \n\n"
        "======================================\n\n"
        "[ Mr./NNP Vinken/NNP ]\nis/VBZ \n[ chairman/NN ]\n*-1/-NONE- ./. \n\n"
        "[ It/PRP ]\nrose/VBD|VBN ./.\n"
    )
    first, second, third = tb.read_ptb(text)
    assert first.text == "Pierre Vinken , 61 years old , will join the board as a nonexecutive director ."
    assert first.xpos[:4] == ("NNP", "NNP", ",", "CD")
    assert second.forms == ("Mr.", "Vinken", "is", "chairman", ".")  # -NONE- dropped
    assert third.xpos == ("PRP", "VBD", ".")  # the first of an ambiguous tag


def test_read_ptb_word_tab_tag() -> None:
    text = "She\tPRP\nquickly\tRB\nran\tVBD\n\nHe\tPRP\nsat\tVBD\n\n\n"
    a, b = tb.read_ptb(text)
    assert a.text == "She quickly ran" and a.xpos == ("PRP", "RB", "VBD")
    assert b.forms == ("He", "sat")


def test_format_sniffing(tmp_path: Path) -> None:
    no_suffix = tmp_path / "data.txt"
    no_suffix.write_text(S1)
    ptb = tmp_path / "wsj.pos"
    ptb.write_text("She/PRP quickly/RB read/VBD\n")
    assert tb.load_treebank(no_suffix).formats == ("conllu",)
    assert tb.load_treebank(ptb).formats == ("ptb",)
    assert tb.load_treebank(ptb).sentences[0].forms == ("She", "quickly", "read")


def test_parse_once_per_mtime(mini: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = tb.read_conllu
    monkeypatch.setattr(tb, "read_conllu", lambda text, where: calls.append(where) or real(text, where))
    first = tb.load_treebank(mini)
    assert tb.load_treebank(mini).sentences == first.sentences and len(calls) == 1
    get_task("pos-treebank", treebank=str(mini))
    assert len(calls) == 1
    stat = mini.stat()
    os.utime(mini, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    tb.load_treebank(mini)
    assert len(calls) == 2


# ---------------------------------------------------------------- pos-treebank on a small file


def test_answers_on_a_small_treebank(mini: Path) -> None:
    task = get_task("pos-treebank", treebank=str(mini), query_fraction=0.4)
    items = [*task.pool("demo"), *task.pool("query")]
    assert sorted(i.text for i in items) == sorted(EXPECTED)  # s4 (gonna) and s5 (no adverb) dropped
    rng = np.random.default_rng(0)
    for item in items:
        for concept, answer in zip(SIX, EXPECTED[item.text], strict=True):
            assert task.from_pool(item, concept, rng).answer == answer
        for _ in range(30):
            ex = task.from_pool(item, NULL_CONCEPT, rng)
            assert ex.input == item.text
            assert re.search(rf"(?<!\w){re.escape(ex.answer)}(?!\w)", ex.input), ex
            assert ex.answer not in {".", ",", "do", "n't"}
    assert task.info()["data"]["pools"] == {"demo": 3, "query": 2}


def test_folder_reads_every_conllu_file_in_order_and_dedupes(tmp_path: Path) -> None:
    (tmp_path / "b.conllu").write_text(S2 + S1)  # S1 repeated: kept once
    (tmp_path / "a.conllu").write_text(S1 + S3)
    (tmp_path / "notes.txt").write_text("not read")
    task = get_task("pos-treebank", treebank=str(tmp_path))
    bank = tb.load_treebank(tmp_path)
    assert [name for name, _, _ in bank.files] == ["a.conllu", "b.conllu"]
    assert len(bank.sentences) == 4
    texts = [i.text for role in ("demo", "query") for i in task.pool(role)]
    assert sorted(texts) == sorted(set(texts)) and len(texts) == 3
    files = task.info()["data"]["files"]
    assert files == {
        p: hashlib.sha256((tmp_path / p).read_bytes()).hexdigest() for p in ("a.conllu", "b.conllu")
    }


def test_xpos_tagset_and_ptb_files(mini: Path, tmp_path: Path) -> None:
    task = get_task("pos-treebank", treebank=str(mini), tagset="xpos")
    items = {i.text: i for role in ("demo", "query") for i in task.pool(role)}
    assert items["They never sold their big house near the river."].answer("pronoun") == "They"
    ptb = tmp_path / "tiny.pos"
    ptb.write_text(
        "She/PRP quickly/RB read/VBD the/DT old/JJ book/NN in/IN the/DT garden/NN ./.\n"
        "He/PRP often/RB drinks/VBZ hot/JJ tea/NN in/IN the/DT morning/NN ./.\n"
        "They/PRP never/RB sold/VBD big/JJ houses/NNS near/IN rivers/NNS ./.\n"
    )
    task = get_task("pos-treebank", treebank=str(ptb))  # the default upos cannot apply: Penn tags used
    assert task.info()["data"]["tagset"] == "xpos"
    pooled = {i.text: i for role in ("demo", "query") for i in task.pool(role)}
    assert pooled["They never sold big houses near rivers ."].answer("noun") == "houses"
    assert pooled["He often drinks hot tea in the morning ."].answer("verb") == "drinks"


def test_split_is_seeded_by_split_seed_only(tmp_path: Path) -> None:
    path = tmp_path / "many.conllu"
    path.write_text("".join(S1.replace("garden", f"garden{i}").replace("s1", f"s1-{i}") for i in range(40)))
    a = get_task("pos-treebank", treebank=str(path))
    b = get_task("pos-treebank", treebank=str(path))
    c = get_task("pos-treebank", treebank=str(path), split_seed=1)
    assert a.pool("demo") == b.pool("demo") and a.pool("demo") != c.pool("demo")
    assert len(a.pool("query")) == 8 and len(a.pool("demo")) == 32
    assert not {i.text for i in a.pool("demo")} & {i.text for i in a.pool("query")}
    for seed in (0, 1):  # a run seed changes prompts, never the pools
        prompts = build_prompts(a, "noun", 2, 5, seed=seed)
        assert all(p.query in {i.text for i in a.pool("query")} for p in prompts)
        assert all(d.input in {i.text for i in a.pool("demo")} for p in prompts for d in p.demos)


# ---------------------------------------------------------------- errors


def _one_line_error(exc_info: pytest.ExceptionInfo, *parts: str) -> None:
    message = str(exc_info.value)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, (part, message)


def test_missing_treebank(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        get_task("pos-treebank", treebank=str(tmp_path / "nope.conllu"))
    _one_line_error(info, str(tmp_path / "nope.conllu"), "does not exist", "pass `treebank`")
    with pytest.raises(ValueError) as info:
        get_task("pos-treebank")
    _one_line_error(info, "needs the `treebank` parameter")


def test_folder_without_conllu(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(ValueError) as info:
        get_task("first-last-treebank", treebank=str(tmp_path))
    _one_line_error(info, str(tmp_path), "holds no *.conllu file", "pass one")


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("bad.conllu", "1\tShe\tshe\tPRON\n\n", "a token line has 4 column(s)"),
        ("bad.conllu", "x\tShe\tshe\tPRON\tPRP\t_\t0\troot\t_\t_\n\n", "malformed CoNLL-U"),
        ("bad.pos", "She/PRP quickly read/VBD\n", "token 'quickly' is not word/TAG"),
        ("bad.tsv", "She\tPRP\nquickly\n", "malformed word<TAB>TAG line 2"),
    ],
)
def test_malformed_content(tmp_path: Path, name: str, content: str, problem: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError) as info:
        get_task("pos-treebank", treebank=str(path))
    _one_line_error(info, str(path), problem)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.conllu"
    path.write_bytes("1\tcafé\t_\tNOUN\tNN\t_\t0\troot\t_\t_\n\n".encode("latin-1"))
    with pytest.raises(ValueError) as info:
        get_task("pos-treebank", treebank=str(path))
    _one_line_error(info, str(path), "not UTF-8")


def test_no_usable_sentence(tmp_path: Path) -> None:
    path = tmp_path / "few.conllu"
    path.write_text(S4 + S5 + S1)
    with pytest.raises(ValueError) as info:
        get_task("pos-treebank", treebank=str(path))
    _one_line_error(
        info, str(path), "1 usable sentence(s) of 3 read", "all six tags", "pass a larger treebank"
    )
    with pytest.raises(ValueError) as info:
        get_task("first-last-treebank", treebank=str(path))
    _one_line_error(info, str(path), "0 usable sentence(s) of 3 read", "first and last noun")
    empty = tmp_path / "empty.conllu"
    empty.write_text("")
    with pytest.raises(ValueError) as info:
        get_task("pos-treebank", treebank=str(empty))
    _one_line_error(info, str(empty), "0 usable sentence(s) of 0 read")


@pytest.mark.parametrize(
    ("params", "problem"),
    [
        ({"tagset": "ptb"}, "`tagset` must be one of upos, xpos"),
        ({"query_fraction": 1.0}, "`query_fraction` must be a number strictly between 0 and 1"),
        ({"query_fraction": "0.2"}, "`query_fraction` must be"),
        ({"split_seed": -1}, "`split_seed` must be an integer >= 0"),
        ({"split_seed": True}, "`split_seed` must be an integer >= 0"),
        ({"seed": 3}, "unknown parameter(s) ['seed']"),
        ({"treebank": 3}, "`treebank` must be a path"),
    ],
)
def test_bad_params(mini: Path, params: dict, problem: str) -> None:
    with pytest.raises(ValueError) as info:
        get_task("pos-treebank", **{"treebank": str(mini), **params})
    _one_line_error(info, problem)


# ---------------------------------------------------------------- the English Web Treebank (dev + test)


def _ewt_sentences() -> dict[str, list[tuple[str, str]]]:
    """Text -> [(form, UPOS)] of the syntactic words, read here directly with the conllu package."""
    out: dict[str, list[tuple[str, str]]] = {}
    for path in sorted(EWT.glob("*.conllu")):
        with path.open(encoding="utf-8") as fh:
            for sentence in conllu.parse_incr(fh):
                words = [(t["form"], t["upos"]) for t in sentence if isinstance(t["id"], int)]
                out.setdefault(sentence.metadata["text"], words)
    return out


@pytest.fixture(scope="module")
def ewt_words() -> dict[str, list[tuple[str, str]]]:
    return _ewt_sentences()


@pytest.fixture(scope="module")
def ewt_pos():
    return get_task("pos-treebank", treebank=str(EWT))


@pytest.fixture(scope="module")
def ewt_first_last():
    return get_task("first-last-treebank", treebank=str(EWT))


def _whole(word: str, text: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text) is not None


@needs_ewt
def test_ewt_sentences_with_six_tags(ewt_words: dict) -> None:
    six = [t for t, words in ewt_words.items() if set(UPOS.values()) <= {u for _, u in words}]
    assert len(six) == 520  # 522 sentences carry all six tags; two texts occur twice


@needs_ewt
def test_ewt_pos_pools(ewt_pos) -> None:
    task = ewt_pos
    demo, query = task.pool("demo"), task.pool("query")
    print(f"pos-treebank EWT dev+test upos pools: demo {len(demo)}, query {len(query)}")
    assert len(demo) + len(query) == 513  # 7 dropped: an answer inside a word ("outta", "There's", "im", ...)
    assert len(query) == round(0.2 * 513) and len(demo) == 410
    assert not {i.text for i in demo} & {i.text for i in query}
    info = task.info()
    assert info["data"]["pools"] == {"demo": 410, "query": 103} and info["version"] == "1"
    assert info["params"] == {"treebank": str(EWT), "tagset": "upos", "query_fraction": 0.2, "split_seed": 0}
    for name, sha in info["data"]["files"].items():
        assert sha == hashlib.sha256((EWT / name).read_bytes()).hexdigest()


@needs_ewt
def test_ewt_pos_answers_are_exact(ewt_pos, ewt_words: dict) -> None:
    task = ewt_pos
    rng = np.random.default_rng(0)
    for item in [*task.pool("demo"), *task.pool("query")]:
        words = ewt_words[item.text]
        for concept in SIX:
            expected = next(f for f, u in words if u == UPOS[concept])
            answer = task.from_pool(item, concept, rng).answer
            assert answer == expected and _whole(answer, item.text), (item.text, concept)
        null = task.from_pool(item, NULL_CONCEPT, rng).answer
        assert _whole(null, item.text) and any(ch.isalnum() for ch in null)
        assert null in {f for f, u in words if u != "PUNCT"}


@needs_ewt
def test_ewt_reuse_rates(ewt_pos) -> None:
    task = ewt_pos
    rates = {}
    for shots in (4, 10):
        for concept in task.concepts:
            stats = reuse_stats(build_prompts(task, concept, shots, 100, seed=0))
            assert stats["query_reused"] == 0 and stats["query_in_demos"] == 0
            rates[(shots, concept)] = stats["demo_reuse_rate"]
    print("pos-treebank demo reuse rates (n=100):", {k: v for k, v in rates.items() if k[1] == "noun"})
    assert all(rates[(4, c)] == 0.0 for c in task.concepts)  # 400 draws from 410
    assert all(rates[(10, c)] == pytest.approx(1 - 410 / 1000) for c in task.concepts)


@needs_ewt
def test_ewt_same_seed_same_prompts(ewt_pos) -> None:
    task = ewt_pos
    a = build_prompts(task, "adverb", 4, 20, seed=5)
    assert a == build_prompts(task, "adverb", 4, 20, seed=5)
    assert [p.text for p in a] != [p.text for p in build_prompts(task, "adverb", 4, 20, seed=6)]
    assert task.sample("noun", np.random.default_rng(1)).input in {i.text for i in task.pool("query")}


@needs_ewt
def test_ewt_first_last(ewt_first_last, ewt_words: dict) -> None:
    task = ewt_first_last
    demo, query = task.pool("demo"), task.pool("query")
    print(f"first-last-treebank EWT dev+test upos pools: demo {len(demo)}, query {len(query)}")
    assert len(demo) > 500 and not {i.text for i in demo} & {i.text for i in query}
    rng = np.random.default_rng(0)
    for item in [*demo, *query]:
        words = ewt_words[item.text]
        nouns = [f for f, u in words if u == "NOUN"]
        verbs = [f for f, u in words if u == "VERB"]
        expected = {
            "first_noun": nouns[0],
            "last_noun": nouns[-1],
            "first_verb": verbs[0],
            "last_verb": verbs[-1],
        }
        for concept, word in expected.items():
            answer = task.from_pool(item, concept, rng).answer
            assert answer == word and _whole(answer, item.text)
        assert nouns[0].lower() != nouns[-1].lower() and verbs[0].lower() != verbs[-1].lower()


@needs_ewt
def test_ewt_lexical_features(ewt_pos, ewt_first_last, ewt_words: dict) -> None:
    """Each answer reads as its most frequent UPOS over the demonstration pool, counted here independently."""
    task = ewt_pos
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for item in task.pool("demo"):
        for form, upos in ewt_words[item.text]:
            counts[form.lower()][upos] += 1
    names = {u: n for n, u in UPOS.items()}
    answers = ["The", "the", "zzzqx", "house", "run", "up", "She", "fast", "good", "well"]
    expected = dict.fromkeys((*SIX, "other"), 0.0)
    for a in answers:
        c = counts.get(a.lower())
        top = max(sorted(c), key=lambda u: c[u]) if c else None
        expected[names.get(top, "other")] += 1 / len(answers)
    feats = task.lexical_features(answers)
    assert feats == pytest.approx(expected) and set(feats) == {*SIX, "other"}
    assert feats["other"] >= 0.3 and feats["pronoun"] >= 0.1  # "the", "The", the unknown word; "She"
    assert task.lexical_features([]) == dict.fromkeys(feats, 0.0)
    fl = ewt_first_last
    for a, b in fl.pairs:  # the pair's answers read as the same class, with nearly the same histogram
        rng = np.random.default_rng(0)
        ha = fl.lexical_features([fl.from_pool(i, a, rng).answer for i in fl.pool("demo")])
        hb = fl.lexical_features([fl.from_pool(i, b, rng).answer for i in fl.pool("demo")])
        tag = a.split("_")[1]
        assert ha[tag] > 0.85 and hb[tag] > 0.85, (ha, hb)
        assert sum(abs(ha[k] - hb[k]) for k in ha) < 0.1, (ha, hb)
