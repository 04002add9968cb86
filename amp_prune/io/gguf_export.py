"""Write a (pruned) model as a GGUF file that llama.cpp and Ollama run, with the ``gguf`` package's writer.

Our widths are uniform and our configs stock, so every pruned shape is plain llama.cpp metadata:
``{arch}.attention.head_count`` / ``head_count_kv``, ``key_length`` / ``value_length`` (the head
size, written explicitly: after heads-mode pruning ``heads x head_dim`` differs from the hidden
size), ``feed_forward_length`` and ``block_count``. Families: the Llama layout (llama, mistral:
arch ``llama``; qwen2, qwen3: their own arch) and Gemma 3 (``gemma3``); the rest are refused in one line.

Tensors are renamed by ``gguf``'s own name map. For arch ``llama``, llama.cpp rotates adjacent
pairs of a head's dimensions where transformers rotates its two halves, so every head's rows of
``q_proj`` / ``k_proj`` are reordered from ``[x_0..x_{d/2-1} | x_{d/2}..x_{d-1}]`` to
``[x_0, x_{d/2}, x_1, x_{d/2+1}, ...]`` (qwen2/qwen3/gemma3 use the halves, as transformers does).
Norms and biases stay fp32; 2-D weights take the requested type. ``q8_0`` packs rows in blocks of
32, so a weight whose rows are not a multiple of 32 (a pruned ``down_proj`` with 758 inputs) is
written in f16, as llama.cpp's own converter does.

Gemma 3: transformers' RMSNorm scales by ``1 + w`` where llama.cpp's scales by ``w``, so every norm
weight is written as ``w + 1``. Which blocks slide is written per block
(``gemma3.attention.sliding_window_pattern``, one bool each), so a depth-pruned model keeps each
remaining block's type; the sliding and the global RoPE bases are both written.

The tokenizer: a model that came from a GGUF file carries that file's ``tokenizer.*`` metadata
over unchanged; any other is built from its Hugging Face tokenizer by ``gguf.vocab`` (BPE
tokenizers; Gemma's SentencePiece vocabulary needs the source GGUF).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from amp_prune.config import GGUF_TYPES
from amp_prune.errors import AmpPruneError

log = logging.getLogger(__name__)

# model_type -> llama.cpp arch
ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3"}
_PERMUTED = frozenset({"llama"})  # archs whose rope pairs adjacent dimensions
_NEEDS_SOURCE_TOKENIZER = frozenset({"gemma3"})  # SentencePiece vocabularies: carried over from a source GGUF only


def gguf_name(out_dir: Path | str, kind: str) -> Path:
    """``model-{kind}.gguf`` in ``out_dir``."""
    return Path(out_dir) / f"model-{kind}.gguf"


def check_gguf_request(kind: str, model_type: str, *, source_gguf: str | Path | None = None, config=None) -> None:
    """Refuse an unknown type, or a family, tokenizer or (with ``config``) layout we cannot write: one line, before
    any work."""
    if kind not in GGUF_TYPES:
        raise AmpPruneError(f"unknown --gguf type '{kind}': choose one of {', '.join(GGUF_TYPES)}")
    if model_type not in ARCHS:
        raise AmpPruneError(f"--gguf writes {', '.join(ARCHS)}; this model is {model_type}: "
                            "export it without --gguf (its safetensors load in transformers and vLLM)")
    if ARCHS[model_type] in _NEEDS_SOURCE_TOKENIZER and source_gguf is None:
        raise AmpPruneError(f"--gguf for {model_type} carries the tokenizer over from a GGUF input (gemma3-270m or a "
                            ".gguf file); this model came from safetensors: export without --gguf and convert the "
                            "export with llama.cpp's convert_hf_to_gguf.py")
    if config is not None:
        _check_layout(config, ARCHS[model_type])


def _check_layout(config, arch: str) -> None:
    """What the writer assumes: plain (unscaled) RoPE, and for gemma3 llama.cpp's query scale ``1/sqrt(head_dim)``."""
    rope = getattr(config, "rope_parameters", None) or {}
    kinds = {v.get("rope_type", "default") for v in rope.values() if isinstance(v, dict)}
    kinds.add(rope.get("rope_type", "default"))
    if kinds - {"default"}:
        raise AmpPruneError(f"--gguf writes plain RoPE; this model's RoPE scaling is {sorted(kinds - {'default'})}: "
                            "export without --gguf and convert the export with llama.cpp's convert_hf_to_gguf.py")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if arch == "gemma3" and int(getattr(config, "query_pre_attn_scalar", head_dim)) != int(head_dim):
        raise AmpPruneError(f"--gguf: this Gemma 3 scales queries by 1/sqrt({config.query_pre_attn_scalar}) and "
                            f"llama.cpp by 1/sqrt(head_dim={head_dim}); export without --gguf")


