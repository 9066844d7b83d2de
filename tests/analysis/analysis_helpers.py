"""Shared helpers of the analysis tests: a tiny model with an offline tokenizer, tiny SAEs, dense oracles."""
from __future__ import annotations

import json
from typing import Dict, List, Optional

import pytest
import torch
from torch import Tensor

from saefast import SAEConfig, TopKSAE

PAD, BOS, UNK = 0, 1, 2
# "<", ">", "&" and '"' make the HTML escaping visible
WORDS = 'the cat sat on a mat while dog ran far away from big red ball and < b > & " script'.split()
VOCAB = {"<pad>": PAD, "<bos>": BOS, "<unk>": UNK, **{w: i + 3 for i, w in enumerate(dict.fromkeys(WORDS))}}
HOOK = "blocks.1.hook_resid_pre"
D_MODEL = 16

_CACHE: Dict[str, object] = {}


def make_tokenizer():
    """A word-level Hugging Face fast tokenizer built in memory (no download)."""
    pytest.importorskip("transformers")  # absent on the lent GPU machine
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", pad_token="<pad>", unk_token="<unk>")


def make_model():
    """Tiny random transformer-lens model with the tokenizer attached (shared; tests must not change it)."""
    pytest.importorskip("transformer_lens")  # absent on the lent GPU machine
    if "model" not in _CACHE:
        from saefast.data.models import tiny_model

        model = tiny_model(dict(d_model=D_MODEL, d_head=4, n_heads=4, n_layers=2, n_ctx=32, d_vocab=len(VOCAB),
                                seed=0))
        model.tokenizer = make_tokenizer()
        _CACHE["model"] = model
    return _CACHE["model"]


def make_sae(d_sae: int = 48, top_k: int = 4, seed: int = 0, d_in: int = D_MODEL) -> TopKSAE:
    """A TopK SAE on the tiny model's hook, with random nonzero biases (so b_dec and b_enc matter)."""
    sae = TopKSAE(SAEConfig(d_in=d_in, d_sae=d_sae, top_k=top_k, architecture="topk", device="cpu", seed=seed,
                            hook_spec=HOOK, train_b_enc=True))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.b_dec.copy_(0.1 * torch.randn(d_in, generator=g))
        sae.b_enc.copy_(0.05 * torch.randn(d_sae, generator=g))
    return sae.eval()


def dense_topk_codes(sae: TopKSAE, x: Tensor) -> Tensor:
    """Plain-PyTorch TopK codes [N, d_sae]: the k largest positive pre-activations of each row."""
    pre = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    vals, idx = torch.topk(pre, sae.config.top_k, dim=1)
    return torch.zeros_like(pre).scatter(1, idx, vals)


def make_texts(n_docs: int, seed: int) -> List[str]:
    g = torch.Generator().manual_seed(seed)
    words = list(dict.fromkeys(WORDS))
    return [" ".join(words[i] for i in torch.randint(0, len(words), (int(n),), generator=g).tolist())
            for n in torch.randint(4, 30, (n_docs,), generator=g)]


def write_jsonl(path, texts: List[str]) -> None:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def random_windows(n: int, seq: int, seed: int, pad_lengths: Optional[List[int]] = None) -> Tensor:
    """[n, seq] token windows: BOS first, random words, trailing PAD after pad_lengths[i] tokens."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, len(VOCAB), (n, seq), generator=g)
    tokens[:, 0] = BOS
    for i, length in enumerate(pad_lengths or []):
        tokens[i, length:] = PAD
    return tokens


def dense_from_db(db) -> Tensor:
    """The database's activations as a dense [n_tokens, d_sae] matrix (tests only)."""
    dense = torch.zeros(db.n_tokens, db.d_sae)
    dense[db.token_index, db.feature_ids.long()] = db.values
    return dense
