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
