"""Activation enclosures (onnxlip.activations) against dense sampling: soundness on random
and adversarial intervals, tightness, exactness of the piecewise-linear ones, values
against onnxruntime's own ops.

`report()` prints the measured tightness figures:
    python -c "import sys; sys.path.insert(0, 'tests'); import test_activations as t; t.report()"
"""

from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxlip import activations as A
from onnxlip.bounds import chord_slopes as relu_chord_slopes
from onnxlip.errors import OnnxlipError

EPS = np.finfo(np.float64).eps

ACTS = {
    "relu": A.ReLU(),
    "leaky": A.LeakyReLU(0.01),
    "leaky_neg": A.LeakyReLU(-0.3),
    "leaky_steep": A.LeakyReLU(2.5),
    "prelu": A.PRelu(np.array([0.25, -0.5, 1.5])),
    "relu6": A.relu6(),
    "hardtanh": A.hardtanh(),
    "clip_min": A.Clip(-1.5, None),
    "clip_max": A.Clip(None, 0.75),
    "clip_const": A.Clip(2.0, 1.0),
    "hardsigmoid": A.HardSigmoid(0.2, 0.5),
    "hardsigmoid_6": A.HardSigmoid(1 / 6, 0.5),
    "hardsigmoid_neg": A.HardSigmoid(-0.7, 0.3),
    "sigmoid": A.Sigmoid(),
    "tanh": A.Tanh(),
    "softplus": A.Softplus(),
    "elu": A.ELU(1.0),
    "elu_half": A.ELU(0.5),
    "elu_2": A.ELU(2.0),
    "elu_neg": A.ELU(-0.5),
    "gelu": A.GELU("none"),
    "gelu_tanh": A.GELU("tanh"),
    "silu": A.SiLU(),
    "hardswish": A.HardSwish(),
}
SMOOTH = [k for k, a in ACTS.items() if not a.is_piecewise_linear]
PL = [k for k, a in ACTS.items() if a.is_piecewise_linear]
#: Minima of GELU and SiLU (σ' < 0 left of them).
MINIMA = {"gelu": -0.7517916, "gelu_tanh": -0.7524614, "silu": -1.2784645, "elu_neg": 0.0}


def _columns(act: A.Activation, n: int) -> int:
    """PRelu's slopes have 3 channels: its test arrays get 3 columns."""
    return 3 if isinstance(act, A.PRelu) else 1


def _sample_points(act: A.Activation, y0, lo, hi, k: int = 160) -> np.ndarray:
    """Points of [lo, hi] (last axis): a grid, points near both ends and near y0 at
    every scale, and the breakpoints."""
    width = (hi - lo)[..., None]
    scales = 10.0 ** -np.arange(1, 15)
    t = np.concatenate([np.linspace(0.0, 1.0, k), scales, 1.0 - scales])
    ys = [lo[..., None] + width * t, y0[..., None] + width * scales, y0[..., None] - width * scales]
    if act.breakpoints.size:
        ys.append(np.broadcast_to(act.breakpoints, (*lo.shape, act.breakpoints.size)))
    return np.clip(np.concatenate(ys, axis=-1), lo[..., None], hi[..., None])


def _along(fn, act: A.Activation, y: np.ndarray, *args) -> np.ndarray:
    """fn(y) for samples on the last axis: PRelu's channels are the axis before it."""
    if isinstance(act, A.PRelu):
        return fn(y.swapaxes(-1, -2), *args).swapaxes(-1, -2)
    return fn(y, *args)


def _float_error(act: A.Activation, y, v):
    """A generous bound of float64's error in evaluating σ(y) (for the sampled chords)."""
    if isinstance(act, A.HardSigmoid):
        return 8 * EPS * (np.abs(act.alpha * y) + abs(act.beta) + 1.0)
    return 16 * EPS * np.abs(v) * (1.0 + np.minimum(np.abs(y), 40.0) ** 3) + 1e-300


