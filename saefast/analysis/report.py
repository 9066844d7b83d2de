"""HTML report: an index page and one page per feature (plain HTML, inline CSS, no JavaScript).

Layout of the report folder::

    index.html                 summary metrics, the pictures, a table of the report's features
    features/feature_<id>.html one page per feature: statistics, activation histogram, top tokens,
                               max-activating contexts (each token shaded by the feature's
                               activation on it), most similar features (decoder cosine),
                               co-occurring features, ablation effect when measured

Activations without token ids (synthetic data, caches written without them) have no contexts to
show, so those sections are left out; for synthetic data with planted features each page shows
instead the planted features closest to the latent's decoder row (cosine), and the index which
planted feature each latent recovers.

Every piece of text that comes from data (token text, metric names, metadata) goes through
``html.escape``. Pictures are referenced by relative path, so the folder can be moved or served
as is.
"""
from __future__ import annotations

import html
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .database import ActivationDatabase
from .features import FeatureStats, feature_stats, max_activating_examples, token_strings, top_tokens
from .similarity import cooccurring_features

__all__ = ["write_html_report", "feature_page_name", "planted_matches"]

PathLike = Union[str, os.PathLike]

_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.ctx { font-family: Menlo, Consolas, monospace; white-space: pre-wrap; line-height: 1.7; }
.tok { border-radius: 2px; } .center { outline: 1.5px solid #b03a2e; }
.unk { color: #aaa; } .muted { color: #777; font-size: 0.9em; }
.hist { display: flex; align-items: flex-end; height: 80px; gap: 1px; margin: 0.5em 0; }
.hist div { background: #3b6ea5; width: 14px; }
nav a { margin-right: 1em; }
"""


def feature_page_name(feature: int) -> str:
    """File name of a feature's page inside ``features/``."""
    return f"feature_{feature:05d}.html"


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return _e(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3e}"
        return f"{value:.4g}"
    return _e(value)


def _page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_e(title)}</title>"
            f"<style>{_CSS}</style></head><body>\n{body}\n</body></html>\n")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], num_cols: Sequence[int] = ()) -> str:
    """A table from already-escaped cells."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td class=\"num\">{c}</td>" if i in num_cols else f"<td>{c}</td>"
                                    for i, c in enumerate(row)) + "</tr>\n" for row in rows)
    return f"<table><tr>{head}</tr>\n{body}</table>"


def _kv_table(items: Mapping[str, Any]) -> str:
    rows = []
    for k, v in items.items():
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        cls = ' class="num"' if number else ""
        rows.append(f"<tr><td>{_e(k)}</td><td{cls}>{_fmt(v)}</td></tr>\n")
    return "<table><tr><th>metric</th><th>value</th></tr>\n" + "".join(rows) + "</table>"


def _context_html(text: Sequence[str], ids: Sequence[int], acts: Sequence[float], center: int, scale: float,
                  has_text: bool) -> str:
    """Tokens as spans shaded by activation / scale; the example's token outlined."""
    parts = []
    for i, (tok_id, act) in enumerate(zip(ids, acts)):
        if has_text:
            label = text[i] if i < len(text) else ""
            if tok_id < 0:
                parts.append("<span class=\"tok unk\">\u00b7</span>")
                continue
        else:
            label = f"<{tok_id}>" if tok_id >= 0 else "\u00b7"
        alpha = max(0.0, min(1.0, act / scale)) if scale > 0 else 0.0
        style = f"background: rgba(230, 97, 0, {alpha:.3f});"
        cls = "tok center" if i == center else "tok"
        parts.append(f"<span class=\"{cls}\" style=\"{style}\" title=\"{_e(f'{act:.4g}')}\">{_e(label)}</span>")
    return "<span class=\"ctx\">" + "".join(parts) + "</span>"


