"""What each layer and component says about the answer: logit lens, direct logit attribution, attention patterns.

- `logit_lens` reads the residual stream before every block and after the last one through the final norm and
  the unembedding (nostalgebraist 2020): the top tokens at every layer and position, and, given answers, the
  correct answer's rank and the logit difference. The last row is the model's output exactly.
- `direct_logit_attribution` splits the final residual stream at one position into what each part wrote (the
  embeddings, every head's z @ W_O, each layer's attention bias, every MLP) and sends each part through the
  final norm *with the norm's scale frozen at its value in this run* and the unembedding. The parts then add up
  exactly to the logit difference (with the norm's and the unembedding's biases as one constant term). A part's
  DLA is not its direct effect: removing the part would change the scale. On a LayerNorm-free model
  (`workbench.lnfree`; `lnfree.dla_exactness` measures the gap) DLA is the direct effect.
- `attention_patterns`: chosen heads' patterns with the prompt's tokens on both axes.
"""

from __future__ import annotations

import re

import nnsight
import torch

from workbench.circuits.edges import head_results
from workbench.circuits.results import AttentionPatterns, DLAResult, LogitLensResult
from workbench.circuits.spec import check_model
from workbench.core import CancelToken, Run, chunks, concat
from workbench.errors import InputError, SiteError, UnsupportedModelError
from workbench.lnfree.norms import FrozenNorm, norm_info, token_scale
from workbench.models.prefix import bytes_per_row
from workbench.patching.spec import plain_versions
from workbench.results import Provenance

DLA_NOTE = (
    "Each part goes through the final norm with the norm's scale frozen at its value in this run (the scale of the "
    "whole residual stream), so the parts add up exactly to the logit difference; a part's DLA is not its direct "
    "effect, because removing the part would change that scale. On a LayerNorm-free model (workbench.lnfree) DLA "
    "is the direct effect; lnfree.dla_exactness measures the difference."
)


def _prompts(model, prompts, answers):
    """Token ids [prompt, pos], their strings, answer ids [prompt, 2] (or None) and answer strings."""
    if hasattr(prompts, "clean") and hasattr(prompts, "answers"):
        answers = prompts.answers if answers is None else answers
        prompts = list(prompts.clean)
    tokens = model.to_tokens(prompts)
    str_tokens = (
        tuple(tuple(model.to_str_tokens(row)) for row in tokens)
        if model.tokenizer
        else tuple(tuple(str(int(t)) for t in row) for row in tokens)
    )
    if answers is None:
        return tokens, str_tokens, None, ()
    n = len(tokens)
    if isinstance(answers, torch.Tensor):
        answers = answers.view(-1, 2).tolist()
    items = list(answers) if not isinstance(answers, str) else [answers]
    if len(items) == 2 and all(isinstance(a, (str, int)) for a in items):
        items = [tuple(items)] * n
    if len(items) != n or any(isinstance(a, str) or len(a) != 2 for a in items):
        raise InputError(
            f"answers must be (correct, incorrect) for all prompts or one such pair per prompt ({n}), e.g. "
            f"(' Mary', ' John'); got {answers!r}."
        )
    ids = [[a if isinstance(a, int) else model.to_single_token(a) for a in pair] for pair in items]
    names = tuple(
        tuple(a if isinstance(a, str) else model.tokenizer.decode([a]) for a in pair) for pair in items
    )
    return tokens, str_tokens, torch.tensor(ids, dtype=torch.long), names


def _logits_of(model, resid: torch.Tensor) -> torch.Tensor:
    """Inside a trace: logits of a residual stream through the final norm and the unembedding (ad hoc calls that
    leave the real forward pass alone), soft-capped as the model's own."""
    logits = model.submodule("unembed")(model.submodule("ln_final")(resid))
    cap = model.cfg.logit_softcap
    return logits if cap is None else cap * torch.tanh(logits / cap)


