"""Training pairs and the resumable, rank-aware batch order (docs/data-formats.md, "Training data contract").

The batch order is a pure function of (seed, epoch): a run resumed at batch k sees exactly the batches
an uninterrupted run would. Every sample carries an aug seed derived from (seed, epoch, index), and all
augmentation randomness (crop, flip, caption choice, caption sub-sequence) comes from it, so batches do
not depend on the number of DataLoader workers or of ranks. Ranks split each global batch into
contiguous slices, so rank r of an R-rank run sees rows [r*b, (r+1)*b) of the 1-rank global batch
(docs/methods.md "CLIP": the distributed loss must match a single-process run on the same global batch).

Corrupt samples (alignlab.data.skips) never change the batch size. Those the shard index finds are not
in the index at all, so the order is the one the dataset without them gives. One that only fails when
read (an image that does not decode, a caption that is not UTF-8) is replaced in its batch row by a
substitute drawn from its aug seed, never a sample of the global batch (`RowBatch.batch_indices`), and
recorded in the dataset's `skip_log`; every other row keeps its sample. The substitute is a pure function
of (seed, epoch, index, global batch) and the data: resume stays exact, no rank waits for another, and
an R-rank run still sees the rows of the 1-rank run.
"""

import logging
import random

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from alignlab.data.coco import CocoCaptions
from alignlab.data.jsonl import JsonlPairs
from alignlab.data.shards import WebDatasetIndex
from alignlab.data.skips import DEFAULT_MAX_CAPTION_BYTES, CorruptSampleError
from alignlab.data.tokenizers import pack_token_ids

log = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1
MAX_SUBSTITUTES = 32  # corrupt draws in a row before a batch row gives up (the data is mostly corrupt)


def _splitmix64(value: int) -> int:
    """SplitMix64 finaliser (Steele et al., 2014): a cheap, well-mixed 64-bit integer hash."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def _hash_seed(*values: int) -> int:
    """A 63-bit seed that depends on every value (non-negative, so any RNG accepts it)."""
    state = 0
    for value in values:
        state = _splitmix64(state ^ (value & _MASK64))
    return state >> 1


def sample_aug_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of sample `index` in `epoch` of a run seeded `seed`."""
    return _hash_seed(seed, epoch, index)


