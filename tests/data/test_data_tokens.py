"""saefast.data.tokens: windows match a plain-Python reference, resume exactly, and reject bad input."""
import pytest

datasets = pytest.importorskip("datasets")  # the lent GPU machine has no datasets
pytest.importorskip("transformer_lens")

import json

import torch

from data_helpers import BOS, PAD, encode, make_texts, make_tokenizer, reference_windows
from saefast.data.tokens import TokenWindows, load_dataset_any


def all_windows(windows):
    out = []
    while True:
        try:
            tokens, n_real = windows.next_with_length()
        except StopIteration:
            return out
        out.append((tokens.tolist(), n_real))


def token_docs(seed, n_docs=9, with_bos=False):
    g = torch.Generator().manual_seed(seed)
    docs = []
    for n in torch.randint(0, 30, (n_docs,), generator=g).tolist():
        ids = torch.randint(3, 40, (n,), generator=g).tolist()
        docs.append(([BOS] + ids) if with_bos and ids else ids)
    return docs


@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("prepend_bos", [True, False])
@pytest.mark.parametrize("ctx", [2, 7, 16])
def test_pretokenized_windows_match_reference(pack, prepend_bos, ctx):
    docs = token_docs(seed=ctx + 10 * pack + 100 * prepend_bos, with_bos=prepend_bos)
    ds = datasets.Dataset.from_dict({"ids": docs})
    windows = TokenWindows(ds, None, ctx, prepend_bos=prepend_bos, tokens_column="ids", pack=pack,
                           bos_token_id=BOS, pad_token_id=PAD)
    got = all_windows(windows)
    assert got == reference_windows(docs, ctx, prepend_bos, pack)
    assert all(len(w) == ctx for w, _ in got)
    assert windows.state_dict()["windows"] == len(got)


@pytest.mark.parametrize("pack", [True, False])
def test_text_is_tokenized_on_the_fly(pack):
    texts = make_texts(12, seed=3)
    assert any(t == "" for t in texts)  # empty documents are skipped
    windows = TokenWindows(datasets.Dataset.from_dict({"text": texts}), make_tokenizer(), 9, pack=pack,
                           tokenize_batch_size=5)
    assert windows.bos_token_id == BOS and windows.pad_token_id == PAD
    assert all_windows(windows) == reference_windows([encode(t) for t in texts], 9, True, pack)


def test_plain_list_of_strings_and_dict_rows():
    texts = make_texts(4, seed=5)
    a = all_windows(TokenWindows(texts, make_tokenizer(), 6))
    b = all_windows(TokenWindows([{"body": t} for t in texts], make_tokenizer(), 6, text_column="body"))
    assert a == b == reference_windows([encode(t) for t in texts], 6, True, True)


@pytest.mark.parametrize("pack", [True, False])
def test_resume_from_every_position(pack):
    texts = make_texts(10, seed=7)
    ds = datasets.Dataset.from_dict({"text": texts})
    tok = make_tokenizer()
    full = all_windows(TokenWindows(ds, tok, 5, pack=pack, tokenize_batch_size=3))
    assert len(full) > 10
    for k in range(len(full) + 1):
        first = TokenWindows(ds, tok, 5, pack=pack, tokenize_batch_size=3)
        head = [first.next_with_length() for _ in range(k)]
        state = json.loads(json.dumps(first.state_dict()))
        second = TokenWindows(ds, tok, 5, pack=pack, tokenize_batch_size=3)
        second.load_state_dict(state)
        rest = all_windows(second)
        assert [(t.tolist(), n) for t, n in head] + rest == full, f"resume after {k} windows"


def test_iterable_dataset_resume():
    docs = token_docs(seed=4, n_docs=12)
    ids = datasets.Dataset.from_dict({"ids": docs}).to_iterable_dataset()
    full = all_windows(TokenWindows(ids, None, 6, tokens_column="ids", bos_token_id=BOS, pad_token_id=PAD))
    assert full == reference_windows(docs, 6, True, True)
    first = TokenWindows(ids, None, 6, tokens_column="ids", bos_token_id=BOS, pad_token_id=PAD)
    for _ in range(5):
        first.next_with_length()
    second = TokenWindows(ids, None, 6, tokens_column="ids", bos_token_id=BOS, pad_token_id=PAD)
    second.load_state_dict(first.state_dict())
    assert all_windows(second) == full[5:]


