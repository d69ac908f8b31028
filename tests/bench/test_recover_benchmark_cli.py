"""`python -m engine.recover.bench`: engine and peer loops timed on the same shapes."""
from engine.recover.bench import main


def test_recover_benchmark_rows(tmp_path, capsys):
    out = tmp_path / "rows.json"
    rows = main(["--model", "convnet", "--image-size", "8", "--batch", "4", "--steps", "1", "--warmup", "0",
                 "--repeats", "1", "--device", "cpu", "--json", str(out)])
    assert [r.variant for r in rows] == ["peer (hooks, copies)", "engine", "engine channels_last"]
    assert all(r.rate > 0 and r.unit == "image-iterations/s" for r in rows)
    assert "vs peer" in capsys.readouterr().out and out.is_file()
