"""Captions per second of the CAT semantic parser (docs/methods.md "CAT filtering") on one CPU core.

    .venv/bin/python benchmarks/parser_throughput.py [--num 5000] [--batch-size 256]

Pins the process to one core and one BLAS/OpenMP thread, then times `parse_captions` (spaCy tok2vec +
tagger + parser, then the rules) on web-like captions of 6-16 words. Also reports the spaCy part alone, so
the cost of the rules is visible. Captions per CPU-second is the figure to trust on a shared machine, where
wall-clock time includes waiting for the core. Target: >= 500 captions/s per core.
"""

from __future__ import annotations

import argparse
import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy/thinc load: one core means one thread

import random  # noqa: E402
import time  # noqa: E402

from alignlab.data.text.semantic_parser import load_spacy_model, parse_captions  # noqa: E402

SUBJECTS = ["a black cat", "two dogs", "a young woman in a red dress", "the man", "a small child", "three people",
            "a brown horse", "an old car", "a group of kids", "Obama", "a chef", "the striped mug"]
VERBS = ["is chasing", "playing with", "is eating", "riding", "holding", "sitting on", "is throwing", "looking at",
         "is", "with", "has", "next to"]
OBJECTS = ["a small brown bird", "a red ball", "an apple", "a wooden bench", "a frisbee", "the kitchen table",
           "a white coffee cup", "a birthday cake with candles", "the beach", "a large green tree"]
TAILS = ["", " in the park", " at sunset", " on a sunny day", " near the river", ", stock photo", " in New York"]


def make_captions(num: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}{rng.choice(TAILS)}"
            for _ in range(num)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="best of N timings (the machine may be shared)")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

    captions = make_captions(args.num)
    nlp = load_spacy_model()
    parse_captions(captions[:200], nlp, batch_size=args.batch_size)  # warm-up
    words = sum(len(c.split()) for c in captions) / len(captions)
    print(f"{len(captions)} captions, {words:.1f} words on average, pipes {nlp.pipe_names}, "
          f"batch_size {args.batch_size}, 1 core")
    for name, run in (("spaCy only", lambda: sum(1 for _ in nlp.pipe(captions, batch_size=args.batch_size))),
                      ("parse_captions", lambda: parse_captions(captions, nlp, batch_size=args.batch_size))):
        wall, cpu = float("inf"), float("inf")
        for _ in range(args.repeats):
            start, start_cpu = time.perf_counter(), time.process_time()
            run()
            wall = min(wall, time.perf_counter() - start)
            cpu = min(cpu, time.process_time() - start_cpu)
        print(f"{name:>15}: {len(captions) / wall:8.0f} captions/s wall, {len(captions) / cpu:8.0f} per CPU-second")


if __name__ == "__main__":
    main()