def logit_lens(
    model,
    prompts,
    answers=None,
    *,
    k: int = 5,
    memory_budget: int | str | None = "auto",
    batch_size: int | None = None,
    progress=True,
    cancel: CancelToken | None = None,
    run: Run | None = None,
) -> LogitLensResult:
    """The logit lens over every layer and position (see the module docstring).

    Args:
        prompts: a prompt, a list of prompts of one token length, a [prompt, pos] token tensor, or a
            `PromptPairs` (its clean prompts and answers).
        answers: (correct, incorrect) single tokens (one tuple for all, or one per prompt), optional.
        k: top tokens kept per layer and position.

    Returns:
        `LogitLensResult` [prompt, layer (embeddings, after block 0, ..., after the last block), pos].
    """
    check_model(model)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InputError(f"k={k!r}: keep a positive number of top tokens per cell.")
    tokens, str_tokens, answer_ids, answer_tokens = _prompts(model, prompts, answers)
    run = Run.of(run, progress=progress, cancel=cancel, memory_budget=memory_budget, batch_size=batch_size)
    c, n_pos = model.cfg, tokens.shape[1]
    k = min(k, c.d_vocab)
    per_row = bytes_per_row(model, n_pos, extra=8 * n_pos * c.d_vocab * 2)
    chunk = run.rows_per_chunk(per_row, model.device, 64)
    spans = chunks(len(tokens), chunk)

    def one(span):
        a, b = span
        ans = None if answer_ids is None else answer_ids[a:b].to(model.device)
        return _lens_trace(model, tokens[a:b].to(model.device), ans, k)

    parts = run.map(spans, one, desc="logit lens", weights=[b - a for a, b in spans])
    out = concat(parts)
    decode = model.tokenizer.decode if model.tokenizer is not None else str
    top_tokens = tuple(
        tuple(tuple(tuple(decode([int(i)]) for i in cell) for cell in layer) for layer in prompt)
        for prompt in out["top_ids"].tolist()
    )
    return LogitLensResult(
        layers=("embeddings", *(f"after L{layer}" for layer in range(c.n_layers))),
        tokens=str_tokens,
        answers=answer_tokens,
        top_ids=out["top_ids"],
        top_probs=out["top_probs"],
        top_tokens=top_tokens,
        logit_diff=out.get("logit_diff"),
        correct_rank=out.get("rank"),
        correct_logprob=out.get("logprob"),
        provenance=_provenance(model, "logit_lens", tokens, str_tokens, answer_tokens, k=k),
    )


def _lens_trace(model, tokens, answers, k: int) -> dict:
    c = model.cfg
    with torch.no_grad(), model.trace(tokens):
        resids = [model.site("resid_pre", layer).value for layer in range(c.n_layers)]
        resids.append(model.submodule("ln_final").input)
        out = {"top_ids": [], "top_probs": [], "logit_diff": [], "rank": [], "logprob": []}
        for resid in resids:
            logp = torch.log_softmax(_logits_of(model, resid).float(), -1)
            top = logp.topk(k, dim=-1)
            out["top_ids"].append(top.indices)
            out["top_probs"].append(top.values.exp())
            if answers is not None:
                index = answers[:, None, :].expand(-1, logp.shape[1], -1)
                picked = logp.gather(-1, index)
                out["logit_diff"].append(picked[..., 0] - picked[..., 1])
                out["rank"].append((logp > picked[..., :1]).sum(-1))
                out["logprob"].append(picked[..., 0])
        out = nnsight.save({key: torch.stack(v, 1).cpu() for key, v in out.items() if v})
    return out


