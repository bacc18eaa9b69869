"""Tiny random models (one per family) and an in-memory tokenizer: no downloads in tests."""

from __future__ import annotations

from functools import lru_cache
from html.parser import HTMLParser

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from conceptprobe.prompts import build_prompts
from conceptprobe.tasks import get_task

FAMILIES = ("llama", "gemma2", "gemma3", "qwen2", "mistral")


@lru_cache(maxsize=4)
def _trained_tokenizer(add_bos: bool) -> Tokenizer:
    corpus = []
    for name in ("pos", "bitwise"):
        task = get_task(name)
        for concept in task.concepts:
            corpus += [p.text + " " + p.answer + "\n" for p in build_prompts(task, concept, 4, 30, seed=123)]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", tok.token_to_id("<bos>"))]
        )
    return tok


def make_tokenizer(add_bos: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in memory on task prompts (vocab 600)."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer(add_bos).to_str()),
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
    )
    tok.padding_side = "left"
    return tok


def make_model(family: str, vocab_size: int = 600, layers: int = 3, seed: int = 0) -> torch.nn.Module:
    """A tiny randomly initialised causal LM of ``family`` (fp32, eval mode)."""
    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=None))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif family == "gemma2":
        model = Gemma2ForCausalLM(Gemma2Config(**common, head_dim=8, sliding_window=16))
    elif family == "gemma3":
        model = Gemma3ForCausalLM(Gemma3TextConfig(**common, head_dim=8, sliding_window=16))
    else:
        raise ValueError(family)
    # random init is near-degenerate (tiny weights); scale so layers differ measurably
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    return model.eval()


def set_seed(seed: int = 0) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


class HtmlTables(HTMLParser):
    """Every ``<table>`` of a page: its attributes and its body rows as ``{data-col: (text, td attrs)}`` (plus
    ``"_attrs"``: the row's attributes); every ``<img>`` src and every element id."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[dict] = []
        self.images: list[str] = []
        self.ids: list[str] = []
        self._row: dict | None = None
        self._cell: tuple[str, dict] | None = None
        self._text: list[str] = []

    @classmethod
    def parse(cls, text: str) -> HtmlTables:
        page = cls()
        page.feed(text)
        return page

    def of(self, cls: str) -> list[dict]:
        """The tables whose class list holds ``cls``."""
        return [t for t in self.tables if cls in (t["attrs"].get("class") or "").split()]

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if a.get("id"):
            self.ids.append(a["id"])
        if tag == "img":
            self.images.append(a.get("src", ""))
        elif tag == "table":
            self.tables.append({"attrs": a, "rows": []})
        elif tag == "tr" and self.tables and self._cell is None:
            self._row = {"_attrs": a}
        elif tag == "td" and self._row is not None:
            self._cell, self._text = (a.get("data-col", ""), a), []

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None and self._row is not None:
            self._row[self._cell[0]] = ("".join(self._text).strip(), self._cell[1])
            self._cell = None
        elif tag == "tr" and self._row is not None:
            if len(self._row) > 1:  # header rows hold no <td>
                self.tables[-1]["rows"].append(self._row)
            self._row = None
