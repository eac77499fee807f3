"""Names, places and organisations with spaCy NER pipelines, each loaded once per process.

The validating recognizers find what has a checksum or a shape; a person's name has neither,
so it needs a statistical model. A pipeline is named by its package (`es_core_news_sm`) or
path and keeps only its `ner` component and what that component listens to (a shared
`tok2vec` in larger pipelines): the small pipelines' NER carries its own token-to-vector
layer, so the tagger, parser, lemmatizer and morphologizer would only cost time.

Every configured pipeline runs over every text and the spans are merged: a Spanish name in
an English message (or the reverse) is still found, at the price of running each pipeline.
A pipeline that raises is a detector error (the caller blocks the request), never a skip.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from soberana.gateway.privacy.recognizers import Span

log = logging.getLogger("soberana.gateway.privacy")

NER_TYPES = frozenset({"PERSON", "LOCATION", "ORGANIZATION"})
NER_PRIORITY = 30  # below every validated recognizer: a name never swallows an IBAN

# spaCy labels -> our entity types: OntoNotes (English pipelines: PERSON, GPE, LOC, FAC, ORG)
# and WikiNER (Spanish and other news pipelines: PER, LOC, ORG). NORP (nationalities), MISC,
# dates and amounts are not personal data on their own and are left in the text.
_LABELS = {
    "PERSON": "PERSON",
    "PER": "PERSON",
    "GPE": "LOCATION",
    "LOC": "LOCATION",
    "FAC": "LOCATION",
    "ORG": "ORGANIZATION",
}

_loaded: dict[str, Any] = {}  # name -> spaCy Language; shared by every Detector of the process
_load_lock = threading.Lock()
# A pipeline adds every new token to its vocabulary; two Detectors (before and after a config
# reload) must not run one pipeline at the same time.
_run_lock = threading.Lock()


def load_pipeline(name: str) -> Any:
    """The spaCy pipeline `name` reduced to its NER; loaded on first use, then reused.

    Raises ImportError (spaCy missing), OSError (pipeline missing) or ValueError (no `ner`,
    or a spaCy older than 3.8).
    """
    with _load_lock:
        nlp = _loaded.get(name)
        if nlp is None:
            import spacy

            if not hasattr(spacy.Language, "memory_zone"):
                raise ValueError(f"spaCy {spacy.__version__} is too old (3.8 or newer needed)")
            nlp = spacy.load(name)
            if "ner" not in nlp.pipe_names:
                raise ValueError(f"spaCy pipeline {name!r} has no `ner` component")
            needed = {"ner"} | {
                pipe_name
                for pipe_name, pipe in nlp.pipeline
                if "ner" in getattr(pipe, "listening_components", ())
            }
            for pipe_name in list(nlp.pipe_names):
                if pipe_name not in needed:
                    nlp.remove_pipe(pipe_name)
            _loaded[name] = nlp
        return nlp


class NerPipelines:
    """The configured pipelines that could be loaded; `find` runs them all over a batch."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names: list[str] = []  # loaded
        self.missing: list[str] = []  # configured but not installed (logged once at load)
        self._pipelines: list[Any] = []
        for name in names:
            try:
                self._pipelines.append(load_pipeline(name))
                self.names.append(name)
            except ImportError:
                log.warning("spaCy is not installed: NER pipeline %s is off", name)
                self.missing.append(name)
            except (OSError, ValueError) as e:
                log.warning("NER pipeline %s is not usable (%s): skipped", name, e)
                self.missing.append(name)
        if self.names:
            log.info("NER pipelines loaded: %s", ", ".join(self.names))

    def __bool__(self) -> bool:
        return bool(self._pipelines)

    def wanted(self, entities: frozenset[str] | None) -> bool:
        """Whether a scan for `entities` (None: all) needs these pipelines at all."""
        return bool(self._pipelines) and (entities is None or not NER_TYPES.isdisjoint(entities))

    def find(self, texts: list[str], entities: frozenset[str] | None) -> list[list[Span]]:
        """Spans of PERSON / LOCATION / ORGANIZATION per text, from every pipeline (may overlap)."""
        out: list[list[Span]] = [[] for _ in texts]
        with _run_lock:
            for nlp in self._pipelines:
                # memory_zone (spaCy >= 3.8) drops the strings this batch added to the shared
                # vocabulary when it ends: names do not pile up in a long-running gateway.
                with nlp.memory_zone():
                    for spans, doc in zip(out, nlp.pipe(texts)):
                        for ent in doc.ents:
                            kind = _LABELS.get(ent.label_)
                            if kind is not None and (entities is None or kind in entities):
                                spans.append(Span(ent.start_char, ent.end_char, kind))
        return out
