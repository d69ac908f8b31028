"""python -m engine.loaders.bench: each loader's sustained rate next to the training rates it must feed."""
import pytest

from engine.loaders.bench import run, table

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bench_times_files_and_the_decode_cache_against_given_training_rates(tmp_path):
    results = run(image_size=16, files=40, batch=8, workers=0, epochs=1, loaders=["torch", "torch-cache"],
                  workdir=tmp_path, stored_size=64)
    rates = results["images_per_s"]
    assert set(rates) == {"torch", "torch-cache"} and all(r > 0 for r in rates.values())
    assert results["cache_build_s"] >= 0 and (tmp_path / "cache" / "train" / "meta.json").is_file()
    needs = {"student": 1e9, "pretrain": 1.0, "source": "given"}
    text = table(results, needs)
    lines = {line.split()[0]: line for line in text.splitlines()[2:] if line.split()}
    assert "NO" in lines["torch-cache"] and "yes" in lines["torch-cache"]  # can't feed 1e9/s, feeds 1/s
    assert "student 1000000000.0, pretrain 1.0 (given)" in text
    missing = table({**results, "images_per_s": {**rates, "dali": None}}, needs)
    assert "cannot be measured" in missing