def test_ranks_split_documents():
    docs = token_docs(seed=8, n_docs=11)
    ds = datasets.Dataset.from_dict({"ids": docs})
    for r in range(3):
        windows = TokenWindows(ds, None, 8, tokens_column="ids", bos_token_id=BOS, pad_token_id=PAD, rank=r,
                               world_size=3)
        got = all_windows(windows)
        assert got == reference_windows(docs[r::3], 8, True, True)


def test_repeat_cycles_through_epochs():
    docs = token_docs(seed=9, n_docs=4)
    ds = datasets.Dataset.from_dict({"ids": docs})
    windows = TokenWindows(ds, None, 5, tokens_column="ids", bos_token_id=BOS, repeat=True)
    got = [windows.next_with_length()[0].tolist() for _ in range(40)]
    stream_twice = reference_windows(docs * 8, 5, True, True)
    assert got == [w for w, _ in stream_twice[:40]]
    assert windows.state_dict()["epoch"] >= 1


def test_load_dataset_any_local_formats(tmp_path):
    texts = ["the cat sat", "a dog ran far", "red ball"]
    (tmp_path / "docs.txt").write_text("\n".join(texts) + "\n")
    assert load_dataset_any(tmp_path / "docs.txt")["text"] == texts
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts))
    assert load_dataset_any(str(tmp_path / "docs.jsonl"))["text"] == texts
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts}),
                          "test": datasets.Dataset.from_dict({"text": texts[:1]})}).save_to_disk(str(saved))
    assert load_dataset_any(saved, split="test")["text"] == texts[:1]
    streamed = load_dataset_any(saved, streaming=True)
    assert [r["text"] for r in streamed] == texts
    with pytest.raises(ValueError, match=r"split='validation' is not in .*splits \['train', 'test'\]"):
        load_dataset_any(saved, split="validation")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty.jsonl is empty"):
        load_dataset_any(tmp_path / "empty.jsonl")
    (tmp_path / "blank.csv").write_text("text\n")
    with pytest.raises(ValueError, match="is empty"):
        load_dataset_any(tmp_path / "blank.csv")
    (tmp_path / "data.xyz").write_text("x")
    with pytest.raises(ValueError, match="unknown file type '.xyz'"):
        load_dataset_any(tmp_path / "data.xyz")


def test_bad_input_is_reported_before_any_work():
    tok = make_tokenizer()
    ds = datasets.Dataset.from_dict({"text": ["the cat"]})
    with pytest.raises(ValueError, match="dataset is empty"):
        TokenWindows(datasets.Dataset.from_dict({"text": []}), tok, 8)
    with pytest.raises(ValueError, match=r"text_column='body' is not a column of the dataset; "
                                         r"its columns are \['text'\]"):
        TokenWindows(ds, tok, 8, text_column="body")
    with pytest.raises(ValueError, match="needs a tokenizer"):
        TokenWindows(ds, None, 8)
    with pytest.raises(ValueError, match="has no BOS token"):
        TokenWindows(datasets.Dataset.from_dict({"ids": [[3, 4]]}), None, 8, tokens_column="ids")
    with pytest.raises(ValueError, match="context_size=0 must be a positive integer"):
        TokenWindows(ds, tok, 0)
    with pytest.raises(ValueError, match="context_size=1 leaves no room"):
        TokenWindows(ds, tok, 1)
    with pytest.raises(ValueError, match="DatasetDict"):
        TokenWindows(datasets.DatasetDict({"train": ds}), tok, 8)
    with pytest.raises(ValueError, match=r"rank=2 must be in \[0, world_size=2\)"):
        TokenWindows(ds, tok, 8, rank=2, world_size=2)
    with pytest.raises(ValueError, match="not a TokenWindows state_dict"):
        TokenWindows(ds, tok, 8).load_state_dict({"doc": 1})
    with pytest.raises(ValueError, match="for token ids use tokens_column"):
        all_windows(TokenWindows([{"text": [3, 4]}], tok, 8))
    with pytest.raises(ValueError, match="no tokens in a whole pass"):
        TokenWindows(datasets.Dataset.from_dict({"text": ["", ""]}), tok, 8, repeat=True).next_with_length()
