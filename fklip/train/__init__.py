"""`fklip train`: FashionKLIP knowledge-injected training (spec 3).

loop.py        run_train: the set-up, the epoch loop, checkpoints
step.py        train_step: one optimisation step, top to bottom, and the pieces it calls
data.py        the training samples (query, item id) and their batches
validation.py  the val loss and recall after each epoch
run_log.py     the run folder: params.json, metrics.jsonl, TensorBoard, closed on any exit

The knowledge the concept loss reads (vocabularies, retrieval, its refresh) is in fklip.knowledge.
"""

from fklip.knowledge import Knowledge, refresh_knowledge
from fklip.train.loop import TrainingError, run_name, run_train

__all__ = ["Knowledge", "TrainingError", "refresh_knowledge", "run_name", "run_train"]