def direct_logit_attribution(
    model,
    prompts,
    answers=None,
    *,
    position: int = -1,
    memory_budget: int | str | None = "auto",
    batch_size: int | None = None,
    progress=True,
    cancel: CancelToken | None = None,
    run: Run | None = None,
) -> DLAResult:
    """Each part's contribution to logit(correct) - logit(incorrect) at `position` (see the module docstring).

    Args:
        prompts, answers: as for `logit_lens`; answers are required.
        position: the position whose next-token logits are explained (default the last).

    Returns:
        `DLAResult` with contributions [prompt, part] and the constant term and total [prompt].
    """
    check_model(model)
    tokens, str_tokens, answer_ids, answer_tokens = _prompts(model, prompts, answers)
    if answer_ids is None:
        raise InputError(
            "Direct logit attribution explains a logit difference: give answers=(correct, incorrect)."
        )
    n_pos = tokens.shape[1]
    if isinstance(position, bool) or not isinstance(position, int) or not -n_pos <= position < n_pos:
        raise InputError(
            f"position={position!r}: the prompts have {n_pos} tokens (0..{n_pos - 1}, or -1 for the last)."
        )
    position %= n_pos

    norm = model.torch_submodule("ln_final")
    try:
        info = norm_info(norm)
    except UnsupportedModelError as err:
        raise UnsupportedModelError(f"Direct logit attribution needs the final norm's kind: {err}") from None
    frozen = norm.frozen_scale() if isinstance(norm, FrozenNorm) else None
    per_head = model.adapter.attn_out_norm is None
    run = Run.of(run, progress=progress, cancel=cancel, memory_budget=memory_budget, batch_size=batch_size)
    chunk = run.rows_per_chunk(bytes_per_row(model, n_pos), model.device, 64)
    spans = chunks(len(tokens), chunk)

    def one(span):
        a, b = span
        return _dla_trace(
            model, tokens[a:b].to(model.device), answer_ids[a:b].to(model.device), position, per_head
        )

    parts = run.map(spans, one, desc="direct logit attribution", weights=[b - a for a, b in spans])
    saved = {key: torch.cat([p[key] for p in parts]) for key in parts[0] if key not in ("w", "b", "b_u")}
    w = parts[0]["w"].double() + info.weight_offset
    bias = parts[0]["b"].double() if "b" in parts[0] else None
    x = saved["resid"].double()  # [prompt, d_model]
    sigma = (
        torch.full(x.shape[:1], frozen, dtype=torch.float64)
        if frozen is not None
        else token_scale(x, info.kind, info.eps).double()
    )
    u = saved["u"].double()  # [prompt, d_model] = W_U[correct] - W_U[incorrect]

    def through(part: torch.Tensor) -> torch.Tensor:  # [prompt, ..., d_model] -> [prompt, ...]
        part = part.double()
        if info.kind == "layernorm":
            part = part - part.mean(-1, keepdim=True)
        shape = (-1,) + (1,) * (part.dim() - 1)
        return (part / sigma.view(shape) * w * u.view(u.shape[0], *([1] * (part.dim() - 2)), -1)).sum(-1)

    labels, columns = [], []
    embed = saved["embed"]
    if "pos_embed" in saved:
        labels += ["embed", "pos_embed"]
        columns += [through(embed - saved["pos_embed"]), through(saved["pos_embed"])]
    else:
        labels.append("embed")
        columns.append(through(embed))
    c = model.cfg
    for layer in range(c.n_layers):
        attn = saved[f"attn.{layer}"]
        if per_head:
            heads = saved[f"heads.{layer}"]  # [prompt, head, d_model]
            labels += [f"L{layer}H{h}" for h in range(c.n_heads)]
            columns += list(through(heads).unbind(1))
            labels.append(f"L{layer} attn bias")
            columns.append(through(attn - heads.sum(1)))
        else:
            labels.append(f"L{layer} attn")
            columns.append(through(attn))
        labels.append(f"MLP{layer}")
        columns.append(through(saved[f"mlp.{layer}"]))
    contributions = torch.stack(columns, 1)
    constant = saved["u_bias"].double()
    if bias is not None:
        constant = constant + (bias * u).sum(-1)
    total = saved["logit_diff"].double()
    return DLAResult(
        parts=tuple(labels),
        contributions=contributions.float(),
        constant=constant.float(),
        total=total.float(),
        position=position,
        final_norm="frozen" if frozen is not None else info.kind,
        per_head=per_head,
        note=DLA_NOTE
        + ("" if c.logit_softcap is None else " The logits are compared before the model's soft-cap."),
        tokens=str_tokens,
        answers=answer_tokens,
        provenance=_provenance(
            model, "direct_logit_attribution", tokens, str_tokens, answer_tokens, position=position
        ),
    )


