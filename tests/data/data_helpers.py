"""Shared helpers for the data-pipeline and model-eval tests: tiny models, an offline tokenizer, docs."""
from __future__ import annotations

import contextlib
import json
from typing import Dict, Iterator, List, Sequence

import torch
from torch import nn

from saefast.data.models import tiny_model

TINY_CFG = dict(d_model=16, d_head=4, n_heads=4, n_layers=3, n_ctx=32, d_vocab=40, seed=0)
PAD, BOS, UNK = 0, 1, 2
WORDS = ("the cat sat on a mat while dog ran far away from big red ball and then slept under "
         "warm sun near old tree").split()
VOCAB = {"<pad>": PAD, "<bos>": BOS, "<unk>": UNK, **{w: i + 3 for i, w in enumerate(dict.fromkeys(WORDS))}}

_MODEL_CACHE: Dict[str, nn.Module] = {}


def make_model(**overrides) -> nn.Module:
    """A tiny random-weight transformer-lens model (cached per config; tests must not modify it)."""
    cfg = {**TINY_CFG, **overrides}
    key = json.dumps(cfg, sort_keys=True)
    if key not in _MODEL_CACHE:
        _MODEL_CACHE[key] = tiny_model(cfg)
    return _MODEL_CACHE[key]


def make_tokenizer():
    """A word-level Hugging Face fast tokenizer built in memory (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", pad_token="<pad>",
                                   unk_token="<unk>")


def make_texts(n_docs: int, seed: int) -> List[str]:
    """Documents of varied length (some empty) over the tokenizer's words."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 23, (n_docs,), generator=g).tolist()
    words = list(dict.fromkeys(WORDS))
    return [" ".join(words[i] for i in torch.randint(0, len(words), (n,), generator=g).tolist())
            for n in lengths]


def encode(text: str) -> List[int]:
    return [VOCAB[w] for w in text.split()]


def reference_windows(docs: Sequence[List[int]], ctx: int, prepend_bos: bool, pack: bool,
                      pad: int = PAD, bos: int = BOS) -> List[tuple]:
    """Plain-Python windowing with the documented semantics: [(window, n_real), ...]."""
    def cut(stream: List[int]) -> List[tuple]:
        out, p = [], 0
        while p < len(stream):
            if prepend_bos:
                if stream[p] == bos:
                    p += 1
                if p >= len(stream):
                    break
                body = stream[p:p + ctx - 1]
                p += ctx - 1
                window = [bos] + body
            else:
                window = stream[p:p + ctx]
                p += ctx
            out.append((window + [pad] * (ctx - len(window)), len(window)))
        return out

    segments = []
    for d in docs:
        if prepend_bos and d and d[0] == bos:
            d = d[1:]
        if d:
            segments.append(([bos] if prepend_bos else []) + list(d))
    if pack:
        return cut([t for s in segments for t in s])
    return [w for s in segments for w in cut(s)]


class LinearSAE(nn.Module):
    """Stand-in SAE: x -> x @ W + b, returned as (x_recon, None) like the user's forward."""

    def __init__(self, d_in: int, mode: str = "random", seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        if mode == "identity":
            W, b = torch.eye(d_in), torch.zeros(d_in)
        elif mode == "zero":
            W, b = torch.zeros(d_in, d_in), torch.zeros(d_in)
        else:
            W = torch.eye(d_in) + 0.3 * torch.randn(d_in, d_in, generator=g)
            b = 0.1 * torch.randn(d_in, generator=g)
        self.W = nn.Parameter(W)
        self.b = nn.Parameter(b)

    def forward(self, x: torch.Tensor):
        return x @ self.W + self.b, None


@contextlib.contextmanager
def block_call_counter(model: nn.Module) -> Iterator[List[int]]:
    """Record the index of every block whose attention runs (torch forward hooks, removed after)."""
    calls: List[int] = []
    handles = [block.attn.register_forward_hook(lambda mod, args, out, i=i: calls.append(i))
               for i, block in enumerate(model.blocks)]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()
