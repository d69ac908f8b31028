"""`python -m engine.evaluate.aggregate`: mean ± sd over several runs' report.json."""
import json

from engine.evaluate.aggregate import main


def _report(path, scdd, random, full):
    path.mkdir(parents=True)
    report = {"ipc": {"1": {"scdd": {"top1": scdd}, "random_real": {"top1": random}}},
              "full_data": {"top1": full}, "teacher": {"supervised_top1": 0.9}}
    (path / "report.json").write_text(json.dumps(report))
    return path


def test_mean_and_sample_sd_per_row(tmp_path, capsys):
    runs = [_report(tmp_path / f"s{i}", s, r, f) for i, (s, r, f) in
            enumerate([(0.20, 0.50, 0.90), (0.30, 0.50, 0.94), (0.40, 0.50, 0.98)])]
    assert main([str(r) for r in runs]) == 0
    out = capsys.readouterr().out
    assert "over 3 runs" in out
    assert "| SC-DD (SSL teacher) | 30.0 ± 10.0 | - |" in out
    assert "| random real subset | 50.0 ± 0.0 | - |" in out
    assert "| full training data | - | 94.0 ± 4.0 |" in out


def test_missing_report_is_one_line_error(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "no report.json" in capsys.readouterr().err
