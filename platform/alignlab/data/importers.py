"""Import image-caption datasets into alignlab's webdataset layout (docs/data-formats.md, "Importing and
filtering"), so that they train with `data.format=webdataset data.train=train data.root=<out>`.

Sources (each a generator of `Candidate`s; `import_candidates` validates and writes them):

- `coco_candidates`: COCO captions JSON (+ image folder), optionally restricted to splits of a Karpathy
  split file (`dataset_coco.json`). One sample per (image, caption): training then sees every caption
  as its own pair, like CC3M-style data. (The reader `CocoCaptions` keeps one sample per image with all
  captions and picks one per visit; that suits evaluation, where a pair key per caption is not wanted.)
- `tsv_candidates`: CC3M/CC12M-style TSV, one (image file, caption) per row.
- `webdataset_candidates`: existing webdataset / img2dataset shards, re-sharded.
- `jsonl_candidates`: the thesis JSONL format (data/jsonl.py), one sample per caption.

Every item is checked before it is written: caption present, UTF-8 and not blank; image file present and
decodable (PIL verify, then a full load); key unique. An item that fails is recorded with its reason in
the manifest's `skipped` list and counted in `skipped_counts`; nothing is dropped silently. Images are
stored as the original bytes when they are PNG or JPEG; other formats (BMP, GIF, TIFF, WebP, ...) are
re-encoded to PNG losslessly and their metadata says `reencoded_from`.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from alignlab.data.writer import DuplicateKeyError, ShardWriter, image_extension, sanitize_key

log = logging.getLogger(__name__)

# Why an item was skipped (the manifest's `skipped_counts` keys).
MISSING_FILE = "missing_file"
UNDECODABLE_IMAGE = "undecodable_image"
EMPTY_CAPTION = "empty_caption"
NON_UTF8_CAPTION = "non_utf8_caption"
DUPLICATE_KEY = "duplicate_key"
MALFORMED_RECORD = "malformed_record"  # a TSV row / JSON record / tar member that is not a usable item
UNREADABLE_SHARD = "unreadable_shard"  # a source file that is not a tar at all
TRUNCATED_SHARD = "truncated_shard"  # a source tar that ends early: the sample it cut, and the shard itself
REASONS = (MISSING_FILE, UNDECODABLE_IMAGE, EMPTY_CAPTION, NON_UTF8_CAPTION, DUPLICATE_KEY, MALFORMED_RECORD,
           UNREADABLE_SHARD, TRUNCATED_SHARD)

SOURCE_IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff")
_PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"}
_TSV_IMAGE_HEADERS = {"image", "image_path", "imagepath", "filepath", "file_path", "file", "path", "filename",
                      "file_name", "url", "image_url"}


@dataclass
class Candidate:
    """One source item on its way to the writer.

    `item` says where it came from (it is what the manifest's `skipped` list shows); `key` is the
    sample key it gets; the image is either `image_path` (read and checked here) or `image_bytes`;
    `caption` is a str, raw bytes (checked to be UTF-8) or None. `problem` = (reason, detail) marks an
    item the source reader already found unusable."""

    item: str
    key: str = ""
    caption: str | bytes | None = None
    image_path: Path | None = None
    image_bytes: bytes | None = None
    meta: dict = field(default_factory=dict)
    problem: tuple[str, str] | None = None


# ---- checks ------------------------------------------------------------------------------------------

def check_caption(caption: str | bytes | None) -> tuple[str | None, tuple[str, str] | None]:
    """(caption with surrounding whitespace removed, None) or (None, (reason, detail))."""
    if caption is None:
        return None, (EMPTY_CAPTION, "no caption")
    if isinstance(caption, bytes):
        try:
            caption = caption.decode("utf-8")
        except UnicodeDecodeError as err:
            return None, (NON_UTF8_CAPTION, f"byte {caption[err.start]:#04x} at offset {err.start} is not UTF-8")
    if not isinstance(caption, str):
        return None, (MALFORMED_RECORD, f"caption is a {type(caption).__name__}, not text")
    try:
        caption.encode("utf-8")
    except UnicodeEncodeError as err:  # lone surrogates: undecodable bytes or "\udcxx" JSON escapes
        return None, (NON_UTF8_CAPTION, f"character {caption[err.start]!r} at {err.start} is not valid Unicode")
    text = caption.strip()
    if not text:
        return None, (EMPTY_CAPTION, "caption is blank")
    return text, None


def check_image(data: bytes) -> tuple[bytes | None, str, str]:
    """(bytes to store, PIL format name, "") or (None, "", why PIL cannot verify and fully load it).

    The bytes to store are `data` itself (the same object) for PNG and JPEG, else a lossless PNG
    re-encoding (callers tell the two apart with `is`)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()  # structure and checksums; the image is unusable afterwards
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decodes every pixel: catches truncated data that verify() lets through
            if image.width < 1 or image.height < 1:
                return None, "", f"image has size {image.size}"
            if image_extension(data) is not None:
                return data, image.format or "", ""
            converted = image if image.mode in _PNG_MODES else image.convert("RGB")
            out = io.BytesIO()
            converted.save(out, format="PNG")
            return out.getvalue(), image.format or "unknown", ""
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ... on bad data
        return None, "", f"{type(err).__name__}: {err}"[:300]


# ---- the import loop -----------------------------------------------------------------------------------

@dataclass
class _ImageCache:
    """The verdict on the last image file read: consecutive captions of one image read and check it once."""

    path: Path | None = None
    verdict: tuple = ()


def import_candidates(candidates: Iterable[Candidate], writer: ShardWriter) -> Counter:
    """Check each candidate and write it with `writer` or record it with `writer.skip`. Returns the
    number of images re-encoded to PNG per source format (the others are stored as they were)."""
    reencoded: Counter = Counter()
    cache = _ImageCache()
    for candidate in candidates:
        problem = candidate.problem
        caption = data = None
        if problem is None:
            caption, problem = check_caption(candidate.caption)
        if problem is None:
            data, image_format, problem, was_reencoded = _read_image(candidate, cache)
        if problem is None and writer.has_key(candidate.key):
            problem = (DUPLICATE_KEY, f"key {candidate.key!r} was already imported from an earlier item")
        if problem is not None:
            writer.skip(candidate.item, *problem)
            continue
        meta = dict(candidate.meta)
        if was_reencoded:
            meta["reencoded_from"] = image_format
            reencoded[image_format] += 1
        try:
            writer.add(candidate.key, data, caption, meta)
        except DuplicateKeyError as err:  # cannot happen after has_key; kept so no item ever goes unrecorded
            writer.skip(candidate.item, DUPLICATE_KEY, str(err))
    return reencoded


def _read_image(candidate: Candidate, cache: _ImageCache) -> tuple[bytes | None, str, tuple | None, bool]:
    """(bytes to store, format, problem or None, re-encoded?) of the candidate's image."""
    if candidate.image_path is None:
        if candidate.image_bytes is None:
            return None, "", (MISSING_FILE, "no image"), False
        return _image_verdict(candidate.image_bytes, "image")
    path = candidate.image_path
    if cache.path != path:
        if not path.is_file():
            verdict = (None, "", (MISSING_FILE, f"image file {path} does not exist"), False)
        else:
            verdict = _image_verdict(path.read_bytes(), str(path))
        cache.path, cache.verdict = path, verdict
    return cache.verdict


def _image_verdict(original: bytes, where: str) -> tuple[bytes | None, str, tuple | None, bool]:
    data, image_format, detail = check_image(original)
    if data is None:
        return None, "", (UNDECODABLE_IMAGE, f"{where}: {detail}"), False
    return data, image_format, None, data is not original


def import_dataset(candidates: Iterable[Candidate], out_uri: str | os.PathLike, source: dict,
                   shard_size: int = 1000, pairing: str | None = None) -> dict:
    """Write `candidates` as shards under `out_uri` and return the manifest (see ShardWriter), which
    records `source` (format, input files, settings; read after the candidates are exhausted, so a
    reader may add counts to it) and `pairing` (how captions became samples)."""
    with ShardWriter(out_uri, shard_size=shard_size) as writer:
        reencoded = import_candidates(candidates, writer)
        extra = {"source": source, **({"pairing": pairing} if pairing else {}),
                 "reencoded": dict(sorted(reencoded.items()))}
        return writer.close(**extra)


def format_summary(manifest: dict) -> str:
    """A table of what an import wrote and skipped, per reason, for the terminal."""
    counts = manifest["counts"]
    rows = [("written", counts.get(manifest.get("train", "train"), 0))]
    rows += [(f"skipped: {reason}", n) for reason, n in manifest["skipped_counts"].items()]
    total = sum(n for _, n in rows)
    rows.append(("items read", total))
    width = max(len(name) for name, _ in rows)
    lines = [f"{'':<{width}}  {'count':>10}  {'%':>7}"]
    lines += [f"{name:<{width}}  {n:>10,}  {100.0 * n / total if total else 0.0:>7.2f}" for name, n in rows]
    return "\n".join(lines)


# ---- COCO captions ---------------------------------------------------------------------------------------

def _load_json(path: Path, what: str):
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{what} {path} is not valid UTF-8 JSON ({err})") from None


def _coco_captions(path: Path) -> tuple[dict, dict, list[Candidate]]:
    """({image_id: file_name}, {image_id: [(annotation_id, caption)]}, unusable records) of a COCO file."""
    data = _load_json(path, "COCO captions file")
    if not isinstance(data, dict) or not all(isinstance(data.get(f), list) for f in ("images", "annotations")):
        raise ValueError(f"{path}: need top-level 'images' and 'annotations' lists (a COCO captions file)")
    files, captions, bad = {}, {}, []
    for n, image in enumerate(data["images"]):
        if not isinstance(image, dict) or "id" not in image or not isinstance(image.get("file_name"), str):
            bad.append(Candidate(f"{path.name}: images[{n}]", problem=(MALFORMED_RECORD, "needs 'id' and 'file_name'")))
            continue
        files[image["id"]] = image["file_name"]
        captions.setdefault(image["id"], [])
    for n, annotation in enumerate(data["annotations"]):
        where = f"{path.name}: annotations[{n}]"
        if not isinstance(annotation, dict) or "image_id" not in annotation or "caption" not in annotation:
            bad.append(Candidate(where, problem=(MALFORMED_RECORD, "needs 'image_id' and 'caption'")))
        elif annotation["image_id"] not in files:
            bad.append(Candidate(where, problem=(MALFORMED_RECORD, f"image_id {annotation['image_id']!r} is not "
                                                                   "in 'images'")))
        else:
            captions[annotation["image_id"]].append((annotation.get("id", n), annotation["caption"]))
    return files, captions, bad


def coco_candidates(annotations: str | Path | None, image_root: str | Path | None = None,
                    karpathy: str | Path | None = None, splits: Iterable[str] = ("train", "restval"),
                    info: dict | None = None) -> Iterator[Candidate]:
    """One candidate per (image, caption) of a COCO captions file and/or a Karpathy split file.

    - `annotations` only: every image of the file; paths are `image_root/<file_name>`.
    - `karpathy` (+ `splits`): the images of those splits, at `image_root/<filepath>/<filename>`, with
      the captions of `annotations` when given (matched on `cocoid`), else Karpathy's `sentences[].raw`.
    `image_root` defaults to the folder of the first JSON. Keys are `<image id>_<annotation or sentence
    id>`. `info` (a dict) receives counts for the manifest: images excluded by the split choice.
    """
    if annotations is None and karpathy is None:
        raise ValueError("COCO import needs --annotations (captions JSON) or --karpathy (dataset_coco.json)")
    first = Path(annotations if annotations is not None else karpathy)
    root = Path(image_root) if image_root is not None else first.parent
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} not found; pass --image-root <folder of the images>")
    info = {} if info is None else info
    files, captions, bad = _coco_captions(Path(annotations)) if annotations is not None else ({}, {}, [])
    yield from bad
    if karpathy is None:
        for image_id, file_name in files.items():
            yield from _image_candidates(f"{first.name}: image {image_id}", image_id, root / file_name,
                                         {"image_id": image_id, "file_name": file_name}, captions[image_id])
        return
    splits = tuple(splits)
    data = _load_json(Path(karpathy), "Karpathy split file")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{karpathy}: need a top-level 'images' list (Karpathy's dataset_coco.json format)")
    excluded = Counter()
    name = Path(karpathy).name
    for n, image in enumerate(data["images"]):
        where = f"{name}: images[{n}]"
        if not isinstance(image, dict) or not isinstance(image.get("filename"), str) or "split" not in image:
            yield Candidate(where, problem=(MALFORMED_RECORD, "needs 'filename' and 'split'"))
            continue
        if image["split"] not in splits:
            excluded[image["split"]] += 1
            continue
        image_id = image.get("cocoid", image.get("imgid", n))
        file_name = f"{image['filepath']}/{image['filename']}" if image.get("filepath") else image["filename"]
        if annotations is not None:
            pairs = captions.get(image_id)
            if pairs is None:
                yield Candidate(f"{where} (cocoid {image_id})",
                                problem=(MALFORMED_RECORD, f"cocoid {image_id!r} is not in {Path(annotations).name}"))
                continue
        else:
            sentences = image.get("sentences")
            if not isinstance(sentences, list) or not all(isinstance(s, dict) for s in sentences):
                yield Candidate(where, problem=(MALFORMED_RECORD, "'sentences' must be a list of {'raw': ...}"))
                continue
            pairs = [(s.get("sentid", j), s.get("raw")) for j, s in enumerate(sentences)]
        meta = {"image_id": image_id, "file_name": file_name, "split": image["split"]}
        yield from _image_candidates(f"{where} (cocoid {image_id})", image_id, root / file_name, meta, pairs)
    info["images_excluded_by_split"] = dict(sorted(excluded.items()))


def _image_candidates(where: str, image_id, path: Path, meta: dict, pairs: list) -> Iterator[Candidate]:
    """The (image, caption) candidates of one image; an image without captions is recorded as skipped."""
    if not pairs:
        yield Candidate(where, problem=(EMPTY_CAPTION, "image has no caption"))
    for caption_id, caption in pairs:
        yield Candidate(f"{where}, caption {caption_id}", sanitize_key(f"{image_id}_{caption_id}"), caption,
                        image_path=path, meta={**meta, "caption_id": caption_id})


# ---- TSV (CC3M / CC12M style) ------------------------------------------------------------------------------

def tsv_candidates(tsv: str | Path, image_root: str | Path | None = None, header: str = "auto",
                   image_column: int | str = 0, caption_column: int | str = 1) -> Iterator[Candidate]:
    """One candidate per row of a tab-separated file of (image file, caption).

    Image paths are relative to `image_root` (default: the TSV's folder) unless absolute; URLs are not
    downloaded (fetch them first, e.g. with img2dataset, and import its shards). `header` is "yes", "no"
    or "auto" (a first row whose image cell is a column name such as `image`, `filepath` or `url`).
    Columns are 0-based indices or header names. Rows are read as bytes, so a caption that is not UTF-8
    is reported for its row alone. Keys are the image path without extension (`images/0001.jpg` ->
    `images_0001`): a row repeating an image already imported is a duplicate.
    """
    path = Path(tsv)
    if not path.is_file():
        raise FileNotFoundError(f"TSV file {path} not found")
    if header not in ("auto", "yes", "no"):
        raise ValueError(f"header must be 'auto', 'yes' or 'no', got {header!r}")
    root = Path(image_root) if image_root is not None else path.parent
    image_column, caption_column = (int(c) if str(c).isdigit() else c for c in (image_column, caption_column))
    lines = path.read_bytes().split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the newline that ends the last row
    rows = [line.rstrip(b"\r").split(b"\t") for line in lines]
    names = None
    if rows and (header == "yes" or (header == "auto" and _looks_like_header(rows[0], image_column, root))):
        names = [cell.decode("utf-8", "replace").strip() for cell in rows[0]]
    columns = [_column_index(column, names, path) for column in (image_column, caption_column)]
    for number, cells in enumerate(rows, start=1):
        if number == 1 and names is not None:
            continue
        where = f"{path.name}: line {number}"
        if len(cells) <= max(columns):
            yield Candidate(where, problem=(MALFORMED_RECORD, f"{len(cells)} tab-separated column(s), need "
                                                              f"{max(columns) + 1}"))
            continue
        image_cell = os.fsdecode(cells[columns[0]].strip())
        if not image_cell:
            yield Candidate(where, problem=(MISSING_FILE, "empty image path"))
            continue
        if image_cell.startswith(("http://", "https://")):
            yield Candidate(where, problem=(MISSING_FILE, f"{image_cell[:100]} is a URL, not a file: download "
                                                          "the images first (e.g. img2dataset) and import those"))
            continue
        image_path = root / image_cell  # an absolute path replaces root
        key = sanitize_key(os.path.splitext(image_cell)[0].lstrip("/"))
        yield Candidate(where, key, cells[columns[1]], image_path=image_path,
                        meta={"file_name": image_cell, "line": number})


def _looks_like_header(cells: list[bytes], image_column: int | str, root: Path) -> bool:
    if isinstance(image_column, str):
        return True  # a column given by name needs a header row
    if len(cells) <= image_column:
        return False
    cell = cells[image_column].decode("utf-8", "replace").strip()
    return cell.lower() in _TSV_IMAGE_HEADERS and not (root / cell).is_file()


def _column_index(column: int | str, names: list[str] | None, path: Path) -> int:
    if isinstance(column, int) or (isinstance(column, str) and column.isdigit()):
        return int(column)
    if names is None:
        raise ValueError(f"{path}: column {column!r} is a name but the file has no header row; pass a 0-based "
                         "index or --header yes")
    if column not in names:
        raise ValueError(f"{path}: no column {column!r} in the header {names}")
    return names.index(column)


# ---- webdataset / img2dataset shards ------------------------------------------------------------------------

def expand_shard_uris(specs: Iterable[str]) -> list[str]:
    """Shard URIs from local directories / globs / brace patterns (as `expand_shards`) and s3:// URIs
    (an object ending in .tar, or a prefix whose .tar objects are taken in sorted order)."""
    from alignlab.data.shards import expand_shards
    from alignlab.storage import list_prefix

    uris = []
    for spec in specs:
        spec = os.fspath(spec)
        if spec.startswith("s3://"):
            uris += [spec] if spec.endswith(".tar") else [u for u in list_prefix(spec) if u.endswith(".tar")]
        else:
            uris += expand_shards(spec)
    if not uris:
        raise FileNotFoundError(f"no .tar shards found in {list(specs)}")
    return uris


def webdataset_candidates(shards: Iterable[str]) -> Iterator[Candidate]:
    """One candidate per sample of webdataset tar shards (SynthCaps, img2dataset output, ...).

    Every sample is validated like any other source: it needs one image member (png/jpg/jpeg/webp/...)
    and a `.txt` caption; its `.json`, if any, must be a JSON object and is kept as the metadata (plus
    `source_key` and `source_shard`). Samples are grouped by `alignlab.data.tar_samples`, the grouper
    training uses. A shard that ends early (cut mid-file, or between members without its end-of-archive
    marker) keeps the samples before the cut and records `truncated_shard` twice: for the sample the
    cut went through, if any, and for the shard (where it stops, how many samples were read); a file
    that is not a tar at all is `unreadable_shard`.
    """
    from alignlab.data.tar_samples import TarWalk, iter_tar_samples
    from alignlab.storage import open_read

    for uri in expand_shard_uris(shards):
        count, last, lost = 0, None, None
        try:
            with open_read(uri) as stream:
                walk = TarWalk(stream, uri, read_data=True)
                for sample in iter_tar_samples(walk):
                    members = {ext: member.data for ext, member in sample.members.items()}
                    has_image = any(ext in members for ext in SOURCE_IMAGE_EXTENSIONS)
                    if sample.cut is not None and (sample.cut.member is not None or "txt" not in members or not has_image):
                        lost = sample.key
                        found = ", ".join(f".{ext}" for ext in members) or "none"
                        yield Candidate(f"{uri}: {lost}", problem=(TRUNCATED_SHARD, f"the shard ends inside this sample "
                                                                                    f"(members read: {found})"))
                        continue
                    count, last = count + 1, sample.key
                    yield _shard_candidate(uri, sample.key, members, sample.problems)
        except (ValueError, OSError) as err:
            yield Candidate(uri, problem=(UNREADABLE_SHARD, f"read stopped after {count} sample(s): {err}"))
            continue
        if walk.cut is not None:
            cut = f"sample {lost} cut" if lost else "no sample cut"
            yield Candidate(uri, problem=(TRUNCATED_SHARD, f"{walk.cut.detail}: {count} complete sample(s) read "
                                                           f"(last: {last}), {cut}, any later samples lost"))


def _shard_candidate(uri: str, key: str, members: dict, problems: list[str]) -> Candidate:
    where = f"{uri}: {key}"
    if problems:
        return Candidate(where, problem=(MALFORMED_RECORD, "; ".join(problems)))
    image_ext = next((ext for ext in SOURCE_IMAGE_EXTENSIONS if ext in members), None)
    if image_ext is None:
        return Candidate(where, problem=(MISSING_FILE, f"no image member (.{'/.'.join(SOURCE_IMAGE_EXTENSIONS)})"))
    if "txt" not in members:
        return Candidate(where, problem=(EMPTY_CAPTION, "no .txt member"))
    meta = {}
    if "json" in members:
        try:
            meta = json.loads(members["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return Candidate(where, problem=(MALFORMED_RECORD, f".json member is not valid JSON ({err})"))
        if not isinstance(meta, dict):
            return Candidate(where, problem=(MALFORMED_RECORD, ".json member is not a JSON object"))
    meta = {**meta, "source_key": key, "source_shard": uri}
    return Candidate(where, sanitize_key(key), members["txt"], image_bytes=members[image_ext], meta=meta)


# ---- thesis JSONL ------------------------------------------------------------------------------------------

def jsonl_candidates(jsonl: str | Path, image_root: str | Path | None = None) -> Iterator[Candidate]:
    """Candidates of a thesis JSONL file (see data/jsonl.py for the fields): one per caption, keyed
    `<id>` for a single caption and `<id>_<j>` for the j-th of a list. Image paths are relative to
    `image_root` (default: the JSONL's folder). Lines that are not valid JSON objects with an id and an
    image are `malformed_record`; a line with token ids but no text is `empty_caption` (the text is needed)."""
    from alignlab.data.jsonl import _ID_FIELDS, _IMAGE_FIELDS, _TEXT_FIELDS, _first_field

    path = Path(jsonl)
    if not path.is_file():
        raise FileNotFoundError(f"JSONL file {path} not found")
    root = Path(image_root) if image_root is not None else path.parent
    for number, line in enumerate(path.read_bytes().split(b"\n"), start=1):
        if not line.strip():
            continue  # blank lines hold no record (JsonlPairs skips them too)
        where = f"{path.name}: line {number}"
        # surrogateescape keeps undecodable bytes, so a bad caption is told apart from a bad line
        try:
            record = json.loads(line.decode("utf-8", "surrogateescape"))
        except json.JSONDecodeError as err:
            yield Candidate(where, problem=(MALFORMED_RECORD, f"not valid JSON ({err.msg} at column {err.colno})"))
            continue
        if not isinstance(record, dict):
            yield Candidate(where, problem=(MALFORMED_RECORD, "not a JSON object"))
            continue
        sample_id, image = _first_field(record, _ID_FIELDS), _first_field(record, _IMAGE_FIELDS)
        caption = _first_field(record, _TEXT_FIELDS)
        if sample_id is None or not isinstance(image, str) or not image:
            yield Candidate(where, problem=(MALFORMED_RECORD, "needs 'id' (or 'sample_id') and an 'image' path"))
            continue
        meta = {"source_id": sample_id, "image_path": image, "line": number}
        if caption is None:
            detail = "only token ids; the import needs the caption text" if "tokens" in record else "no 'text'"
            yield Candidate(where, problem=(EMPTY_CAPTION, detail))
            continue
        if isinstance(caption, list) and not caption:
            yield Candidate(where, problem=(EMPTY_CAPTION, "empty caption list"))
            continue
        if isinstance(caption, list):
            for j, text in enumerate(caption):
                yield Candidate(f"{where}, caption {j}", sanitize_key(f"{sample_id}_{j}"), text,
                                image_path=root / image, meta={**meta, "caption_index": j})
        else:
            yield Candidate(where, sanitize_key(str(sample_id)), caption, image_path=root / image, meta=meta)


def import_source(format: str, sources: list[str], out: str, *, image_root: str | None, karpathy: str | None,
                  split: str, header: str, image_column: str, caption_column: str, shard_size: int) -> dict:
    """Import a dataset in `format` as shards under `out` and return the manifest; the arguments are
    `ImportSettings`' fields (`import_source(**settings.model_dump())`)."""
    info: dict = {"format": format}
    first = sources[0] if sources else None
    if format == "coco":
        splits = tuple(s.strip() for s in split.split(",") if s.strip())
        info |= {"annotations": first, "karpathy": karpathy, "image_root": image_root,
                 "splits": list(splits) if karpathy else None}
        items = coco_candidates(first, image_root, karpathy, splits, info=info)
        pairing = "one sample per (image, caption)"
    elif format == "tsv":
        info |= {"tsv": first, "image_root": image_root, "header": header, "image_column": image_column,
                 "caption_column": caption_column}
        items, pairing = tsv_candidates(first, image_root, header, image_column, caption_column), None
    elif format == "webdataset":
        info |= {"shards": list(sources)}
        items, pairing = webdataset_candidates(sources), None
    elif format == "jsonl":
        info |= {"jsonl": first, "image_root": image_root}
        items, pairing = jsonl_candidates(first, image_root), "one sample per caption"
    else:
        raise ValueError(f"format {format!r}: choose from coco, tsv, webdataset, jsonl")
    return import_dataset(items, out, info, shard_size=shard_size, pairing=pairing)
