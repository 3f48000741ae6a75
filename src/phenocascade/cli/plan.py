"""``phenocascade plan NAME...``: a topology whose tiers follow stored datasets' labels."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import shutil
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from phenocascade.config import get_settings
from phenocascade.data.planning import CascadePlan, plan_cascade
from phenocascade.data.registry import StoredDataset, load_dataset

# As `data show`'s: the table's seven columns squeeze into unreadable pieces below 120.
console = Console(width=max(120, shutil.get_terminal_size().columns))


def register(subparsers: Any) -> None:
    """Add the ``plan`` sub-command to the top-level parser's subparsers."""
    plan = subparsers.add_parser(
        "plan",
        help="write a topology whose tiers follow stored datasets' label frequencies",
        description=(
            "Read the label frequencies and kinds of stored datasets (`phenocascade data "
            "import ... --name NAME`), print which tier decides each label and why, and write "
            "a topology: the quality gate, a classifier per label group with a frequent label, "
            "one for the other image labels, one for the presence of frequent object classes, "
            "and a detector for the rare ones. The rules: phenocascade.data.planning."
        ),
    )
    plan.add_argument("names", nargs="+", metavar="NAME", help="stored dataset(s)")
    plan.add_argument(
        "--out", type=Path, default=None, help="topology file (default: topology-<NAME>.yaml)"
    )
    plan.add_argument(
        "--minority-max-fraction",
        type=float,
        default=0.15,
        help="a label at most this frequent is rare (default: %(default)s)",
    )
    plan.add_argument(
        "--quality",
        choices=("own", "generic"),
        default="own",
        help="gate trained on the first dataset, or the bundled one (default: %(default)s)",
    )
    plan.add_argument(
        "--prefix",
        default=None,
        help="prefix of topics and consumer groups (default: '<NAME>.'; '' for none)",
    )
    plan.add_argument("--json", action="store_true", help="print JSON instead of a table")
    plan.set_defaults(func=_plan)


def _plan(args: argparse.Namespace) -> int:
    store = get_settings().dataset_store
    datasets = [load_dataset(store, name) for name in args.names]
    plan = plan_cascade(
        datasets,
        minority_max_fraction=args.minority_max_fraction,
        quality=args.quality,
        prefix=args.prefix,
    )
    out: Path = args.out or Path(f"topology-{args.names[0]}.yaml")
    out.write_text(plan.to_yaml(_header(args, plan, datasets)))
    if args.json:
        rows = [dataclasses.asdict(row) for row in plan.rows]
        print(json.dumps({"out": str(out), "prefix": plan.prefix, "rows": rows}, indent=2))
        return 0
    console.print(plan_table(plan))
    # The reasons are sentences: beneath the table, where they never squeeze its columns.
    for row in plan.rows:
        why = f"{row.label} ({row.dataset}): {row.why}"
        console.print(f"  {escape(why)}", soft_wrap=True, highlight=False)
    console.print(f"wrote {escape(str(out))}; next:")
    for step in next_steps(plan, out):
        # Commands to copy: never wrapped at the terminal's width.
        console.print(f"  {escape(step)}", soft_wrap=True)
    return 0


def _header(args: argparse.Namespace, plan: CascadePlan, datasets: list[StoredDataset]) -> str:
    """Return the file's header: the command that made it and the dataset versions."""
    command = [
        "phenocascade",
        "plan",
        *args.names,
        f"--minority-max-fraction={args.minority_max_fraction}",
        f"--quality={args.quality}",
        f"--prefix={plan.prefix}",
    ]
    sources = [f"{d.name} version {d.version}, fingerprint {d.fingerprint}" for d in datasets]
    return "\n".join(
        [f"Written by: {shlex.join(command)}", *(f"From dataset {s}" for s in sources)]
    )


def plan_table(plan: CascadePlan) -> Table:
    """Return a rich table of the plan: one row per label, and the tier that decides it.

    Every cell is short and never wrapped; the reasons (``PlanRow.why``) are printed
    beneath it. A ``dataset`` column appears when the plan reads more than one dataset.
    """
    tiers = len(plan.topology.tiers)
    several = len({row.dataset for row in plan.rows}) > 1
    table = Table(title=f"{tiers} tiers (prefix {plan.prefix!r})")
    columns = ["dataset"] if several else []
    columns += ["label", "kind", "images", "objects", "% images", "% objects", "tier"]
    for column in columns:
        numeric = column in ("images", "objects", "% images", "% objects")
        table.add_column(column, justify="right" if numeric else "left", no_wrap=True)
    for row in plan.rows:
        objects = "-" if row.object_fraction is None else f"{row.object_fraction:.1%}"
        cells = [row.dataset] if several else []
        cells += [row.label, row.kind, str(row.images), str(row.objects)]
        cells += [f"{row.image_fraction:.1%}", objects, row.tier or "-"]
        table.add_row(*(escape(cell) for cell in cells))
    return table


def next_steps(plan: CascadePlan, out: Path) -> list[str]:
    """Return the three commands that put the planned cascade to work, in order."""
    trains = []
    for tier in plan.topology.tiers:
        dataset = [] if tier.dataset is None else ["--dataset", tier.dataset]
        trains.append(shlex.join(["phenocascade", "train", tier.name, *dataset]))
    return [
        f"export PHENOCASCADE_TOPOLOGY={shlex.quote(str(out.resolve()))}",
        " && ".join(trains),
        "phenocascade run",
    ]