def sampled_slopes(act: A.Activation, y0, lo, hi):
    """(chord slopes at sample points, their float tolerance, valid mask), one row per
    interval, plus the one-sided derivatives at y0 as extra columns."""
    ys = _sample_points(act, y0, lo, hi)
    y0c = np.broadcast_to(y0[..., None], ys.shape)
    with np.errstate(all="ignore"):
        v, v0 = _along(act.value, act, ys), act.value(y0)[..., None]
        s = (v - v0) / (ys - y0c)
        tol = (_float_error(act, ys, v) + _float_error(act, y0c, v0)) / np.abs(ys - y0c)
        tol += 16 * EPS * np.abs(s)
    valid = ys != y0c
    assert not np.isnan(s[valid]).any() and not np.isnan(tol[valid]).any()
    right = act.derivative(y0, 1)[..., None]
    left = act.derivative(y0, -1)[..., None]
    point = (lo == hi)[..., None]
    s = np.concatenate([s, right, left], axis=-1)
    tol = np.concatenate([tol, 0 * right, 0 * left], axis=-1)
    valid = np.concatenate([valid, (hi > y0)[..., None] | point, (lo < y0)[..., None] | point], axis=-1)
    return s, tol, valid


def check_enclosure(act: A.Activation, y0, lo, hi) -> dict:
    """Assert every sampled chord slope lies in the enclosure; return the counts and the
    excess of the enclosure over the sampled range."""
    smin, smax = act.chord_slopes(y0, lo, hi)
    s, tol, valid = sampled_slopes(act, y0, lo, hi)
    below = valid & (s < smin[..., None] - tol)
    above = valid & (s > smax[..., None] + tol)
    if below.any() or above.any():
        i = np.argwhere(below | above)[0][:-1]
        i = tuple(i)
        raise AssertionError(f"{act}: chord slope outside [{smin[i]!r}, {smax[i]!r}] for y0={y0[i]!r}, "
                             f"[{lo[i]!r}, {hi[i]!r}]: sampled {np.sort(s[i][valid[i]])[[0, -1]]}")
    assert np.all(smin <= smax)
    lo_s = np.where(valid, s, np.inf).min(-1)
    hi_s = np.where(valid, s, -np.inf).max(-1)
    return {"count": int(valid.sum()), "excess": np.maximum(smax - hi_s, lo_s - smin),
            "width": smax - smin, "sampled": hi_s - lo_s}


def random_intervals(rng, n: int, cols: int = 1, log_width=(-8.0, 1.3)):
    shape = (n, cols) if cols > 1 else (n,)
    centre = rng.normal(0.0, 3.0, shape) * rng.choice([0.1, 1.0, 3.0], shape)
    width = 10.0 ** rng.uniform(*log_width, shape)
    lo = centre - width * rng.uniform(0.0, 1.0, shape)
    hi = lo + width
    where = rng.choice([0.0, 1.0, 0.5, -1.0], shape)
    y0 = np.where(where >= 0, lo + where * (hi - lo), lo + rng.uniform(0, 1, shape) * (hi - lo))
    return np.clip(y0, lo, hi), lo, hi


