"""The benchmark harness and report: quick options, bracketing order, result files, the doc."""

import argparse
import json

from benchmarks import harness, report


def test_quick_swaps_defaults_but_explicit_options_win():
    def parser():
        p = argparse.ArgumentParser()
        p.add_argument("--images", type=int, default=1000)
        p.add_argument("--rounds", type=int, default=3)
        return p

    quick = {"images": 10, "rounds": 1}
    assert vars(harness.parse_args(parser(), quick, [])) == {
        "images": 1000,
        "rounds": 3,
        "quick": False,
    }
    args = harness.parse_args(parser(), quick, ["--quick", "--rounds", "2"])
    assert (args.images, args.rounds, args.quick) == (10, 2, True)


def test_bracketed_alternates_and_pairs_each_run_with_its_neighbours():
    calls = []

    def baseline():
        calls.append("bare")
        return {"rate": float(len(calls))}

    def measure(name):
        def run():
            calls.append(name)
            return {"rate": 10.0}

        return run

    bares, rounds = harness.bracketed(baseline, [measure("a"), measure("b")], rounds=2)
    assert calls == ["bare", "a", "bare", "b", "bare", "a", "bare", "b", "bare"]
    assert len(bares) == 5 and [(r.number, r.index) for r in rounds] == [
        (1, 0),
        (1, 1),
        (2, 0),
        (2, 1),
    ]
    first = rounds[0]  # between the runs that were calls 1 and 3
    assert first.reference("rate") == 2.0 and first.ratio("rate") == 5.0
    assert rounds[1].before is first.after


def test_result_file_renders_into_its_doc_block(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(harness, "RESULTS", tmp_path)
    args = argparse.Namespace(images=5, quick=False)
    result = harness.Result("bench_map", args, argv=["--images", "5"])
    result.note("a note")
    result.table(["method", "s"], [["mlc", "0.1"]], "lr")
    result.target(True, "fast (got 0.1 s)", 0.1, 1.0)
    path = result.write()
    data = json.loads(path.read_text())
    assert data["command"] == "python -m benchmarks.bench_map --images 5"
    assert data["machine"]["cores"] >= 1 and not data["quick"]
    block = report.render(data)
    assert "| mlc | 0.1 |" in block and "- met: fast (got 0.1 s)" in block
    assert block.startswith("Measured by `python -m benchmarks.bench_map --images 5` on ")

    doc = tmp_path / "benchmarks.md"
    blocks = "".join(f"<!-- begin {n} -->\nold\n<!-- end {n} -->\n" for n in report.BENCHMARKS)
    doc.write_text("# Benchmarks\n" + blocks)
    monkeypatch.setattr(report, "DOC", doc)
    assert report.main(["--check"]) == 1  # bench_map's block differs from its result file
    assert report.main([]) == 0
    assert report.main(["--check"]) == 0
    assert report.main(["--check", "--strict"]) == 1  # the other six have no result file
    assert f"<!-- begin bench_map -->\n{block}<!-- end bench_map -->" in doc.read_text()
    capsys.readouterr()
