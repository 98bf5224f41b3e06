"""conftest's fixtures: the expert-backend registry is restored after each test.

The two tests run in file order: the first registers and reorders, the second
sees neither."""

from mlx_moe import experts

DUMMY = "dummy_test_backend"


def test_a_test_may_register_a_backend():
    experts.register_backend(DUMMY, experts.Backend(run=lambda e, x, w, ids: x))
    experts.AUTO_ORDER.insert(0, DUMMY)
    del experts.BACKENDS["gather"]
    assert DUMMY in experts.BACKENDS


def test_the_next_test_does_not_see_it():
    assert DUMMY not in experts.BACKENDS and DUMMY not in experts.AUTO_ORDER
    assert "gather" in experts.BACKENDS