def adversarial_intervals(act: A.Activation, name: str):
    """Intervals around breakpoints (kinks, inflection points) and minima at every width,
    y0 at the ends, at the point itself and inside; degenerate ones; huge |y|."""
    points = list(act.breakpoints) + ([MINIMA[name]] if name in MINIMA else []) + [0.0]
    y0s, los, his = [], [], []
    for p in points:
        for w in (1e-12, 1e-9, 1e-6, 1e-3, 0.1, 1.0, 5.0, 40.0):
            for lo, hi in ((p - w, p + w), (p - w, p), (p, p + w), (p - w, p + 3 * w), (p - 3 * w, p + w)):
                for y0 in (lo, hi, p, 0.5 * (lo + hi), lo + 0.01 * (hi - lo), hi - 0.3 * (hi - lo)):
                    y0s.append(min(max(y0, lo), hi))
                    los.append(lo)
                    his.append(hi)
        y0s.append(p)
        los.append(p)
        his.append(p)
    for lo, hi in ((1e6 - 1.0, 1e6), (-1e6, -1e6 + 1.0), (-1e6, 1e6), (-1e6, 0.0), (0.0, 1e6),
                   (-800.0, 800.0), (-40.0, -30.0), (-1e300, 1e300), (-1e300, -1e299)):
        for y0 in (lo, hi, 0.5 * (lo + hi), max(lo, min(hi, 0.0))):
            y0s.append(y0)
            los.append(lo)
            his.append(hi)
    y0, lo, hi = (np.array(a) for a in (y0s, los, his))
    if isinstance(act, A.PRelu):
        y0, lo, hi = (np.repeat(a[:, None], 3, axis=1) for a in (y0, lo, hi))
    return y0, lo, hi


@pytest.mark.parametrize("name", ACTS)
def test_chord_slopes_contain_sampled_slopes_on_random_intervals(name):
    act = ACTS[name]
    rng = np.random.default_rng(sum(map(ord, name)))
    y0, lo, hi = random_intervals(rng, 1500, _columns(act, 1500))
    result = check_enclosure(act, y0, lo, hi)
    assert result["count"] > 1500 * 150


@pytest.mark.parametrize("name", ACTS)
def test_chord_slopes_contain_sampled_slopes_on_adversarial_intervals(name):
    act = ACTS[name]
    y0, lo, hi = adversarial_intervals(act, name)
    check_enclosure(act, y0, lo, hi)


@pytest.mark.parametrize("name", SMOOTH)
def test_enclosure_shrinks_like_the_width(name):
    """Away from kinks, smax − smin is O(width): at most 2.5·width (|σ''| ≤ 2 here) plus the
    evaluation margins, so a loose enclosure fails."""
    act = ACTS[name]
    rng = np.random.default_rng(7)
    for width in (1e-9, 1e-6, 1e-3, 1e-1):
        centre = rng.uniform(-6.0, 6.0, 4000)
        centre = centre[np.all(np.abs(centre[:, None] - act.kinks) > 2 * width, axis=1)]
        lo, hi = centre - width / 2, centre + width / 2
        y0 = lo + rng.uniform(0, 1, lo.shape) * width
        smin, smax = act.chord_slopes(y0, lo, hi)
        assert np.all(smax - smin <= 2.5 * width + 1e-10), name


@pytest.mark.parametrize("name", ACTS)
def test_enclosure_is_near_exact_on_moderate_intervals(name):
    """Wide enough for the evaluation margins not to matter, the enclosure exceeds the
    densely sampled range of chord slopes by at most 1e-3 of the interval's width
    (the sampling grid's own resolution)."""
    act = ACTS[name]
    rng = np.random.default_rng(11)
    y0, lo, hi = random_intervals(rng, 600, _columns(act, 600), log_width=(-2.0, 1.0))
    result = check_enclosure(act, y0, lo, hi)
    assert np.all(result["excess"] <= 1e-3 * (hi - lo) + 1e-9)


@pytest.mark.parametrize("name", PL)
def test_piecewise_linear_exact_and_stable(name):
    act = ACTS[name]
    rng = np.random.default_rng(3)
    y0, lo, hi = random_intervals(rng, 3000, _columns(act, 3000), log_width=(-6.0, 1.0))
    stable = act.stable(lo, hi)
    smin, smax = act.chord_slopes(y0, lo, hi)
    dmin, dmax = act.derivative_range(lo, hi)
    inside = np.ones(lo.shape, dtype=bool)
    for k in act.breakpoints:
        inside &= (hi <= k) | (lo >= k)
    assert np.array_equal(stable, inside)
    slope = act.derivative(0.5 * (lo + hi))
    np.testing.assert_array_equal(np.broadcast_to(slope, lo.shape)[stable], smin[stable])
    np.testing.assert_array_equal(smin[stable], smax[stable])
    np.testing.assert_array_equal(dmin[stable], dmax[stable])
    assert stable.any() and (stable.all() == (act.breakpoints.size == 0))


