"""Passkey retrieval: hide a 5-digit key in filler text and ask the model for it.

Prompts are assembled at the token level so each has exactly the requested
length: intro + filler[:cut] + key sentence + filler[cut:] + question, with the
key placed at ``depth`` (0..1) of the filler. Answers are greedy-decoded with a
manual loop through the (optionally compiled) model and a fresh cache, so a
KV-cache compression is exercised on prefill and decode alike.
"""
from __future__ import annotations

import random
from typing import Callable

import torch
from transformers import DynamicCache

from kvpass.evaluate.perplexity import compiled_forward

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant "
         "text. Find it and memorize it. I will quiz you about it.\n")
FILLER = ("The grass is green. The sky is blue. The sun is yellow. "
          "Here we go. There and back again. ")
KEY_SENTENCE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def build_prompt(tokenizer, length: int, depth: float, key: str) -> torch.Tensor:
    """Token ids [1, length] with the key sentence at ``depth`` of the filler."""
    head, key_ids, tail = _ids(tokenizer, INTRO), _ids(tokenizer, KEY_SENTENCE.format(key=key)), \
        _ids(tokenizer, QUESTION)
    n_filler = length - len(head) - len(key_ids) - len(tail)
    if n_filler < 0:
        raise ValueError(f"passkey length {length} is shorter than the fixed text "
                         f"({length - n_filler} tokens)")
    unit = _ids(tokenizer, FILLER)
    filler = (unit * (n_filler // len(unit) + 1))[:n_filler]
    cut = round(depth * n_filler)
    ids = head + filler[:cut] + key_ids + filler[cut:] + tail
    return torch.tensor([ids])                                    # [1, length]


@torch.no_grad()
def greedy_generate(fwd, input_ids: torch.Tensor, max_new_tokens: int,
                    cache_factory: Callable[[], object] | None = None) -> list[int]:
    """Greedy decode with a manual loop; fwd is the model or its compiled wrapper."""
    cache = cache_factory() if cache_factory is not None else DynamicCache()
    out = fwd(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    new: list[int] = []
    for _ in range(max_new_tokens):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)           # [1, 1]
        new.append(nxt.item())
        out = fwd(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
    return new


def passkey(model, tokenizer, *, backend=None, lengths=(1000, 2000, 4000, 7000),
            depths=(0.1, 0.5, 0.9), trials: int = 3, seed: int = 0,
            cache_factory: Callable[[], object] | None = None,
            max_new_tokens: int = 8, verbose: bool = False) -> dict[int, int]:
    """Hits per prompt length (out of len(depths) * trials); a hit when the key appears."""
    rng = random.Random(seed)
    device = next(model.parameters()).device
    fwd = compiled_forward(model, backend)
    hits: dict[int, int] = {}
    for length in lengths:
        hits[length] = 0
        for depth in depths:
            for _ in range(trials):
                key = str(rng.randint(10000, 99999))
                ids = build_prompt(tokenizer, length, depth, key).to(device)
                answer = tokenizer.decode(greedy_generate(fwd, ids, max_new_tokens, cache_factory))
                hit = key in answer
                hits[length] += hit
                if verbose:
                    print(f"passkey len={length} depth={depth} key={key} "
                          f"{'HIT ' if hit else 'MISS'} {answer!r}")
    return hits
