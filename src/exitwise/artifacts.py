"""What every saved artefact (RAEE database, exit classifier, heads) shares: a JSON manifest with a
format number and the fingerprint of the model it was made for, sha256 checksums of its files, and
readers that turn any malformed file into one :class:`~exitwise.errors.DataError` naming the file
and what is wrong (the CLI prints it as one line)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import warnings
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from exitwise.errors import DataError, IncompatibleError

# Keys that must match for an artefact to be usable with a model; the name alone may differ (the
# same weights can be loaded from a bundled name, a directory or a .gguf path).
STRUCTURE = ("model_type", "num_layers", "hidden_size", "vocab_size")
SHA256 = re.compile(r"[0-9a-f]{64}")
# What reading a malformed file raises (numpy: ValueError/EOFError/BadZipFile/KeyError, faiss:
# RuntimeError, safetensors: SafetensorError, the OS: OSError); turned into a DataError by ``reading``.
READ_ERRORS = (OSError, ValueError, KeyError, EOFError, RuntimeError, zipfile.BadZipFile)


def model_fingerprint(backbone) -> dict:
    """What an artefact records of the model it was made with; the weight dtype is provenance only (an
    artefact made at one dtype loads at another)."""
    return {"name": backbone.name, "model_type": backbone.config.model_type, "num_layers": backbone.num_layers,
            "hidden_size": backbone.hidden_size, "vocab_size": backbone.vocab_size,
            "weight_dtype": getattr(backbone, "weight_dtype", "float32")}


def structure_id(fingerprint: dict) -> str:
    """Short hash of a fingerprint's structural keys: tells apart two models whose names print alike."""
    text = json.dumps([fingerprint.get(k) for k in STRUCTURE])
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def check_model(stored: dict, backbone, what: str) -> None:
    """Refuse ``backbone`` if it is not structurally the model ``stored`` describes; warn on a new name."""
    have = model_fingerprint(backbone)
    diffs = [f"{k}: {stored.get(k)!r} vs {have[k]!r}" for k in STRUCTURE if stored.get(k) != have[k]]
    if diffs:
        # the names alone can be identical ('gemma3-270m' twice for two variants): the fingerprints are not
        made = f"{stored.get('name')!r} (fingerprint {structure_id(stored)})"
        raise IncompatibleError(f"{what} was made for model {made}, not {have['name']!r} (fingerprint "
                                f"{structure_id(have)}): {'; '.join(diffs)}")
    if stored.get("name") != have["name"]:
        warnings.warn(f"{what} was made for model {stored.get('name')!r}; using it with {have['name']!r}, "
                      "which has the same shape", stacklevel=2)


