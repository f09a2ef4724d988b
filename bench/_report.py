"""For the benchmarks: docs/benchmarks.md sections between markers, an in-memory keyring."""

from __future__ import annotations

from pathlib import Path

from keyring.backend import KeyringBackend

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"


def write_section(name: str, section: str, doc: Path = DOC) -> None:
    """Replace the text between `<!-- name:begin -->` and `<!-- name:end -->`, or append it."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    doc.parent.mkdir(exist_ok=True)
    text = doc.read_text() if doc.exists() else "# Benchmarks\n\n"
    block = f"{begin}\n{section}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)


class MemoryKeyring(KeyringBackend):
    """Keeps the benchmark's login token out of the machine's real keyring."""

    priority = 1  # type: ignore[assignment]

    def __init__(self) -> None:
        super().__init__()
        self.data: dict[tuple[str, str], str] = {}

    def get_password(self, service: str, username: str) -> str | None:
        return self.data.get((service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        self.data[service, username] = password

    def delete_password(self, service: str, username: str) -> None:
        self.data.pop((service, username), None)
