"""Answer-option log-likelihoods by forward passes, as lm-eval computes them.

For a prompt ``ctx`` and an option ``opt`` the continuation is ``" " + opt``; its tokens are
those of ``tok(ctx + " " + opt)`` after the tokens of ``tok(ctx)``, and the score is the sum
of their log-probabilities. Identical token sequences are run once (a yes/no question is a
single forward), batches are left-padded with explicit position ids, and only the logits of
the scored positions are computed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def encode_pair(tokenizer, ctx: str, option: str) -> tuple[list[int], list[int]]:
    cont = " " + option
    ctx_ids = tokenizer(ctx)["input_ids"]
    whole = tokenizer(ctx + cont)["input_ids"]
    if whole[:len(ctx_ids)] != ctx_ids:  # the tokenizer merged across the boundary: encode the parts
        return ctx_ids, tokenizer(cont, add_special_tokens=False)["input_ids"]
    return ctx_ids, whole[len(ctx_ids):]


def _forward(model, ids: torch.Tensor, mask: torch.Tensor, keep: int) -> torch.Tensor:
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    try:
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=keep, use_cache=False)
    except TypeError:  # models without logits_to_keep
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
    return out.logits[:, -keep:]


@torch.no_grad()
def option_loglikelihoods(model, tokenizer, pairs: list[tuple[str, str]], *, batch_size: int = 16,
                          progress: bool = True, desc: str = "forward passes") -> list[float]:
    """Sum of log p(option tokens | prompt) for every (prompt, option) pair."""
    device = next(model.parameters()).device
    max_len = getattr(model.config, "max_position_embeddings", None) or 10**9
    seqs: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
    for i, (ctx, opt) in enumerate(pairs):
        ctx_ids, cont = encode_pair(tokenizer, ctx, opt)
        if not cont:
            raise ValueError(f"option {opt!r} encodes to no tokens")
        seq = tuple((ctx_ids + cont)[:-1][-max_len:])  # the positions that predict the option tokens
        seqs.setdefault(seq, []).append((i, cont))
    order = sorted(seqs, key=len, reverse=True)
    out = [0.0] * len(pairs)
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    bar = tqdm(total=len(order), desc=desc, disable=not progress, unit="seq")
    try:
        for b in range(0, len(order), batch_size):
            chunk = order[b:b + batch_size]
            width = max(len(s) for s in chunk)
            keep = max(len(c) for s in chunk for _, c in seqs[s])
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
