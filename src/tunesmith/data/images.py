"""Images in records: read in the formats people have, carried as content parts, checked.

A message whose content holds an image becomes a list of parts (the chat-template and
processor convention of transformers); a message of text alone keeps its string, so every
text-only path is unchanged:

    {"role": "user", "content": [{"type": "image", "image": "/abs/path/1.jpg"},
                                 {"type": "text", "text": "Who are they?"}]}

Read from:
- OpenAI content parts: ``{"type": "image_url", "image_url": {"url": ...}}`` (or the URL as a
  string), ``{"type": "image", "image": ...}`` (also ``"url"`` / ``"path"``), ``{"type": "text",
  "text": ...}``, plain strings;
- LLaMA-Factory: ``<image>`` placeholders in the text with a parallel ``images`` list (each
  placeholder takes the next image; with no placeholder at all the images go before the first
  user turn's text, as LLaMA-Factory does), preference pairs too;
- LLaVA: an ``image`` path beside ``conversations``.

A reference is a path (relative to the data file's folder, or absolute; ``file://`` too) or a
``data:image/...;base64,`` URI; nothing is fetched from the network: an ``http(s)://`` image is
refused in one sentence. ``data check`` opens every image (``check``): a missing or
undecodable file, an absurd size — each at ``file:line:field`` with the fix.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from pathlib import Path
from typing import Any

PLACEHOLDER = "<image>"
MAX_SIDE = 16384          # pixels: larger is a scan or a mistake, not a training picture
MAX_BYTES = 64 << 20      # one image file
_DATA_URI = re.compile(r"data:image/[\w.+-]+;base64,", re.I)


def is_image(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") == "image"


def has_images(rec: dict) -> bool:
    """The record holds an image part in any of its messages."""
    return any(isinstance(m.get("content"), list) and any(map(is_image, m["content"]))
               for key in ("messages", "prompt", "chosen", "rejected", "completion")
               for m in rec.get(key) or () if isinstance(rec.get(key), list) and isinstance(m, dict))


def images_of(rec: dict) -> list[tuple[str, str]]:
    """(field, reference) of every image part, in order."""
    out = []
    for key in ("messages", "prompt", "chosen", "rejected", "completion"):
        for i, m in enumerate(rec.get(key) or () if isinstance(rec.get(key), list) else ()):
            for j, p in enumerate(m.get("content") if isinstance(m.get("content"), list) else ()):
                if is_image(p):
                    out.append((f"{key}.{i}.content.{j}", p["image"]))
    return out


def text_of(content: Any) -> str:
    """A message's text: its string, or its text parts joined (images left out)."""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return content if isinstance(content, str) else ""


def resolve(ctx, value: Any, field: str) -> str | None:
    """An image reference as tunesmith keeps it: an absolute path or a data: URI."""
    if not isinstance(value, str) or not value.strip():
        ctx.err(field, f"the image is {type(value).__name__ if value is not None else 'null'}; give a file path "
                "(relative to the data file) or a data:image/...;base64, URI", "image")
        return None
    value = value.strip()
    low = value.lower()
    if low.startswith(("http://", "https://")):
        ctx.err(field, f"image {value[:80]} is a web address; tunesmith fetches nothing from the network — "
                "download it and give its path", "image")
        return None
    if low.startswith("data:"):
        if not _DATA_URI.match(value):
            ctx.err(field, "a data: image must be data:image/<type>;base64,<data>", "image")
            return None
        return "data:" + value[5:]
    if low.startswith("file://"):
        value = value[7:]
    path = Path(value).expanduser()
    if not path.is_absolute():  # beside the data file as the user sees it (a symlinked file: its link's folder)
        path = Path(ctx.file).absolute().parent / path
    return str(path)


def content_parts(ctx, value: list, field: str) -> list[dict] | str | None:
    """An OpenAI/transformers content list → canonical parts (a string when it is all text)."""
    parts: list[dict] = []
    for j, p in enumerate(value):
        at = f"{field}.{j}"
        kind = p.get("type") if isinstance(p, dict) else None
        if isinstance(p, str) or kind == "text":
            text = p if isinstance(p, str) else p.get("text")
            if not isinstance(text, str):
                ctx.err(at, "a text part needs a text string", "type")
                return None
            parts.append({"type": "text", "text": text})
        elif kind in ("image_url", "image", "input_image"):
            ref = p.get("image_url", p.get("image", p.get("url", p.get("path"))))
            if isinstance(ref, dict):
                ref = ref.get("url")
            ref = resolve(ctx, ref, at)
            if ref is None:
                return None
            parts.append({"type": "image", "image": ref})
        else:
            ctx.err(at, f"content part of type {kind!r}; tunesmith reads text and image parts "
                    "({type: text, text}, {type: image_url, image_url: {url}}, {type: image, image})", "type")
            return None
    if not any(map(is_image, parts)):
        return "".join(p["text"] for p in parts)
    return parts


