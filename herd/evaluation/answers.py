"""Answer scoring for the multimodal evaluations: VQA accuracy, exact-match QA accuracy, ASR WER/CER.

VQA (Antol et al. 2015, the VQA v2 evaluation's rules, re-implemented from its description):
- normalisation: newlines/tabs → spaces; punctuation `; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !` is
  deleted where it touches a space (or when the answer holds a digit-comma-digit run) and otherwise
  replaced by a space; a period is removed unless it is a decimal point; lower case; number words
  zero…ten (and "none") → digits; articles a / an / the dropped; apostrophe-less contractions restored
  ("dont" → "don't"; `CONTRACTIONS` holds the common ones, not the official list's every entry);
- accuracy with 10 human answers: the official average over the 10 leave-one-out subsets of 9,
  acc = mean_i min(1, #{j ≠ i : gt_j = pred} / 3); with fewer answers the same rule over what is given
  (one answer: exact match after normalisation).

ASR: word and character error rates from `jiwer` after its normalisation (the `jiwer.wer_standardize`
steps: lower case, common English contractions expanded, Kaldi non-words removed, whitespace collapsed;
plus punctuation removed), pooled over the set (total edits / total reference words), as speech papers
report them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]  # fmt: skip
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")  # a period that is not a decimal point
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = frozenset({"a", "an", "the"})
CONTRACTIONS = {
    "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "couldve": "could've", "didnt": "didn't",
    "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't", "havent": "haven't",
    "hes": "he's", "im": "i'm", "isnt": "isn't", "itd": "it'd", "itll": "it'll", "ive": "i've",
    "lets": "let's", "shes": "she's", "shouldnt": "shouldn't", "thats": "that's", "theres": "there's",
    "theyre": "they're", "theyve": "they've", "wasnt": "wasn't", "werent": "weren't", "whats": "what's",
    "wheres": "where's", "whos": "who's", "wont": "won't", "wouldnt": "wouldn't", "youre": "you're",
    "youve": "you've", "yall": "y'all",
}  # fmt: skip


def _punctuation(text: str) -> str:
    keep_commas = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in _PUNCTUATION:
        if (p + " " in text or " " + p in text) or keep_commas:
            text = text.replace(p, "")
        else:
            text = text.replace(p, " ")
    return _PERIOD.sub("", text)


def _digits_articles(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_vqa_answer(answer: str) -> str:
    """The VQA evaluation's normal form of an answer (see the module docstring)."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles(_punctuation(text))


def vqa_accuracy(prediction: str, references: Sequence[str]) -> float:
    """VQA accuracy of one prediction against its human answers (10 in VQA v2)."""
    if not references:
        raise ValueError("VQA accuracy needs at least one reference answer")
    pred = normalize_vqa_answer(prediction)
    gts = [normalize_vqa_answer(r) for r in references]
    if len(gts) == 1:
        return float(pred == gts[0])
    scores = []
    for i in range(len(gts)):
        matches = sum(1 for j, gt in enumerate(gts) if j != i and gt == pred)
        scores.append(min(1.0, matches / 3.0))
    return sum(scores) / len(scores)


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised reference (video QA), else 0.0."""
    pred = normalize_vqa_answer(prediction)
    return float(any(pred == normalize_vqa_answer(r) for r in references))


def _jiwer_normalisation(chars: bool) -> Any:
    """jiwer's `wer_standardize` steps (lower case, contractions expanded, Kaldi non-words dropped,
    whitespace collapsed) plus `RemovePunctuation`, ending in words or characters."""
    import jiwer

    return jiwer.Compose([
        jiwer.ToLowerCase(), jiwer.ExpandCommonEnglishContractions(), jiwer.RemoveKaldiNonWords(),
        jiwer.RemovePunctuation(), jiwer.RemoveWhiteSpace(replace_by_space=True), jiwer.RemoveMultipleSpaces(),
        jiwer.Strip(), jiwer.ReduceToListOfListOfChars() if chars else jiwer.ReduceToListOfListOfWords(),
    ])  # fmt: skip


def error_rates(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, float]:
    """Pooled WER and CER (jiwer, `_jiwer_normalisation`) of transcripts against references."""
    import jiwer

    if len(references) != len(hypotheses) or not references:
        raise ValueError(f"{len(references)} references for {len(hypotheses)} hypotheses")
    words, chars = _jiwer_normalisation(False), _jiwer_normalisation(True)
    # an empty hypothesis is a valid transcript (all deletions); jiwer wants a string, not an empty list
    hyps = [h if h.strip() else "" for h in hypotheses]
    w = jiwer.process_words(list(references), hyps, reference_transform=words, hypothesis_transform=words)
    c = jiwer.process_characters(
        list(references), hyps, reference_transform=chars, hypothesis_transform=chars
    )
    return {"wer": w.wer, "cer": c.cer}


__all__ = [
    "CONTRACTIONS",
    "NUMBER_WORDS",
    "error_rates",
    "exact_match",
    "normalize_vqa_answer",
    "vqa_accuracy",
]
