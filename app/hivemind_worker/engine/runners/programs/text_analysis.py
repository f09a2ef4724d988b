"""text_analysis: word and token counts, top terms, n-grams and per-document statistics.

Standard library only. Input: one text file or a folder of them (every file, sorted).
Writes summary.json, word_counts.csv, documents.csv and summary.txt under results/.
"""

from __future__ import annotations

import csv
import os
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "_hivemind"))
import hivemind_runner as hr

WORD_RE = re.compile(r"[^\W\d_]+(?:['\u2019][^\W\d_]+)*")
SENTENCE_END_RE = re.compile(r"[.!?]+(?:\s|$)")


def documents(root: Path, relative: str) -> list[tuple[str, Path]]:
    if root.is_file():
        return [(relative, root)]
    found = sorted(p for p in root.rglob("*") if p.is_file())
    if not found:
        raise hr.RunnerError(f"{relative}: the folder holds no files")
    return [(f"{relative}/{p.relative_to(root).as_posix()}", p) for p in found]


def read_text(name: str, path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line, column = hr.decode_error_line(data, exc.start)
        raise hr.RunnerError(
            f"{name} line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at column "
            f"{column}); save the file as UTF-8"
        ) from None


def main(p: dict[str, Any]) -> None:
    opts = p["options"]
    keep_case = bool(opts["keep_case"])
    stop = {w if keep_case else w.lower() for w in opts["stop_words"]}
    min_len = int(opts["min_word_length"])
    top_n = int(opts["top_terms"])
    sizes = [int(n) for n in opts["ngrams"]]
    docs = documents(hr.input_path(p["input_path"]), p["input_path"])
    words: Counter[str] = Counter()
    ngrams: dict[int, Counter[str]] = {n: Counter() for n in sizes}
    per_doc: list[dict[str, Any]] = []
    for index, (name, path) in enumerate(docs, start=1):
        text = read_text(name, path)
        tokens = WORD_RE.findall(text if keep_case else text.lower())
        words.update(tokens)
        for n in sizes:
            for i in range(len(tokens) - n + 1):
                gram = tokens[i : i + n]
                if not any(t in stop for t in gram):
                    ngrams[n][" ".join(gram)] += 1
        per_doc.append(
            {
                "document": name,
                "characters": len(text),
                "lines": text.count("\n") + (1 if text and not text.endswith("\n") else 0),
                "words": len(tokens),
                "distinct_words": len(set(tokens)),
                "sentences": len(SENTENCE_END_RE.findall(text)),
                "mean_word_length": round(sum(map(len, tokens)) / len(tokens), 3)
                if tokens
                else 0.0,
            }
        )
        hr.progress(index, len(docs), "document")
    terms = Counter({w: c for w, c in words.items() if w not in stop and len(w) >= min_len})
    summary = {
        "documents": len(docs),
        "words": sum(words.values()),
        "distinct_words": len(words),
        "characters": sum(d["characters"] for d in per_doc),
        "sentences": sum(d["sentences"] for d in per_doc),
        "top_terms": [[w, c] for w, c in _top(terms, top_n)],
        "ngrams": {str(n): [[g, c] for g, c in _top(ngrams[n], top_n)] for n in sizes},
        "per_document": per_doc,
    }
    hr.write_json("summary.json", summary)
    with open(hr.results_dir() / "word_counts.csv", "w", newline="", encoding="utf-8") as fh:
        out = csv.writer(fh)
        out.writerow(["word", "count"])
        out.writerows(_top(words, len(words)))
    with open(hr.results_dir() / "documents.csv", "w", newline="", encoding="utf-8") as fh:
        dict_out = csv.DictWriter(fh, fieldnames=list(per_doc[0]))
        dict_out.writeheader()
        dict_out.writerows(per_doc)
    top = ", ".join(f"{w} {c}" for w, c in _top(terms, 5))
    hr.write_text(
        "summary.txt",
        f"{summary['words']} words ({summary['distinct_words']} distinct) in "
        f"{len(docs)} document(s); most common: {top}\n",
    )


def _top(counts: Counter[str], n: int) -> list[tuple[str, int]]:
    # Ties in alphabetical order, so the same text always gives the same list.
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:n]


if __name__ == "__main__":
    hr.run(main)