@pytest.mark.parametrize("name", ACTS)
def test_constant_where_the_derivative_vanishes(name):
    act = ACTS[name]
    lo = np.array([-20.0, -4.0, 2.0, 7.0, 0.5, -1.0])
    hi = np.array([-10.0, -3.5, 2.0, 9.0, 1.5, 1.0])
    if isinstance(act, A.PRelu):
        lo, hi = (np.repeat(a[:, None], 3, axis=1) for a in (lo, hi))
    constant = act.constant(lo, hi)
    dmin, dmax = act.derivative_range(lo, hi)
    grid = lo[..., None] + np.linspace(0, 1, 101) * (hi - lo)[..., None]
    values = _along(act.value, act, grid)
    flat = np.all(values == values[..., :1], axis=-1)
    assert np.all(flat[constant])  # sound: never says constant where σ moves
    np.testing.assert_array_equal(constant, (lo == hi) | ((dmin == 0) & (dmax == 0)))
    assert constant[2].all()  # lo == hi


@settings(max_examples=200)
@given(st.sampled_from(sorted(ACTS)), st.floats(-60, 60), st.floats(0, 30), st.floats(0, 30),
       st.sampled_from([1.0, 1e-3, 1e-7, 1e-11]))
def test_enclosure_property(name, y0, below, above, scale):
    act = ACTS[name]
    y0, lo, hi = np.array([y0]), np.array([y0 - below * scale]), np.array([y0 + above * scale])
    if isinstance(act, A.PRelu):
        y0, lo, hi = (np.repeat(a[:, None], 3, axis=1) for a in (y0, lo, hi))
    check_enclosure(act, np.clip(y0, lo, hi), lo, hi)


def test_relu_matches_the_paper_chord_slope():
    """ReLU over [y0 − r, y0 + r]: the largest chord slope is the paper's r_i (bounds.chord_slopes)."""
    rng = np.random.default_rng(5)
    y0 = rng.normal(0, 1, 5000)
    reach = 10.0 ** rng.uniform(-4, 1, 5000)
    _, smax = A.ReLU().chord_slopes(y0, y0 - reach, y0 + reach)
    paper = relu_chord_slopes(y0, y0 + reach)
    np.testing.assert_allclose(smax, paper, rtol=1e-14, atol=4e-15)  # 16-ulp margin
    assert np.all(smax >= paper)


def test_relu_kink_cases():
    relu = A.ReLU()
    y0, lo, hi = [0.0, 0.0, 0.0, -1.0, 1.0], [-1.0, 0.0, -1.0, -1.0, 1.0], [0.0, 1.0, 1.0, -1.0, 1.0]
    smin, smax = relu.chord_slopes(y0, lo, hi)
    np.testing.assert_array_equal(smin, [0.0, 1.0, 0.0, 0.0, 1.0])
    np.testing.assert_array_equal(smax, [0.0, 1.0, 1.0, 0.0, 1.0])
    assert relu.stable([0.0], [0.0]).tolist() == [False]  # a point at the kink: both slopes


def test_negative_slopes_are_kept():
    """GELU and SiLU left of their minima, ELU with alpha < 0, LeakyReLU with negative alpha."""
    for act, lo, hi in ((A.GELU(), -3.0, -1.0), (A.GELU("tanh"), -3.0, -1.0), (A.SiLU(), -4.0, -2.0),
                        (A.ELU(-0.5), -2.0, -0.5), (A.LeakyReLU(-0.3), -2.0, -0.5),
                        (A.HardSwish(), -3.0, -2.0)):
        smin, smax = act.chord_slopes(0.5 * (lo + hi), lo, hi)
        assert smax < 0, act
        assert act.max_abs_slope(0.5 * (lo + hi), lo, hi) == pytest.approx(-smin)


