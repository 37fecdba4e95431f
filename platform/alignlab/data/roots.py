"""Where a config's dataset lives (`resolve_data_root`) and the local folder evaluation reads
(`local_eval_root`: an s3:// dataset's evaluation folders are cached on local disk once)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from alignlab import storage

if TYPE_CHECKING:  # config imports the data package (SynthCaps settings); a DataConfig is only read here
    from alignlab.config import DataConfig


def resolve_data_root(data: "DataConfig") -> Path | str:
    """Where the dataset lives: `root` itself, or a per-generator-config folder under it for SynthCaps.

    An `s3://bucket/prefix` root is returned as that URI string (a Path would fold its `//`); training
    then streams its webdataset shards from S3 (alignlab.data.shards). SynthCaps is generated locally,
    so `data.synth` with an s3:// root is refused."""
    if data.root.startswith("s3://"):
        if data.synth is not None:
            raise ValueError(f"data.synth generates SynthCaps on local disk, but data.root is {data.root}: "
                             "generate it locally, upload the folder, and set data.synth to null")
        return data.root.rstrip("/")
    root = Path(data.root)
    if data.synth is None:
        return root
    digest = hashlib.sha256(json.dumps(data.synth.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()
    return root / f"synthcaps-{digest[:12]}"


EVAL_FOLDERS = ("retrieval", "classification", "shift")  # what alignlab.evaluate reads (data-formats.md)


def local_eval_root(data_root: Path | str, cache_dir: str | Path | None = None) -> Path:
    """The folder evaluation reads from local disk: `data_root` itself, or for an s3:// root a copy of
    its small evaluation folders (retrieval/, classification/, shift/) plus manifest.json under
    `<cache_dir>/<manifest's dataset_hash>` (default $ALIGNLAB_CACHE_DIR/datasets, else
    ~/.cache/alignlab/datasets), downloaded once, verified against the manifest's sha256, and reused
    by every later run on the same dataset content. Train shards are never downloaded."""
    if not isinstance(data_root, str):
        return Path(data_root)
    manifest_uri = f"{data_root}/manifest.json"
    try:
        manifest = json.loads(storage.read_bytes(manifest_uri))
    except FileNotFoundError:
        raise FileNotFoundError(f"evaluating on {data_root} needs {manifest_uri} (it names and checksums the "
                                "evaluation files); upload the dataset with its manifest, or set "
                                "eval.enabled=false") from None
    files, digest = manifest.get("files"), manifest.get("dataset_hash")
    if not isinstance(files, dict) or not isinstance(digest, str) or not digest.isalnum():
        raise ValueError(f"{manifest_uri} needs a 'files' mapping and an alphanumeric 'dataset_hash' (SynthCaps "
                         "manifest format) to cache the evaluation folders")
    if cache_dir is None:
        cache_dir = Path(os.environ.get("ALIGNLAB_CACHE_DIR") or Path.home() / ".cache" / "alignlab") / "datasets"
    target = Path(cache_dir) / digest
    if not target.is_dir():
        keys = [key for key in files if key.split("/")[0] in EVAL_FOLDERS] + ["manifest.json"]
        storage.download_tree(data_root, keys, target, checksums={k: v for k, v in files.items() if k in keys})
    return target
