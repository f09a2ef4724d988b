"""Sample tasks for the demo: small, real computations whose results a person can check."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

from hivemind_worker.protocol import nodepool_pb2 as pb
from hivemind_worker.task_params import param_value

_PRIMES = """
    import sys
    n = int(sys.argv[1])
    sieve = bytearray([1]) * (n + 1)
    sieve[0:2] = b"\\x00\\x00"
    for i in range(2, int(n ** 0.5) + 1):
        if sieve[i]:
            sieve[i * i :: i] = bytes(len(range(i * i, n + 1, i)))
    primes = [i for i, p in enumerate(sieve) if p]
    with open("results/primes.txt", "w") as fh:
        fh.write("\\n".join(map(str, primes)) + "\\n")
    with open("results/summary.txt", "w") as fh:
        fh.write(f"{len(primes)} primes up to {n}; the largest is {primes[-1]}\\n")
"""

_WORDCOUNT = """
    import collections, json, re
    text = open("input/text.txt", encoding="utf-8").read().lower()
    words = re.findall(r"[a-z']+", text)
    counts = collections.Counter(words)
    with open("results/wordcount.json", "w") as fh:
        json.dump(dict(counts.most_common()), fh, indent=1)
    top = ", ".join(f"{w} {c}" for w, c in counts.most_common(5))
    with open("results/summary.txt", "w") as fh:
        fh.write(f"{len(words)} words, {len(counts)} distinct; most common: {top}\\n")
"""

_CHECKSUM = """
    import hashlib, sys
    megabytes = int(sys.argv[1])
    block = hashlib.sha256(b"hivemind").digest() * 32768  # 1 MiB of repeating data
    digest = hashlib.sha256()
    for i in range(megabytes):
        digest.update(i.to_bytes(8, "little") + block)
    with open("results/summary.txt", "w") as fh:
        fh.write(f"sha256 of {megabytes} MiB of generated data: {digest.hexdigest()}\\n")
"""

_PI = """
    import random, sys
    samples = int(sys.argv[1])
    rng = random.Random(42)
    inside = sum(1 for _ in range(samples) if rng.random() ** 2 + rng.random() ** 2 <= 1.0)
    with open("results/summary.txt", "w") as fh:
        fh.write(f"pi is about {4 * inside / samples:.5f} ({samples} samples, seed 42)\\n")
"""

_COLLATZ = """
    import sys
    limit = int(sys.argv[1])
    best, best_len = 1, 1
    cache = {1: 1}
    for start in range(2, limit):
        n, steps = start, 0
        while n not in cache:
            n = n // 2 if n % 2 == 0 else 3 * n + 1
            steps += 1
        length = steps + cache[n]
        cache[start] = length
        if length > best_len:
            best, best_len = start, length
    with open("results/summary.txt", "w") as fh:
        fh.write(f"longest Collatz chain below {limit} starts at {best} ({best_len} terms)\\n")
"""

_MANDELBROT = """
    rows = []
    for y in range(24):
        row = ""
        for x in range(64):
            c = complex(-2.2 + x * 3.0 / 64, -1.2 + y * 2.4 / 24)
            z, n = 0j, 0
            while abs(z) <= 2 and n < 200:
                z, n = z * z + c, n + 1
            row += " .:-=+*#%@"[min(n // 20, 9)]
        rows.append(row)
    with open("results/mandelbrot.txt", "w") as fh:
        fh.write("\\n".join(rows) + "\\n")
    inside = sum(r.count("@") for r in rows)
    with open("results/summary.txt", "w") as fh:
        fh.write(f"Mandelbrot set drawn in 64x24 characters, {inside} inside the set\\n")
"""

_TEXT = (
    "The quick brown fox jumps over the lazy dog. A volunteer's spare cycles "
    "become science: every idle core counts, and the dog does not mind. "
) * 200


@dataclass(frozen=True)
class Sample:
    name: str
    spec: pb.TaskSpec
    needs: str = ""  # the capability beyond an executor's (ml and data samples)


def _python(name: str, source: str, *argv: str, **fields: object) -> Sample:
    spec = pb.TaskSpec(
        kind=pb.TASK_KIND_PYTHON,
        name=name,
        source=textwrap.dedent(source).lstrip(),
        argv=list(argv),
        resources=pb.Resources(cpus=1, memory_bytes=256 << 20, disk_bytes=64 << 20),
        timeout_seconds=300,
        **fields,  # type: ignore[arg-type]
    )
    return Sample(name, spec)


def demo_tasks(count: int = 6) -> list[Sample]:
    """`count` sample tasks, cycling through the six kinds with growing sizes."""
    kinds = [
        lambda k: _python(f"primes up to {200_000 * k:,}", _PRIMES, str(200_000 * k)),
        lambda k: _python(
            "word count of a text",
            _WORDCOUNT,
            input_files=[pb.InputFile(path="input/text.txt", content=_TEXT.encode() * k)],
        ),
        lambda k: _python(f"checksum of {32 * k} MiB", _CHECKSUM, str(32 * k)),
        lambda k: _python("estimate pi", _PI, str(300_000 * k)),
        lambda k: _python(f"Collatz below {100_000 * k:,}", _COLLATZ, str(100_000 * k)),
        lambda k: _python("draw the Mandelbrot set", _MANDELBROT),
    ]
    return [kinds[i % len(kinds)](1 + i // len(kinds)) for i in range(count)]


def _sales_csv(rows: int = 2000) -> bytes:
    """A made-up sales table (region, product, units, price) with a few gaps, reproducible."""
    regions, products = ("north", "south", "east", "west"), ("apple", "pear", "plum")
    lines = ["region,product,units,price"]
    for i in range(rows):
        units = "" if i % 97 == 0 else str((i * 37) % 50 + 1)
        price = f"{1 + ((i * 13) % 300) / 100:.2f}"
        lines.append(f"{regions[i % 4]},{products[(i // 4) % 3]},{units},{price}")
    return ("\n".join(lines) + "\n").encode()


RUNNER_RESOURCES = pb.Resources(cpus=1, memory_bytes=1536 << 20, disk_bytes=256 << 20)


def runner_samples() -> list[Sample]:
    """The ml and data samples: a random forest on iris, and a CSV summarised by region. They
    run the worker's own runners, so each needs its capability (and its environment, built
    on first use)."""
    forest = pb.MlParams(
        framework="scikit-learn", model="random-forest-classifier", dataset="iris",
        validation_split=0.3, seed=7,
    )  # fmt: skip
    forest.hyperparameters["n_estimators"].CopyFrom(param_value(100))
    sales = pb.DataParams(
        processing="csv_analysis",
        input_path="sales.csv",
        csv=pb.CsvAnalysis(group_by=["region"], aggregations=["sum", "mean", "count"]),
    )
    return [
        Sample(
            "random forest on iris (scikit-learn)",
            pb.TaskSpec(
                kind=pb.TASK_KIND_ML,
                name="random forest on iris",
                ml=forest,
                resources=RUNNER_RESOURCES,
                timeout_seconds=600,
            ),
            needs="ml:scikit-learn",
        ),
        Sample(
            "sales by region (csv analysis)",
            pb.TaskSpec(
                kind=pb.TASK_KIND_DATA,
                name="sales by region",
                data=sales,
                input_files=[pb.InputFile(path="sales.csv", content=_sales_csv())],
                resources=RUNNER_RESOURCES,
                timeout_seconds=600,
            ),
            needs="data",
        ),
    ]
