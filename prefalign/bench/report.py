"""Leaderboards of `prefalign bench`: per-generator means with bootstrap CIs, paired win rates, and the files
(leaderboard.csv/.md, samples.csv, gallery.html, leaderboard.png).

Statistics: per reward, each prompt's score is the mean over its samples; a generator's score is the mean over
prompts with a 95% percentile-bootstrap CI resampling prompts (`prefalign.stats.bootstrap_ci`). The win rate
vs the baseline is paired per prompt (same prompt, same seeds), counting a win 1, a tie ½ and a loss 0 (in the
reward's better direction), averaged over prompts with the same bootstrap CI.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from prefalign.io import atomic_path, atomic_write_text
from prefalign.stats import bootstrap_ci


@dataclass
class RewardMeta:
    """A leaderboard column: the spec the user gave and what its numbers mean (from `RewardInfo`)."""

    spec: str
    version: str
    convention: str
    higher_is_better: bool


@dataclass
class GeneratorMeta:
    label: str
    settings: dict[str, Any]
    nfe: int | None
    seconds_per_image: float


def per_prompt_means(samples: pd.DataFrame, rewards: Sequence[str]) -> pd.DataFrame:
    """[generator, prompt_index] → mean score over the prompt's samples, one column per reward."""
    return samples.groupby(["generator", "prompt_index"], sort=False)[list(rewards)].mean()


def win_rate(scores: np.ndarray, baseline: np.ndarray, higher_is_better: bool) -> np.ndarray:
    """Per-prompt outcome vs the baseline on the same prompt: 1 win, ½ tie, 0 loss."""
    sign = np.sign(scores - baseline) * (1 if higher_is_better else -1)
    return (sign + 1) / 2


def summarise(
    samples: pd.DataFrame,
    generators: Sequence[GeneratorMeta],
    rewards: Sequence[RewardMeta],
    baseline: str | None,
) -> pd.DataFrame:
    """One row per generator: NFE, s/image, per reward the mean [95% CI] and the win rate vs `baseline`."""
    names = [r.spec for r in rewards]
    means = per_prompt_means(samples, names)
    base = means.loc[baseline] if baseline is not None else None
    rows = []
    for gen in generators:
        per_prompt = means.loc[gen.label]
        n_images = int((samples["generator"] == gen.label).sum())
        row: dict[str, Any] = {
            "generator": gen.label,
            "nfe": gen.nfe,
            "seconds_per_image": gen.seconds_per_image,
            "prompts": len(per_prompt),
            "images": n_images,
        }
        for reward in rewards:
            ci = bootstrap_ci(per_prompt[reward.spec].to_numpy())
            row.update(
                {reward.spec: ci.mean, f"{reward.spec}_ci_low": ci.low, f"{reward.spec}_ci_high": ci.high}
            )
        for reward in rewards:
            if base is None or gen.label == baseline:
                ci_values = (math.nan, math.nan, math.nan)
            else:
                paired = per_prompt[reward.spec].reindex(base.index).to_numpy()
                ci = bootstrap_ci(win_rate(paired, base[reward.spec].to_numpy(), reward.higher_is_better))
                ci_values = (ci.mean, ci.low, ci.high)
            key = f"win_{reward.spec}"
            row.update(dict(zip((key, f"{key}_ci_low", f"{key}_ci_high"), ci_values, strict=True)))
        rows.append(row)
    return pd.DataFrame(rows)


