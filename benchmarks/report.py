"""docs/benchmarks.md's figures from the result files (benchmarks/results/<name>.json).

Each benchmark's figures sit in the doc between ``<!-- begin NAME -->`` and ``<!-- end NAME -->``:
the command, date, commit and machine, the tables and the targets, as the result file has them.
Result files of --quick runs are left out: they check that a benchmark runs, they measure
nothing (--allow-quick takes them anyway).

    python -m benchmarks.report            # rewrite the blocks that have a result file
    python -m benchmarks.report --check    # exit 1 if a block differs from its result file
    python -m benchmarks.report --summary  # one line per result file: date, targets met
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys

from benchmarks import harness
from benchmarks.harness import ROOT, describe, markdown_table

BENCHMARKS = (
    "bench_map",
    "bench_shard",
    "bench_loader",
    "bench_model",
    "bench_train",
    "bench_eval",
    "bench_async",
    "bench_scale",
    "bench_precision",
    "bench_gpu",
)
DOC = ROOT / "docs" / "benchmarks.md"
BLOCK = re.compile(r"<!-- begin (\w+) -->\n(.*?)<!-- end \1 -->", re.S)


def render(result: dict) -> str:
    """A result file as the doc shows it (the text between the markers)."""
    commit = f", commit {result['commit']}" if result.get("commit") else ""
    parts = [
        f"Measured by `{result['command']}` on {result['date'][:10]}{commit}; "
        f"{describe(result['machine'])}."
    ]
    if result["notes"]:
        parts.append("\n".join(f"- {note}" for note in result["notes"]))
    for table in result["tables"]:
        text = markdown_table(table["columns"], table["rows"], table["align"])
        parts.append(f"{table['title']}\n\n{text}" if table["title"] else text)
    if result["targets"]:
        parts.append(
            "\n".join(
                f"- {'met' if t['met'] else 'MISSED'}: {t['text']}" for t in result["targets"]
            )
        )
    return "\n\n".join(parts) + "\n"


def load(name: str, allow_quick: bool) -> tuple[dict | None, str]:
    """(the result file of ``name``, or None with the reason)."""
    path = harness.RESULTS / f"{name}.json"
    if not path.is_file():
        return None, f"no {harness.shown(path)}"
    result = json.loads(path.read_text())
    if result.get("quick") and not allow_quick:
        return None, f"{harness.shown(path)} is from a --quick run"
    return result, ""


def blocks(text: str) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in BLOCK.finditer(text)}


def check(text: str, allow_quick: bool, strict: bool) -> int:
    found, failures = blocks(text), 0
    for name in BENCHMARKS:
        if name not in found:
            print(f"{name}: no <!-- begin {name} --> ... <!-- end {name} --> block in {DOC.name}")
            failures += 1
            continue
        result, why = load(name, allow_quick)
        if result is None:
            print(f"{name}: not checked ({why})")
            failures += strict
            continue
        want = render(result)
        if found[name] == want:
            print(f"{name}: the doc has the figures of {result['date'][:10]}")
            continue
        failures += 1
        print(f"{name}: the doc differs from its result file:")
        diff = difflib.unified_diff(
            found[name].splitlines(), want.splitlines(), "doc", "result", lineterm=""
        )
        print("\n".join(diff))
    return 1 if failures else 0


def write(text: str, allow_quick: bool) -> int:
    found = blocks(text)
    missing = [name for name in BENCHMARKS if name not in found]
    if missing:
        print(f"{DOC.name} has no block for {', '.join(missing)}: add the markers first")
        return 1

    def replace(match: re.Match) -> str:
        name = match.group(1)
        result, why = load(name, allow_quick)
        if result is None:
            print(f"{name}: kept as it is ({why})")
            return match.group(0)
        print(f"{name}: figures of {result['date'][:10]}")
        return f"<!-- begin {name} -->\n{render(result)}<!-- end {name} -->"

    new = BLOCK.sub(replace, text)
    if new != text:
        DOC.write_text(new)
    return 0


def summary() -> int:
    for name in BENCHMARKS:
        result, why = load(name, allow_quick=True)
        if result is None:
            print(f"{name}: {why}")
            continue
        targets = result["targets"]
        missed = [t["text"] for t in targets if not t["met"]]
        quick = " (quick run)" if result.get("quick") else ""
        print(
            f"{name}: {result['date']}{quick}, {result.get('seconds', 0):.0f} s; targets met "
            f"{len(targets) - len(missed)} of {len(targets)}"
        )
        for text in missed:
            print(f"  MISSED: {text}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    what = p.add_mutually_exclusive_group()
    what.add_argument("--check", action="store_true", help="compare, do not write")
    what.add_argument("--summary", action="store_true", help="list the result files")
    p.add_argument("--allow-quick", action="store_true", help="use --quick results too")
    p.add_argument("--strict", action="store_true", help="--check: a missing result fails")
    args = p.parse_args(argv)
    if args.summary:
        return summary()
    text = DOC.read_text()
    if args.check:
        return check(text, args.allow_quick, args.strict)
    return write(text, args.allow_quick)


if __name__ == "__main__":
    sys.exit(main())
