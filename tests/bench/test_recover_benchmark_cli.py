"""`python -m engine.bench.recover_cli`: peer, floor and engine rows by option, timed on the same shapes."""
import json

import pytest

from engine.bench import recover_variants
from engine.bench.recover_cli import main
from engine.bench.recover_variants import Variant, unavailable

pytestmark = pytest.mark.usefixtures("one_thread")


def test_recover_benchmark_rows(tmp_path, capsys):
    out = tmp_path / "rows.json"
    rows = main(["--model", "convnet", "--image-size", "8", "--batch", "4", "--steps", "1", "--warmup", "0",
                 "--repeats", "1", "--device", "cpu", "--groups", "1,2", "--graphs", "off,on", "--json", str(out)])
    labels = [r.variant.label for r in rows]
    assert labels == ["peer (hooks, copies)", "floor G=1 fp32", "floor G=2 fp32",
                      "engine G=1 fp32 graphs off", "engine G=2 fp32 graphs off",
                      "engine G=1 fp32 graphs on", "engine G=2 fp32 graphs on"]
    by_label = dict(zip(labels, rows))
    for label in ("peer (hooks, copies)", "floor G=1 fp32", "floor G=2 fp32", "engine G=1 fp32 graphs off"):
        rate = by_label[label].rate
        assert rate.rate > 0 and rate.unit == "image-iterations/s"
        assert rate.rate == pytest.approx(rate.batch * rate.steps / rate.seconds, rel=1e-12)
    # G class-batches of B images per step: the floor at G=2 runs twice the images
    assert by_label["floor G=2 fp32"].rate.batch == 2 * by_label["floor G=1 fp32"].rate.batch == 8
    grouped = by_label["engine G=2 fp32 graphs off"]
    assert grouped.rate.batch == 8 and grouped.rate.rate > 0
    assert all(by_label[f"engine G={g} fp32 graphs on"].note == "n/a (CUDA only)" for g in (1, 2))
    printed = capsys.readouterr().out
    assert "vs peer" in printed and "n/a (CUDA only)" in printed and "best engine row" in printed
    saved = json.loads(out.read_text())
    assert [r["variant"] for r in saved] == labels
    assert saved[0]["rate"]["rate"] == pytest.approx(rows[0].rate.rate) == max(saved[0]["rates"])
    assert "spread" in printed


def test_graph_rows_are_cuda_only():
    cpu, cuda = __import__("torch").device("cpu"), __import__("torch").device("cuda")
    assert unavailable(Variant("engine", 4, "bf16", False), cpu) is None
    assert unavailable(Variant("engine", 1, "fp32", True), cpu) == "n/a (CUDA only)"
    assert unavailable(Variant("engine", 1, "fp32", True), cuda) is None
    assert unavailable(Variant("floor", 8, "bf16"), cpu) is None


def test_engine_options_reach_the_loop(monkeypatch):
    """The runner hands synthesize_groups the G class-batches (stacked inputs split group by group, one
    generator each) and the variant's precision and CUDA graphs."""
    import torch

    calls = []

    def synthesize_groups(teacher, bn_modules, inits, labels, objective, aug, bounds, generators,
                          channels_last=False, precision="fp32", cuda_graphs=False, on_step=None):
        calls.append((len(inits), [t.tolist() for t in labels], len(generators), precision, cuda_graphs))
        return ["result"] * len(inits)

    monkeypatch.setattr(recover_variants.synthesize, "synthesize_groups", synthesize_groups)
    generators = [torch.Generator(), torch.Generator()]
    init, labels = torch.zeros(4, 1, 2, 2), torch.tensor([0, 1, 0, 1])
    run = recover_variants.engine_runner(Variant("engine", 2, "bf16", True))
    assert run(None, [], init, labels, None, None, None, generators, True) == ["result", "result"]
    assert calls[-1] == (2, [[0, 1], [0, 1]], 2, "bf16", True)


def test_gpu_entry_points_import_no_hydra():
    """The GPU box has torch but no Hydra: nothing the recover bench, the trajectory check and the
    kernel bench import at module level (followed through engine/ and kernels/) imports hydra or
    omegaconf."""
    import ast
    from pathlib import Path

    root = Path(recover_variants.__file__).resolve().parents[2]

    def source(module: str):
        for candidate in (root / (module.replace(".", "/") + ".py"), root / module.replace(".", "/") / "__init__.py"):
            if candidate.is_file():
                return candidate
        return None

    seen, todo = set(), ["engine.bench.recover_cli", "engine.bench.gpu_checks", "kernels.bench"]
    while todo:
        module = todo.pop()
        path = source(module)
        if module in seen or path is None:
            continue
        seen.add(module)
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.parse(path.read_text()).body:  # module level only: imports inside functions run later
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in ("hydra", "omegaconf"), f"{module} imports {name}"
                parts = name.split(".")
                todo += [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    assert "engine.recover.synthesize" in seen and "kernels.fused_bn" in seen


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
