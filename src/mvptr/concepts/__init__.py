"""Textual concepts of MVPTR: scene graphs parsed out of captions, their quality, and the concept vocabulary.

Why: MVPTR appends a caption's *textual concepts* (objects, (object, attribute) pairs, (subject, relation,
object) triples) to its word pieces. The paper parsed captions with the SPICE scene-graph parser; this
package does the same job with spaCy's dependency parse (`parser`), measures it against the synthetic
world's gold tuples (`quality`) and turns the parsed concepts into embedding ids (`vocab`).

Run: `mvptr concepts extract|quality|vocab ...` (see `mvptr.concepts.commands`).
"""
