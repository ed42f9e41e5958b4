"""Language identification as a text filter stage (paper §3.1.1: documents are classified by language
and non-kept languages are dropped).

The paper used a fastText classifier over 176 languages; here the classifier is Lingua
(`lingua-language-detector`, Apache-2.0), whose n-gram models ship inside its wheel, so nothing is
downloaded at run time. For each document Lingua gives a confidence per candidate language (they sum
to 1 over the candidates); the stage takes the most confident language and keeps the document when it
is one of `keep` and its confidence is at least `min_confidence`.

Reasons in rejects: `unknown_language` (no language detected: digits, symbols, empty), `language_not_kept`
(confident, but not one of `keep`), `low_language_confidence` (below the threshold). The stage also counts
every document's detected language (`detected/<code>`) and the kept ones (`kept/<code>`), which
`filter_text` reports as `languages`.

Cost (measured on this machine, one core): with all 75 languages in high-accuracy mode the detector takes
17 s and 1.1 GB to load and then ~0.4 ms per sentence; restricting `candidates` to the languages a corpus
can contain (e.g. 7) loads in ~1 s and 170 MB. Confidences are relative to the candidates: with all 75
languages an English sentence may score 0.3 where seven candidates give it 0.8, so set `min_confidence`
for the candidate set in use. Low-accuracy mode is faster but misreads short texts (French read as Tagalog).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from herd.data.curation.text_pipeline import BaseStage, Verdict


@dataclass
class LanguageIdConfig:
    keep: list[str] = field(default_factory=lambda: ["en"])  # ISO 639-1 codes; empty: keep every language
    min_confidence: float = 0.5
    candidates: list[str] | None = None  # ISO 639-1 codes Lingua chooses among; None: all 75 languages
    low_accuracy: bool = False  # Lingua's low-accuracy mode: trigrams only, faster, worse on short texts
    max_chars: int = 2000  # classify the first characters only: language is settled long before


def _iso_codes(codes: Sequence[str]) -> list[Any]:
    from lingua import IsoCode639_1

    out = []
    for c in codes:
        try:
            out.append(getattr(IsoCode639_1, c.strip().upper()))
        except AttributeError:
            raise ValueError(
                f"unknown ISO 639-1 language code {c!r} (Lingua supports 75 languages)"
            ) from None
    return out


def build_detector(cfg: LanguageIdConfig) -> Any:
    """A Lingua `LanguageDetector` over cfg.candidates (all languages when None)."""
    try:
        from lingua import LanguageDetectorBuilder
    except ImportError as e:
        raise ImportError(
            "language identification needs lingua: pip install 'herd[data]'", name="lingua"
        ) from e
    _iso_codes(cfg.keep)  # a typo in keep is an error now, not an empty output later
    if cfg.candidates:
        codes = _iso_codes(cfg.candidates)
        if len(codes) < 2:
            raise ValueError("language candidates: give at least two languages")
        builder = LanguageDetectorBuilder.from_iso_codes_639_1(*codes)
    else:
        builder = LanguageDetectorBuilder.from_all_languages()
    if cfg.low_accuracy:
        builder = builder.with_low_accuracy_mode()
    return builder.build()


class LanguageDetector:
    """(language code | None, confidence) of a text with a Lingua detector built once."""

    def __init__(self, cfg: LanguageIdConfig) -> None:
        self.cfg = cfg
        self._detector = build_detector(cfg)

    def detect(self, text: str) -> tuple[str | None, float]:
        values = self._detector.compute_language_confidence_values(text[: self.cfg.max_chars])
        if not values or values[0].value <= 0.0:
            return None, 0.0
        return values[0].language.iso_code_639_1.name.lower(), float(values[0].value)


class LanguageIdStage(BaseStage):
    """The filter stage; the detector is built on the first record (a resumed run that has nothing left
    to do never loads it) and not pickled with the stage state."""

    name = "language_id"

    def __init__(self, cfg: LanguageIdConfig, text_field: str = "text") -> None:
        super().__init__()
        self.cfg, self.text_field = cfg, text_field
        self.keep = {c.strip().lower() for c in cfg.keep}
        self._detector: LanguageDetector | None = None

    def detect(self, text: str) -> tuple[str | None, float]:
        if self._detector is None:
            self._detector = LanguageDetector(self.cfg)
        return self._detector.detect(text)

    def process(self, rec: dict[str, Any], ordinal: int) -> Verdict:
        lang, confidence = self.detect(rec[self.text_field])
        self.counters[f"detected/{lang or 'unknown'}"] += 1
        if lang is None:
            return None, "unknown_language", None
        detail = {"language": lang, "confidence": round(confidence, 4)}
        if self.keep and lang not in self.keep:
            return None, "language_not_kept", detail
        if confidence < self.cfg.min_confidence:
            return None, "low_language_confidence", detail
        self.counters[f"kept/{lang}"] += 1
        return {**rec, "language": lang, "language_confidence": round(confidence, 4)}, None, None


def language_report(counters: dict[str, int]) -> dict[str, dict[str, int]]:
    """Stage counters → {"detected": {code: n}, "kept": {code: n}}, most frequent first."""
    out: dict[str, dict[str, int]] = {"detected": {}, "kept": {}}
    for key, n in sorted(counters.items(), key=lambda kv: (-kv[1], kv[0])):
        kind, _, code = key.partition("/")
        if kind in out:
            out[kind][code] = n
    return out
