"""Plot loss, validation loss and learning rate from a run's metrics.jsonl to a PNG.

    python launch/plot_metrics.py runs/tiny/metrics.jsonl [-o runs/tiny/curves.png]
"""
import argparse
import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.backend_bases import FigureCanvasBase  # noqa: E402

from cli_types import DefaultsHelpFormatter, tolerant_stdout, user_path  # noqa: E402  (launch/, the script's directory)


def curves(recs: list[dict]) -> tuple[list[dict], list[dict], list[int]]:
    """(training records, validation records, switch/reset steps), one per step in step order. A resumed
    run appends to metrics.jsonl and logs the steps after its checkpoint again: the later record wins."""
    def last_per_step(key):
        return sorted({r["step"]: r for r in recs if key in r}.values(), key=lambda r: r["step"])

    resets = sorted({r["step"] for r in recs if r.get("event") in ("reset", "switch_to_relora")})
    return last_per_step("loss"), last_per_step("val_loss"), resets


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                 formatter_class=DefaultsHelpFormatter)
    ap.add_argument("metrics", type=user_path)
    ap.add_argument("-o", "--out", help="image path, PNG unless its suffix names another format "
                    "(a directory, or a path ending in /, created if missing: DIR/curves.png; default: curves.png "
                    "next to the metrics file)")
    args = ap.parse_args(argv)
    args.out = args.out if args.out is None else os.path.expanduser(args.out)  # as user_path, keeping a trailing /
    if args.out is not None and args.out.endswith(("/", os.sep)):  # Path() would drop the slash: DIR.png
        Path(args.out).mkdir(parents=True, exist_ok=True)
    args.out = Path(args.out) if args.out is not None else None
    if args.metrics.is_dir():  # a run's output_dir: its metrics.jsonl
        args.metrics = args.metrics / "metrics.jsonl"
    if not args.metrics.is_file():
        ap.error(f"{args.metrics}: no such file")
    out = args.out or args.metrics.with_name("curves.png")
    if out.is_dir():
        out = out / "curves.png"
    elif not out.suffix:
        out = out.with_suffix(".png")  # what matplotlib would write: the path printed is the file written
    formats = FigureCanvasBase.get_supported_filetypes()
    if out.suffix[1:].lower() not in formats:
        ap.error(f"-o {out}: {out.suffix!r} is not an image format matplotlib writes; valid: "
                 f"{', '.join('.' + f for f in sorted(formats))}")
    if not out.parent.is_dir():
        ap.error(f"-o {out}: no directory {out.parent}")
    recs, cut = [], 0
    for line in args.metrics.read_text().splitlines():
        if line.strip():
            try:
                rec = json.loads(line)
            except ValueError:  # a line cut by a run killed mid-write (metrics.py moves it aside on resume)
                rec = None
            if isinstance(rec, dict):
                recs.append(rec)
            else:  # (or JSON but no record: a hand edit)
                cut += 1
    if cut:
        print(f"{args.metrics}: skipped {cut} line(s) that are not complete JSON records (a run killed mid-write?)")
    train, val, resets = curves(recs)
    if not train:
        ap.error(f"{args.metrics}: no training records")
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    ax1.plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8, label="train loss")
    if val:
        ax1.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
        # a mixture's members, each its own validation loss (relora_ds.evaluate: val_loss/<member>)
        for key in sorted({k for r in val for k in r if k.startswith("val_loss/")}):
            have = [r for r in val if key in r]
            ax1.plot([r["step"] for r in have], [r[key] for r in have], ".--", lw=0.8,
                     label=f"validation loss, {key.split('/', 1)[1]}")
    ax2.plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:green")
    for step in resets:
        for ax in (ax1, ax2):
            ax.axvline(step, color="gray", ls=":", lw=0.8)
    ax1.set_ylabel("loss")
    ax1.legend()
    ax2.set_ylabel("learning rate")
    ax2.set_xlabel("optimizer step (dotted: ReLoRA switch and resets)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    tolerant_stdout()
    main()
