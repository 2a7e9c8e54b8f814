"""Turn ``uncnn-rt eval --json`` reports into the tables of ``bench/RESULTS.md`` and a combined plot.

    python bench/eval_dev.py run ../shared/faces/dev --mode mid --set texture_floor=0.35 \
        --set ssim_min=0.95 --json bench/results/eval_mid_texture035.json
    python bench/eval_dev.py table bench/results/eval_mid.json [more.json ...]
    python bench/eval_dev.py plot bench/results/eval_*.json -o bench/results/protection_vs_ssim.png \
        --bars bench/results

``run`` evaluates aligned chips (the protocol of ``uncnn-rt eval --aligned``) with a recipe that the
CLI cannot express: any field of ``CloakSettings`` set with ``--set FIELD=VALUE`` on top of a mode.
``table`` prints one markdown table per mode: pooled white-box and leave-one-out protection (P1, P2, in
every condition), then each recognizer's leave-one-out row and the external evaluators, with mean SSIM
and seconds per photo. ``plot`` concatenates the modes of several reports of one dataset and ensemble
into one protection-vs-SSIM figure (one point per mode).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

from uncnn_rt.runtime import catalog
from uncnn_rt.runtime import evaluate as ev
from uncnn_rt.runtime.cloak import MODES, CloakSettings, default_recognizer_names, load_recognizers
from uncnn_rt.runtime.evaluate.plots import protection_bars, protection_vs_flip, protection_vs_ssim

SHORT = {"as_saved": "saved"}


def _pct(rate: dict[str, Any]) -> str:
    value, hits = rate["rate"], rate.get("protected", rate.get("unlinked"))
    return "-" if value is None else f"{100 * value:.1f}% ({hits}/{rate['of']})"


def _protocols(report: dict[str, Any]) -> tuple[str, ...]:
    """P1 and P2, and P3 in reports that have it (written since linkability was measured)."""
    first = report["modes"][0]["summary"]
    conditions = next(iter(first.values()))["conditions"] if first else {}
    return tuple(p for p in ("p1", "p2", "p3") if all(p in c for c in conditions.values()))


def _short(name: str) -> str:
    return SHORT.get(name, name)


def mode_table(report: dict[str, Any], mode: dict[str, Any]) -> str:
    conditions = [c["name"] for c in report["conditions"]]
    settings = mode["settings"]
    quality = {q["attack"]: q for q in mode["quality"]}
    white = quality.get("white-box")
    lines = [
        f"**{mode['mode']}**: {settings.get('description', '')}; recipe "
        + ", ".join(f"{k} {v}" for k, v in settings.items() if k not in ("description", "mode"))
        + f". {report['probes']} probes, ensemble {'+'.join(report['ensemble'])}.",
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
    protocols = _protocols(report)
    header += [f"{p.upper()} {_short(c)}" for p in protocols for c in conditions]
    header += ["mean SSIM", "s/photo", "self-sim"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for kind, summary in mode["summary"].items():
        cells = [f"**{kind} (pooled)**", ""]
        cells += [_pct(summary["conditions"][c][p]) for p in protocols for c in conditions]
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
        cells += [_pct(per[c][p]) for p in protocols for c in conditions]
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


def summary_rows(paths: list[Path]) -> str:
    """One row per mode and kind (white-box, leave-one-out): pooled P1/P2 in every condition."""
    out = []
    for path in paths:
        report = json.loads(path.read_text(encoding="utf-8"))
        conditions = [c["name"] for c in report["conditions"]]
        if not out:
            head = ["run", "eps", "steps", "SSIM floor", "scored"]
            protocols = _protocols(report)
            head += [f"{p.upper()} {_short(c)}" for p in protocols for c in conditions]
            head += ["mean SSIM", "s/photo"]
            out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for mode in report["modes"]:
            settings = mode["settings"]
            for kind in ("white-box", "leave-one-out"):
                summary = mode["summary"].get(kind)
                if summary is None:
                    continue
                attacks = [q for q in mode["quality"] if _kind_of(mode, q["attack"]) == kind]
                seconds = sum(q["seconds_per_photo"] for q in attacks) / max(len(attacks), 1)
                cells = [
                    mode["mode"],
                    f"{settings['eps']:g}",
                    str(settings["steps"]),
                    str(settings["ssim_min"]),
                    kind,
                ]
                cells += [
                    "-" if (r := summary["conditions"][c][p]["rate"]) is None else f"{100 * r:.1f}%"
                    for p in protocols
                    for c in conditions
                ]
                cells += [f"{summary['ssim_mean']:.3f}", f"{seconds:.1f}"]
                out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


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


def _value(text: str) -> Any:
    """A ``--set`` value: JSON (numbers, true/false, null, [70, 95]) or else the plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def recipe(mode: str, assignments: list[str]) -> CloakSettings:
    """``MODES[mode]`` with ``field=value`` overrides of any :class:`CloakSettings` field."""
    base = MODES[mode]
    known = {f.name for f in fields(CloakSettings)}
    changes: dict[str, Any] = {}
    for item in assignments:
        name, sep, text = item.partition("=")
        if not sep or name not in known:
            raise SystemExit(
                f"--set takes FIELD=VALUE with FIELD one of {', '.join(sorted(known))}; got {item!r}"
            )
        value = _value(text)
        changes[name] = tuple(value) if isinstance(value, list) else value
    label = mode + "".join(f" {k}={v}" for k, v in changes.items())
    return replace(base, mode=label, **changes)


