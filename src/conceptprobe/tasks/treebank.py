"""Tagged natural sentences from a treebank, and the base of the concept tasks built on them.

Readers:

- **CoNLL-U** (through the ``conllu`` package): multiword-token lines (ids like ``3-4``) and empty nodes
  (ids like ``8.1``) are skipped, so a sentence is its syntactic words. Its text is the ``# text`` comment
  when present (the natural text), else the forms joined by single spaces.
- **PTB-style tagged text**, either ``word/TAG`` tokens (one sentence per line; or, when the file has blank
  or ``=====`` lines, blocks of lines separated by them, as in the Penn Treebank's ``.pos`` files; ``[`` and
  ``]`` chunk marks are ignored, ``\\/`` is an escaped slash) or ``word<TAB>TAG`` lines with a blank line
  between sentences. Its text is the words joined by single spaces. Tokens tagged ``-NONE-`` (empty
  elements) are dropped; of an ambiguous tag such as ``JJ|VBN`` the first is kept.

A path is a file (``.conllu``: CoNLL-U; any other name: CoNLL-U when its first line of content has ten
tab-separated columns or it starts with ``# sent_id``/``# text`` comments, else PTB-style) or a folder, whose
``*.conllu`` files are all read in sorted order. Each file is parsed once per process for a given
modification time and size.

Tag sets (``tagset``): ``upos`` maps NOUN/VERB/ADJ/ADV/ADP/PRON to noun/verb/adjective/adverb/preposition/
pronoun; ``xpos`` maps the Penn tags NN*/VB*/JJ*/RB*/IN/PRP* (so proper nouns NNP* count as nouns, and
auxiliaries tagged VB* as verbs, as in the Penn Treebank). PTB-style files have only the Penn tag and always
use ``xpos``.

:class:`TreebankTask` holds what the treebank tasks share: parameters, loading, filtering, deduplication by
text, the seeded split into disjoint demonstration and query pools, and the lexicon of the demonstration pool
(each word's most frequent tag there, for :meth:`~TreebankTask.lexical_features`).
"""

from __future__ import annotations

import hashlib
import io
import numbers
import os
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from conceptprobe.tasks.base import NULL_CONCEPT, ConceptTask, Example
from conceptprobe.tasks.lexical import pos_histogram

UPOS_TAGS: dict[str, str] = {
    "NOUN": "noun",
    "VERB": "verb",
    "ADJ": "adjective",
    "ADV": "adverb",
    "ADP": "preposition",
    "PRON": "pronoun",
}
"""UPOS tag -> part of speech (the concept names)."""

XPOS_PREFIXES: tuple[tuple[str, str], ...] = (
    ("NN", "noun"),
    ("VB", "verb"),
    ("JJ", "adjective"),
    ("RB", "adverb"),
    ("PRP", "pronoun"),
)
"""Penn tag prefix -> part of speech; ``IN`` (exactly) is a preposition."""

PTB_PUNCTUATION: frozenset[str] = frozenset(
    {",", ".", ":", "``", "''", "-LRB-", "-RRB-", "-LCB-", "-RCB-", "-LSB-", "-RSB-", "#", "$", "HYPH", "NFP"}
)
TAGSETS: tuple[str, ...] = ("upos", "xpos")


@dataclass(frozen=True)
class TreebankSentence:
    """One sentence: its text, and per syntactic word its form, UPOS tag and Penn tag (None if absent)."""

    text: str
    forms: tuple[str, ...]
    upos: tuple[str | None, ...]
    xpos: tuple[str | None, ...]


@dataclass(frozen=True)
class Treebank:
    """The sentences of a treebank path, with each file's name, sha256 and format."""

    path: str
    files: tuple[tuple[str, str, str], ...]  # (name, sha256, format)
    sentences: tuple[TreebankSentence, ...]

    @property
    def formats(self) -> tuple[str, ...]:
        return tuple(sorted({fmt for _, _, fmt in self.files}))


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


# ---------------------------------------------------------------- readers


