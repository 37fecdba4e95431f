"""The SynthCaps generator settings: one validated schema, used by the CLI, experiment configs and tests."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

# Fields that change how the data is produced but not the data itself: left out of the manifest's
# config and ignored when deciding whether an existing dataset can be reused.
EXECUTION_ONLY_FIELDS = frozenset({"workers"})


class SynthCapsConfig(BaseModel):
    """Sizes of every SynthCaps split and the fraction of training pairs hit by each caption noise
    (each noise is drawn independently per sample; see `captions.noisy_caption` for how they combine)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    seed: int = Field(0, ge=0, description="Root seed; every sample's RNG derives from (seed, split, index).")
    image_size: int = Field(64, ge=32, le=1024, description="Side of the square RGB images, in pixels.")
    num_train: int = Field(10000, ge=1, description="Number of training image-text pairs.")
    shard_size: int = Field(1000, ge=1, description="Training pairs per webdataset shard.")
    num_retrieval_test: int = Field(500, ge=1, description="Images in retrieval/test.")
    num_retrieval_val: int = Field(200, ge=1, description="Images in retrieval/val (model selection).")
    captions_per_image: int = Field(5, ge=1, le=8, description="Clean captions per retrieval image.")
    zeroshot_per_class_train: int = Field(20, ge=1, description="Images per class, classification train split.")
    zeroshot_per_class_val: int = Field(10, ge=1, description="Images per class, classification val split.")
    zeroshot_per_class_test: int = Field(20, ge=1, description="Images per class, classification test split.")
    shift_per_class: int = Field(20, ge=1, description="Images per class in each distribution-shift set.")
    workers: int = Field(1, ge=1, le=256, description="Processes; the output does not depend on it.")
    object_scale: float = Field(1.0, ge=0.5, le=1.4, description="Difficulty: multiplies every object's radius "
                                "(1.0: small 0.1, large 0.15 of the image side).")
    max_objects: int = Field(3, ge=1, le=3, description="Difficulty: at most this many objects per scene "
                             "(a larger draw is cut down, so 1-object scenes grow more common).")
    mismatch: float = Field(0.0, ge=0.0, le=1.0, description="Fraction captioned from another random scene.")
    wrong_attribute: float = Field(0.0, ge=0.0, le=1.0, description="Fraction with one colour/size word wrong.")
    uninformative: float = Field(0.0, ge=0.0, le=1.0, description="Fraction with alt-text like 'IMG_0042.jpg'.")
    product: float = Field(0.0, ge=0.0, le=1.0, description="Fraction with product-listing captions (no action).")
    text_in_image: float = Field(0.0, ge=0.0, le=1.0, description="Fraction with caption words drawn in the image.")

    def layout(self) -> dict:
        """The scene difficulty settings, as `sample_scene` keywords."""
        return {"object_scale": self.object_scale, "max_objects": self.max_objects}

    def noise_fractions(self) -> dict[str, float]:
        return {"mismatch": self.mismatch, "wrong_attribute": self.wrong_attribute,
                "uninformative": self.uninformative, "product": self.product, "text_in_image": self.text_in_image}

    def dataset_fields(self) -> dict:
        """The settings that determine the dataset's content (what the manifest records)."""
        return self.model_dump(mode="json", exclude=set(EXECUTION_ONLY_FIELDS))