def run(args: argparse.Namespace) -> None:
    """``uncnn-rt eval --aligned`` on chips with any recipe, through the runtime API."""
    settings = recipe(args.mode, args.set or [])
    data = ev.load_dataset(args.dataset)
    ensemble = default_recognizer_names()
    shipped = [e.name for e in catalog.load_manifest() if e.kind == "face" and e.threshold is not None]
    sessions = load_recognizers(list(dict.fromkeys(ensemble + shipped)), device="cpu")
    by_name = {s.name: s for s in sessions}
    cloak = ev.cloak_function(by_name, settings, no_align=True, seed=args.seed)
    report = ev.evaluate(
        data,
        cloaks={settings.mode: cloak},
        embedders=ev.shipped_embedders(sessions),
        ensemble=ensemble,
        transfer=not args.no_transfer,
        limit=args.limit,
        settings={
            settings.mode: {"description": settings.describe(), **json.loads(json.dumps(asdict(settings)))}
        },
        progress=lambda what: print(what, flush=True) if args.verbose else None,
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    for mode in report.to_dict()["modes"]:
        print(mode_table(report.to_dict(), mode))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    table = sub.add_parser("table", help="markdown tables for RESULTS.md")
    table.add_argument("reports", nargs="+", type=Path)
    brief = sub.add_parser("summary", help="one markdown row per mode and kind")
    brief.add_argument("reports", nargs="+", type=Path)
    plot = sub.add_parser("plot", help="one protection-vs-SSIM (or -FLIP) figure over several reports")
    plot.add_argument("--flip", action="store_true", help="against the median face FLIP instead of SSIM")
    plot.add_argument("reports", nargs="+", type=Path)
    plot.add_argument("-o", "--output", type=Path, required=True)
    plot.add_argument("--bars", type=Path, metavar="DIR", help="also one per-recognizer bar chart per mode")
    runner = sub.add_parser("run", help="eval aligned chips with any recipe (CloakSettings field overrides)")
    runner.add_argument("dataset", type=Path)
    runner.add_argument("--mode", default="mid", choices=sorted(MODES))
    runner.add_argument("--set", action="append", metavar="FIELD=VALUE", help="e.g. texture_floor=0.35")
    runner.add_argument("--limit", type=int)
    runner.add_argument("--no-transfer", action="store_true")
    runner.add_argument("--seed", type=int, default=0)
    runner.add_argument("--json", type=Path, required=True)
    runner.add_argument("-v", "--verbose", action="store_true", help="print each cloaked photo")
    args = parser.parse_args()
    if args.command == "run":
        run(args)
    elif args.command == "summary":
        print(summary_rows(args.reports))
    elif args.command == "table":
        for path in args.reports:
            report = json.loads(path.read_text(encoding="utf-8"))
            for mode in report["modes"]:
                print(f"<!-- {path} -->")
                print(mode_table(report, mode))
                print()
    else:
        report = merged(args.reports)
        print((protection_vs_flip if args.flip else protection_vs_ssim)(report, args.output))
        if args.bars is not None:
            for mode in report["modes"]:
                print(protection_bars(report, mode["mode"], args.bars / f"protection_{mode['mode']}.png"))


if __name__ == "__main__":
    main()