def epoch_order(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of sample indices that epoch `epoch` visits."""
    generator = torch.Generator().manual_seed(_hash_seed(seed, epoch))
    return torch.randperm(num_samples, generator=generator)


class PairDataset(Dataset):
    """(image, tokens) pairs from a source; `dataset[(index, aug_seed)]` -> (image [3,H,W], tokens [context], index).

    `source` exposes `__len__` and `get(i) -> (PIL image, caption, meta)` (WebDatasetIndex, CocoCaptions,
    JsonlPairs). A list of captions gets one picked per visit; a caption of None means the source stored
    token ids in `meta["tokens"]`, used as they are (cut keeping their last id, padded with pad_id).
    `tokenizer` is an alignlab tokenizer (called with `generator=` for the random sub-sequence);
    `transform` is `(image, rng: random.Random) -> tensor` from `build_image_transform`. A sample the source
    reports corrupt (CorruptSampleError) is substituted (module docstring) and its record appended to
    `skip_log` (an alignlab.data.skips.SkipLog, set by the trainer; None: only logged). `name` is what
    skip reports call the data (e.g. the shard spec).
    """

    def __init__(self, source, tokenizer, transform, name: str = "training data"):
        self.source = source
        self.tokenizer = tokenizer
        self.transform = transform
        self.name = name
        self.skip_log = None

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.__getitems__([item])[0]

    def __getitems__(self, items: list[tuple[int, int]]) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        """A whole batch (the DataLoader calls this when it exists): the raw samples come from the
        source's `get_many` when it has one (s3:// shards fetch them concurrently), then each pair is
        built from its own aug seed, a corrupt sample's row from its substitute."""
        indices = [index for index, _ in items]
        get_many = getattr(self.source, "get_many", None)
        loaded = get_many(indices, corrupt="return") if get_many else [self._load(i) for i in indices]
        batch = getattr(items, "batch_indices", None) or frozenset(indices)
        pairs = []
        for (index, aug_seed), raw in zip(items, loaded):
            if isinstance(raw, CorruptSampleError):
                index, raw = self._substitute(index, aug_seed, raw, batch)
            pairs.append(self._pair(index, aug_seed, *raw))
        return pairs

    def _load(self, index: int):
        try:
            return self.source.get(index)
        except CorruptSampleError as err:
            return err

    def _substitute(self, index: int, aug_seed: int, error: CorruptSampleError, batch: frozenset) -> tuple[int, tuple]:
        """(substitute index, its raw sample) for the corrupt sample `index`: the first of its draws outside
        the global `batch` that reads. Two substitutes of one batch may coincide (chance ~1/len(self));
        excluding the first pick would make the second depend on how ranks split the batch."""
        self._record(error)
        for attempt in range(1, MAX_SUBSTITUTES + 1):
            candidate = _hash_seed(aug_seed, index, attempt) % len(self)
            if candidate in batch:
                continue
            raw = self._load(candidate)
            if not isinstance(raw, CorruptSampleError):
                return candidate, raw
            self._record(raw)
        raise RuntimeError(f"sample {index} is corrupt ({error}) and none of its {MAX_SUBSTITUTES} substitute draws "
                           "outside its batch could be read: most of the training data is corrupt (skips.json names "
                           "the bad samples) or the dataset is hardly larger than the batch")

    def _record(self, error: CorruptSampleError) -> None:
        log.warning("corrupt training sample skipped (substituted): %s", error)
        if self.skip_log is not None:
            self.skip_log.append(error.record)

    def _pair(self, index: int, aug_seed: int, image, caption, meta) -> tuple[torch.Tensor, torch.Tensor, int]:
        rng = random.Random(aug_seed)
        # The image draws come first, so the crop does not depend on the caption's length or count.
        image_tensor = self.transform(image, rng)
        if caption is None:
            tokens = meta["tokens"]
            if max(tokens) >= self.tokenizer.vocab_size or min(tokens) < 0:
                raise ValueError(
                    f"sample {index}: stored token ids fall outside the tokenizer's vocabulary of "
                    f"{self.tokenizer.vocab_size}; tokenise with the same vocabulary or store the text"
                )
            packed = pack_token_ids([tokens], self.tokenizer.context_length, self.tokenizer.pad_id)
            return image_tensor, packed[0], index
        if isinstance(caption, (list, tuple)):
            caption = caption[rng.randrange(len(caption))]
        generator = None  # the tokenizer's random sub-sequence; a torch.Generator costs ~10 us, made when used
        if getattr(self.tokenizer, "random_subsequence", False):
            generator = torch.Generator().manual_seed(rng.getrandbits(63))
        return image_tensor, self.tokenizer([caption], generator=generator)[0], index


class RowBatch(list):
    """One rank's rows of a global batch, as (index, aug_seed), with `batch_indices`: the indices of the
    whole global batch (every rank's rows), so that substitutes avoid all of them. Travels to DataLoader
    workers as it is (a pickled list keeps its attributes)."""

    def __init__(self, rows, batch_indices: frozenset):
        super().__init__(rows)
        self.batch_indices = batch_indices


class ResumableBatchSampler(Sampler):
    """Batches of (index, aug_seed) for one rank; the order depends only on (seed, epoch).

    `batch_size` is the global batch; each rank gets the contiguous slice of batch_size // world_size
    rows at rank * (batch_size // world_size). `len()` is the number of global batches per epoch;
    after `set_start_batch(k)` iteration yields batches k .. len()-1 of the epoch (the state persists
    until changed, so build one loader per epoch or reset it to 0).
    """

    def __init__(
        self, num_samples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, drop_last: bool = True
    ):
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples} (is the training source empty?)")
        if batch_size <= 0 or world_size <= 0 or batch_size % world_size:
            raise ValueError(f"global batch_size {batch_size} must be a positive multiple of world_size {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        if drop_last and num_samples < batch_size:
            raise ValueError(
                f"drop_last with batch_size {batch_size} > {num_samples} samples leaves no batch; lower batch_size"
            )
        if not drop_last and world_size > 1:
            raise ValueError(
                "drop_last=False needs world_size=1: a partial last batch cannot be split evenly across ranks"
            )
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_start_batch(self, start_batch: int) -> None:
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch {start_batch} is outside 0..{len(self)} (batches per epoch)")
        self.start_batch = start_batch

    def __len__(self) -> int:
        full, partial = divmod(self.num_samples, self.batch_size)
        return full + (1 if partial and not self.drop_last else 0)

    def __iter__(self):
        order = epoch_order(self.num_samples, self.seed, self.epoch).tolist()
        rows = self.batch_size // self.world_size
        for batch in range(self.start_batch, len(self)):
            global_batch = order[batch * self.batch_size : (batch + 1) * self.batch_size]
            local = global_batch[self.rank * rows : (self.rank + 1) * rows]
            yield RowBatch([(index, sample_aug_seed(self.seed, self.epoch, index)) for index in local],
                           frozenset(global_batch))


def collate_pairs(samples: list[tuple[torch.Tensor, torch.Tensor, int]]) -> tuple[torch.Tensor, ...]:
    """Stack samples into (images [B,3,H,W], tokens [B,context], sample indices [B])."""
    images, tokens, indices = zip(*samples)
    return torch.stack(images), torch.stack(tokens), torch.tensor(indices, dtype=torch.long)


def loader_for_sampler(
    dataset: PairDataset, sampler: ResumableBatchSampler, num_workers: int = 0, pin_memory: bool = False,
    persistent_workers: bool = False,
) -> DataLoader:
    """DataLoader yielding (images, tokens, indices) batches in the order of `sampler`. The sampler is read in
    this process at each `iter()`, so with `persistent_workers` one loader serves every epoch: set the
    sampler's epoch and start batch, then iterate again."""
    return DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate_pairs, pin_memory=pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
    )