@pytest.mark.parametrize("name", ACTS)
def test_derivative_range_contains_pairwise_chords(name):
    act = ACTS[name]
    rng = np.random.default_rng(13)
    _, lo, hi = random_intervals(rng, 1000, _columns(act, 1000), log_width=(-4.0, 1.3))
    dmin, dmax = act.derivative_range(lo, hi)
    t = rng.uniform(0, 1, (*lo.shape, 2, 64))
    y = lo[..., None, None] + t * (hi - lo)[..., None, None]
    a, b = y[..., 0, :], y[..., 1, :]
    with np.errstate(all="ignore"):
        va, vb = _along(act.value, act, a), _along(act.value, act, b)
        s = (va - vb) / (a - b)
        tol = (_float_error(act, a, va) + _float_error(act, b, vb)) / np.abs(a - b) + 16 * EPS * np.abs(s)
    ok = a != b
    assert np.all(~ok | (s >= dmin[..., None] - tol)) and np.all(~ok | (s <= dmax[..., None] + tol))
    # tight: the derivative at sample points spans the range up to the grid resolution
    grid = lo[..., None] + np.linspace(0, 1, 401) * (hi - lo)[..., None]
    grid = np.concatenate([grid, np.clip(np.broadcast_to(act.breakpoints, (*lo.shape, act.breakpoints.size)),
                                         lo[..., None], hi[..., None])], axis=-1)
    d = np.concatenate([_along(act.derivative, act, grid, side) for side in (1, -1)], axis=-1)
    inner = (grid > lo[..., None]) & (grid < hi[..., None])
    inner = np.concatenate([inner, inner], axis=-1)
    assert np.all(~inner | ((d >= dmin[..., None] - 1e-11) & (d <= dmax[..., None] + 1e-11)))
    span = np.where(inner, d, -np.inf).max(-1) - np.where(inner, d, np.inf).min(-1)
    assert np.all(dmax - dmin <= span + 0.02 * (hi - lo) + 1e-9)


@pytest.mark.parametrize("name", SMOOTH)
def test_derivative_against_finite_differences(name):
    act = ACTS[name]
    y = np.linspace(-8.0, 8.0, 1601) + 0.0123
    y = y[np.all(np.abs(y[:, None] - act.kinks) > 1e-3, axis=1)]
    h = 1e-6
    fd = (act.value(y + h) - act.value(y - h)) / (2 * h)
    np.testing.assert_allclose(act.derivative(y), fd, atol=1e-8)


@pytest.mark.parametrize("name", ACTS)
def test_global_lipschitz_is_sup_of_derivative(name):
    act = ACTS[name]
    grid = np.concatenate([np.linspace(-50.0, 50.0, 200001), act.breakpoints])
    if isinstance(act, A.PRelu):
        grid = np.repeat(grid[:, None], 3, axis=1)
    sup = max(np.abs(act.derivative(grid, s)).max() for s in (1, -1))
    assert sup <= act.global_lipschitz <= sup + 1e-9


def test_known_constants():
    assert A.GELU().global_lipschitz == pytest.approx(1.1289, abs=1e-4)
    assert A.SiLU().global_lipschitz == pytest.approx(1.0998, abs=1e-4)
    assert A.HardSwish().global_lipschitz == pytest.approx(1.5, abs=1e-9)
    assert A.Sigmoid().global_lipschitz == pytest.approx(0.25, abs=1e-9)
    assert A.ReLU().global_lipschitz == 1.0
    assert A.HardSigmoid(0.2, 0.5).global_lipschitz == 0.2
    np.testing.assert_allclose(A.GELU().breakpoints, [-math.sqrt(2), math.sqrt(2)])
    np.testing.assert_allclose(A.SiLU().breakpoints, [-2.3993572805, 2.3993572805], rtol=1e-10)
    np.testing.assert_array_equal(A.ELU(1.0).kinks, [])
    np.testing.assert_array_equal(A.ELU(0.5).kinks, [0.0])


