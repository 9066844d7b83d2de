"""Pictures and the HTML report: the files are written and hold what they should (ids, escaped text)."""
import html
import json
import re

import pytest
import torch

from analysis_helpers import VOCAB, make_tokenizer
from saefast.analysis.database import ActivationDatabase
from saefast.analysis.features import feature_stats
from saefast.analysis.plots import plot_feature_density, plot_training_curves, read_metrics
from saefast.analysis.report import feature_page_name, write_html_report
from saefast.analysis.similarity import decoder_neighbours

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_density_histogram_and_training_curves(tmp_path):
    log10 = torch.cat([torch.linspace(-5, -0.5, 40, dtype=torch.float64), torch.full((3,), -10.0),
                       torch.tensor([float("-inf")], dtype=torch.float64)])
    path = plot_feature_density(log10, tmp_path / "pics" / "density.png")
    assert _png_size(path) == (700, 400)
    with pytest.raises(ValueError, match=r"1-D tensor \[d_sae\]"):
        plot_feature_density(log10[None], tmp_path / "x.png")

    rows = [{"kind": "train", "step": s, "loss": 1.0 / s, "mse_loss": 0.8 / s, "l0": 8.0 + s, "dead_fraction": 0.1,
             "lr": 1e-3, "note": "text is skipped"} for s in range(1, 6)]
    rows += [{"kind": "eval", "step": s, "explained_variance": 0.5 + 0.1 * s, "mse": float("nan")} for s in (2, 5)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = read_metrics(tmp_path)
    assert metrics["train"]["loss"] == ([1, 2, 3, 4, 5], [1.0, 0.5, 1 / 3, 0.25, 0.2])
    assert "note" not in metrics["train"] and "mse" not in metrics["eval"]
    assert metrics["eval"]["explained_variance"][0] == [2, 5]
    curves = plot_training_curves(tmp_path, tmp_path / "curves.png")
    # loss, mse_loss, l0, dead_fraction, lr (train) + explained_variance (eval): 6 panels, 3 columns x 2 rows
    assert _png_size(curves) == (1260, 560)
    assert _png_size(plot_training_curves(metrics, tmp_path / "one.png", keys=["l0"])) == (420, 280)
    assert plot_training_curves({"train": {}, "eval": {}}, tmp_path / "none.png") is None
    with pytest.raises(ValueError, match="key 'accuracy' is not in the metrics"):
        plot_training_curves(metrics, tmp_path / "bad.png", keys=["accuracy"])
    with pytest.raises(FileNotFoundError, match="no metrics file"):
        read_metrics(tmp_path / "nowhere")


def _db_with_text():
    """Windows whose text holds '<', '>', '&' and '"'; feature 2 fires most on the '<' tokens."""
    words = ["the", "<", "b", ">", "&", "cat", '"', "sat"]
    ids = torch.tensor([[VOCAB[w] for w in words], [VOCAB[w] for w in reversed(words)]])
    n_windows, seq = ids.shape
    n_tokens = n_windows * seq
    token_ids = ids.reshape(-1)
    dense = torch.zeros(n_tokens, 6)
    dense[:, 2] = torch.where(token_ids == VOCAB["<"], 3.0, 0.5 * (torch.arange(n_tokens) % 3 == 0).float())
    dense[:, 4] = (torch.arange(n_tokens) % 2).float() * 1.5
    dense[3, 1] = 0.25
    t, f = torch.nonzero(dense, as_tuple=True)
    return ActivationDatabase(dense[t, f], f, t, n_tokens, 6, token_ids=token_ids,
                              window_ids=torch.arange(n_tokens) // seq, positions=torch.arange(n_tokens) % seq,
                              context_window_ids=torch.arange(n_windows), context_tokens=ids), dense


def test_html_report_pages_hold_examples_similarity_and_escaped_text(tmp_path):
    db, dense = _db_with_text()
    g = torch.Generator().manual_seed(0)
    W_dec = torch.randn(6, 5, generator=g)
    features = [1, 2, 4, 5]
    index = write_html_report(tmp_path / "report", features, db=db, W_dec=W_dec, tokenizer=make_tokenizer(),
                              summary={"l0_mean": 1.5, "model <name>": 'a&b "c"'},
                              images=[("Feature density", "density.png")],
                              ablation={2: 0.125}, n_examples=3, context=(2, 1), n_similar=3, title="Report <1>")
    text = index.read_text()
    assert "<h1>Report &lt;1&gt;</h1>" in text and "model &lt;name&gt;" in text and "a&amp;b &quot;c&quot;" in text
    assert '<img src="density.png"' in text
    for f in features:
        assert f'href="features/{feature_page_name(f)}"' in text
        assert (tmp_path / "report" / "features" / feature_page_name(f)).is_file()
    stats = feature_stats(db)
    assert f"{float(stats.max_activation[2]):.4g}" in text

    page = (tmp_path / "report" / "features" / feature_page_name(2)).read_text()
    # no raw data text anywhere: every '<' of the page starts a tag
    assert not re.search(r"<(?![a-zA-Z/!])", page)
    assert "Feature 2" in page and "0.125" in page
    # the two strongest examples are the '<' tokens (3.0): the example token is outlined and fully
    # shaded, the words around it escaped
    examples = page.split("Max-activating examples")[1]
    assert examples.count('class="tok center" style="background: rgba(230, 97, 0, 1.000);"') == 2
    assert '"> &lt;</span>' in examples and '">&gt;</span>' in examples
    assert 'title="3"' in examples
    # most similar features by decoder cosine, in order, linked when they have a page
    _, near = decoder_neighbours(W_dec, 3)
    similar = page.split("Most similar features")[1].split("</table>")[0]
    found = [int(m) for m in re.findall(r"<tr><td>(?:<a href=\"feature_\d+\.html\">)?(\d+)", similar)]
    assert found == near[2].tolist()
    # co-occurrence with feature 4: the tokens where both fire
    together = int(((dense[:, 2] > 0) & (dense[:, 4] > 0)).sum())
    co = page.split("Features firing on the same tokens")[1]
    assert f'href="feature_00004.html">4</a></td><td class="num">{together}</td>' in co
    # pages link back to the index and to their neighbours in the report
    assert 'href="../index.html"' in page and f'href="{feature_page_name(1)}"' in page
    assert "never fires" in (tmp_path / "report" / "features" / feature_page_name(5)).read_text()


def test_html_report_without_tokens_or_database(tmp_path):
    db, _ = _db_with_text()
    anon = ActivationDatabase(db.values, db.feature_ids, db.token_index, db.n_tokens, db.d_sae)
    write_html_report(tmp_path / "anon", [2], db=anon, W_dec=torch.randn(6, 5))
    page = (tmp_path / "anon" / "features" / feature_page_name(2)).read_text()
    assert "no contexts to show" in page and "Max-activating examples" not in page and "\u00b7" not in page
    assert html.escape("<-1>") not in page and "Activation histogram" in page
    weights_only = write_html_report(tmp_path / "w", [0, 3], W_dec=torch.randn(6, 5),
                                     log10_density=torch.tensor([-1.0, -2, -10, -3, -4, -5]))
    assert "features/feature_00003.html" in weights_only.read_text()
    assert "log10 density (training)" in (tmp_path / "w" / "features" / feature_page_name(3)).read_text()
    with pytest.raises(ValueError, match="needs db or W_dec"):
        write_html_report(tmp_path / "x", [0])
    with pytest.raises(ValueError, match=r"features \[9\] are not in \[0, d_sae=6\)"):
        write_html_report(tmp_path / "x", [9], W_dec=torch.randn(6, 5))


def test_html_report_with_planted_features_names_the_closest_ones(tmp_path):
    g = torch.Generator().manual_seed(0)
    planted = torch.nn.functional.normalize(torch.randn(4, 5, generator=g), dim=1)
    W_dec = torch.cat([planted[[2, 0]] * 3 + 0.01 * torch.randn(2, 5, generator=g), torch.randn(4, 5, generator=g)])
    db, _ = _db_with_text()
    anon = ActivationDatabase(db.values, db.feature_ids, db.token_index, db.n_tokens, db.d_sae)
    index = write_html_report(tmp_path / "p", [0, 1, 4], db=anon, W_dec=W_dec, planted=planted).read_text()
    cos = torch.nn.functional.normalize(W_dec, dim=1) @ planted.T
    for f in (0, 1, 4):
        page = (tmp_path / "p" / "features" / feature_page_name(f)).read_text()
        best, ids = cos[f].topk(3)
        rows = re.findall(r"<tr><td>(\d+)</td><td class=\"num\">([-\d.e]+)</td></tr>",
                          page.split("Planted features it recovers")[1].split("</table>")[0])
        assert [int(i) for i, _ in rows] == ids.tolist()
        assert [float(c) for _, c in rows] == pytest.approx(best.tolist(), abs=1e-3)
        assert f"<td>{int(ids[0])} ({float(best[0]):.3f})</td>" in index
        assert "no contexts to show" not in page  # the planted match replaces them
    assert "<td>2 (1.000)</td>" in index and "<td>0 (1.000)</td>" in index
    with pytest.raises(ValueError, match="planted needs W_dec"):
        write_html_report(tmp_path / "q", [0], db=anon, planted=planted)
    with pytest.raises(ValueError, match=r"planted must be \[n_planted, d_in=5\]"):
        write_html_report(tmp_path / "q", [0], W_dec=W_dec, planted=torch.randn(4, 3))