def _split(text: str, images: list[str]) -> list[dict]:
    """A text with ``<image>`` placeholders as parts, each placeholder the next image."""
    out: list[dict] = []
    pieces = text.split(PLACEHOLDER)
    for k, piece in enumerate(pieces):
        if k:
            out.append({"type": "image", "image": images.pop(0)})
        if piece:
            out.append({"type": "text", "text": piece})
    return out


def attach(ctx, rec: dict, raw: dict) -> set[str]:
    """Give a record's ``<image>`` placeholders the images of its ``images`` (LLaMA-Factory) or
    ``image`` (LLaVA) column; → the columns it used. An empty value (null, "", []) is no image,
    and a record without a conversation keeps the column in ``meta``."""
    from tunesmith.data.messages import _describe, _maybe_json

    key = "images" if "images" in raw else "image" if "image" in raw else None
    if key is None or not any(isinstance(rec.get(k), list) for k in ("messages", "prompt")):
        return set()
    value = _maybe_json(raw[key])  # a CSV cell holds the list as JSON
    if value is None or value == "" or value == []:
        return set()
    refs = [value] if isinstance(value, str) else value if isinstance(value, list) else None
    if refs is None:
        ctx.err(key, f"{key} is {_describe(value)}; give a list of image paths (one per {PLACEHOLDER})", "image")
        return {key}
    resolved = [resolve(ctx, r, f"{key}.{i}" if key == "images" else key) for i, r in enumerate(refs)]
    if any(r is None for r in resolved):
        return {key}
    msgs = [m for k in ("messages", "prompt", "chosen", "rejected", "completion") for m in rec.get(k) or ()
            if isinstance(rec.get(k), list)]
    # user turns of the prompt (chosen and rejected answer the same picture); images go nowhere else
    lists = [rec[k] for k in ("messages", "prompt") if isinstance(rec.get(k), list)]
    counted = [m for ms in lists for m in ms if isinstance(m.get("content"), str) and m.get("role") == "user"]
    n = sum(m["content"].count(PLACEHOLDER) for m in counted)
    if n == 0 and resolved:
        first = next((m for m in counted if m["role"] == "user"), None)
        if first is None:
            ctx.err(key, f"{len(resolved)} image(s) but no user turn to put them in", "image")
            return {key}
        first["content"] = PLACEHOLDER * len(resolved) + first["content"]
        n = len(resolved)
    if n != len(resolved):
        ctx.err(key, f"{n} {PLACEHOLDER} placeholder(s) in the text but {len(resolved)} image(s) in {key}; give "
                f"one image per placeholder", "image")
        return {key}
    pool = list(resolved)
    for m in counted:
        if PLACEHOLDER in m["content"]:
            m["content"] = _split(m["content"], pool)
    for m in msgs:  # placeholders in answers would be images the model is trained to produce
        if not any(m is c for c in counted) and isinstance(m.get("content"), str) and PLACEHOLDER in m["content"]:
            ctx.err(key, f"a {m.get('role')} turn holds {PLACEHOLDER}; images go in user turns", "image")
            break
    return {key}


def open_image(ref: str) -> tuple[int, int, str]:
    """(width, height, format) of an image that decodes; raises ValueError with the reason."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    name = "the data: image" if ref.startswith("data:") else ref
    if ref.startswith("data:"):
        try:
            data = base64.b64decode(ref[ref.index(",") + 1:], validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("the data: image's base64 does not decode; encode the file again (base64, no "
                             "line breaks)") from None
        if len(data) > MAX_BYTES:
            raise ValueError(f"the data: image is {len(data) >> 20} MiB; resize it under {MAX_BYTES >> 20} MiB")
        source: Any = io.BytesIO(data)
    else:
        path = Path(ref)
        if not path.is_file():
            raise ValueError(f"{ref} does not exist; check the path (relative to the data file's folder)")
        if path.stat().st_size > MAX_BYTES:
            raise ValueError(f"{ref} is {path.stat().st_size >> 20} MiB; an image over {MAX_BYTES >> 20} MiB is not "
                             f"a training picture — resize it")
        source = path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is judged below
            with Image.open(source) as im:
                w, h, fmt = im.width, im.height, im.format or "?"
                if max(w, h) > MAX_SIDE or min(w, h) < 2:  # before decoding: a huge one never loads
                    raise ValueError(f"{name} is {w}x{h} pixels; give pictures between 2 and {MAX_SIDE} pixels "
                                     f"a side")
                im.load()  # every pixel: a truncated JPEG fails here (verify() does not read JPEG data)
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"{name} is not an image Pillow can decode ({e}); re-save it as PNG or JPEG") from None
    return w, h, fmt