def interleave_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's rows of ``w`` ``[n_heads * d, in]`` (or a bias ``[n_heads * d]``) from halves to pairs.

    Row ``h*d + j`` for ``j < d/2`` goes to ``h*d + 2j``, and ``h*d + d/2 + j`` to ``h*d + 2j + 1``.
    """
    d = w.shape[0] // n_heads
    shape = w.shape
    return w.reshape(n_heads, 2, d // 2, *shape[1:]).transpose(1, 2).reshape(shape)


def _array(t: torch.Tensor, kind: str):
    """``(numpy data, GGMLQuantizationType)`` of one tensor in ``kind`` (1-D: f32; q8_0 rows not of 32s: f16)."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    x = t.detach().to("cpu", torch.float32).numpy()
    if x.ndim == 1 or kind == "f32":
        return x, Q.F32
    if kind == "f16" or (kind == "q8_0" and x.shape[-1] % 32):
        return x.astype(np.float16), Q.F16
    qtype = Q.BF16 if kind == "bf16" else Q.Q8_0
    return quants.quantize(x, qtype), qtype


def _file_type(kind: str) -> int:
    from gguf import LlamaFileType as F
    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0}[kind]


def _rope_base(config, layer_type: str | None = None) -> float:
    """The RoPE base of ``layer_type``'s layers (transformers 5 ``rope_parameters``, flat or per type)."""
    rope = getattr(config, "rope_parameters", None) or {}
    if layer_type in rope:
        rope = rope[layer_type]
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _add_hparams(w, arch: str, config, n_layers: int) -> None:
    """The (pruned) shape and the attention / RoPE / norm settings as ``{arch}.*`` metadata."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    w.add_block_count(n_layers)
    w.add_context_length(int(config.max_position_embeddings))
    w.add_embedding_length(int(config.hidden_size))
    w.add_feed_forward_length(int(config.intermediate_size))
    w.add_head_count(int(config.num_attention_heads))
    w.add_head_count_kv(int(config.num_key_value_heads))
    w.add_key_length(int(head_dim))
    w.add_value_length(int(head_dim))
    w.add_rope_dimension_count(int(head_dim))
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    w.add_vocab_size(int(config.vocab_size))
    if arch != "gemma3":
        w.add_rope_freq_base(_rope_base(config))
        return
    w.add_rope_freq_base(_rope_base(config, "full_attention"))
    w.add_rope_freq_base_swa(_rope_base(config, "sliding_attention"))
    w.add_sliding_window(int(config.sliding_window))
    w.add_sliding_window_pattern([t == "sliding_attention" for t in config.layer_types])
    if getattr(config, "final_logit_softcapping", None):
        w.add_final_logit_softcapping(float(config.final_logit_softcapping))


def _copy_tokenizer(w, source_gguf: Path) -> None:
    """The source file's ``tokenizer.*`` key-value pairs, with their types, unchanged."""
    from gguf import GGUFReader, GGUFValueType

    for key, field in GGUFReader(str(source_gguf)).fields.items():
        if not key.startswith("tokenizer."):
            continue
        value = field.contents()
        if field.types[0] == GGUFValueType.ARRAY:
            w.add_key_value(key, value, GGUFValueType.ARRAY, sub_type=field.types[-1])
        else:
            w.add_key_value(key, value, field.types[0])