def _histogram_html(values: Tensor, bins: int = 24) -> str:
    """CSS bar chart of a feature's activation values (from 0 to the max)."""
    if not values.numel():
        return "<p class=\"muted\">never fires on the analysed tokens</p>"
    top = float(values.max())
    counts = torch.histc(values.float(), bins=bins, min=0.0, max=top if top > 0 else 1.0)
    peak = float(counts.max())
    bars = "".join(f"<div style=\"height: {max(1.0, 80.0 * float(c) / peak):.1f}px\" "
                   f"title=\"{_e(f'{int(c)} tokens')}\"></div>" for c in counts)
    return (f"<div class=\"hist\">{bars}</div><p class=\"muted\">activation values from 0 to {_fmt(top)}, "
            f"{bins} bins</p>")


def _feature_link(feature: int, pages: set, prefix: str) -> str:
    if feature in pages:
        return f"<a href=\"{prefix}{feature_page_name(feature)}\">{feature}</a>"
    return str(feature)


def write_html_report(out_dir: PathLike, features: Sequence[int], *, db: Optional[ActivationDatabase] = None,
                      W_dec: Optional[Tensor] = None, tokenizer: Any = None,
                      summary: Optional[Mapping[str, Any]] = None, images: Sequence[Tuple[str, str]] = (),
                      neighbours: Optional[Tuple[Tensor, Tensor]] = None,
                      ablation: Optional[Mapping[int, float]] = None, n_examples: int = 20,
                      context: Tuple[int, int] = (12, 4), n_similar: int = 10, title: str = "SAE analysis",
                      log10_density: Optional[Tensor] = None, planted: Optional[Tensor] = None) -> Path:
    """Write ``index.html`` and ``features/feature_<id>.html`` for ``features`` into ``out_dir``.

    Args:
        out_dir: report folder (created).
        features: the features that get a page (and a row in the index table).
        db: activation database (examples, statistics, top tokens, co-occurrence); None for a
            weights-only report.
        W_dec: [d_sae, d_in] decoder, for similar features when ``neighbours`` is not given.
        tokenizer: Hugging Face tokenizer to show token text (token ids are shown without it).
        summary: metrics shown on the index page (flat mapping of name -> value).
        images: (caption, path relative to out_dir) of pictures on the index page.
        neighbours: (cosines [d_sae, n], ids [d_sae, n]) from
            :func:`saefast.analysis.similarity.decoder_neighbours` over all features.
        ablation: {feature: CE loss increase when ablated}.
        n_examples: max-activating examples per page; context: tokens (before, after) each example.
        n_similar: similar / co-occurring features listed per page.
        title: the index page's title.
        log10_density: [d_sae] log10 firing frequency for a report without a database (e.g. from
            SAELens' sparsity file).
        planted: [n_planted, d_in] the planted directions of synthetic data (needs ``W_dec``): each
            page lists the planted features closest to the latent (decoder cosine), the index the
            best one.

    Returns the path of ``index.html``.
    """
    from .similarity import decoder_neighbours

    out = Path(out_dir)
    pages_dir = out / "features"
    pages_dir.mkdir(parents=True, exist_ok=True)
    features = [int(f) for f in features]
    d_sae = db.d_sae if db is not None else (W_dec.shape[0] if W_dec is not None else None)
    if d_sae is None:
        raise ValueError("write_html_report needs db or W_dec")
    bad = [f for f in features if not 0 <= f < d_sae]
    if bad:
        raise ValueError(f"features {bad[:5]} are not in [0, d_sae={d_sae})")
    stats: Optional[FeatureStats] = feature_stats(db) if db is not None else None
    if neighbours is None and W_dec is not None and d_sae > 1 and features:
        vals, ids = decoder_neighbours(W_dec, min(n_similar, d_sae - 1), features=features)
        near = {f: (vals[i], ids[i]) for i, f in enumerate(features)}
    elif neighbours is not None:
        near = {f: (neighbours[0][f], neighbours[1][f]) for f in features}
    else:
        near = {}
    page_set = set(features)
    has_text = tokenizer is not None and db is not None and db.has_token_ids
    matches: Dict[int, Tuple[Tensor, Tensor]] = {}
    if planted is not None:
        if W_dec is None:
            raise ValueError("planted needs W_dec (the decoder rows are matched to the planted directions)")
        matches = planted_matches(W_dec, planted, features, n=min(3, planted.shape[0]))

    rows = []
    for pos, f in enumerate(features):
        prev_f = features[pos - 1] if pos > 0 else None
        next_f = features[pos + 1] if pos + 1 < len(features) else None
        body = _feature_page(f, db, stats, near.get(f), page_set, tokenizer, has_text, ablation, n_examples,
                             context, n_similar, prev_f, next_f, log10_density, matches.get(f))
        (pages_dir / feature_page_name(f)).write_text(_page(f"Feature {f}", body), encoding="utf-8")
        rows.append(_index_row(f, db, stats, near.get(f), page_set, tokenizer, has_text, ablation, log10_density,
                               matches.get(f)))

    parts = [f"<h1>{_e(title)}</h1>"]
    if summary:
        parts.append("<h2>Summary</h2>" + _kv_table(summary))
    for caption, rel in images:
        parts.append(f"<h2>{_e(caption)}</h2><img src=\"{_e(Path(rel).as_posix())}\" alt=\"{_e(caption)}\">")
    header = ["feature", "density", "log10 density", "mean act", "max act", "nearest (cos)"]
    if matches:
        header.append("planted feature (cos)")
    if has_text:
        header.append("top tokens")
    if ablation:
        header.append("CE increase when ablated")
    parts.append(f"<h2>Features ({len(features)})</h2>" + _table([_e(h) for h in header], rows,
                                                                  num_cols=(1, 2, 3, 4)))
    index = out / "index.html"
    index.write_text(_page(title, "\n".join(parts)), encoding="utf-8")
    return index


