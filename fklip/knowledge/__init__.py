"""Concept knowledge (spec 1.3, 1.4, 3.2 to 3.4).

concepts.py        vocabularies with hypernyms; each train query's concept slots
concept_images.py  concept -> image retrieval over the knowledge base (KB) with MMR; prototype features
"""

from fklip.knowledge.concept_images import RowLookup, mmr, prototype_features, retrieve_concept_images
from fklip.knowledge.concepts import (KINDS, PROMPT, ConceptSlots, ConceptTable, Vocabulary, build_concept_table,
                                      concept_slots, data_concepts, kb_concepts, load_vocabulary, with_hypernyms)

__all__ = ["KINDS", "PROMPT", "ConceptSlots", "ConceptTable", "RowLookup", "Vocabulary", "build_concept_table",
           "concept_slots", "data_concepts", "kb_concepts", "load_vocabulary", "mmr", "prototype_features",
           "retrieve_concept_images", "with_hypernyms"]
