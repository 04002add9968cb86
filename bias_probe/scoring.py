"""Answer-option and sentence log-likelihoods by forward passes, as lm-eval computes them.

Plain prompts: for a prompt ``ctx`` and an option ``opt`` the continuation is ``" " + opt``; its
tokens are those of ``tok(ctx + " " + opt)`` after the tokens of ``tok(ctx)``, and the score is
the sum of their log-probabilities.

Chat prompts (``chat=True``): the prompt becomes the user turn of the tokenizer's chat template
(a trailing ``"Answer:"`` cue is dropped, the template's generation prompt opens the reply), and
the option, its first letter capitalized as a reply starts ("Yes", "The nurse"), is scored as the
start of the assistant's reply: log P(option tokens | templated prompt). The counterfactual variants are built before templating, so the edit is the same
either way.

Sentences (CrowS-Pairs): the whole sentence after the model's prefix token (BOS, else EOS), as
lm-eval's empty-context requests.

Identical token sequences are run once (a yes/no question is a single forward), batches are
left-padded with explicit position ids, and only the logits of the scored positions are computed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from bias_probe.errors import BiasProbeError

CHAT_MODES = ("auto", "on", "off")
ANSWER_CUE = "\nAnswer:"


def use_chat(tokenizer, mode: str) -> bool:
    """``auto``: on exactly when the tokenizer has a chat template; ``on`` without one is an error."""
    if mode not in CHAT_MODES:
        raise BiasProbeError(f"unknown --chat-template '{mode}': choose one of {', '.join(CHAT_MODES)}")
    has = bool(getattr(tokenizer, "chat_template", None))
    if mode == "on" and not has:
        raise BiasProbeError("--chat-template on, but the tokenizer has no chat template; use auto or off")
    return has if mode == "auto" else mode == "on"


def chat_prompt(tokenizer, ctx: str) -> str:
    """The templated text of ``ctx`` as the user turn, ending where the assistant's reply begins."""
    question = ctx[:-len(ANSWER_CUE)] if ctx.endswith(ANSWER_CUE) else ctx
    return tokenizer.apply_chat_template([{"role": "user", "content": question.strip()}], tokenize=False,
                                         add_generation_prompt=True)


def encode_pair(tokenizer, ctx: str, option: str, chat: bool = False) -> tuple[list[int], list[int]]:
    """(prompt token ids, option token ids) for one (prompt, option) pair."""
    if chat:  # the template text carries its own special tokens
        ctx, cont, special = chat_prompt(tokenizer, ctx), option[:1].upper() + option[1:], False
    else:
        cont, special = " " + option, True
    ctx_ids = tokenizer(ctx, add_special_tokens=special)["input_ids"]
    whole = tokenizer(ctx + cont, add_special_tokens=special)["input_ids"]
    if whole[:len(ctx_ids)] != ctx_ids:  # the tokenizer merged across the boundary: encode the parts
        return ctx_ids, tokenizer(cont, add_special_tokens=False)["input_ids"]
    return ctx_ids, whole[len(ctx_ids):]


def prefix_token(tokenizer) -> int:
    """The token an empty context starts from: BOS, else EOS (lm-eval's prefix token)."""
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return tid
    raise BiasProbeError("the tokenizer has neither a BOS nor an EOS token to start a sentence from")


def _forward(model, ids: torch.Tensor, mask: torch.Tensor, keep: int) -> torch.Tensor:
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    try:
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=keep, use_cache=False)
    except TypeError:  # models without logits_to_keep
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
    return out.logits[:, -keep:]


@torch.no_grad()
def encoded_loglikelihoods(model, tokenizer, encoded: list[tuple[list[int], list[int]]], *, batch_size: int = 16,
                           progress: bool = True, desc: str = "forward passes") -> list[float]:
    """``sum_t log p(cont_t | ctx, cont_<t)`` for every (ctx ids, cont ids) pair; shared sequences run once."""
    device = next(model.parameters()).device
    max_len = getattr(model.config, "max_position_embeddings", None) or 10**9
    seqs: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
    for i, (ctx_ids, cont) in enumerate(encoded):
        if not cont:
            raise ValueError(f"pair {i} has an empty continuation")
        seq = tuple((ctx_ids + cont)[:-1][-max_len:])  # the positions that predict the continuation tokens
        seqs.setdefault(seq, []).append((i, cont))
    order = sorted(seqs, key=len, reverse=True)
    out = [0.0] * len(encoded)
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    bar = tqdm(total=len(order), desc=desc, disable=not progress, unit="seq")
    try:
        for b in range(0, len(order), batch_size):
            chunk = order[b:b + batch_size]
            width = max(len(s) for s in chunk)
            keep = min(width, max(len(c) for s in chunk for _, c in seqs[s]))
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, s in enumerate(chunk):
                ids[r, width - len(s):] = torch.tensor(s)
                mask[r, width - len(s):] = 1
            logp = F.log_softmax(_forward(model, ids.to(device), mask.to(device), keep).float(), dim=-1)
            for r, s in enumerate(chunk):
                for i, cont in seqs[s]:
                    rows = logp[r, keep - len(cont):]
                    out[i] = rows.gather(1, torch.tensor(cont, device=rows.device)[:, None]).sum().item()
            bar.update(len(chunk))
    finally:
        bar.close()
        model.train(was_training)
    return out


def option_loglikelihoods(model, tokenizer, pairs: list[tuple[str, str]], *, batch_size: int = 16,
                          progress: bool = True, desc: str = "forward passes", chat: bool = False) -> list[float]:
    """Sum of log p(option tokens | prompt) for every (prompt, option) pair (templated when ``chat``)."""
    encoded = []
    for ctx, opt in pairs:
        ctx_ids, cont = encode_pair(tokenizer, ctx, opt, chat)
        if not cont:
            raise ValueError(f"option {opt!r} encodes to no tokens")
        encoded.append((ctx_ids, cont))
    return encoded_loglikelihoods(model, tokenizer, encoded, batch_size=batch_size, progress=progress, desc=desc)


def sentence_loglikelihoods(model, tokenizer, sentences: list[str], *, batch_size: int = 16, progress: bool = True,
                            desc: str = "sentences") -> list[float]:
    """``log p(sentence)`` for every sentence: all its tokens after the prefix token."""
    start = prefix_token(tokenizer)
    encoded = [([start], tokenizer(s, add_special_tokens=False)["input_ids"]) for s in sentences]
    return encoded_loglikelihoods(model, tokenizer, encoded, batch_size=batch_size, progress=progress, desc=desc)