def _density_cells(f: int, stats: Optional[FeatureStats], log10_density: Optional[Tensor]) -> List[str]:
    if stats is not None:
        return [_fmt(float(stats.density[f])), _fmt(float(stats.log10_density[f])),
                _fmt(float(stats.mean_activation[f])), _fmt(float(stats.max_activation[f]))]
    if log10_density is not None:
        ld = float(log10_density[f])
        return [_fmt(10 ** ld), _fmt(ld), "", ""]
    return ["", "", "", ""]


def _top_token_text(db: ActivationDatabase, f: int, tokenizer: Any, n: int = 5) -> List[Tuple[str, int]]:
    return [(token_strings(tokenizer, [t])[0], c) for t, c in top_tokens(db, f, n)]


def planted_matches(W_dec: Tensor, planted: Tensor, features: Sequence[int], n: int = 3) -> Dict[int, Tuple[Tensor, Tensor]]:
    """For each latent of ``features``: the ``n`` planted directions ([n_planted, d_in]) closest to
    its decoder row (W_dec [d_sae, d_in]), as (cosines [n], planted ids [n]), best first."""
    if planted.dim() != 2 or planted.shape[1] != W_dec.shape[1]:
        raise ValueError(f"planted must be [n_planted, d_in={W_dec.shape[1]}], got {tuple(planted.shape)}")
    if not features:
        return {}
    rows = torch.nn.functional.normalize(W_dec.detach()[list(features)].float().cpu(), dim=1)
    cos = rows @ torch.nn.functional.normalize(planted.detach().float().cpu(), dim=1).T
    vals, ids = cos.topk(min(n, planted.shape[0]), dim=1)
    return {f: (vals[i], ids[i]) for i, f in enumerate(features)}


def _index_row(f: int, db: Optional[ActivationDatabase], stats: Optional[FeatureStats], near: Any, pages: set,
               tokenizer: Any, has_text: bool, ablation: Optional[Mapping[int, float]],
               log10_density: Optional[Tensor], match: Any = None) -> List[str]:
    row = [_feature_link(f, pages, "features/")] + _density_cells(f, stats, log10_density)
    if near is not None and len(near[1]):
        row.append(f"{_feature_link(int(near[1][0]), pages, 'features/')} ({float(near[0][0]):.3f})")
    else:
        row.append("")
    if match is not None:
        row.append(f"{int(match[1][0])} ({float(match[0][0]):.3f})")
    if has_text:
        row.append(", ".join(f"<code>{_e(repr(t))}</code>" for t, _ in _top_token_text(db, f, tokenizer, 3)))
    if ablation:
        row.append(_fmt(ablation[f]) if f in ablation else "")
    return row


def _where(ex: Any) -> str:
    return f"window {ex.window_id}, pos {ex.position}" if ex.window_id >= 0 else f"token {ex.token_index}"


