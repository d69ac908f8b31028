"""`python -m engine.bench.recover_cli`: engine and peer loops timed on the same shapes."""
from engine.bench.recover_cli import main


def test_recover_benchmark_rows(tmp_path, capsys):
    out = tmp_path / "rows.json"
    rows = main(["--model", "convnet", "--image-size", "8", "--batch", "4", "--steps", "1", "--warmup", "0",
                 "--repeats", "1", "--device", "cpu", "--json", str(out)])
    assert [r.variant for r in rows] == ["peer (hooks, copies)", "engine", "engine channels_last"]
    assert all(r.rate > 0 and r.unit == "image-iterations/s" for r in rows)
    assert "vs peer" in capsys.readouterr().out and out.is_file()


def test_recover_stage_never_imports_bench_or_pipeline():
    """Stages sit below bench and pipeline: nothing under engine/recover imports them."""
    import ast
    from pathlib import Path

    import engine

    for path in sorted((Path(engine.__file__).parent / "recover").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert not name.startswith(("engine.bench", "engine.pipeline")), f"{path.name} imports {name}"
