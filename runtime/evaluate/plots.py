"""PNG figures of an evaluation (:class:`.EvalReport`): protection against image quality, per-model bars,
and a before/after strip of sample faces.

matplotlib is an optional extra (``pip install 'uncnn-rt[plot]'``); it is imported inside the functions,
so the runtime imports without it.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

from uncnn_rt.runtime.errors import UncnnError
from uncnn_rt.runtime.evaluate.protocol import AS_SAVED, PROTOCOLS, SCORE_KINDS
from uncnn_rt.runtime.evaluate.report import EvalReport, Sample
from uncnn_rt.runtime.fileio import atomic_write_bytes, make_folder
from uncnn_rt.runtime.plotting import pyplot, save_png

AMPLIFY: Final = 10
"""The difference image shows ``128 + AMPLIFY * (cloaked - original)``."""
GOALS: Final = {AS_SAVED: 90.0, "jpeg75": 80.0}
"""Per condition, the protection (% of eligible probes) the figures mark as the goal, at mean SSIM >=
:data:`GOAL_SSIM`."""
GOAL_SSIM: Final = 0.95
_KIND_COLOURS: Final = {"white-box": "#7f7f7f", "leave-one-out": "#d62728", "external": "#1f77b4"}
_KIND_LABELS: Final = {
    "white-box": "white-box",
    "leave-one-out": "leave-one-out transfer",
    "external": "external (independent)",
}
_PROTOCOL_STYLE: Final = {"p1": ("o", "-"), "p2": ("s", "--"), "p3": ("^", ":")}
_PROTOCOL_LABELS: Final = {
    "p1": "P1 probe cloaked",
    "p2": "P2 gallery cloaked",
    "p3": "P3 unlinked among cloaked photos",
}


def protection_vs_ssim(report: EvalReport | Mapping[str, Any], path: str | Path) -> Path:
    """One panel per condition: pooled protection (%) against mean SSIM, one point per mode, a line per
    kind (white-box, leave-one-out, independent external) and protocol (P1, P2).

    ``report`` is an :class:`EvalReport` or its JSON form (``to_dict``; several runs' ``modes`` may be
    concatenated into one, as ``bench/eval_dev.py plot`` does).
    """
    data = report.to_dict() if isinstance(report, EvalReport) else report
    plt = pyplot()
    described = {c["name"]: c["description"] for c in data["conditions"]}
    conditions = list(described)
    fig, axes = plt.subplots(1, len(conditions), figsize=(5.2 * len(conditions), 4.6), squeeze=False)
    ssims = [1.0]
    for ax, condition in zip(axes[0], conditions, strict=True):
        ssims += _curves(ax, data, condition, _mean_ssim)
        goal = GOALS.get(condition)
        if goal is not None:
            ax.axvspan(GOAL_SSIM, 1.0, ymin=(goal + 2) / 104, color="#2ca02c", alpha=0.12, lw=0)
            ax.text(
                (GOAL_SSIM + 1.0) / 2,
                (goal + 102) / 2,
                f"goal\n>= {goal:g}%\nSSIM >= {GOAL_SSIM}",
                fontsize=7,
                ha="center",
                va="center",
                color="#2ca02c",
            )
        ax.set_title("as saved" if condition == AS_SAVED else f"after {described[condition]}")
        ax.set_xlabel("mean SSIM of the saved photo (1 = unchanged)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    low = min(min(ssims) - 0.01, GOAL_SSIM - 0.01)
    for ax in axes[0]:
        ax.set_xlim(low, 1.0)
    axes[0][0].set_ylabel("protection (% of probes recognized when clean)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(
        f"Protection vs image quality: {Path(data['dataset']).name}, {data['probes']} probes, "
        f"ensemble {'+'.join(data['ensemble'])}",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.1, 1, 0.95))
    return save_png(fig, path, dpi=110)


def protection_vs_flip(report: EvalReport | Mapping[str, Any], path: str | Path) -> Path:
    """One panel per condition: pooled protection (%) against the median face FLIP of the saved cloaks,
    one point per mode, a line per kind and protocol; dotted verticals mark the same photos' own JPEG
    q95/q85/q75 re-encodes. ``report`` as for :func:`protection_vs_ssim`."""
    data = report.to_dict() if isinstance(report, EvalReport) else report
    plt = pyplot()
    described = {c["name"]: c["description"] for c in data["conditions"]}
    conditions = list(described)
    fig, axes = plt.subplots(1, len(conditions), figsize=(5.2 * len(conditions), 4.6), squeeze=False)
    ladder = {q: v["flip"]["median"] for q, v in (data.get("jpeg_ladder") or {}).items() if v}
    for ax, condition in zip(axes[0], conditions, strict=True):
        _curves(ax, data, condition, _median_flip)
        for q, x in ladder.items():
            ax.axvline(x, color="#555555", linestyle=":", lw=1)
            ax.text(x, 101, q, fontsize=7, ha="center", va="bottom", color="#555555")
        ax.set_title("as saved" if condition == AS_SAVED else f"after {described[condition]}", pad=14)
        ax.set_xlabel("median FLIP of the face regions (0 = unchanged)")
        ax.set_xlim(left=0)
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("protection (% of probes recognized when clean)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(
        f"Protection vs visibility: {Path(data['dataset']).name}, {data['probes']} probes, "
        f"ensemble {'+'.join(data['ensemble'])}",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.1, 1, 0.95))
    return save_png(fig, path, dpi=110)


def _curves(
    ax: Any, data: Mapping[str, Any], condition: str, x_of: Callable[[Mapping[str, Any], str], float | None]
) -> list[float]:
    """On ``ax``, pooled protection (%) under ``condition`` against ``x_of(mode, kind)``: a point per mode,
    a line per kind and protocol, P1 points labelled with the mode. Returns the x values drawn."""
    xs: list[float] = []
    for kind in SCORE_KINDS:
        for protocol in PROTOCOLS:
            points = []
            for mode in data["modes"]:
                summary = mode["summary"].get(kind)
                x = x_of(mode, kind)
                if summary is None or x is None:
                    continue
                rate = summary["conditions"][condition][protocol]["rate"]
                if rate is not None:
                    points.append((x, 100.0 * rate, str(mode["mode"])))
            if not points:
                continue
            points.sort()
            xs += [p[0] for p in points]
            marker, line = _PROTOCOL_STYLE[protocol]
            ax.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                marker=marker,
                linestyle=line,
                color=_KIND_COLOURS[kind],
                label=f"{_KIND_LABELS[kind]}, {_PROTOCOL_LABELS[protocol]}",
            )
            if protocol == "p1":
                for x, y, name in points:
                    ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    return xs


def _mean_ssim(mode: Mapping[str, Any], kind: str) -> float | None:
    summary = mode["summary"].get(kind)
    return None if summary is None or summary["ssim_mean"] is None else float(summary["ssim_mean"])


def _median_flip(mode: Mapping[str, Any], kind: str) -> float | None:
    """The median face FLIP of the cloaks a kind is scored on: the white-box attack's (white-box and
    external), the mean of the leave-one-out attacks' medians (leave-one-out)."""
    rows = [q for q in mode["quality"] if q.get("visibility")]
    chosen = [q for q in rows if (q["attack"] == "white-box") == (kind != "leave-one-out")]
    values = [q["visibility"]["flip"]["median"] for q in chosen]
    return None if not values else float(np.mean(values))


