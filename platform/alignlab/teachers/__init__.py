"""Vision teachers and their precomputed targets (SPEC 3.2 concept distillation, 4.2 teachers and targets).

- `registry`: `load_teacher(source) -> Teacher`, a frozen model that takes student-normalised images and
  returns concept-head logits ("objects", "attributes"), classifier "logits" and the pooled "embedding".
- `supervised`, `concepts`: `alignlab teacher train`, a small supervised teacher on SynthCaps' true labels
  plus DiHT concept heads trained on caption-parsed concepts.
- `cache`: `build_teacher_cache` / `TeacherCache`, top-k targets and embeddings stored once per image and
  content-addressed, so the teacher does not run during student training.
"""

from alignlab.teachers.registry import CONCEPT_HEADS, TARGET_NAMES, Teacher, load_teacher, state_dict_hash

__all__ = ["CONCEPT_HEADS", "TARGET_NAMES", "Teacher", "load_teacher", "state_dict_hash"]
