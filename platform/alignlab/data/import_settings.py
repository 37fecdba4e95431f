"""The settings of `alignlab data import`: the one definition used by the CLI, a spec's `import` prepare step
and the KFP prepare component (`data.importers.import_source` does the work). Free of PIL and storage, so
the CLI builds its parser without them."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ImportSettings(BaseModel):
    """Import `sources` in `format` as alignlab's webdataset shards under `out`: the captions JSON (coco; none
    with `karpathy`), the TSV, the JSONL, or the shards / folders / s3:// URIs (webdataset)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    format: Literal["coco", "tsv", "webdataset", "jsonl"]
    sources: list[str] = Field(default_factory=list)
    out: str = Field(min_length=1, description="output folder or s3://bucket/prefix (must not hold a dataset)")
    image_root: str | None = Field(None, description="folder the image paths are relative to (default: the "
                                                     "source file's folder)")
    karpathy: str | None = Field(None, description="coco: Karpathy split file (dataset_coco.json)")
    split: str = Field("train,restval", description="coco with karpathy: splits to import, comma-separated")
    header: Literal["auto", "yes", "no"] = Field("auto", description="tsv: the first row names the columns")
    image_column: str = Field("0", description="tsv: 0-based index or header name of the image column")
    caption_column: str = Field("1", description="tsv: 0-based index or header name of the caption column")
    shard_size: int = Field(1000, ge=1, description="pairs per tar shard")

    @model_validator(mode="after")
    def _check(self) -> "ImportSettings":
        wanted = {"tsv": "exactly one TSV file", "jsonl": "exactly one JSONL file"}
        if self.format in wanted and len(self.sources) != 1:
            raise ValueError(f"sources: format {self.format} reads {wanted[self.format]}, got {self.sources}")
        if self.format == "webdataset" and not self.sources:
            raise ValueError("sources: format webdataset needs at least one shard, folder or glob")
        if self.format == "coco" and len(self.sources) > 1:
            raise ValueError(f"sources: format coco reads one captions JSON, got {self.sources}")
        if self.format == "coco" and not self.sources and not self.karpathy:
            raise ValueError("sources: format coco needs a captions JSON or a karpathy split file")
        if self.karpathy and self.format != "coco":
            raise ValueError(f"karpathy: a coco option, not one of format {self.format}")
        if self.image_root and self.format == "webdataset":
            raise ValueError("image_root: webdataset shards hold their images; give image_root to other formats")
        return self
