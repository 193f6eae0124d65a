"""The methods registry (incseg_fast/train/methods.py): every module reads the one table."""

import dataclasses

import pytest

from incseg_fast.cli import build_parser
from incseg_fast.train import METHODS, TrainConfig
from incseg_fast.train.config import option_flag
from incseg_fast.train.demo import demo_methods
from incseg_fast.train.methods import incremental_methods, method_help
from incseg_fast.train.results import _sorted_methods

NON_NEUTRAL = {
    "lambda_fd": 5.0,
    "freeze_encoder": True,
    "lambda_ad": 5.0,
    "kd": "none",
    "caf_module": False,
    "lambda_pod": 0.5,
    "lambda_pod_logits": 0.5,
    "pseudo_labels": False,
    "pseudo_threshold": 0.5,
    "lambda_ac": 2.0,
    "lambda_dkd": 2.0,
    "pos_weight": 2.0,
}


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_rejects_the_options_of_the_others(method):
    others = {name for m in METHODS.values() if m.name != method for name in m.own_options}
    for name in sorted(others - set(METHODS[method].own_options)):
        cfg = dataclasses.replace(TrainConfig(method=method), **{name: NON_NEUTRAL[name]})
        with pytest.raises(ValueError, match=f"{option_flag(name)} does not apply to --method {method} "):
            cfg.resolved()


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_accepts_its_own_options(method):
    for name in METHODS[method].own_options:
        resolved = dataclasses.replace(TrainConfig(method=method), **{name: NON_NEUTRAL[name]}).resolved()
        assert getattr(resolved, name) == NON_NEUTRAL[name]


def test_every_own_option_has_a_non_neutral_value_in_this_test():
    assert {name for m in METHODS.values() for name in m.own_options} == set(NON_NEUTRAL)


def test_method_defaults_resolve_per_dataset():
    caf = METHODS["caf"]
    assert TrainConfig(method="caf").resolved().lambda_ad == caf.default("lambda_ad", "synthetic") == 0.1
    assert caf.default("lambda_ad", "voc") == 1000.0
    assert TrainConfig(method="mib").resolved().lambda_kd == METHODS["mib"].lambda_kd


def test_command_line_help_and_choices_come_from_the_registry():
    (action,) = [
        a for a in build_parser()._subparsers._group_actions[0].choices["train"]._actions if a.dest == "method"
    ]
    assert list(action.choices) == list(METHODS)
    assert all(f"{name}: {m.summary}" in method_help() for name, m in METHODS.items())


def test_demo_and_reports_follow_the_registry():
    assert demo_methods(list(METHODS)) == incremental_methods()
    assert _sorted_methods(list(reversed(METHODS))) == list(METHODS)
