"""Every number a user can set has a declared domain, and the one validator holds it there.

Iterates over every registered method (``heads.methods.METHODS``), so a method added later without
domains fails here, naming the method and the field. In the fast subset: nothing here trains.
"""
import dataclasses
import math
import typing

import pytest

from heads.blocks import domains
from heads.blocks.domains import NONNEGATIVE_INT, POSITIVE, UNIT_OPEN, Domain
from heads.errors import OptionError
from heads.methods import METHODS
from heads.sweeps.axes import parse_values
from heads.sweeps.specs import parse_method_spec, parse_seeds
from heads.train.config import DOMAINS, TrainConfig, check_config, check_setting, config_from_options
from heads.train.options import check_value, resolve_options


def numeric_fields(cls) -> list[dataclasses.Field]:
    hints = typing.get_type_hints(cls)
    kinds = lambda t: {a for a in (typing.get_args(t) or (t,)) if a is not type(None)}
    return [f for f in dataclasses.fields(cls) if kinds(hints[f.name]) & {int, float} and hints[f.name] is not bool]


def test_every_numeric_option_of_every_method_declares_its_domain():
    missing = [f"{name}: --{f.name.replace('_', '-')}" for name, cls in METHODS.items()
               for f in numeric_fields(cls.Options) if not isinstance(f.metadata.get("domain"), Domain)]
    assert not missing, "numeric options without a declared domain: " + ", ".join(missing)


def test_every_numeric_training_setting_declares_its_domain():
    missing = [f.name for f in numeric_fields(TrainConfig) if f.name not in DOMAINS]
    assert not missing, missing


def method_cases():
    for name, cls in METHODS.items():
        for f in numeric_fields(cls.Options):
            yield name, f


@pytest.mark.parametrize("method,field", list(method_cases()), ids=lambda v: getattr(v, "name", v))
def test_nan_inf_and_out_of_domain_values_are_refused_for_every_method_option(method, field):
    domain = field.metadata["domain"]
    flag = "--" + field.name.replace("_", "-")
    assert domain.contains(field.default), f"{method} {flag}: the default lies outside its own domain"
    resolve_options(method, {field.name: str(field.default)})  # the default, typed as text, passes
    for bad in domain.outside():
        text = str(int(bad)) if isinstance(field.default, int) and math.isfinite(bad) else repr(float(bad))
        with pytest.raises(OptionError, match=flag):  # the CLI's and a saved config's path
            resolve_options(method, {field.name: text})
        with pytest.raises(OptionError, match=flag):  # a method spec, edm[tau=nan]
            parse_method_spec(f"{method}[{field.name}={text}]")
        with pytest.raises(OptionError, match=flag):  # a grid axis
            parse_values(method, field.name, text)


@pytest.mark.parametrize("name", sorted(DOMAINS))
def test_nan_inf_and_out_of_domain_training_settings_are_refused(name):
    domain = DOMAINS[name]
    for bad in domain.outside():
        with pytest.raises(OptionError, match="--" + name.replace("_", "-")):
            check_setting(name, bad)


def test_the_validator_names_option_value_and_domain():
    with pytest.raises(OptionError) as err:
        check_value("--tau", 1.0, UNIT_OPEN)
    assert str(err.value) == "--tau must lie in [0, 1), got 1.0"
    with pytest.raises(OptionError) as err:
        check_value("--temperature", 0.0, POSITIVE)
    assert str(err.value) == "--temperature must be positive (a finite number > 0), got 0.0"


def test_domains_by_hand():
    assert UNIT_OPEN.contains(0.0) and UNIT_OPEN.contains(0.999) and not UNIT_OPEN.contains(1.0)
    assert not UNIT_OPEN.contains(-0.001) and not UNIT_OPEN.contains(math.nan)
    assert POSITIVE.contains(1e-12) and not POSITIVE.contains(0.0) and not POSITIVE.contains(math.inf)
    assert NONNEGATIVE_INT.contains(0) and not NONNEGATIVE_INT.contains(1.5) and not NONNEGATIVE_INT.contains(-1)
    derived = NONNEGATIVE_INT | (-1,)  # "-1 = derive it"
    assert derived.contains(-1) and not derived.contains(-2) and -1 not in derived.outside()
    assert not domains.FINITE.contains(True)  # a bool is not a number here
    assert domains.SEED.contains(2**63 - 1) and not domains.SEED.contains(2**63)
    assert domains.LR.contains(10) and not domains.LR.contains(10.5)


def test_the_reported_silent_failures_are_refused():
    cases = [({"lr": math.inf}, "--lr"), ({"lr": 1e10}, "--lr"), ({"weight_decay": math.nan}, "--weight-decay"),
             ({"weight_decay": math.inf}, "--weight-decay"), ({"schedule": "step:1:inf"}, "--schedule"),
             ({"seed": 2**70}, "--seed"), ({"hidden": 10**8}, "--hidden")]
    for given, flag in cases:
        kwargs = dict(method="concat", epochs=1, seed=0, lr=None, batch_size=None, optimizer=None, hidden=8,
                      weight_decay=None, missing_train=0.0, missing_test=0.0) | given
        with pytest.raises(OptionError, match=flag):
            config_from_options(**kwargs)
    for spec, flag in [("ccat[beta=-1]", "--beta"), ("ccat[beta=nan]", "--beta"), ("ogm-ge[alpha=nan]", "--alpha"),
                       ("qmf[temperature=0]", "--temperature"), ("lfm[temperature=0]", "--temperature"),
                       ("mla[alpha=-1]", "--alpha"), ("mmpareto[boost=nan]", "--boost"),
                       ("edm[memory-dim=-1]", "--memory-dim")]:
        with pytest.raises(OptionError, match=flag):
            parse_method_spec(spec)


def test_a_key_twice_in_a_method_spec_is_an_error():
    with pytest.raises(OptionError, match="sets 'tau' twice"):
        parse_method_spec("edm[tau=0.3;tau=0.5]")
    with pytest.raises(OptionError, match="twice"):
        parse_method_spec("edm[memory_dim=8,memory-dim=16]")  # the two spellings of one option
    assert parse_method_spec("edm[tau=0.3;order=fixed]") == ("edm", {"tau": 0.3, "order": "fixed"})


def test_seed_lists_are_checked():
    with pytest.raises(OptionError, match="lists no seed"):
        parse_seeds(" , ")
    with pytest.raises(OptionError, match="--seeds must be an integer"):
        parse_seeds(f"0,{2**70}")
    assert parse_seeds("0,5,") == [0, 5]


def test_a_saved_config_is_held_to_the_domains():
    check_config(TrainConfig(method="edm", options={"tau": 0.3}))
    for bad in (TrainConfig(method="edm", options={"tau": 1.5}), TrainConfig(lr=math.nan), TrainConfig(epochs=0)):
        with pytest.raises(OptionError):
            check_config(bad)