def _build_tokenizer(w, tokenizer) -> None:
    """A GPT-2-style BPE vocabulary from the Hugging Face tokenizer (``gguf.vocab``), its merges and special ids."""
    import tempfile

    from gguf.vocab import BpeVocab, SpecialVocab

    with tempfile.TemporaryDirectory(prefix="amp-prune-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        try:
            vocab = BpeVocab(Path(tmp))
        except (FileNotFoundError, ValueError, KeyError) as e:
            raise AmpPruneError(f"--gguf builds the tokenizer of a BPE (GPT-2 style) tokenizer only ({e}); convert "
                                "this model's safetensors with llama.cpp's convert_hf_to_gguf.py instead") from None
        tokens, scores, types = [], [], []
        for text, score, ttype in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(ttype)
        w.add_tokenizer_model("gpt2")
        w.add_token_list(tokens)
        w.add_token_types(types)
        SpecialVocab(Path(tmp), load_merges=True, n_vocab=len(tokens)).add_to_gguf(w)


def plan_description(s: dict) -> str:
    """``general.description``: what amp-prune removed, from a run summary ``s`` (``run.json``'s ``summary``)."""
    return (f"pruned by amp-prune ({s['method']}) from {s['source']}: {s['achieved_ratio']:.1%} of the parameters "
            f"removed; {s['layers_after']} blocks of {s['heads_after']}/{s['kv_after']} heads/KV heads and "
            f"{s['channels_after']} MLP channels")


def write_gguf(model: nn.Module, tokenizer, path: Path, kind: str, *, source_gguf: Path | None = None,
               name: str = "", description: str = "", base_model: str | None = None) -> Path:
    """Write ``model`` (a Llama-layout CausalLM) to ``path`` as GGUF ``kind`` (see the module docstring)."""
    import gguf

    config = model.config
    check_gguf_request(kind, config.model_type, source_gguf=source_gguf, config=config)
    arch = ARCHS[config.model_type]
    n_layers = int(config.num_hidden_layers)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_type("model")
    w.add_name(name or Path(path).parent.name)
    if description:
        w.add_description(description)
    if base_model:
        w.add_base_model_count(1)
        w.add_base_model_name(0, base_model)
    w.add_file_type(_file_type(kind))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_hparams(w, arch, config, n_layers)
    if source_gguf is not None:
        _copy_tokenizer(w, source_gguf)
    else:
        _build_tokenizer(w, tokenizer)
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), n_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, t in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        new = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise AmpPruneError(f"--gguf: no llama.cpp name for tensor {hf_name}; please report it")
        if arch in _PERMUTED and (".q_proj." in hf_name or ".k_proj." in hf_name):
            heads = config.num_attention_heads if ".q_proj." in hf_name else config.num_key_value_heads
            t = interleave_rope_rows(t, heads)
        if arch == "gemma3" and hf_name.endswith("norm.weight"):
            t = t.float() + 1.0  # llama.cpp scales by w, transformers' Gemma RMSNorm by 1 + w
        data, qtype = _array(t, kind)
        w.add_tensor(new, data, raw_dtype=qtype if qtype in (gguf.GGMLQuantizationType.BF16,
                                                              gguf.GGMLQuantizationType.Q8_0) else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    log.info("wrote %s (%s, arch %s)", path, kind, arch)
    return path


def gguf_for_dir(folder: str | Path, kind: str, *, overwrite: bool = False) -> Path:
    """``amp-prune gguf DIR --type TYPE``: write ``DIR/model-TYPE.gguf`` for an existing export, atomically.

    The tokenizer metadata comes from the GGUF the export's source was (``run.json``'s model, when it is
    a built-in model or a ``.gguf`` file), else from the export's own tokenizer.
    """
    import json
    import os
    import uuid

    from amp_prune.io.faults import tensor_bytes, writing_to
    from amp_prune.io.load import alias_gguf, load_model

    folder = Path(folder).expanduser()
    if not (folder / "config.json").is_file():
        raise AmpPruneError(f"{folder} has no config.json; pass an export directory (or any HF model directory)")
    target = gguf_name(folder, kind)
    if target.exists() and not overwrite:
        raise AmpPruneError(f"{target} already exists; pass --overwrite")
    config = json.loads((folder / "config.json").read_text())
    source, summary = None, {}
    run = folder / "run.json"
    if run.is_file():
        record = json.loads(run.read_text())
        src, summary = record.get("config", {}).get("model"), record.get("summary", {})
        if isinstance(src, str):
            source = alias_gguf(src, Path(src).expanduser())
    check_gguf_request(kind, config.get("model_type", "unknown"), source_gguf=source)
    lm = load_model(str(folder), device="cpu", dtype="float32")
    check_gguf_request(kind, lm.model.config.model_type, source_gguf=source, config=lm.model.config)
    tmp = folder / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    with writing_to(target, tensor_bytes(lm.model)):
        try:
            write_gguf(lm.model, lm.tokenizer, tmp, kind, source_gguf=Path(source) if source else None,
                       name=folder.name, description=plan_description(summary) if summary else "",
                       base_model=summary.get("card_meta", {}).get("base_model"))
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return target
