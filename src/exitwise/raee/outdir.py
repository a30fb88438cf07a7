"""Where ``raee build`` writes a database: it replaces nothing that exitwise did not make.

A build writes into ``.NAME.building-PID-XXXX`` beside the target ``NAME`` and renames it into place
when complete. Replacing an existing database (``--overwrite``) moves it aside to
``.NAME.old-PID-XXXX`` first and removes it once the new one is in place. ``--overwrite`` replaces
only an exitwise RAEE database (``manifest.json`` of kind ``exitwise-raee-database``) that holds no
file its manifest does not list: a folder of user files, a plain file or a symbolic link is refused.

A build killed in between leaves those hidden siblings; the next build of the same target removes
them (those of a process that is still running are left to it), and if it was killed between the
two renames of a replacement, it puts the previous database back first.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import tempfile
import warnings
from pathlib import Path

from exitwise.artifacts import read_utf8
from exitwise.errors import DataError, OverwriteError
from exitwise.raee.predictor import TABLE_FILE

MANIFEST = "manifest.json"
KIND = "exitwise-raee-database"
# what a build writes at the top of a database; a leftover holding anything else is not ours to delete
ENTRIES = {MANIFEST, TABLE_FILE, "labels.npy", "layer_probs.npy", "readout", "store"}


def prepare(out: Path, overwrite: bool) -> None:
    """Clean up after interrupted builds of ``out``, then refuse a target that may not be written."""
    clean_leftovers(out)
    check_target(out, overwrite)


def check_target(out: Path, overwrite: bool) -> None:
    """Raise :class:`OverwriteError` unless ``out`` is free, or ``overwrite`` and a database we made."""
    parent = next((p for p in Path(out).absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise OverwriteError(f"cannot create {out}: {parent} is a file, not a directory")
    if not out.exists() and not out.is_symlink():
        return
    if not overwrite:
        raise OverwriteError(f"{out} already exists (pass --overwrite to replace an exitwise RAEE database)")
    why = not_replaceable(out)
    if why:
        raise OverwriteError(f"refusing to replace {out}: {why}; --overwrite replaces only an exitwise RAEE "
                             "database (move it away or choose another --out)")


def not_replaceable(out: Path) -> str | None:
    """Why ``out`` is not a database that a build may replace, or None if it is one."""
    if out.is_symlink():
        return "it is a symbolic link"
    if not out.is_dir():
        return "it is a file, not a database directory"
    manifest = _manifest(out)
    if manifest is None:
        return f"it has no readable {MANIFEST} of an exitwise RAEE database"
    listed = {Path(rel).as_posix() for rel in manifest.get("checksums") or {}} | {MANIFEST}
    foreign = [rel for rel in _files(out) if rel not in listed]
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        return f"it holds files that are not part of the database ({', '.join(foreign[:3])}{more})"
    return None


def _manifest(directory: Path) -> dict | None:
    try:
        manifest = json.loads(read_utf8(directory / MANIFEST))
    except (DataError, ValueError):
        return None
    ok = isinstance(manifest, dict) and manifest.get("kind") == KIND and isinstance(manifest.get("checksums"), dict)
    return manifest if ok else None


def _files(directory: Path) -> list[str]:
    """Every file and symbolic link under ``directory`` (not followed), relative, in posix form."""
    found = []
    for root, dirs, files in os.walk(directory):
        base = Path(root)
        found += [(base / d).relative_to(directory).as_posix() for d in dirs if (base / d).is_symlink()]
        found += [(base / f).relative_to(directory).as_posix() for f in files]
    return sorted(found)


# ----------------------------------------------------------------------------------- interrupted builds
def _leftover(out: Path) -> re.Pattern:
    # .NAME.building-PID-XXXX, .NAME.old-PID-XXXX; also .NAME.building-XXXXXXXX / .NAME.old-PID of
    # builds from before the PID was in both names
    return re.compile(rf"\.{re.escape(out.name)}\.(?P<what>building|old)-(?:(?P<pid>\d+)(?:-\w+)?|\w+)")


def _running(pid: str | None) -> bool:
    """Whether the process that made a leftover may still be writing it."""
    if pid is None:
        return False
    if int(pid) == os.getpid():
        return True  # another build in this very process (a thread): not ours to remove
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists, under another user
    return True


def _ours(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and all(p.name in ENTRIES for p in path.iterdir())


def clean_leftovers(out: Path) -> list[Path]:
    """Remove what interrupted builds of ``out`` left beside it; returns what was removed.

    If ``out`` is gone and a database moved aside is there, the build was killed between the two
    renames of a replacement: the previous database is put back instead of removed."""
    if not out.parent.is_dir():
        return []
    pattern = _leftover(out)
    stale = []
    for p in sorted(out.parent.iterdir()):
        m = pattern.fullmatch(p.name)
        if m is None or _running(m["pid"]):
            continue
        if not _ours(p):
            warnings.warn(f"left {p} alone: it is named like a leftover of an interrupted build of {out} but "
                          "holds files exitwise does not write", stacklevel=3)
            continue
        stale.append((m["what"], p))
    olds = sorted((p for what, p in stale if what == "old" and _manifest(p)), key=lambda p: p.stat().st_mtime)
    if olds and not out.exists() and not out.is_symlink():
        olds[-1].rename(out)
        warnings.warn(f"put the database {out} back from {olds[-1].name}: a build was interrupted while replacing "
                      "it", stacklevel=3)
    removed = [p for _, p in stale if p.exists()]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


# ------------------------------------------------------------------------------------------ writing
def building_dir(out: Path) -> Path:
    """A fresh hidden directory beside ``out`` to build into."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.building-{os.getpid()}-", dir=out.parent))


def install(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the complete database ``tmp`` to ``out``, replacing a database there if ``overwrite``."""
    check_target(out, overwrite)  # again: something may have appeared at ``out`` while the build ran
    if not out.exists():
        tmp.rename(out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if not out.exists():
            old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)