# --------------------------------------------------------------------------------------- reading text
def decode_utf8(data: bytes, where: str, error: type[DataError] = DataError) -> str:
    """``data`` as UTF-8; a bad byte is an ``error`` naming ``where`` (a file) with line and column."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        start = data.rfind(b"\n", 0, exc.start) + 1
        line, column = data.count(b"\n", 0, exc.start) + 1, len(data[start:exc.start].decode("utf-8")) + 1
        raise error(f"{where}:{line}: not valid UTF-8 (byte 0x{data[exc.start]:02x} at column {column})") from None


ESCAPED = re.compile("[\udc80-\udcff]")  # what errors="surrogateescape" turns undecodable bytes into


def check_line_utf8(line: str, where: str, error: type[DataError] = DataError) -> str:
    """A line read with ``errors="surrogateescape"``, refused if it held bytes that are not UTF-8."""
    m = ESCAPED.search(line)
    if m is not None:
        raise error(f"{where}: not valid UTF-8 (byte 0x{ord(m.group()) - 0xDC00:02x} at column {m.start() + 1})")
    return line


def read_utf8(path: Path) -> str:
    """The text of ``path``; invalid UTF-8 is a DataError naming the file and line."""
    with reading(path, "file"):
        data = Path(path).read_bytes()
    return decode_utf8(data, str(path))


def read_manifest(path: Path, fmt: int | str, what: str) -> dict:
    """Parse a JSON manifest and check its format number, with errors naming the file."""
    if not path.is_file():
        raise DataError(f"{path} not found: not a complete {what}")
    try:
        manifest = json.loads(read_utf8(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise DataError(f"{path}: unsupported {what} format {got!r} (expected {fmt!r})")
    return manifest


def one_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's message on one line (faiss and numpy messages can span several), cut to ``limit``."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def reading(path: Path, what: str) -> Iterator[None]:
    """Turn whatever a library raises on a malformed ``path`` into a DataError naming it."""
    try:
        yield
    except DataError:
        raise
    except READ_ERRORS as exc:
        raise DataError(f"{path}: unreadable {what} ({type(exc).__name__}: {one_line(exc)})") from None


# ---------------------------------------------------------------------------------- manifest fields
def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def get_field(manifest: dict, dotted: str, kind: type | tuple[type, ...], where: Path) -> Any:
    """``manifest[a][b]`` for ``dotted = "a.b"``, checked to be of ``kind`` (bool is no int here)."""
    node: Any = manifest
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise DataError(f"{where}: missing field {dotted!r}")
        node = node[part]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if (isinstance(node, bool) and bool not in kinds) or not isinstance(node, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise DataError(f"{where}: field {dotted!r} must be {names}, got {_short(node)}")
    return node


def get_layers(manifest: dict, dotted: str, where: Path, lo: int, hi: int) -> list[int]:
    """A non-empty list of distinct integer layers in ``lo..hi`` (ascending order not required)."""
    layers = get_field(manifest, dotted, list, where)
    if not layers or any(isinstance(x, bool) or not isinstance(x, int) for x in layers):
        raise DataError(f"{where}: field {dotted!r} must be a non-empty list of integers, got {_short(layers)}")
    if len(set(layers)) != len(layers) or not all(lo <= x <= hi for x in layers):
        raise DataError(f"{where}: field {dotted!r} must hold distinct layers in {lo}..{hi}, got {_short(layers)}")
    return layers


FINGERPRINT = (("name", str), ("model_type", str), ("num_layers", int), ("hidden_size", int), ("vocab_size", int))


def check_fingerprint(manifest: dict, where: Path, prefix: str = "") -> dict:
    """The model fingerprint at ``prefix`` (``""``: the manifest's top level, ``"model"``: its ``model``
    object), checked field by field; returns it."""
    fp = get_field(manifest, prefix, dict, where) if prefix else manifest
    for key, kind in FINGERPRINT:
        dotted = f"{prefix}.{key}" if prefix else key
        value = get_field(manifest, dotted, kind, where)
        if kind is int and value < 1:
            raise DataError(f"{where}: field {dotted!r} must be >= 1, got {value}")
    return fp


# ------------------------------------------------------------------------------------------ checksums
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def inside(directory: Path, rel: str, where: Path) -> Path:
    """``directory / rel``, refused unless it resolves inside ``directory`` (no ``..``, absolute path or
    symbolic link out): a manifest must never make exitwise read, or vouch for, a file elsewhere."""
    root = Path(directory).resolve()
    target = (root / rel).resolve()
    if Path(rel).is_absolute() or not target.is_relative_to(root) or target == root:
        raise DataError(f"{where}: checksum entry {rel!r} points outside {directory}")
    return target


def check_digest(path: Path, digest: object, where: Path, name: str) -> None:
    """``path`` exists and its sha256 is ``digest`` (the manifest ``where``'s entry ``name``)."""
    if not isinstance(digest, str) or not SHA256.fullmatch(digest):
        raise DataError(f"{where}: checksum of {name} must be 64 lowercase hex digits, got {_short(digest)}")
    if not path.is_file():
        raise DataError(f"{where}: incomplete, {name} is missing ({path})")
    if sha256_file(path) != digest:
        raise DataError(f"{where}: checksum of {name} does not match the file ({path} is corrupt or was replaced)")


# ------------------------------------------------------------------------------------- tensor files
def temp_sibling(path: Path) -> Path:
    """A fresh hidden name next to ``path`` to write into before an atomic ``os.replace``."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def save_tensors(tensors: dict, path: Path) -> str:
    """Write a safetensors file atomically (a reader never sees half of it); returns its sha256."""
    from safetensors.torch import save_file

    tmp = temp_sibling(path)
    try:
        save_file(tensors, str(tmp))
        digest = sha256_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return digest


def write_lines(lines: Iterable[str], path: Path) -> int:
    """Write ``lines`` (newline added) to ``path`` as they come, atomically: a reader, or a run that fails
    midway, never leaves half a file there. Returns the number of lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    n = 0
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for line in lines:
                f.write(line + "\n")
                n += 1
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return n


def write_json(obj: dict, path: Path) -> None:
    """Write a JSON manifest atomically."""
    tmp = temp_sibling(path)
    try:
        tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_tensors(path: Path, what: str) -> dict:
    """All tensors of a safetensors file; truncated, empty or garbled files and NaN/Inf weights are
    DataErrors naming the file (and the tensor)."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise DataError(f"{path}: not a readable {what} safetensors file ({one_line(exc)})") from None
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise DataError(f"{path}: tensor {name!r} has dtype {t.dtype}, expected floating point")
        if not bool(torch.isfinite(t).all()):
            raise DataError(f"{path}: tensor {name!r} contains NaN or Inf")
    return tensors


def check_tensors(path: Path, tensors: dict, shapes: dict[str, tuple], optional: dict[str, tuple] | None = None
                  ) -> None:
    """Exactly the tensors ``shapes`` (plus any of ``optional``) with those shapes, else a DataError."""
    optional = optional or {}
    missing = [n for n in shapes if n not in tensors]
    if missing:
        raise DataError(f"{path}: missing tensor(s) {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    extra = sorted(set(tensors) - set(shapes) - set(optional))
    if extra:
        raise DataError(f"{path}: unexpected tensor(s) {', '.join(extra[:4])}{' ...' if len(extra) > 4 else ''}")
    for name, t in tensors.items():
        want = tuple(shapes.get(name, optional.get(name)))
        if tuple(t.shape) != want:
            raise DataError(f"{path}: tensor {name!r} has shape {tuple(t.shape)}, expected {want}")