def build_train_loader(
    dataset: PairDataset,
    batch_size: int,
    seed: int,
    epoch: int = 0,
    start_batch: int = 0,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = True,
    pin_memory: bool = False,
) -> DataLoader:
    """DataLoader over one epoch (from `start_batch`) of this rank's slices of the global `batch_size`."""
    sampler = ResumableBatchSampler(len(dataset), batch_size, seed, rank, world_size, drop_last)
    sampler.set_epoch(epoch)
    sampler.set_start_batch(start_batch)
    return loader_for_sampler(dataset, sampler, num_workers, pin_memory)


def open_train_source(format: str, path_or_spec, image_root=None, manifest=None,
                      max_caption_bytes: int = DEFAULT_MAX_CAPTION_BYTES):
    """Training source by format: "webdataset" (shard dir/glob/brace pattern/list, local or s3://),
    "coco" (captions JSON, images under `image_root`) or "jsonl" (one split file); the last two read
    local files only. `manifest` and `max_caption_bytes` (webdataset only): a manifest.json to check the
    shards against, and the caption length past which a sample is skipped (see alignlab.data.shards)."""
    if format == "webdataset":
        return WebDatasetIndex(path_or_spec, manifest=manifest, max_caption_bytes=max_caption_bytes)
    remote = [str(p) for p in (path_or_spec if isinstance(path_or_spec, (list, tuple)) else [path_or_spec])
              if str(p).startswith("s3://")]
    if remote:
        raise ValueError(f"data.format={format!r} reads local files only, got {remote[0]}: use webdataset shards "
                         "to train from S3, or download the dataset first")
    if format == "coco":
        return CocoCaptions(path_or_spec, image_root=image_root)
    if format == "jsonl":
        return JsonlPairs(path_or_spec)
    raise ValueError(f"unknown training data format {format!r}; choose 'webdataset', 'coco' or 'jsonl'")
