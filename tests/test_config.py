"""Config validation reads the mutation registry; its built-in names are the population's."""

import subprocess
import sys

import pytest

from edrop_ray import population as pop
from edrop_ray.config import Config, validate
from edrop_ray.errors import UserError
from edrop_ray.validation import BUILTIN_MUTATIONS, mutation_names


def test_builtin_mutation_names_are_the_registered_ones():
    assert set(BUILTIN_MUTATIONS) <= set(pop.mutations())
    assert mutation_names() == pop.mutations()


def test_the_config_knows_the_builtin_operators_before_torch_is_imported():
    code = (
        "import sys; from edrop_ray.validation import mutation_names; "
        "assert 'torch' not in sys.modules; print(','.join(mutation_names()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ",".join(BUILTIN_MUTATIONS)


def test_a_registered_operator_is_a_valid_mutation():
    with pytest.raises(UserError, match="mutation must be one of logical, sigmoid"):
        validate(Config(mutation="flip-all"), names=False)
    pop.register_mutation("flip-all")(lambda s_a, s_b, s_c, *, F, kappa, generator: ~s_a)
    try:
        assert validate(Config(mutation="flip-all"), names=False).mutation == "flip-all"
    finally:
        pop.unregister_mutation("flip-all")


def test_the_paper_preset_sets_the_papers_procedure_and_set_still_wins():
    from edrop_ray.config import PRESETS, load_config, preset_overrides

    cfg = load_config(None, preset_overrides("paper"))
    for key, value in PRESETS["paper"].items():
        assert getattr(cfg, key) == value, key
    assert (cfg.evolve_every, cfg.population_size, cfg.F, cfg.CR) == (1, 16, 0.9, 0.7)
    cfg = load_config(None, [*preset_overrides("paper"), "population_size=8"])
    assert cfg.population_size == 8 and cfg.evolve_every == 1


def test_an_unknown_preset_is_one_line_and_writes_nothing(tmp_path, capsys):
    from edrop_ray.cli import main

    out = tmp_path / "run"
    assert main(["prune", "--preset", "nope", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown preset 'nope'; choose one of: paper" in err[0]
    assert not out.exists()
