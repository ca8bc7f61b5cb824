"""``python -m signmask``: ``inspect TICKET`` prints a ticket's metadata and per-layer table;
``demo`` runs Find A Winning Sign on real MNIST digits (needs ``pip install signmask[demo]``)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from . import _io, _ticket


def _table(ticket) -> list[str]:
    rows = [("tensor", "shape", "kept", "sparsity", "% negative")]
    entries = [*ticket.masks.items(), *((k + " (dense sign)", v) for k, v in ticket.signs.items())]
    for name, m in entries:
        kept = int(m.count_nonzero())
        neg = int((m < 0).count_nonzero())
        # The ticket's own rule (0.0 for an empty tensor), which the header's total follows too.
        pruned = _ticket.fraction_pruned(kept, m.numel())
        rows.append((
            name,
            "x".join(map(str, m.shape)) or "scalar",
            f"{kept}/{m.numel()}",
            f"{pruned:.4f}",
            f"{100 * neg / kept:.1f}" if kept else "-",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return [fmt(rows[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows[1:]]


def _versions(value: str) -> str:
    """``extract``'s JSON of library versions as "torch 2.13, ..."; other text as it is (the
    key is free-form metadata too)."""
    try:
        versions = json.loads(value)
    except (ValueError, RecursionError):
        return value
    if not isinstance(versions, dict):
        return value
    return ", ".join(f"{k} {v}" for k, v in versions.items())


def inspect(path: str) -> str:
    """The text ``python -m signmask inspect`` prints for the ticket at ``path``."""
    ticket = _io.load(path)
    lines = [f"ticket: {path}"]
    for key, value in sorted(ticket.metadata.items()):
        if key == "versions":
            value = _versions(value)
        lines.append(f"  {key}: {value}")
    lines.append(
        f"  sparsity: {ticket.sparsity:.4f} ({ticket.kept} of {ticket.numel} weights kept, "
        f"{len(ticket.masks)} masked tensors)"
    )
    if ticket.norms:
        values = sum(t.numel() for t in ticket.norms.values())
        dtypes = ", ".join(sorted({str(t.dtype).removeprefix("torch.") for t in ticket.norms.values()}))
        lines.append(f"  norm parameters: {len(ticket.norms)} tensors, {values} values ({dtypes})")
    lines.append("")
    lines.extend(_table(ticket))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m signmask",
        description="inspect TICKET prints a ticket's metadata and per-layer table; demo runs Find A "
        "Winning Sign on real MNIST digits (needs pip install 'signmask[demo]').",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_inspect = sub.add_parser("inspect", help="print a ticket's metadata and per-layer table")
    p_inspect.add_argument("ticket", help="path of a .safetensors ticket")
    p_demo = sub.add_parser(
        "demo", help="AWS vs LRR signed masks on real MNIST digits, a few minutes on a CPU",
        description="Find A Winning Sign on 5000 real MNIST digits: dense, AWS and LRR searches, "
        "signed masks transferred to a new init, error barriers. Needs: pip install 'signmask[demo]'.",
    )
    from . import _demo  # its heavy imports (timm, mlxtend, matplotlib) happen only when it runs

    _demo.add_arguments(p_demo)
    args = parser.parse_args(argv)
    if args.command == "demo":
        return _demo.main(args)
    try:
        text = inspect(args.ticket)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        print(text)
        sys.stdout.flush()  # a full disk shows only here
    except BrokenPipeError:  # `... | head` closed the pipe; not an error
        sys.stdout = None
    except OSError as e:
        print(f"error: cannot write the table: {e}", file=sys.stderr)
        sys.stdout = None  # the interpreter's own flush at exit would fail again
        return 1
    return 0
