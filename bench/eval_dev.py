"""Turn ``uncnn-rt eval --json`` reports into the tables of ``bench/RESULTS.md`` and a combined plot.

    python bench/eval_dev.py table bench/results/eval_mid.json [more.json ...]
    python bench/eval_dev.py plot bench/results/eval_*.json -o bench/results/protection_vs_ssim.png \
        --bars bench/results

``table`` prints one markdown table per mode: pooled white-box and leave-one-out protection (P1, P2, in
every condition), then each recognizer's leave-one-out row and the external evaluators, with mean SSIM
and seconds per photo. ``plot`` concatenates the modes of several reports of one dataset and ensemble
into one protection-vs-SSIM figure (one point per mode).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from uncnn_rt.runtime.plots import protection_bars, protection_vs_ssim

SHORT = {"as_saved": "saved"}


def _pct(rate: dict[str, Any]) -> str:
    value = rate["rate"]
    return "-" if value is None else f"{100 * value:.1f}% ({rate['protected']}/{rate['of']})"


def _short(name: str) -> str:
    return SHORT.get(name, name)


def mode_table(report: dict[str, Any], mode: dict[str, Any]) -> str:
    conditions = [c["name"] for c in report["conditions"]]
    settings = mode["settings"]
    quality = {q["attack"]: q for q in mode["quality"]}
    white = quality.get("white-box")
    lines = [
        f"**{mode['mode']}**: {settings.get('description', '')}; step {settings.get('step_size')}, "
        f"momentum {settings.get('momentum')}, DI {settings.get('diversity')}, EOT JPEG "
        f"{settings.get('eot_quality')}, TI {settings.get('smoothing')}, texture floor "
        f"{settings.get('texture_floor')}, stop margin {settings.get('stop_margin')}. "
        f"{report['probes']} probes, ensemble {'+'.join(report['ensemble'])}.",
        "",
    ]
    if white is not None:
        lines += [
            f"White-box cloak: mean SSIM {white['ssim_mean']:.4f} (min {white['ssim_min']:.4f}), "
            f"PSNR {white['psnr_mean']} dB, L-inf max {white['linf_max']} (mean {white['linf_mean']}), "
            f"{white['seconds_per_photo']:.1f} s/photo, {white['steps_mean']} steps run on average.",
            "",
        ]
    header = ["rows", "eligible"]
    header += [f"P1 {_short(c)}" for c in conditions] + [f"P2 {_short(c)}" for c in conditions]
    header += ["mean SSIM", "s/photo", "self-sim"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for kind, summary in mode["summary"].items():
        cells = [f"**{kind} (pooled)**", ""]
        cells += [_pct(summary["conditions"][c][p]) for p in ("p1", "p2") for c in conditions]
        attacks = [q for q in mode["quality"] if _kind_of(mode, q["attack"]) == kind]
        seconds = sum(q["seconds_per_photo"] for q in attacks) / max(len(attacks), 1)
        cells += [f"{summary['ssim_mean']:.4f}", f"{seconds:.1f}", ""]
        lines.append("| " + " | ".join(cells) + " |")
    for score in mode["scores"]:
        if score["kind"] == "white-box" and len(mode["summary"]) > 1:
            name = f"{score['evaluator']} (white-box)"
        else:
            name = f"{score['evaluator']} ({score['kind']}, {score['attack']})"
        if score["duplicate_of"]:
            name += f", = {score['duplicate_of']}, not independent"
        q = quality[score["attack"]]
        per = score["conditions"]
        sim = per["as_saved"]["mean_self_similarity"]
        cells = [name, str(score["eligible"])]
        cells += [_pct(per[c][p]) for p in ("p1", "p2") for c in conditions]
        cells += [
            f"{q['ssim_mean']:.4f}",
            f"{q['seconds_per_photo']:.1f}",
            "-" if sim is None else f"{sim:.3f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    group = mode.get("group_photos")
    if group:
        lines += ["", group_table(report, group)]
    return "\n".join(lines)


def _kind_of(mode: dict[str, Any], attack: str) -> str | None:
    kinds = {s["kind"] for s in mode["scores"] if s["attack"] == attack} - {"external"}
    return next(iter(kinds), None)


def group_table(report: dict[str, Any], group: dict[str, Any]) -> str:
    conditions = [c["name"] for c in report["conditions"]]
    quality = {q["attack"]: q for q in group["quality"]}
    white = quality["white-box"]
    lines = [
        f"Group photos ({group['photos']} photos, {group['faces']} faces), self-protection: the cloaked "
        f"face's similarity to its own clean embedding below the threshold. White-box whole-photo SSIM "
        f"{white['ssim_mean']:.4f}, {white['seconds_per_photo']:.1f} s/photo.",
        "",
        "| evaluator | " + " | ".join(f"protected {_short(c)}" for c in conditions) + " | mean sim saved |",
        "|---|" + "---|" * (len(conditions) + 1),
    ]
    for s in group["scores"]:
        name = f"{s['evaluator']} ({s['kind']}{'' if s['kind'] != 'leave-one-out' else ', ' + s['attack']})"
        if s["duplicate_of"]:
            name += f", = {s['duplicate_of']}"
        per = s["conditions"]
        cells = [
            f"{100 * r['rate']:.0f}% ({r['protected']}/{r['of']})" if r["rate"] is not None else "-"
            for r in (per[c]["protected"] for c in conditions)
        ]
        sim = per["as_saved"]["mean_similarity"]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'-' if sim is None else f'{sim:.3f}'} |")
    return "\n".join(lines)


def merged(paths: list[Path]) -> dict[str, Any]:
    reports = [json.loads(p.read_text(encoding="utf-8")) for p in paths]
    first = dict(reports[0])
    for other in reports[1:]:
        if (other["dataset"], other["ensemble"], other["probes"]) != (
            first["dataset"],
            first["ensemble"],
            first["probes"],
        ):
            raise SystemExit("reports differ in dataset, ensemble or probes; plot them separately")
    first["modes"] = [m for r in reports for m in r["modes"]]
    return first


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    table = sub.add_parser("table", help="markdown tables for RESULTS.md")
    table.add_argument("reports", nargs="+", type=Path)
    plot = sub.add_parser("plot", help="one protection-vs-SSIM figure over several reports")
    plot.add_argument("reports", nargs="+", type=Path)
    plot.add_argument("-o", "--output", type=Path, required=True)
    plot.add_argument("--bars", type=Path, metavar="DIR", help="also one per-recognizer bar chart per mode")
    args = parser.parse_args()
    if args.command == "table":
        for path in args.reports:
            report = json.loads(path.read_text(encoding="utf-8"))
            for mode in report["modes"]:
                print(f"<!-- {path} -->")
                print(mode_table(report, mode))
                print()
    else:
        report = merged(args.reports)
        print(protection_vs_ssim(report, args.output))
        if args.bars is not None:
            for mode in report["modes"]:
                print(protection_bars(report, mode["mode"], args.bars / f"protection_{mode['mode']}.png"))


if __name__ == "__main__":
    main()
