import pytest

from aegis.schedule import PHI, Schedule, alpha_at, alpha_for_step, gate, phase

SEED = Schedule()  # 500 steps, 50 warmup at -5, 400 linear anneal to φ


def test_seed_recipe_defaults():
    assert (SEED.total_steps, SEED.warmup_steps, SEED.anneal_steps) == (500, 50, 400)
    assert SEED.start_alpha == -5.0 and SEED.target_alpha == pytest.approx(1.6180339887)


@pytest.mark.parametrize(
    "step,expected",
    [
        (1, -5.0),
        (50, -5.0),
        (51, -5.0),  # a(0), a(49), a(50): chaos until the anneal moves
        (52, -5.0 + (PHI + 5) / 400),  # the first step that moves
        (450, -5.0 + 399 / 400 * (PHI + 5)),
        (451, PHI),
        (500, PHI),
    ],
)
def test_alpha_at_the_seed_steps(step, expected):
    assert alpha_for_step(step, SEED) == pytest.approx(expected, abs=1e-12)


def test_gate_goes_from_closed_to_golden():
    assert gate(alpha_for_step(1, SEED)) == pytest.approx(0.0067, abs=1e-4)
    assert gate(alpha_for_step(50, SEED)) == pytest.approx(0.0067, abs=1e-4)  # the last warmup step
    assert gate(alpha_for_step(500, SEED)) == pytest.approx(0.8345, abs=1e-4)


@pytest.mark.parametrize("shape", ["linear", "sigmoid", "cosine"])
def test_every_shape_spans_the_same_window_monotonically(shape):
    s = Schedule(shape=shape)
    values = [alpha_at(i, s) for i in range(500)]
    assert values[49] == -5.0 and values[50] == pytest.approx(-5.0, abs=1e-9)
    assert values[450] == PHI and values[499] == PHI
    assert all(b >= a - 1e-12 for a, b in zip(values, values[1:]))
    mid = alpha_at(250, s)
    assert mid == pytest.approx(-5 + 0.5 * (PHI + 5), abs=1e-9)  # all three are symmetric about the middle


def test_shapes_differ_inside_the_window():
    lin, sig, cos = (alpha_at(100, Schedule(shape=x)) for x in ("linear", "sigmoid", "cosine"))
    assert sig < cos < lin


def test_phases():
    assert phase(alpha_for_step(10, SEED), SEED) == "chaos"
    assert phase(alpha_for_step(200, SEED), SEED) == "transition"
    assert phase(alpha_for_step(451, SEED), SEED) == "golden"
    assert phase(PHI - 0.02, SEED) == "transition"


def test_unknown_shape():
    with pytest.raises(ValueError, match="schedule.shape"):
        alpha_at(60, Schedule(shape="step"))


def test_the_whole_seed_curve_asked_in_any_order():
    """Every step of the seed recipe as its numbers state it (α = -5 for the 50 warmup steps and the anneal's first
    step, then 400 equal steps up to φ = 1.6180339887, held to step 500), asked for last step first: α depends on
    the step alone."""
    rise = (1.6180339887 + 5) / 400
    for step in range(500, 0, -1):
        assert alpha_for_step(step, SEED) == pytest.approx(-5 + min(max(step - 51, 0), 400) * rise, abs=1e-9)
    assert alpha_at(10**9, SEED) == pytest.approx(1.6180339887)  # past the end it stays at φ
