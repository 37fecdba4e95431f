"""Vision teachers and their precomputed targets (docs/methods.md, "DiHT concept distillation").

- `registry`: `load_teacher(source) -> Teacher`, a frozen model that takes student-normalised images and
  returns concept-head logits ("objects", "attributes"), classifier "logits" and the pooled "embedding".
- `supervised`, `concepts`: `alignlab teacher train`, a small supervised teacher on SynthCaps' true labels
  plus DiHT concept heads trained on caption-parsed concepts.
- `cache`: `build_teacher_cache` / `TeacherCache`, top-k targets and embeddings stored once per image and
  content-addressed, so the teacher does not run during student training.
- `settings`: the pydantic settings of teacher training and caching (CLI flags and spec prepare steps).

The registry (torch, timm) loads on first use of its names, so `alignlab.teachers.settings` stays light.
"""

__all__ = ["CONCEPT_HEADS", "TARGET_NAMES", "Teacher", "load_teacher", "state_dict_hash"]


def __getattr__(name: str):
    if name in __all__:
        from alignlab.teachers import registry

        return getattr(registry, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
