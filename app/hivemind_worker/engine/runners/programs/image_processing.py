"""image_processing: resize, thumbnail, format, grayscale, rotate and filters over images.

Input: one image, or a folder whose image files (by extension) are each processed. Writes
the images under results/images/ (same relative names, new extension), manifest.json and
summary.txt. A file Pillow cannot read fails the task naming it; the others are still
written. Needs Pillow.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "_hivemind"))
import hivemind_runner as hr
from PIL import Image, ImageFilter, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp"}
SUFFIX = {"png": ".png", "jpeg": ".jpg", "webp": ".webp", "gif": ".gif", "bmp": ".bmp",
          "tiff": ".tif"}  # fmt: skip
FILTERS = {
    "blur": ImageFilter.BLUR,
    "sharpen": ImageFilter.SHARPEN,
    "smooth": ImageFilter.SMOOTH,
    "edge-enhance": ImageFilter.EDGE_ENHANCE,
    "contour": ImageFilter.CONTOUR,
    "detail": ImageFilter.DETAIL,
    "emboss": ImageFilter.EMBOSS,
    "find-edges": ImageFilter.FIND_EDGES,
}
# A decompression bomb is refused by Pillow above this many pixels (about 16k x 16k).
Image.MAX_IMAGE_PIXELS = 16384 * 16384


def sources(root: Path, relative: str) -> list[tuple[str, Path]]:
    if root.is_file():
        return [(relative, root)]
    found = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise hr.RunnerError(f"{relative}: the folder holds no image files")
    return [(f"{relative}/{p.relative_to(root).as_posix()}", p) for p in found]


def process(image: Image.Image, o: dict[str, Any], fmt: str) -> Image.Image:
    image.load()
    if o["grayscale"]:
        image = image.convert("LA" if "A" in image.getbands() else "L")
    for name in o["filters"]:
        if image.mode not in ("L", "RGB"):  # most filters need a plain mode
            image = image.convert("RGB" if image.mode not in ("L", "LA") else "L")
        image = image.filter(FILTERS[name])
    if o["rotate"]:
        image = image.rotate(o["rotate"], expand=True)
    if o["width"]:
        size = (int(o["width"]), int(o["height"]))
        if o["thumbnail"]:
            image = image.copy()
            image.thumbnail(size)
        else:
            image = image.resize(size)
    if fmt == "jpeg" and image.mode not in ("L", "RGB"):
        image = image.convert("L" if image.mode in ("L", "LA") else "RGB")
    return image


def main(p: dict[str, Any]) -> None:
    o = p["options"]
    files = sources(hr.input_path(p["input_path"]), p["input_path"])
    out_root = hr.results_dir() / "images"
    manifest: list[dict[str, Any]] = []
    bad: list[str] = []
    for index, (name, path) in enumerate(files, start=1):
        try:
            with Image.open(path) as original:
                source_format = (original.format or "").lower()
                fmt = o["format"] or source_format or "png"
                source_size = original.size
                result = process(original, o, fmt)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError,
                Image.DecompressionBombError) as exc:  # fmt: skip
            bad.append(f"{name}: not an image Pillow can read ({exc})")
            continue
        relative = (
            Path(name).relative_to(p["input_path"])
            if name != p["input_path"]
            else Path(Path(name).name)
        )
        target = out_root / relative.with_suffix(SUFFIX.get(fmt, relative.suffix))
        target.parent.mkdir(parents=True, exist_ok=True)
        save: dict[str, Any] = {}
        if o["quality"] and fmt in ("jpeg", "webp"):
            save["quality"] = int(o["quality"])
        result.save(target, format=fmt.upper(), **save)
        manifest.append(
            {
                "source": name,
                "source_format": source_format,
                "source_size": list(source_size),
                "output": target.relative_to(hr.results_dir()).as_posix(),
                "format": fmt,
                "size": list(result.size),
                "mode": result.mode,
                "bytes": target.stat().st_size,
            }
        )
        hr.progress(index, len(files), "image")
    hr.write_json("manifest.json", {"images": manifest, "failed": bad})
    hr.write_text("summary.txt", f"{len(manifest)} of {len(files)} image(s) processed\n")
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise hr.RunnerError(bad[0] + more)


if __name__ == "__main__":
    hr.run(main)