def test_tanh_gelu_against_its_formula():
    x = np.concatenate([np.linspace(-12, 12, 4801), [-30.0, 30.0, 1e3, -1e3]])
    formula = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    np.testing.assert_allclose(A.GELU("tanh").value(x), formula, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(A.GELU("tanh").value(x), A.GELU().value(x), atol=1e-3)


def test_prelu_broadcasts_per_channel():
    act = A.PRelu(np.array([0.1, -0.2, 2.0]).reshape(3, 1, 1))
    rng = np.random.default_rng(2)
    y0 = rng.normal(0, 1, (2, 3, 4, 4))
    smin, smax = act.chord_slopes(y0, y0 - 0.05, y0 + 0.05)
    assert smin.shape == y0.shape
    neg = (y0 + 0.05 < 0)
    np.testing.assert_array_equal(smin[:, 2][neg[:, 2]], 2.0)
    np.testing.assert_array_equal(smax[:, 1][neg[:, 1]], -0.2)


def test_bad_intervals_are_refused():
    with pytest.raises(OnnxlipError, match="lo <= y0 <= hi"):
        A.Sigmoid().chord_slopes([0.0], [0.5], [1.0])
    with pytest.raises(OnnxlipError, match="lo <= hi fails at 1 of 2"):
        A.Tanh().derivative_range([0.0, 1.0], [1.0, 0.5])
    with pytest.raises(OnnxlipError, match="not finite"):
        A.ReLU().chord_slopes([0.0], [-np.inf], [1.0])
    with pytest.raises(OnnxlipError, match="approximate"):
        A.GELU("fast")


# --------------------------------------------------------------- values against onnxruntime

def _ort_values(op: str, x: np.ndarray, opset: int = 17, inputs=(), **attrs) -> np.ndarray:
    """Run one node on a float32 tensor x, extra inputs given as (name, array or None)."""
    inits = [numpy_helper.from_array(np.asarray(a, np.float32), n) for n, a in inputs if a is not None]
    names = ["x"] + [n if a is not None else "" for n, a in inputs]
    if op == "Silu":
        nodes = [helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("Mul", ["x", "s"], ["y"])]
    else:
        nodes = [helper.make_node(op, names, ["y"], **attrs)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = helper.find_min_ir_version_for(model.opset_import)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


ORT_CASES = [
    ("relu", "Relu", {}, 17, ()),
    ("leaky_neg", "LeakyRelu", {"alpha": -0.3}, 17, ()),
    ("leaky", "LeakyRelu", {"alpha": 0.01}, 17, ()),
    ("prelu", "PRelu", {}, 17, (("slope", [0.25, -0.5, 1.5]),)),
    ("relu6", "Clip", {}, 17, (("min", 0.0), ("max", 6.0))),
    ("hardtanh", "Clip", {}, 17, (("min", -1.0), ("max", 1.0))),
    ("clip_max", "Clip", {}, 17, (("min", None), ("max", 0.75))),
    ("clip_const", "Clip", {}, 17, (("min", 2.0), ("max", 1.0))),
    ("hardsigmoid", "HardSigmoid", {"alpha": 0.2, "beta": 0.5}, 17, ()),
    ("hardsigmoid_neg", "HardSigmoid", {"alpha": -0.7, "beta": 0.3}, 17, ()),
    ("sigmoid", "Sigmoid", {}, 17, ()),
    ("tanh", "Tanh", {}, 17, ()),
    ("softplus", "Softplus", {}, 17, ()),
    ("elu", "Elu", {"alpha": 1.0}, 17, ()),
    ("elu_2", "Elu", {"alpha": 2.0}, 17, ()),
    ("elu_neg", "Elu", {"alpha": -0.5}, 17, ()),
    ("gelu", "Gelu", {"approximate": "none"}, 20, ()),
    ("gelu_tanh", "Gelu", {"approximate": "tanh"}, 20, ()),
    ("silu", "Silu", {}, 17, ()),
    ("hardswish", "HardSwish", {}, 17, ()),
]


@pytest.mark.parametrize(("name", "op", "attrs", "opset", "inputs"), ORT_CASES, ids=[c[0] for c in ORT_CASES])
def test_value_matches_onnxruntime(name, op, attrs, opset, inputs):
    act = ACTS[name]
    x = np.concatenate([np.linspace(-12, 12, 2401), act.breakpoints, [-60.0, 60.0, -1e4, 1e4]])
    x = np.repeat(x.astype(np.float32)[:, None], 3, axis=1)
    expected = _ort_values(op, x, opset, inputs, **attrs).astype(np.float64)
    got = act.value(x.astype(np.float64))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------- measured figures

def _fine_excess(act: A.Activation, y0, lo, hi, points: int = 200001) -> float:
    """The enclosure's excess over chord slopes sampled on a fine grid, per width (one interval)."""
    smin, smax = act.chord_slopes(y0, lo, hi)
    y = np.concatenate([np.linspace(lo, hi, points, axis=-1), act.breakpoints[(act.breakpoints > lo)
                                                                             & (act.breakpoints < hi)]])
    y = y[y != y0]
    s = (act.value(y) - act.value(y0)) / (y - y0)
    d = [act.derivative(y0, side) for side, reach in ((1, hi > y0), (-1, lo < y0)) if reach]
    s = np.concatenate([s, d])
    return float(max(smax - s.max(), s.min() - smin) / (hi - lo))


def report() -> None:
    """Print per activation: sampled slopes checked, the worst excess of the enclosure over
    the sampled range per width on moderate intervals (grid of 160, then the 5 worst on a
    grid of 200,001), and the worst (smax − smin) / width on tiny and small intervals."""
    print(f"{'activation':16s} {'slopes checked':>14s} {'excess/w grid':>13s} {'fine':>9s} "
          f"{'(smax-smin)/w w=1e-6':>21s} {'w=1e-3':>8s}")
    total = 0
    for name, act in ACTS.items():
        rng = np.random.default_rng(0)
        cols = _columns(act, 1)
        count = 0
        for log_width in ((-8.0, 1.3), (-2.0, 1.0)):
            y0, lo, hi = random_intervals(rng, 1500, cols, log_width)
            result = check_enclosure(act, y0, lo, hi)
            count += result["count"]
        ratios = result["excess"] / (hi - lo)
        fine = float("nan")  # PRelu's 3 channels: not on the fine grid
        if cols == 1:
            fine = max(_fine_excess(act, y0[i], lo[i], hi[i]) for i in np.argsort(ratios)[-5:])
        count += check_enclosure(act, *adversarial_intervals(act, name))["count"]
        total += count
        tight = []
        for width in (1e-6, 1e-3):
            centre = rng.uniform(-6.0, 6.0, 4000)
            centre = centre[np.all(np.abs(centre[:, None] - act.breakpoints) > 2 * width, axis=1)]
            lo, hi = centre - width / 2, centre + width / 2
            if cols > 1:
                lo, hi = (np.repeat(a[:, None], 3, axis=1) for a in (lo, hi))
            y0 = lo + rng.uniform(0, 1, lo.shape) * width
            smin, smax = act.chord_slopes(y0, lo, hi)
            tight.append(np.max(smax - smin) / width)
        print(f"{name:16s} {count:14d} {np.max(ratios):13.2e} {fine:9.1e} {tight[0]:21.3f} {tight[1]:8.3f}")
    print(f"total sampled chord slopes checked: {total}")


# --------------------------------------------------------------- exact chords at 40 digits

def _mp_function(act: A.Activation, mp):
    """σ in mpmath (arguments are doubles, converted exactly)."""
    relu = lambda y: max(y, 0)  # noqa: E731
    if isinstance(act, A.LeakyReLU):
        alpha = mp.mpf(act.alpha)
        return lambda y: y if y >= 0 else alpha * y
    if isinstance(act, A.Clip):
        def clip(y):
            y = y if act.low is None else max(y, mp.mpf(act.low))
            return y if act.high is None else min(y, mp.mpf(act.high))
        return clip
    if isinstance(act, A.HardSigmoid):
        return lambda y: min(max(mp.mpf(act.alpha) * y + mp.mpf(act.beta), 0), 1)
    if isinstance(act, A.ELU):
        return lambda y: y if y > 0 else mp.mpf(act.alpha) * mp.expm1(y)
    if isinstance(act, A.GELU) and act.approximate == "tanh":  # 1 + tanh(u) = 2 / (1 + e^(-2u))
        c = mp.sqrt(2 / mp.pi)
        return lambda y: y / (1 + mp.exp(-2 * c * (y + mp.mpf(0.044715) * y**3)))
    return {
        A.Sigmoid: lambda y: 1 / (1 + mp.exp(-y)),
        A.Tanh: mp.tanh,
        A.Softplus: lambda y: mp.log1p(mp.exp(y)),
        A.GELU: lambda y: y * mp.erfc(-y / mp.sqrt(2)) / 2,
        A.SiLU: lambda y: y / (1 + mp.exp(-y)),
        A.HardSwish: lambda y: y * min(max(y / 6 + mp.mpf(1) / 2, 0), 1),
        A.ReLU: relu,
    }[type(act)]


@pytest.mark.parametrize("name", [n for n in ACTS if n != "prelu"])
def test_enclosure_contains_exact_chord_slopes(name):
    """Where float64 sampling cannot judge (widths down to 1e-12, huge |y|), the chord
    slopes computed at 150 significant digits (cancellations near saturation included)
    lie inside the enclosure, up to 1e-100 relative (mpmath's own rounding)."""
    mpmath = pytest.importorskip("mpmath", reason="mpmath (a dependency of torch's sympy) is absent")
    act = ACTS[name]
    mp = mpmath.mp
    mp.dps = 150
    f = _mp_function(act, mpmath)
    y0, lo, hi = adversarial_intervals(act, name)
    rng = np.random.default_rng(17)
    pick = rng.choice(y0.size, size=min(y0.size, 150), replace=False)
    ry0, rlo, rhi = random_intervals(rng, 40, log_width=(-12.0, 1.0))
    y0, lo, hi = (np.concatenate([a[pick], b]) for a, b in ((y0, ry0), (lo, rlo), (hi, rhi)))
    if isinstance(act, A.GELU):  # mpmath's erfc overflows at 1e300 (float sampling covers those)
        keep = np.maximum(np.abs(lo), np.abs(hi)) <= 1e7
        y0, lo, hi = y0[keep], lo[keep], hi[keep]
    smin, smax = act.chord_slopes(y0, lo, hi)
    checked = 0
    smin, smax = [mp.mpf(float(v)) for v in smin], [mp.mpf(float(v)) for v in smax]
    for k in range(y0.size):
        width = hi[k] - lo[k]
        near = np.clip(y0[k] + width * np.array([-1e-9, -1e-3, 1e-3, 1e-9, -0.4, 0.4]), lo[k], hi[k])
        inside = act.breakpoints[(act.breakpoints >= lo[k]) & (act.breakpoints <= hi[k])]
        ys = {lo[k], hi[k], *near, *np.linspace(lo[k], hi[k], 9), *inside}
        base = mp.mpf(float(y0[k]))
        f0 = f(base)
        for y in ys - {y0[k]}:
            s = (f(mp.mpf(float(y))) - f0) / (mp.mpf(float(y)) - base)
            slack = abs(s) * mp.mpf(10) ** -100
            assert smin[k] - slack <= s <= smax[k] + slack, (act, y0[k], lo[k], hi[k], y, s)
            checked += 1
    assert checked > 1000