def read_conllu(text: str, where: str = "<string>") -> list[TreebankSentence]:
    """Sentences of CoNLL-U ``text``; a malformed sentence is a one-line ValueError naming ``where``."""
    import conllu  # the CoNLL-U reader: imported when a treebank is read

    fix = (
        "each token line needs 10 tab-separated columns (ID FORM LEMMA UPOS XPOS FEATS HEAD DEPREL DEPS MISC)"
    )
    out: list[TreebankSentence] = []
    try:
        for k, tokens in enumerate(conllu.parse_incr(_lines(text)), start=1):
            forms, upos, xpos = [], [], []
            for token in tokens:
                if len(token) != 10:
                    raise ValueError(
                        f"treebank {where}: malformed CoNLL-U in sentence {k}: a token line has {len(token)} "
                        f"column(s); {fix}"
                    )
                tid = token["id"]
                if not isinstance(tid, int):  # multiword token (3-4) or empty node (8.1)
                    continue
                form = token["form"]
                if not isinstance(form, str) or not form:
                    raise ValueError(
                        f"treebank {where}: malformed CoNLL-U in sentence {k}: token {tid} has no form"
                    )
                forms.append(form)
                upos.append(token["upos"] if isinstance(token["upos"], str) else None)
                xpos.append(token["xpos"] if isinstance(token["xpos"], str) else None)
            if not forms:
                continue
            meta = tokens.metadata.get("text")
            sentence_text = meta.strip() if isinstance(meta, str) and meta.strip() else " ".join(forms)
            out.append(TreebankSentence(sentence_text, tuple(forms), tuple(upos), tuple(xpos)))
    except conllu.exceptions.ParseException as exc:
        raise ValueError(
            f"treebank {where}: malformed CoNLL-U after {len(out)} sentence(s) ({_one_line(exc)}); {fix}"
        ) from None
    return out


def _lines(text: str):
    """``text`` as an iterator of lines (what ``conllu.parse_incr`` reads), ending with a newline."""
    return io.StringIO(text if text.endswith("\n") else text + "\n")


_SEPARATOR = re.compile(r"^=+$")


def read_ptb(text: str, where: str = "<string>") -> list[TreebankSentence]:
    """Sentences of PTB-style tagged ``text`` (``word/TAG`` tokens, or ``word<TAB>TAG`` lines)."""
    lines = text.splitlines()
    if any("\t" in line for line in lines):
        return _read_ptb_columns(lines, where)
    content = [i for i, line in enumerate(lines) if line.strip() and not _SEPARATOR.match(line.strip())]
    blocks = bool(content) and any(
        not lines[i].strip() or _SEPARATOR.match(lines[i].strip()) for i in range(content[0], content[-1])
    )
    out: list[TreebankSentence] = []
    current: list[tuple[str, str]] = []
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        if not stripped or _SEPARATOR.match(stripped):
            _flush(current, out)
            continue
        for token in stripped.split():
            if token in ("[", "]"):
                continue
            word, slash, tag = token.rpartition("/")
            if not slash or not word or not tag:
                raise ValueError(
                    f"treebank {where}: malformed PTB-style line {number}: token {token!r} is not word/TAG; "
                    "write each token as word/TAG (escape a slash in a word as \\/)"
                )
            current.append((word.replace("\\/", "/"), tag))
        if not blocks:
            _flush(current, out)
    _flush(current, out)
    return out


