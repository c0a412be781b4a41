"""Concept knowledge (spec 1.3, 1.4, 3.2 to 3.4).

concepts.py        vocabularies with hypernyms; each train query's concept slots
concept_images.py  concept -> image retrieval over the knowledge base (KB) with MMR; prototype features
refresh.py         the knowledge inputs of a training run, and its refresh with the current weights
"""

from fklip.knowledge.concept_images import (
                                      RowLookup,
                                      mmr,
                                      prototype_features,
                                      retrieve_concept_images,
)
from fklip.knowledge.concepts import (
                                      KINDS,
                                      PROMPT,
                                      ConceptSlots,
                                      ConceptTable,
                                      Vocabulary,
                                      build_concept_table,
                                      concept_slots,
                                      data_concepts,
                                      kb_concepts,
                                      load_vocabulary,
                                      with_hypernyms,
)
from fklip.knowledge.refresh import Knowledge, load_knowledge_inputs, refresh_knowledge

__all__ = ["KINDS", "PROMPT", "ConceptSlots", "ConceptTable", "Knowledge", "RowLookup", "Vocabulary",
           "build_concept_table", "concept_slots", "data_concepts", "kb_concepts", "load_knowledge_inputs",
           "load_vocabulary", "mmr", "prototype_features", "refresh_knowledge", "retrieve_concept_images",
           "with_hypernyms"]