def _feature_page(f: int, db: Optional[ActivationDatabase], stats: Optional[FeatureStats], near: Any, pages: set,
                  tokenizer: Any, has_text: bool, ablation: Optional[Mapping[int, float]], n_examples: int,
                  context: Tuple[int, int], n_similar: int, prev_f: Optional[int], next_f: Optional[int],
                  log10_density: Optional[Tensor], match: Any = None) -> str:
    nav = ["<a href=\"../index.html\">index</a>"]
    if prev_f is not None:
        nav.append(f"<a href=\"{feature_page_name(prev_f)}\">&larr; feature {prev_f}</a>")
    if next_f is not None:
        nav.append(f"<a href=\"{feature_page_name(next_f)}\">feature {next_f} &rarr;</a>")
    parts = [f"<nav>{''.join(nav)}</nav>", f"<h1>Feature {f}</h1>"]
    info: Dict[str, Any] = {}
    if stats is not None:
        info.update({"tokens where it fires": int(stats.counts[f]), "of tokens analysed": stats.n_tokens,
                     "density": float(stats.density[f]), "log10 density": float(stats.log10_density[f]),
                     "mean activation (when firing)": float(stats.mean_activation[f]),
                     "max activation": float(stats.max_activation[f])})
    elif log10_density is not None:
        info.update({"log10 density (training)": float(log10_density[f])})
    if ablation and f in ablation:
        info["CE loss increase when ablated"] = float(ablation[f])
    if info:
        parts.append("<h2>Statistics</h2>" + _kv_table(info))
    if match is not None:
        rows = [[_e(int(i)), _fmt(float(v))] for v, i in zip(match[0], match[1])]
        parts.append("<h2>Planted features it recovers</h2><p class=\"muted\">the planted directions of the synthetic "
                     "data closest to this latent's decoder row; a cosine near 1 means the latent found that "
                     "feature</p>" + _table(["planted feature", "cosine"], rows, num_cols=(1,)))
    if db is not None:
        _, values = db.feature_activations(f)
        parts.append("<h2>Activation histogram</h2>" + _histogram_html(values))
    if db is not None and db.has_token_ids:
        if has_text:
            tops = _top_token_text(db, f, tokenizer, n_similar)
            if tops:
                parts.append("<h2>Tokens it fires on most</h2>" + _table(
                    ["token", "count"], [[f"<code>{_e(repr(t))}</code>", _fmt(c)] for t, c in tops], num_cols=(1,)))
        examples = max_activating_examples(db, f, n_examples, context[0], context[1], tokenizer if has_text else None)
        if examples:
            scale = examples[0].activation
            rows = [[_fmt(ex.activation), _context_html(ex.context_text, ex.context_ids, ex.context_acts, ex.center,
                                                        scale, has_text), _e(_where(ex))] for ex in examples]
            parts.append(f"<h2>Max-activating examples ({len(examples)})</h2>"
                         + _table(["activation", "context", "where"], rows, num_cols=(0,)))
            if not has_text:
                parts.append("<p class=\"muted\">no token text: no tokenizer was given, so tokens show as ids</p>")
        else:
            parts.append("<h2>Max-activating examples</h2><p class=\"muted\">never fires on the analysed tokens</p>")
    elif db is not None and match is None:
        parts.append("<p class=\"muted\">these activations carry no token ids, so there are no contexts to "
                     "show</p>")
    if near is not None and len(near[1]):
        rows = [[_feature_link(int(i), pages, ""), _fmt(float(v))] for v, i in zip(near[0], near[1])]
        parts.append("<h2>Most similar features (decoder cosine)</h2>" + _table(["feature", "cosine"], rows,
                                                                               num_cols=(1,)))
    if db is not None:
        co = cooccurring_features(db, f, n_similar, metric="jaccard")
        if co:
            rows = [[_feature_link(o, pages, ""), _fmt(c), _fmt(s)] for o, c, s in co]
            parts.append("<h2>Features firing on the same tokens</h2>"
                         + _table(["feature", "tokens together", "Jaccard"], rows, num_cols=(1, 2)))
    return "\n".join(parts)