def _read_ptb_columns(lines: list[str], where: str) -> list[TreebankSentence]:
    out: list[TreebankSentence] = []
    current: list[tuple[str, str]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            _flush(current, out)
            continue
        fields = line.strip("\r\n").split("\t")
        if len(fields) < 2 or not fields[0].strip() or not fields[1].strip():
            raise ValueError(
                f"treebank {where}: malformed word<TAB>TAG line {number} ({line.strip()[:60]!r}); write one "
                "word<TAB>TAG per line with a blank line between sentences"
            )
        current.append((fields[0].strip(), fields[1].strip()))
    _flush(current, out)
    return out


def _flush(current: list[tuple[str, str]], out: list[TreebankSentence]) -> None:
    pairs = [(w, t.split("|")[0]) for w, t in current if t != "-NONE-"]
    current.clear()
    if pairs:
        forms = tuple(w for w, _ in pairs)
        out.append(TreebankSentence(" ".join(forms), forms, (None,) * len(forms), tuple(t for _, t in pairs)))


def _looks_like_conllu(text: str) -> bool:
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith(("# sent_id", "# text", "# newdoc", "# newpar")):
            return True
        if stripped.startswith("#"):
            continue
        return len(line.split("\t")) == 10
    return False


# ---------------------------------------------------------------- loading, with a per-process cache

_FILE_CACHE: dict[tuple[str, int, int], tuple[str, str, tuple[TreebankSentence, ...]]] = {}


def _read_file(path: Path) -> tuple[str, str, tuple[TreebankSentence, ...]]:
    """(sha256, format, sentences) of one file, parsed once per (path, mtime, size) in a process."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _FILE_CACHE:
        data = path.read_bytes()
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise ValueError(
                f"treebank {path}: not UTF-8 text ({_one_line(exc)}); pass a UTF-8 CoNLL-U or PTB-style file"
            ) from None
        if path.suffix == ".conllu" or _looks_like_conllu(text):
            fmt, sentences = "conllu", read_conllu(text, str(path))
        else:
            fmt, sentences = "ptb", read_ptb(text, str(path))
        _FILE_CACHE[key] = (hashlib.sha256(data).hexdigest(), fmt, tuple(sentences))
    return _FILE_CACHE[key]


def load_treebank(path: str | os.PathLike[str]) -> Treebank:
    """The sentences of a treebank file, or of every ``*.conllu`` file of a folder (sorted by name)."""
    where = Path(path).expanduser()
    if not where.exists():
        raise FileNotFoundError(
            f"treebank {where} does not exist; pass `treebank` as a CoNLL-U file, a folder of .conllu files "
            "or a PTB-style tagged file"
        )
    if where.is_dir():
        files = sorted(p for p in where.glob("*.conllu") if p.is_file())
        if not files:
            raise ValueError(
                f"treebank folder {where} holds no *.conllu file; put the .conllu files there or pass one "
                "treebank file (CoNLL-U or PTB-style)"
            )
    else:
        files = [where]
    records, sentences = [], []
    for file in files:
        sha, fmt, found = _read_file(file)
        records.append((file.name, sha, fmt))
        sentences.extend(found)
    return Treebank(str(where), tuple(records), tuple(sentences))


# ---------------------------------------------------------------- tagging and filtering


def pos_class(upos: str | None, xpos: str | None, tagset: str) -> str:
    """The part of speech of a word under ``tagset`` (a concept name), else its raw tag (``"_"``: none)."""
    if tagset == "upos" and upos is not None:
        return UPOS_TAGS.get(upos, upos)
    if xpos is None:
        return upos or "_"
    if xpos == "IN":
        return "preposition"
    for prefix, name in XPOS_PREFIXES:
        if xpos.startswith(prefix):
            return name
    return xpos


def is_punctuation(form: str, upos: str | None, xpos: str | None) -> bool:
    """Punctuation (never a null answer): UPOS PUNCT, a Penn punctuation tag, or no letter or digit."""
    return upos == "PUNCT" or xpos in PTB_PUNCTUATION or not any(ch.isalnum() for ch in form)


def is_whole_word(form: str, text: str) -> bool:
    """Does ``form`` occur in ``text`` as a whole word (not inside a longer run of word characters)?"""
    return re.search(rf"(?<!\w){re.escape(form)}(?!\w)", text) is not None


class WholeWords(Sequence[bool]):
    """Per form of a sentence, :func:`is_whole_word` in its text; computed on first access."""

    def __init__(self, text: str, forms: Sequence[str]) -> None:
        self.text, self.forms = text, forms
        self._known: dict[int, bool] = {}

    def __len__(self) -> int:
        return len(self.forms)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = range(len(self))[i]
        if i not in self._known:
            self._known[i] = is_whole_word(self.forms[i], self.text)
        return self._known[i]


@dataclass(frozen=True)
class PoolSentence:
    """A usable sentence: its text, its words' classes, each concept's answer and the null candidates."""

    text: str
    forms: tuple[str, ...]
    classes: tuple[str, ...]
    answers: tuple[tuple[str, str], ...]  # (concept, answer) for every concept but null
    null_words: tuple[str, ...]

    def answer(self, concept: str) -> str:
        return dict(self.answers)[concept]


def _check_real(name: str, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not lo < float(value) < hi:
        raise ValueError(f"`{name}` must be a number strictly between {lo:g} and {hi:g}, got {value!r}")
    return float(value)


class TreebankTask(ConceptTask):
    """Base of the treebank tasks: a subclass sets the concepts and :meth:`answers_of` (None: drop it).

    Params: ``treebank`` (required), ``tagset`` (``"upos"`` or ``"xpos"``), ``query_fraction`` (0.2 of the
    usable sentences go to the query pool) and ``split_seed`` (0: the split does not follow the run seed).
    """

    version = "1"
    keep_rule: str = "usable"  # what "no usable sentence" means, in the error

    def __init__(
        self,
        treebank: str | os.PathLike[str] | None = None,
        tagset: str = "upos",
        query_fraction: float = 0.2,
        split_seed: int = 0,
        **unknown: Any,
    ) -> None:
        name = getattr(self, "name", type(self).__name__)
        if unknown:
            raise ValueError(
                f"task {name!r} got unknown parameter(s) {sorted(unknown)}; its parameters are treebank, "
                "tagset, query_fraction, split_seed"
            )
        if treebank is None:
            raise ValueError(
                f"task {name!r} needs the `treebank` parameter: a CoNLL-U file, a folder of .conllu files or a "
                "PTB-style tagged file (e.g. task_params: {treebank: data/en_ewt-ud-dev.conllu})"
            )
        if not isinstance(treebank, (str, os.PathLike)) or not str(treebank).strip():
            raise ValueError(f"`treebank` must be a path to a treebank file or folder, got {treebank!r}")
        if tagset not in TAGSETS:
            raise ValueError(f"`tagset` must be one of {', '.join(TAGSETS)}, got {tagset!r}")
        fraction = _check_real("query_fraction", query_fraction, 0.0, 1.0)
        if isinstance(split_seed, bool) or not isinstance(split_seed, numbers.Integral) or split_seed < 0:
            raise ValueError(f"`split_seed` must be an integer >= 0, got {split_seed!r}")
        super().__init__(
            treebank=str(treebank), tagset=tagset, query_fraction=fraction, split_seed=int(split_seed)
        )
        self.treebank = load_treebank(treebank)
        self.tagset = "xpos" if self.treebank.formats == ("ptb",) else tagset
        items: list[PoolSentence] = []
        seen: set[str] = set()
        for sentence in self.treebank.sentences:
            if sentence.text in seen:
                continue
            item = self._prepare(sentence)
            if item is not None:
                seen.add(sentence.text)
                items.append(item)
        read = len(self.treebank.sentences)
        if len(items) < 2:
            raise ValueError(
                f"treebank {self.treebank.path}: {len(items)} usable sentence(s) of {read} read ({self.keep_rule}, "
                f"tagset {self.tagset}); task {name!r} needs at least 2: pass a larger treebank or another tagset"
            )
        order = np.random.default_rng(int(split_seed)).permutation(len(items))
        n_query = min(max(1, int(round(fraction * len(items)))), len(items) - 1)
        self._pools = {
            "demo": tuple(items[i] for i in sorted(order[n_query:])),
            "query": tuple(items[i] for i in sorted(order[:n_query])),
        }
        self._lexicon = self._most_frequent_tags(self._pools["demo"])

    # -------------------------------------------------- subclass hook

    def answers_of(
        self, forms: Sequence[str], classes: Sequence[str], whole: Sequence[bool]
    ) -> dict[str, str] | None:
        """Each non-null concept's answer on a sentence, or None to drop the sentence."""
        raise NotImplementedError

    # -------------------------------------------------- pools

    def _prepare(self, sentence: TreebankSentence) -> PoolSentence | None:
        forms = sentence.forms
        classes = tuple(
            pos_class(u, x, self.tagset) for u, x in zip(sentence.upos, sentence.xpos, strict=True)
        )
        whole = WholeWords(sentence.text, forms)
        answers = self.answers_of(forms, classes, whole)
        if answers is None:
            return None
        null_words = tuple(
            f
            for f, u, x, w in zip(forms, sentence.upos, sentence.xpos, whole, strict=True)
            if w and not is_punctuation(f, u, x)
        )
        if not null_words:
            return None
        ordered = tuple((c, answers[c]) for c in self.concepts if c != NULL_CONCEPT)
        return PoolSentence(sentence.text, forms, classes, ordered, null_words)

    def pool(self, role: str) -> Sequence[PoolSentence]:
        """The demonstration (``"demo"``) or query (``"query"``) pool: disjoint, fixed by ``split_seed``."""
        if role not in self._pools:
            raise ValueError(f"pool role must be 'demo' or 'query', got {role!r}")
        return self._pools[role]

    def from_pool(self, item: PoolSentence, concept: str, rng: np.random.Generator) -> Example:
        """The sentence and its answer under ``concept`` (null: a uniformly chosen word, no punctuation)."""
        self.check_concept(concept)
        if concept == NULL_CONCEPT:
            return Example(item.text, item.null_words[int(rng.integers(len(item.null_words)))])
        return Example(item.text, item.answer(concept))

    def sample(self, concept: str, rng: np.random.Generator) -> Example:
        """A random query-pool sentence under ``concept``."""
        self.check_concept(concept)
        query = self._pools["query"]
        return self.from_pool(query[int(rng.integers(len(query)))], concept, rng)

    # -------------------------------------------------- lexical reader and record

    @staticmethod
    def _most_frequent_tags(items: Sequence[PoolSentence]) -> dict[str, str]:
        counts: dict[str, Counter[str]] = defaultdict(Counter)
        for item in items:
            for form, cls in zip(item.forms, item.classes, strict=True):
                counts[form.lower()][cls] += 1
        return {w: min(c, key=lambda t: (-c[t], t)) for w, c in counts.items()}

    def lexical_features(self, answers: Sequence[str]) -> dict[str, float]:
        """Histogram of the answers' most frequent part of speech in the demonstration pool (else "other")."""
        return pos_histogram([a.lower() for a in answers], self._lexicon)

    def info(self) -> dict[str, Any]:
        """The usual record plus the treebank files' sha256, the tag set used and the pool sizes."""
        out = super().info()
        out["data"] = {
            "files": {name: sha for name, sha, _ in self.treebank.files},
            "formats": list(self.treebank.formats),
            "tagset": self.tagset,
            "sentences": len(self.treebank.sentences),
            "pools": {role: len(items) for role, items in self._pools.items()},
        }
        return out