def _dla_trace(model, tokens, answers, position: int, per_head: bool) -> dict:
    c = model.cfg
    with torch.no_grad(), model.trace(tokens):
        out = {}
        if model.adapter.pos_embed is not None:
            out["pos_embed"] = model.site("pos_embed").value[:, position].expand(len(tokens), -1)
        out["embed"] = model.site("resid_pre", 0).value[:, position]
        for layer in range(c.n_layers):
            if per_head:
                out[f"heads.{layer}"] = head_results(model, layer)[:, position]
            out[f"attn.{layer}"] = model.site("attn_out", layer).value[:, position]
            out[f"mlp.{layer}"] = model.site("mlp_out", layer).value[:, position]
        lnf = model.submodule("ln_final")
        out["resid"] = lnf.input[:, position]
        out["w"] = lnf.weight
        bias = getattr(lnf, "bias", None)
        if bias is not None:
            out["b"] = bias
        unembed = model.submodule("unembed")
        rows = unembed.weight[answers]
        out["u"] = rows[:, 0] - rows[:, 1]
        u_bias = getattr(unembed, "bias", None)
        out["u_bias"] = (
            (u_bias[answers[:, 0]] - u_bias[answers[:, 1]])
            if u_bias is not None
            else torch.zeros(len(answers), device=rows.device)
        )
        logits = model.submodule("unembed").output[:, position]
        out["logit_diff"] = logits.gather(-1, answers[:, :1])[:, 0] - logits.gather(-1, answers[:, 1:])[:, 0]
        out = nnsight.save({key: v.detach().float().cpu() for key, v in out.items()})
    return out


def attention_patterns(model, prompt, heads="all") -> AttentionPatterns:
    """Attention patterns [head, query, key] of one prompt, with its tokens on both axes.

    heads: "all", a layer (its heads), a label such as "L2H0", (layer, head), or a list of these.
    """
    check_model(model)
    tokens = model.to_tokens(prompt)[:1]
    c = model.cfg
    chosen = _resolve_heads(c, heads)
    layers = sorted({layer for layer, _ in chosen})
    try:
        with torch.no_grad(), model.trace(tokens.to(model.device)):
            saved = {}
            for layer in layers:
                saved[layer] = model.site("pattern", layer).value[0].detach().float().cpu()
            saved = nnsight.save(saved)
    except SiteError:
        raise
    pattern = torch.stack([saved[layer][head] for layer, head in chosen])
    str_tokens = tuple(model.to_str_tokens(tokens[0]))
    return AttentionPatterns(
        heads=tuple(f"L{layer}H{head}" for layer, head in chosen),
        tokens=str_tokens,
        pattern=pattern,
        provenance=_provenance(
            model, "attention_patterns", tokens, (str_tokens,), (), heads=[list(h) for h in chosen]
        ),
    )


def _resolve_heads(c, heads) -> list[tuple[int, int]]:
    def check(layer, head):
        if not (
            isinstance(layer, int)
            and 0 <= layer < c.n_layers
            and isinstance(head, int)
            and 0 <= head < c.n_heads
        ):
            raise InputError(
                f"Head ({layer!r}, {head!r}) does not exist: layers are 0..{c.n_layers - 1}, heads 0..{c.n_heads - 1}."
            )
        return (layer, head)

    if isinstance(heads, str) and heads == "all":
        return [(layer, h) for layer in range(c.n_layers) for h in range(c.n_heads)]
    items = heads if isinstance(heads, list) else [heads]
    out = []
    for item in items:
        if isinstance(item, bool):
            raise InputError(f"{item!r} is not a head.")
        if isinstance(item, int):
            if not 0 <= item < c.n_layers:
                raise InputError(f"Layer {item} is out of range: layers are 0..{c.n_layers - 1}.")
            out += [(item, h) for h in range(c.n_heads)]
        elif isinstance(item, str):
            m = re.match(r"^L(\d+)H(\d+)$", item)
            if m is None:
                raise InputError(f"{item!r}: name a head like 'L2H0', or give (layer, head).")
            out.append(check(int(m.group(1)), int(m.group(2))))
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            out.append(check(*item))
        else:
            raise InputError(f"{item!r}: give 'all', a layer, 'L2H0', (layer, head) or a list of these.")
    if not out:
        raise InputError("heads=[]: choose at least one head.")
    return list(dict.fromkeys(out))


def _provenance(model, method, tokens, str_tokens, answer_tokens, **options):
    return plain_versions(
        Provenance.capture(
            model.name,
            method=method,
            prompts=["".join(t) for t in str_tokens],
            token_ids=tokens.tolist(),
            answers=[list(a) for a in answer_tokens],
            **options,
        )
    )
