"""`scdd +study=NAME`: the config group (one preset per study, one-line refusals) and the rank-correlation helper."""
import math

import numpy as np
import pytest
from omegaconf import OmegaConf

from engine.config import from_mapping
from engine.errors import ConfigError
from engine.studies.common import bootstrap_interval, ranks, spearman
from engine.studies.settings import STUDY_NAMES, STUDY_PRESETS, StudyConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", STUDY_NAMES)
def test_each_study_composes_from_its_preset(compose, name):
    cfg = OmegaConf.to_container(compose(f"+study={name}"), resolve=True)
    study = from_mapping(StudyConfig, cfg["study"], "study")
    assert study == STUDY_PRESETS[name] and study.name == name
    assert "study" not in OmegaConf.to_container(compose(), resolve=True)


def test_full_scale_override_composes_with_a_data_preset(compose):
    cfg = compose("+study=teacher_size", "+experiment=cifar100_ipc50", "study.scale=full")
    study = from_mapping(StudyConfig, OmegaConf.to_container(cfg.study), "study")
    assert study.scale == "full" and [m.name for m in study.full_teachers] == ["resnet18", "resnet50", "resnet101"]


@pytest.mark.parametrize("overrides,message", [
    (("study.scale=huge",), "study.scale='huge' is not one of reduced|full"),
    (("study.seeds=[1,1]",), "study.seeds=[1, 1] must be a non-empty list of distinct seeds"),
    (("study.reduced.ipc=0",), "study.reduced: ipc=0 must be >= 1"),
    (("study.name=sizes",), "study.name='sizes' is not a study"),
])
def test_a_bad_study_option_is_one_config_error_line(run_scdd, tmp_path, overrides, message):
    with pytest.raises(ConfigError) as exc:
        run_scdd("+study=teacher_size", "data=digits", *overrides)
    assert message in str(exc.value) and "\n" not in str(exc.value)
    assert not (tmp_path / "run" / "study").exists()


def test_bn_variance_refuses_fewer_than_eight_teachers(run_scdd, tmp_path):
    with pytest.raises(ConfigError, match="compares 7 teachers but a rank correlation needs >= 8"):
        run_scdd("+study=bn_variance", "data=digits", "progress=false", "study.teachers=[{width:64},{width:8,depth:2}]")
    assert not (tmp_path / "run" / "study").exists()


def test_spearman_on_known_inputs():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)  # 1 - 6*4/(5*24)
    assert list(ranks([3.0, 1.0, 3.0, 2.0])) == [3.5, 1.0, 3.5, 2.0]  # ties share their mean rank
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    from scipy import stats as scipy_stats  # installed with scikit-learn (setup.py), which needs it

    rng = np.random.default_rng(3)
    x, y = rng.integers(0, 5, 12).astype(float), rng.normal(size=12)
    assert spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y).statistic)


def test_bootstrap_interval_brackets_rho_and_repeats_with_its_seed():
    x = np.arange(10.0)
    assert bootstrap_interval(x, 2 * x + 1, 500) == (pytest.approx(1.0), pytest.approx(1.0))
    rng = np.random.default_rng(0)
    y = x + rng.normal(scale=4.0, size=10)
    low, high = bootstrap_interval(x, y, 1000, 0.9, seed=7)
    assert -1.0 <= low < spearman(x, y) < high <= 1.0
    assert bootstrap_interval(x, y, 1000, 0.9, seed=7) == (low, high)
    wide = bootstrap_interval(x, y, 1000, 0.99, seed=7)
    assert wide[0] <= low and wide[1] >= high
