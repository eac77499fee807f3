"""A spaCy `ner` component that fails or stalls on demand, for the fail-closed tests.

It is a real spaCy factory, saved with a blank pipeline to a directory and loaded by path like
any pipeline. The gateway runs in its own process, so the factory is found there through the
`spacy_factories` entry point that `install_entry_point` writes (spaCy's own plug-in mechanism).
"""

from __future__ import annotations

import time
from pathlib import Path

import spacy
from spacy.language import Language

FACTORY = "soberana_test_faulty_ner"
FAIL = "FALLO-NER"  # a text containing this makes the component raise
STALL = "NER-LENTO"  # ... or take STALL_S seconds
STALL_S = 3.0


class FaultyNer:
    def __call__(self, doc):
        if FAIL in doc.text:
            raise RuntimeError("NER model crashed")
        if STALL in doc.text:
            time.sleep(STALL_S)
        return doc


@Language.factory(FACTORY)
def make(nlp: Language, name: str) -> FaultyNer:
    return FaultyNer()


def save_pipeline(where: Path) -> Path:
    """A blank Spanish pipeline whose `ner` is the faulty component, saved at `where`."""
    nlp = spacy.blank("es")
    nlp.add_pipe(FACTORY, name="ner")
    nlp.to_disk(where)
    return where


def install_entry_point(site: Path) -> Path:
    """A dist-info under `site` (put it on PYTHONPATH) declaring the factory to spaCy."""
    info = site / "soberana_test_faulty_ner-0.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: soberana-test-faulty-ner\nVersion: 0.0\n"
    )
    (info / "entry_points.txt").write_text(f"[spacy_factories]\n{FACTORY} = {__name__}:make\n")
    return site