def leaderboard_markdown(
    board: pd.DataFrame,
    generators: Sequence[GeneratorMeta],
    rewards: Sequence[RewardMeta],
    context: dict[str, Any],
) -> str:
    """The leaderboard as markdown: table, generator settings, score conventions and the statistics used."""
    baseline = context.get("baseline")
    header = ["generator", *(r.spec for r in rewards)]
    if baseline is not None:
        header += [f"win vs {baseline} ({r.spec})" for r in rewards]
    header += ["NFE", "s / image"]
    lines = [
        f"# prefalign bench — {context['suite']}",
        "",
        f"{context['prompts']} prompts × {context['samples_per_prompt']} sample(s), seed {context['seed']}. "
        f"Prompts: {context['source']} ({context['rule']}).",
        "Scores: mean over prompts of the per-prompt mean [95% bootstrap CI, prompts resampled]. "
        "Win rate: paired per prompt against the baseline (same prompt and seeds; tie = ½).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for _, row in board.iterrows():
        cells = [str(row["generator"])]
        cells += [_ci(row, r.spec, "{:.4g}") for r in rewards]
        if baseline is not None:
            cells += [
                "—" if row["generator"] == baseline else _ci(row, f"win_{r.spec}", "{:.1%}") for r in rewards
            ]
        nfe = row["nfe"]
        cells += ["—" if nfe is None or pd.isna(nfe) else str(int(nfe)), f"{row['seconds_per_image']:.4g}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Generators", ""]
    for gen in generators:
        settings = ", ".join(
            f"{k}={v!r}" if isinstance(v, str) and k == "negative" else f"{k}={v}"
            for k, v in gen.settings.items()
        )
        lines.append(f"- **{gen.label}**: {settings}")
    lines += ["", "## Score conventions", ""]
    for r in rewards:
        direction = "higher is better" if r.higher_is_better else "lower is better"
        lines.append(f"- **{r.spec}** ({r.version}): {r.convention}; {direction}")
    lines += [
        "",
        "Files: samples.csv (per-image scores), gallery.html, leaderboard.png, leaderboard.csv.",
        "",
    ]
    return "\n".join(lines)


def _ci(row: pd.Series, key: str, fmt: str) -> str:
    if pd.isna(row[key]):
        return "—"
    return f"{fmt.format(row[key])} [{fmt.format(row[f'{key}_ci_low'])}, {fmt.format(row[f'{key}_ci_high'])}]"


def gallery_html(
    samples: pd.DataFrame,
    generators: Sequence[GeneratorMeta],
    rewards: Sequence[RewardMeta],
    max_prompts: int,
    title: str,
) -> str:
    """A prompt × generator grid for the first prompts: each image captioned with its scores, and a last row
    with each generator's mean score per reward over all prompts."""
    labels = [g.label for g in generators]
    prompt_rows = samples.drop_duplicates("prompt_index").sort_values("prompt_index").head(max_prompts)
    by_cell = {key: group for key, group in samples.groupby(["prompt_index", "generator"], sort=False)}
    out = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif}td,th{border:1px solid #ccc;padding:4px;vertical-align:top}"
        "img{width:128px;image-rendering:pixelated}table{border-collapse:collapse}"
        "figure{display:inline-block;margin:1px;text-align:center}figcaption{font-size:11px}"
        "tr.mean td{background:#f4f4f4;font-weight:bold}</style>",
        f"</head><body><h1>{html.escape(title)}</h1>",
        f"<p>First {len(prompt_rows)} of {samples['prompt_index'].nunique()} prompts; under each image its "
        f"scores ({html.escape(', '.join(r.spec for r in rewards))}).</p><table><tr><th>prompt</th>"
        + "".join(f"<th>{html.escape(x)}</th>" for x in labels)
        + "</tr>",
    ]
    for _, prompt in prompt_rows.iterrows():
        group = f"<br><small>{html.escape(str(prompt['group']))}</small>" if prompt["group"] else ""
        cells = [f"<td>{html.escape(str(prompt['prompt']))}{group}</td>"]
        for label in labels:
            figures = []
            for _, sample in by_cell[(prompt["prompt_index"], label)].iterrows():
                caption = " · ".join(f"{sample[r.spec]:.3g}" for r in rewards)
                figures.append(f"<figure><img src='{html.escape(sample['image'])}' loading='lazy'>"
                               f"<figcaption>{html.escape(caption)}</figcaption></figure>")
            cells.append("<td>" + "".join(figures) + "</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    means = samples.groupby("generator")[[r.spec for r in rewards]].mean()
    mean_cells = ["<td>mean over all prompts</td>"] + [
        "<td>" + "<br>".join(f"{html.escape(r.spec)} {means.loc[label, r.spec]:.3g}" for r in rewards) + "</td>"
        for label in labels
    ]
    out.append("<tr class='mean'>" + "".join(mean_cells) + "</tr>")
    out.append("</table></body></html>")
    return "\n".join(out)


def bar_plot(board: pd.DataFrame, rewards: Sequence[RewardMeta], path: Path, title: str) -> None:
    """One panel per reward: a bar per generator with its 95% CI (matplotlib Agg canvas, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(4.0, 1.2 * len(board)) * len(rewards), 4.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(rewards), squeeze=False)[0]
    x = np.arange(len(board))
    for ax, reward in zip(axes, rewards, strict=True):
        mean = board[reward.spec].to_numpy(dtype=float)
        err = np.stack(
            [
                mean - board[f"{reward.spec}_ci_low"].to_numpy(float),
                board[f"{reward.spec}_ci_high"].to_numpy(float) - mean,
            ]
        )
        ax.bar(x, mean, yerr=err, capsize=4, color=[f"C{i % 10}" for i in range(len(board))])
        ax.set_xticks(x, board["generator"].tolist(), rotation=30, ha="right")
        arrow = "↑" if reward.higher_is_better else "↓"
        ax.set_title(f"{reward.spec} {arrow}")
        ax.set_ylabel(reward.convention, fontsize=8)
    fig.suptitle(title)
    fig.subplots_adjust(bottom=0.3, wspace=0.35)  # room for rotated labels; constrained layout costs ~1 s
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def write_reports(
    out: Path,
    samples: pd.DataFrame,
    generators: Sequence[GeneratorMeta],
    rewards: Sequence[RewardMeta],
    context: dict[str, Any],
    gallery_prompts: int,
) -> pd.DataFrame:
    """Write samples.csv, leaderboard.csv/.md, gallery.html and leaderboard.png to `out`; return the board."""
    board = summarise(samples, generators, rewards, context.get("baseline"))
    with atomic_path(out / "samples.csv") as tmp:
        samples.to_csv(tmp, index=False)
    with atomic_path(out / "leaderboard.csv") as tmp:
        board.to_csv(tmp, index=False)
    atomic_write_text(out / "leaderboard.md", leaderboard_markdown(board, generators, rewards, context))
    title = f"prefalign bench — {context['suite']}"
    atomic_write_text(
        out / "gallery.html", gallery_html(samples, generators, rewards, gallery_prompts, title)
    )
    bar_plot(board, rewards, out / "leaderboard.png", title)
    return board