def face_strip(samples: Sequence[Sample], path: str | Path, *, zoom: int = 1, height: int = 160) -> Path:
    """Faces side by side at a true pixel scale: per face, original above cloaked (as saved) above their
    difference amplified :data:`AMPLIFY` x, each row ``height`` pixels tall times ``zoom`` (nearest
    neighbour, so 200% shows the pixels as they are). Needs only Pillow."""
    from PIL import Image

    if not samples:
        raise UncnnError("no sample faces to draw (nothing was cloaked)")
    columns = []
    for sample in samples:
        rows = [sample.original, sample.cloaked, difference_image(sample.original, sample.cloaked)]
        h, w = sample.original.shape[:2]
        scale = min(1.0, height / h)
        size = (max(1, round(w * scale)) * zoom, max(1, round(h * scale)) * zoom)
        resample = Image.Resampling.NEAREST if scale == 1.0 else Image.Resampling.LANCZOS
        images = [Image.fromarray(r).resize((size[0] // zoom, size[1] // zoom), resample) for r in rows]
        if zoom > 1:
            images = [i.resize(size, Image.Resampling.NEAREST) for i in images]
        column = Image.new("RGB", (size[0], 3 * size[1] + 8), "white")
        for k, image in enumerate(images):
            column.paste(image, (0, k * (size[1] + 4)))
        columns.append(column)
    width = sum(c.width for c in columns) + 6 * (len(columns) - 1)
    strip = Image.new("RGB", (width, max(c.height for c in columns)), "white")
    x = 0
    for column in columns:
        strip.paste(column, (x, 0))
        x += column.width + 6
    target = Path(path)
    make_folder(target.parent)
    buffer = io.BytesIO()
    strip.save(buffer, format="PNG")
    atomic_write_bytes(target, buffer.getvalue())
    return target


def protection_bars(report: EvalReport | Mapping[str, Any], mode: str, path: str | Path) -> Path:
    """Per evaluator, P1 and P2 protection (%) as saved and after each transform, for the mode named
    ``mode`` of ``report`` (an :class:`EvalReport` or its JSON form)."""
    data = report.to_dict() if isinstance(report, EvalReport) else report
    chosen = [m for m in data["modes"] if m["mode"] == mode]
    if not chosen:
        raise UncnnError(
            f"no mode {mode!r} in the report (has: {', '.join(m['mode'] for m in data['modes'])})"
        )
    plt = pyplot()
    described = {c["name"]: c["description"] for c in data["conditions"]}
    conditions = list(described)
    scores = chosen[0]["scores"]
    fig, axes = plt.subplots(1, len(PROTOCOLS), figsize=(max(12.0, 1.3 * len(scores) + 7), 5.4), sharey=True)
    width = 0.8 / len(conditions)
    shades = ("#08306b", "#4292c6", "#9ecae1", "#deebf7")
    for ax, protocol in zip(axes, PROTOCOLS, strict=True):
        x = np.arange(len(scores))
        for k, condition in enumerate(conditions):
            rates = [s["conditions"][condition][protocol]["rate"] for s in scores]
            ax.bar(
                x + (k - (len(conditions) - 1) / 2) * width,
                [0.0 if r is None else 100.0 * r for r in rates],
                width,
                color=shades[k % len(shades)],
                label="as saved" if condition == AS_SAVED else f"after {described[condition]}",
            )
        ax.set_xticks(x)
        ax.set_xticklabels(
            [_score_label(s["evaluator"], s["kind"], s["duplicate_of"]) for s in scores],
            fontsize=7,
            rotation=35,
            ha="right",
        )
        ax.set_title(_PROTOCOL_LABELS[protocol])
        ax.set_ylim(0, 102)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("protection (%)")
    axes[-1].legend(fontsize=7, loc="upper right")
    fig.suptitle(f"Protection per recognizer, mode {mode}", fontsize=10)
    fig.tight_layout()
    return save_png(fig, path, dpi=110)


def _score_label(evaluator: str, kind: str, duplicate_of: str | None) -> str:
    tag = {"white-box": "white-box", "leave-one-out": "leave-one-out", "external": "external"}[kind]
    twin = f", = {duplicate_of}" if duplicate_of else ""
    return f"{evaluator} ({tag}{twin})"


def difference_image(original: NDArray[np.uint8], cloaked: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """``128 + AMPLIFY * (cloaked - original)``, clipped: grey where nothing changed."""
    diff = cloaked.astype(np.int32) - original.astype(np.int32)
    return np.clip(128 + AMPLIFY * diff, 0, 255).astype(np.uint8)


def before_after(samples: Sequence[Sample], path: str | Path, *, title: str = "") -> Path:
    """A strip of faces: original, cloaked (as saved), and the difference amplified :data:`AMPLIFY` x."""
    if not samples:
        raise UncnnError("no sample faces to draw (nothing was cloaked)")
    plt = pyplot()
    fig, axes = plt.subplots(3, len(samples), figsize=(max(2.2 * len(samples), 5.0), 7.0), squeeze=False)
    rows = ("original", "cloaked", f"difference x{AMPLIFY}")
    for j, sample in enumerate(samples):
        images = (sample.original, sample.cloaked, difference_image(sample.original, sample.cloaked))
        for i, image in enumerate(images):
            ax = axes[i][j]
            ax.imshow(image, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(rows[i])
        axes[0][j].set_title(sample.name, fontsize=8)
        axes[1][j].set_title(f"SSIM {sample.ssim:.3f}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_png(fig, path, dpi=110)


def write_plots(report: EvalReport, folder: str | Path) -> list[Path]:
    """Every figure of ``report`` into ``folder``: ``protection_vs_ssim.png``, ``protection_vs_flip.png``,
    and per mode ``protection_<mode>.png``, ``before_after_<mode>.png`` and the face strips at 100% and
    200%, ``faces_<mode>_100.png`` and ``faces_<mode>_200.png``."""
    out = Path(folder)
    make_folder(out)
    written = [
        protection_vs_ssim(report, out / "protection_vs_ssim.png"),
        protection_vs_flip(report, out / "protection_vs_flip.png"),
    ]
    for mode in report.modes:
        slug = "".join(ch if ch.isalnum() else "_" for ch in mode.mode).strip("_") or "mode"
        written.append(protection_bars(report, mode.mode, out / f"protection_{slug}.png"))
        if mode.samples:
            written.append(
                before_after(
                    mode.samples,
                    out / f"before_after_{slug}.png",
                    title=f"Mode {mode.mode}: white-box cloak ({'+'.join(report.ensemble)}), as saved",
                )
            )
            for zoom in (1, 2):
                written.append(face_strip(mode.samples, out / f"faces_{slug}_{100 * zoom}.png", zoom=zoom))
    return written
