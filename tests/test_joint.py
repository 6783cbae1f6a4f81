"""The joint bound (onnxlip.joint): the uncertain units' centres and radii enclose
their true changes, the S-lemma's t is proven against points of the admissible
set (and is the exact supremum where one constraint makes the S-lemma lossless),
and on networks it stays above every ratio found and below the telescoping."""

from __future__ import annotations

import math
import time
from pathlib import Path

import netgen
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import onnxlip
from onnxlip import joint, sdp, tight
from onnxlip.blocks import AffineBlock, MaxPoolBlock
from onnxlip.joint import _Forms, _multipliers, _proven, _value, relu_spread, window_spread
from onnxlip.reach import analyse

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
SLACK = 1 + 1e-6


def _enclosed(spread, y, r, units) -> np.ndarray:
    """|r_u − shift_u·y| − ||rows_u·y|| per unit (≤ 0 where enclosed)."""
    centre = spread.shift @ y
    radius = np.sqrt(np.bincount(spread.owner, (spread.rows @ y) ** 2, minlength=units))
    return np.abs(r - centre) - radius


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_relu_spread_encloses_every_chord(seed):
    """A ReLU with gate g and |U| ≤ h (U ≤ 0 where g = 1) adds (S − g)·y with S in
    its slope interval: the centre ± radius holds it for every slope, at the ends too."""
    rng = np.random.default_rng(seed)
    n = 12
    gate = (rng.random(n) < 0.5).astype(float)
    slopes = rng.random(n)
    uncertain = rng.random(n) < 0.7
    spread = relu_spread(None, n, uncertain, gate, slopes)
    y = rng.standard_normal(n) * 10.0 ** rng.integers(-3, 3)
    for pick in (rng.random(n), np.zeros(n), np.ones(n)):  # U's share of its interval
        u = np.where(gate > 0, -pick * slopes, pick * slopes)
        r = (u * y)[spread.units]
        assert (_enclosed(spread, y, r, spread.units.size) <= 1e-12 * np.abs(y).max()).all()


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_window_spread_encloses_the_window(seed):
    """A tied window moves by max_m z_m(x) − max_m z_m(x0), between its members'
    changes; a window whose winner stays in S⁰ rises past it by t ∈ [0, max_j
    s_j(Δz_j − Δz_w)⁺]; both are within centre ± radius for every change."""
    rng = np.random.default_rng(seed)
    size, units = 16, []
    members, winners, tied, rises, truth = [], [], [], [], []
    dz = rng.standard_normal(size) * 10.0 ** rng.integers(-3, 2)
    for u in range(4):
        idx = rng.choice(size, size=rng.integers(2, 5), replace=False)
        if rng.random() < 0.5:  # tied at x0: every member at the top
            members.append(idx)
            winners.append(idx[0])
            tied.append(True)
            rises.append((np.array([], int), np.array([])))
            truth.append(dz[idx].max() if rng.random() < 0.5 else
                         dz[idx].min() + rng.random() * np.ptp(dz[idx]))
        else:
            w, js = idx[0], idx[1:]
            s = rng.random(js.size)
            members.append(idx)
            winners.append(w)
            tied.append(False)
            rises.append((js, s))
            top = max(0.0, float((s * np.maximum(dz[js] - dz[w], 0)).max()))
            truth.append(rng.choice([0.0, top, rng.random() * top]))
        units.append(u)
    spread = window_spread(size, np.array(units), members, np.array(winners), np.array(tied), rises)
    assert (_enclosed(spread, dz, np.array(truth), len(units)) <= 1e-12 * np.abs(dz).max()).all()


@pytest.mark.parametrize("k", [2, 3, 4, 9])
def test_tied_window_radius_is_the_largest_deviation(k):
    """A tied window of k members where one member alone moves (by ±1) is at its
    mean + (1 − 1/k) or its mean − 1/k (others' deviation): the radius is
    exactly the largest of these, (k − 1)/k, and holds both."""
    mem = np.arange(k)
    spread = window_spread(k, np.array([0]), [mem], np.array([0]), np.array([True]),
                           [(np.array([], int), np.array([]))])
    for sign in (1.0, -1.0):
        dz = np.zeros(k)
        dz[0] = sign
        radius = np.linalg.norm(spread.rows @ dz)
        assert radius == pytest.approx((k - 1) / k, rel=1e-12)
        for truth in (dz.max(), dz.min()):  # the members' extremes: the window's possible ends
            assert _enclosed(spread, dz, np.array([truth]), 1)[0] <= 1e-15


def _random_forms(rng, n=6, o=3, blocks=(2,), rows_per_unit=1) -> _Forms:
    """Forms of a made-up network: d-part D (reduced by QR as joint does), r-part P,
    units coupled to the earlier blocks' units."""
    m = sum(blocks)
    q = m * rows_per_unit
    p = o + m + q
    D = rng.standard_normal((p, n))
    P = np.zeros((p, m))
    P[:o] = rng.standard_normal((o, m))
    start, level = 0, []
    for i, size in enumerate(blocks):
        units = np.arange(start, start + size)
        P[o + units, units] = 1.0
        if start:  # coupling: this block's centres and radii read earlier units
            P[o + units, :start] = rng.standard_normal((size, start)) * 0.5
            for k in range(rows_per_unit):
                P[o + m + units * rows_per_unit + k, :start] = rng.standard_normal((size, start)) * 0.5
        level.append(np.full(size, len(blocks) - 1 - i))
        start += size
    D[o + m:] *= 0.3  # radii smaller than the centres' scale
    R = np.linalg.qr(D.T, mode="r")
    owner = np.repeat(np.arange(m), rows_per_unit)
    return _Forms(R[:min(n, p)], P, o, owner, np.concatenate(level), 1e-14), D


def _admissible(forms: _Forms, D: np.ndarray, d: np.ndarray, pick: np.ndarray) -> np.ndarray:
    """r for direction d with each unit at `pick` ∈ [−1, 1] of its interval, units in
    order (a unit's centre and radius read only earlier units)."""
    o, m = forms.outputs, forms.units
    r = np.zeros(m)
    for u in range(m):
        base = D[o + u] @ d + forms.P[o + u] @ r - r[u]  # c_u = r_u + base
        rows = np.flatnonzero(forms.owner == u) + o + m
        radius = np.linalg.norm(D[rows] @ d + forms.P[rows] @ r)
        r[u] = -base + pick[u] * radius
    return r


@pytest.mark.parametrize("blocks", [(1,), (3,), (2, 2), (2, 1, 2)])
@pytest.mark.parametrize("seed", range(4))
def test_proven_t_holds_on_admissible_points(blocks, seed):
    """√t bounds ||out(z)|| for every admissible z with ||d|| = 1: sampled
    directions and interval picks, then coordinate ascent on the picks (vertices
    are where a convex objective peaks)."""
    rng = np.random.default_rng(seed)
    forms, D = _random_forms(rng, blocks=blocks, rows_per_unit=1 + seed % 2)
    found = _multipliers(forms)
    assert found is not None
    lam, value = found
    assert value == pytest.approx(_value(forms, lam)[0], rel=1e-9)  # t at the λ returned
    t = _proven(forms, lam, value)
    assert t is not None and t >= value
    o, best = forms.outputs, 0.0
    for _ in range(400):
        d = rng.standard_normal(D.shape[1])
        d /= np.linalg.norm(d)
        pick = rng.choice([-1.0, 1.0], forms.units)
        for _ in range(3):
            for u in range(forms.units):
                trial = [pick.copy(), pick.copy()]
                trial[0][u], trial[1][u] = -1.0, 1.0
                pick = max(trial, key=lambda p: np.linalg.norm(
                    D[:o] @ d + forms.P[:o] @ _admissible(forms, D, d, p)))
        r = _admissible(forms, D, d, pick)
        best = max(best, float(np.linalg.norm(D[:o] @ d + forms.P[:o] @ r)))
    assert best**2 <= t * SLACK


@pytest.mark.parametrize("seed", range(6))
def test_one_unit_is_exact(seed):
    """One unit with one radius row: the S-lemma is lossless, and the admissible
    set's supremum is at a vertex, r = (c ± g)·d: max(||E + b(c ± g)ᵀ||). The
    proven bound is above it and within 1e-4 of it."""
    rng = np.random.default_rng(100 + seed)
    forms, D = _random_forms(rng, n=7, o=4, blocks=(1,))
    e, b = D[:4], forms.P[:4, 0]
    c, g = -D[4], D[5]  # c_u(z) = r − cᵀd (the centre row holds −cᵀ), g_u(z) = gᵀd
    truth = max(np.linalg.norm(e + np.outer(b, c + g), 2), np.linalg.norm(e + np.outer(b, c - g), 2))
    lam, value = _multipliers(forms)
    t = _proven(forms, lam, value)
    assert truth <= math.sqrt(t) <= truth * (1 + 1e-4)


def test_rounding_of_the_forms_is_paid_for():
    """The forms' error bound η enters the proof: with a large η the proven t
    grows (or no t is proven), never shrinks."""
    rng = np.random.default_rng(7)
    forms, _ = _random_forms(rng, blocks=(2, 2))
    lam, value = _multipliers(forms)
    small = _proven(forms, lam, value)
    forms.eta = 1e-3 * math.sqrt(value)
    large = _proven(forms, lam, value)
    assert large is None or large > small * (1 + 1e-7)


def _chain(kind: str, seed: int, tmp_path, **options):
    if kind == "tie":  # exact max-pooling ties over a constant background
        net, x0 = netgen.tie_net(seed)
    else:
        net = {"dense": netgen.dense_net, "conv": netgen.conv_net}[kind](seed)
        x0 = np.random.default_rng(seed).standard_normal(net.input_shape)
    path = net.save(tmp_path / f"{kind}{seed}.onnx")
    return net, onnxlip.load(path, seed=0, **options), x0


def _sampled_ratio(net, engine, x0: np.ndarray, eps: float, rng: np.random.Generator) -> float:
    """The largest ratio the float64 twin shows at points of the ball: random ones
    and along J(x0)'s two top right singular vectors (netgen.ball_points)."""
    directions = list(np.linalg.svd(engine.jacobian(x0).dense())[2][:2])
    points = netgen.ball_points(rng, x0, eps, 300, 300, directions)
    return netgen.max_ratio(lambda p: net(p.reshape((-1, *net.input_shape[1:]))), x0, points)


@pytest.mark.parametrize("kind,seed", [("dense", 7), ("conv", 5), ("conv", 6), ("conv", 11)])
def test_joint_on_chains_is_sound_and_below_the_telescoping(tmp_path, kind, seed, monkeypatch):
    """Where the joint bound is used it is below the telescoping alone, and above
    sampled ratios of the float64 twin and onnxlip's lower bounds."""
    net, engine, x0 = _chain(kind, seed, tmp_path)
    nominal, used = engine.trace(x0), 0
    rng = np.random.default_rng(seed)
    for level in (1e-3, 1e-2, 3e-2):
        eps = level * float(np.linalg.norm(x0))
        reach = analyse(engine.blocks, nominal, eps)
        both = tight.tight_local_bound(engine.blocks, nominal, eps, engine.tol, reach=reach.changes)
        with monkeypatch.context() as m:
            m.setattr(tight, "joint_bound", lambda *a: (math.inf, False))
            alone = tight.tight_local_bound(engine.blocks, nominal, eps, engine.tol, reach=reach.changes)
        assert both.bound <= alone.bound
        if both.source != "joint":
            continue
        used += 1
        assert both.bound < alone.bound
        sampled = _sampled_ratio(net, engine, x0, eps, rng)
        lower = engine.lower_bounds(x0, [eps], samples=16, ascent_steps=10)[0].best
        assert max(sampled, lower) <= both.bound * SLACK
    assert used  # each of these nets has a radius where the joint bound is the tighter


def test_float32_maps_are_pulled_in_float64(tmp_path, monkeypatch):
    """The forms of a float32 conv net (products rounded at 1e-9 of the maps' norms
    and above) are pulled through the maps' exact float64 copies
    (_Linearized.precise): their error bound is at float64's scale."""
    _, engine, x0 = _chain("conv", 5, tmp_path)
    nominal = engine.trace(x0)
    eps = 1e-2 * float(np.linalg.norm(x0))
    reach = analyse(engine.blocks, nominal, eps)
    seen = []
    original = joint._forms

    def spy(dense, floors=False):
        forms = original(dense, floors)
        seen.append((forms, any(s.linear is not None and max(s.linear.rounding()) > 1e-9 * s.linear.norm_cap()
                                for s in captured[-1].steps)))
        return forms

    captured = []
    original_dense = joint._dense
    monkeypatch.setattr(joint, "_dense", lambda net, *a: captured.append(net) or original_dense(net, *a))

    monkeypatch.setattr(joint, "_forms", spy)
    tight.tight_local_bound(engine.blocks, nominal, eps, engine.tol, reach=reach.changes)
    forms, float32 = seen[0]
    assert float32 and forms is not None
    assert forms.eta < 1e-9 * max(1.0, float(np.abs(forms.R).max()))


@pytest.mark.parametrize("floors", [False, True])
def test_forms_reduce_over_the_inputs_they_read(monkeypatch, floors):
    """The QR of the forms' d-part runs on the inputs some form reads: the reduced
    forms give the same Gram matrix D Dᵀ = Rᵀ R (so ||Dd|| = ||Rᵀa||, a = Qᵀd̂),
    from a smaller factorization whose rounding term η is no larger; with the
    floors (pivoted QR) too."""
    rng = np.random.default_rng(11)
    p, n = 9, 400
    D = np.zeros((p, n))
    read = rng.choice(n, 30, replace=False)
    D[:, read] = rng.standard_normal((p, read.size))
    extra = {}
    if floors:
        DN = np.zeros((3, n))
        DN[:, read[:10]] = rng.standard_normal((3, 10))
        extra = dict(DN=DN, PN=rng.standard_normal((3, 4)), floor_error=1e-12)
    dense = joint._Dense(D, rng.standard_normal((p, 4)), 2, np.array([0, 1, 2, 3]), np.ones(4), 1e-12, [0],
                         [np.arange(4)], **extra)
    reduced = joint._forms(dense, floors)
    monkeypatch.setattr(joint, "_read", lambda D: D)
    whole = joint._forms(dense, floors)
    every = np.vstack([D, extra["DN"]]) if floors else D
    gram = every @ every.T
    for forms in (reduced, whole):
        assert np.allclose(forms.R.T @ forms.R, gram, rtol=0, atol=1e-12 * np.abs(gram).max())
    assert reduced.eta < whole.eta


@pytest.mark.skipif(not (REFERENCE / "mnist_avant.onnx").is_file(), reason="../shared/reference absent")
def test_mnist_reference_ties_bounded_jointly():
    """MNIST reference at ε = 1e-3: only tied max-pooling windows are uncertain;
    the joint bound is at most 1.11 ||J(x0)|| (1.70 by the telescoping), above the
    best ratio found at a point of the ball (45.47, tools/ties.py)."""
    engine = onnxlip.load(REFERENCE / "mnist_avant.onnx", seed=0)
    x0 = np.load(REFERENCE / "mnist_avant_x0.npy")
    result = engine.local_bound(x0, 1e-3)
    assert result.source == "joint"
    assert 45.47 <= result.bound <= 1.11 * 45.52


def _output(block, at, k: int) -> np.ndarray:
    """Block k's output in float64 from a trace (max-pooling by its windows)."""
    if isinstance(block, AffineBlock):
        return block.activate(at.pre[k])
    if isinstance(block, MaxPoolBlock):
        windows = block.windows
        return np.where(windows < 0, -np.inf, at.inputs[k][np.maximum(windows, 0)]).max(axis=1)
    return np.maximum(at.inputs[k], 0.0)


def _captured(engine, x0, eps, monkeypatch):
    """The centred stable network tight_local_bound hands to the joint bound."""
    nominal = engine.trace(x0)
    reach = analyse(engine.blocks, nominal, eps)
    seen = []
    with monkeypatch.context() as m:
        m.setattr(tight, "joint_bound", lambda net, *args: seen.append(net) or (math.inf, False))
        tight.tight_local_bound(engine.blocks, nominal, eps, engine.tol, reach=reach.changes)
    return seen[0]


@pytest.mark.parametrize("kind,seed,level", [("conv", 6, 1e-2), ("conv", 11, 1e-2), ("dense", 7, 3e-2),
                                             ("conv", 8, 1e-3), ("conv", 3, 3e-2), ("tie", 28, 1e-3),
                                             ("tie", 3, 3e-3)])
def test_forms_hold_at_points_of_the_ball(tmp_path, monkeypatch, kind, seed, level):
    """At points x of the ball, with d = x − x0 and r the uncertain units' true
    change beyond the stable part (float64 forward pass of every block): the
    output forms give f(x) − f(x0), every unit's centre is within its radius,
    every floor is ≥ 0 (the tie nets: proven exact ties and rising windows)
    and every stable output changes exactly as the stable network says."""
    _, engine, x0 = _chain(kind, seed, tmp_path)
    eps = level * float(np.linalg.norm(x0))
    net = _captured(engine, x0, eps, monkeypatch)
    dense = joint._dense(net)
    assert dense is not None and len(dense.blocks) >= 1
    net = net.precise()  # the stable steps in float64
    blocks, o, m = engine.blocks, dense.outputs, dense.P.shape[1]
    base = engine.trace(x0)  # float64 (the layers' precise arithmetic)
    outs0 = [_output(b, base, k) for k, b in enumerate(blocks)]
    rng = np.random.default_rng(seed)
    top = list(np.linalg.svd(engine.jacobian(x0).dense())[2][:3])
    for i in range(60):
        u = top[i % 3] * rng.choice([-1, 1]) if i < 12 else rng.standard_normal(x0.size)
        x = x0 + (eps * rng.uniform(0.2, 1.0) * u / np.linalg.norm(u)).reshape(x0.shape)
        at = engine.trace(x)
        d = at.x - base.x
        r, centres, radii, scale = [], [], [], eps * float(np.abs(dense.D).max())
        for k, (block, step) in enumerate(zip(blocks, net.steps)):
            dv = at.inputs[k] - base.inputs[k]
            extra = _output(block, at, k) - outs0[k] - step.forward(dv)
            units = dense.units[dense.blocks.index(k)] if k in dense.blocks else np.array([], int)
            stable = np.delete(extra, units)
            assert np.abs(stable).max(initial=0) <= 1e-9 * scale, (k, "a stable output moved off E")
            r.append(extra[units])
            if units.size:  # the unit's centre and radius rows, from the true Δv_k
                y = dv if step.spread.head is None else step.spread.head.matvec(dv)
                centres.append(extra[units] - step.spread.shift @ y)
                radii.append(step.spread.rows @ y)
        r = np.concatenate(r)
        forms = dense.D @ d + dense.P @ r
        change = _output(blocks[-1], at, len(blocks) - 1) - outs0[-1]
        assert np.abs(forms[:o] - change).max() <= 1e-9 * scale
        assert np.abs(forms[o:o + m] - np.concatenate(centres)).max() <= 1e-9 * scale
        assert np.abs(forms[o + m:] - np.concatenate(radii)).max() <= 1e-9 * scale
        centre = np.abs(forms[o:o + m])
        radius = np.sqrt(np.bincount(dense.owner, forms[o + m:] ** 2, minlength=m))
        assert (centre <= radius + 1e-9 * scale).all()
        assert (dense.DN @ d + dense.PN @ r >= -1e-9 * scale).all(), "a floor is negative"
    coupled = float(np.abs(dense.P[o:]).sum()) > m  # beyond each centre's own r_u
    assert coupled or (kind, seed) != ("conv", 6)  # where the pulls between blocks are tested
    assert dense.DN.shape[0] > m or kind != "tie"  # exact ties' floors: one per member


def test_extreme_multipliers_count_as_infeasible():
    """t(λ) at λ overflowing, zero, NaN or huge is inf (no exception), so that the
    search's line steps that reach them only back off."""
    forms, _ = _random_forms(np.random.default_rng(3), blocks=(2, 2))
    for lam in (np.full(4, np.inf), np.zeros(4), np.full(4, np.nan), np.full(4, 1e308),
                np.array([1e300, 1e-300, 1.0, 1e300])):
        value, grad = _value(forms, lam)
        assert value == math.inf and grad is None


def test_target_only_gives_up_where_it_cannot_be_met(tmp_path):
    """A caller's target (a certificate's test) far below what the joint bound
    reaches makes it give up early: the telescoping's or paper's bound, never
    lower; a target above it leaves the bound as it is."""
    _, engine, x0 = _chain("conv", 6, tmp_path)
    eps = 1e-2 * float(np.linalg.norm(x0))
    nominal = engine.trace(x0)
    free = engine.local_bound_from(nominal, eps)
    assert free.source == "joint"
    assert engine.local_bound_from(nominal, eps, target=free.bound * 10).bound == free.bound
    low = engine.local_bound_from(nominal, eps, target=free.bound / 10)
    assert low.source != "joint" and low.bound > free.bound


def _patch_key(x0: np.ndarray, block, outputs: np.ndarray) -> list[bytes]:
    """Each conv output's channel and 3x3 input patch (the tie nets' first layer)."""
    channels, height, width = block.out_shape[-3:]
    c, rest = np.divmod(outputs, height * width)
    i, j = np.divmod(rest, width)
    image = x0.reshape(x0.shape[-2:])
    return [bytes([int(ci)]) + image[a:a + 3, b:b + 3].tobytes() for ci, a, b in zip(c, i, j)]


@pytest.mark.parametrize("seed", [28, 3])
def test_exact_ties_are_proven_and_near_ties_are_not(tmp_path, seed):
    """Block.equal_outputs on the tie nets' conv: a window is proven tied exactly
    where its members read the same patch in the same channel; one input
    nudged by one ulp (a near-tie, 1e-7 relative) undoes the proof of every
    window that reads it from some members only."""
    _, engine, x0 = _chain("tie", seed, tmp_path)
    conv, pool = engine.blocks[0], engine.blocks[1]
    assert isinstance(conv, AffineBlock) and isinstance(pool, MaxPoolBlock) and conv.inputs == (-1,)
    groups = [w[w >= 0] for w in pool.windows]

    def expected(x):
        return np.array([len(set(_patch_key(x, conv, g))) == 1 for g in groups])

    x = x0.astype(np.float64).ravel()
    proven = conv.equal_outputs(x, groups)
    assert proven.any() and not proven.all()
    assert (proven == expected(x0)).all()
    nudged = x0.copy()  # the top-left input of a proven window's first member
    first = groups[int(np.argmax(proven))][0]
    i, j = np.divmod(first % (conv.out_shape[-2] * conv.out_shape[-1]), conv.out_shape[-1])
    nudged[0, 0, i, j] = np.nextafter(nudged[0, 0, i, j], np.float32(np.inf))
    after = conv.equal_outputs(nudged.astype(np.float64).ravel(), groups)
    assert (after == expected(nudged)).all()
    assert (proven & ~after).any()


@pytest.mark.parametrize("seed", [28, 39])
def test_products_of_floors_tighten_soundly(tmp_path, monkeypatch, seed):
    """The refinement (a time budget; here two rounds of cutting planes) on the
    tie nets at ε = 1e-3: well below the joint bound without it (4.89 → 3.97 and
    4.57 → 3.71 on these two), above the ratios gradient ascent finds in float64
    and onnxlip's own lower bound."""
    monkeypatch.setattr(joint, "ROUNDS_MAX", 2)
    net, plain, x0 = _chain("tie", seed, tmp_path)
    _, refined, _ = _chain("tie", seed, tmp_path, time_budget=600)
    before, after = plain.local_bound(x0, 1e-3), refined.local_bound(x0, 1e-3)
    assert (before.source, after.source) == ("joint", "joint (refined)")
    assert after.bound < 0.9 * before.bound
    found = netgen.ratio_ascent(net, x0, 1e-3, np.random.default_rng(seed), starts=20, steps=30)
    lower = refined.lower_bounds(x0, [1e-3], samples=16, ascent_steps=10)[0].best
    assert max(found, lower) <= after.bound * SLACK
    _, needs_less, _ = _chain("tie", seed, tmp_path, time_budget=600)  # a caller's target already met:
    met = needs_less.local_bound_from(needs_less.trace(x0), 1e-3, target=2 * before.bound)  # no refining
    assert met.bound == before.bound and met.source == "joint"


@pytest.mark.skipif(not (REFERENCE / "mnist_avant.onnx").is_file(), reason="../shared/reference absent")
def test_mnist_reference_refined_within_five_percent(monkeypatch):
    """MNIST reference at ε = 1e-3 with the refinement (three rounds of cutting
    planes, about 12 s here): 43 of its 44 tied windows are proven exact ties,
    the bound is at most 1.05 ||J(x0)|| = 47.80 (47.41), above the best ratio
    found at a point of the ball (45.47, tools/ties.py)."""
    monkeypatch.setattr(joint, "ROUNDS_MAX", 3)
    engine = onnxlip.load(REFERENCE / "mnist_avant.onnx", seed=0, time_budget=600)
    x0 = np.load(REFERENCE / "mnist_avant_x0.npy")
    result = engine.local_bound(x0, 1e-3)
    assert result.source == "joint (refined)"
    assert 45.47 <= result.bound <= 1.05 * 45.52


def _plain_program(forms: _Forms) -> sdp.Program:
    """The plain S-lemma's program over made-up forms (no products of floors)."""
    o, m, q = forms.outputs, forms.units, forms.owner.size
    rows = np.concatenate([o + np.arange(m), o + m + np.arange(q)])
    return sdp.Program(forms.L.T, np.concatenate([np.arange(m), forms.owner]), rows, rows,
                       np.concatenate([np.ones(m), -np.ones(q)]), forms.L[:o].T @ forms.L[:o],
                       forms.R.shape[0])


def test_interior_point_reaches_the_s_lemma_optimum():
    """onnxlip.sdp on the plain S-lemma of made-up forms: its multipliers prove a
    t within its gap (1e-3) of L-BFGS's or below it, and the bound from them
    holds on admissible points as the module's proof says (_proven)."""
    for seed in range(4):
        rng = np.random.default_rng(50 + seed)
        forms, _ = _random_forms(rng, blocks=(2, 2), rows_per_unit=2)
        lam, value = _multipliers(forms)
        found = sdp.solve(_plain_program(forms), lam, math.inf)
        assert found is not None
        ipm = _value(forms, found.y)[0]
        assert ipm <= value * (1 + 1e-3)
        assert _proven(forms, found.y, ipm) >= ipm
        matrix = _proven(forms, found.y, ipm, np.diag(forms.weights(found.y)))
        assert matrix == pytest.approx(_proven(forms, found.y, ipm), rel=1e-9)


def test_interior_point_starts_no_iteration_that_would_overrun(monkeypatch):
    """solve's deadline: an iteration starts only where one as long as the last
    would end before the deadline. On a clock that advances 10 per reading (one
    reading per iteration), a deadline 25 after the first leaves one iteration
    (the second would end at 30), and the iterate it returns is still a point."""
    rng = np.random.default_rng(50)
    forms, _ = _random_forms(rng, blocks=(2, 2), rows_per_unit=2)
    lam, _ = _multipliers(forms)
    program = _plain_program(forms)
    readings = iter(range(0, 10_000, 10))
    monkeypatch.setattr(sdp.time, "perf_counter", lambda: float(next(readings)))
    found = sdp.solve(program, lam, deadline=25.0)
    assert found is not None and found.iterations == 2  # counted at the check that stopped it
    assert math.isfinite(found.t)
    monkeypatch.undo()
    assert sdp.solve(program, lam, math.inf).iterations > 2  # the test's premise: more were needed


def test_multipliers_decades_apart_are_floored_before_the_proof(tmp_path):
    """conv6 at ε = 0.03·||x0||: L-BFGS's multipliers span 1.6e-15 … 6e3, the
    proof's margin fails on the nearly singular radius blocks, and the joint
    bound (5.54) was lost to the paper's (41.2). Floored at 1e-8 of the largest
    they are proven; the bound stays above the float64 twin's sampled ratios."""
    net, engine, x0 = _chain("conv", 6, tmp_path)
    eps = 0.03 * float(np.linalg.norm(x0))
    result = engine.local_bound(x0, eps)
    paper = engine.local_bound(x0, eps, method="paper")
    assert result.source == "joint" and result.bound < 0.2 * paper.bound
    sampled = _sampled_ratio(net, engine, x0, eps, np.random.default_rng(6))
    assert sampled <= result.bound * SLACK


@pytest.mark.parametrize("handicap", ["size", "search"])
def test_budget_refines_where_the_plain_joint_bound_gives_up(tmp_path, monkeypatch, handicap):
    """With a time budget the interior-point method (one round, no products)
    starts from the search's multipliers even where the plain joint bound gives
    up: programs above FORMS_MAX (up to FORMS_MAX_REFINED), and multipliers that
    do not beat the paper's bound (here a search of one evaluation). conv6 at
    ε = 0.03·||x0|| (program side 170): the paper's composition (41.2) without the budget,
    the joint bound (~3.2-3.4) with it, above the float64 twin's sampled ratios."""
    if handicap == "size":
        monkeypatch.setattr(joint, "FORMS_MAX", 100)
    else:
        monkeypatch.setattr(joint, "EVALS_MIN", 1)
        monkeypatch.setattr(joint, "EVALS_MAX", 1)
    monkeypatch.setattr(joint, "ROUNDS_MAX", 1)
    # a tail's joint bound (7.5-11.3 here) would stand in for the whole one given up
    monkeypatch.setattr(tight, "_split_joint", lambda *args: (math.inf, 0, False))
    net, plain, x0 = _chain("conv", 6, tmp_path)
    _, budgeted, _ = _chain("conv", 6, tmp_path, time_budget=600)
    eps = 0.03 * float(np.linalg.norm(x0))
    without, refined = plain.local_bound(x0, eps), budgeted.local_bound(x0, eps)
    assert without.source != "joint"
    assert refined.source == "joint (refined)" and refined.bound < 0.2 * without.bound
    sampled = _sampled_ratio(net, plain, x0, eps, np.random.default_rng(6))
    lower = plain.lower_bounds(x0, [eps], samples=16, ascent_steps=10)[0].best
    assert max(sampled, lower) <= refined.bound * SLACK


def test_search_stops_at_its_deadline(monkeypatch):
    """The budget counts the multiplier search too: with its deadline passed, the
    search evaluates no L-BFGS point and returns its (feasible) start, which is
    no better than what it reaches without a deadline and still proves a bound."""
    forms, _ = _random_forms(np.random.default_rng(7), n=8, o=3, blocks=(2, 2))
    calls = []
    real = joint._value
    monkeypatch.setattr(joint, "_value", lambda f, lam, *a: calls.append(1) or real(f, lam, *a))
    lam_late, late = _multipliers(forms, math.inf, deadline=-math.inf)
    scan = len(calls)
    lam_free, free = _multipliers(forms)
    assert len(calls) - scan > scan  # without a deadline L-BFGS evaluates more points
    assert scan <= 16  # the start's scan alone: ratios, then scales
    assert math.isfinite(late) and free <= late
    assert late == pytest.approx(real(forms, lam_late)[0])
    assert _proven(forms, lam_late, late) is not None


@pytest.mark.parametrize("seed", range(3))
def test_chain_split_joint_bound_is_sound(tmp_path, monkeypatch, seed):
    """Where a chain's uncertain units are too many for one joint bound, the joint
    bound of a tail times the paper's bounds of the blocks before it: below the
    paper's bound, above every ratio sampled or found by ascent, and each factor
    holds on its own at sampled points (the tail's ||Δf|| / ||Δv_k|| and the
    head's ||Δv_k|| / ||Δx||)."""
    net, starts = netgen.wide_net(seed)
    engine = onnxlip.load(net.save(tmp_path / f"{net.name}.onnx"))
    x0 = np.random.default_rng(seed).standard_normal(net.input_shape)
    calls = []

    def spy(tail, limit, *args, **kwargs):
        result = joint_bound(tail, limit, *args, **kwargs)
        calls.append((len(tail.blocks), result[0]))
        return result

    joint_bound = tight.joint_bound
    monkeypatch.setattr(tight, "joint_bound", spy)
    rng = np.random.default_rng(seed)
    split = 0
    for level in (0.3, 1.0, 3.0):
        eps = level * float(np.linalg.norm(x0))
        calls.clear()
        auto = engine.local_bound(x0, eps)
        paper = engine.local_bound(x0, eps, method="paper")
        assert auto.bound <= paper.bound * (1 + 2e-3)
        points = netgen.ball_points(rng, x0, eps, 300, 300)
        assert netgen.max_ratio(net, x0, points) <= auto.bound * SLACK
        assert engine.lower_bounds(x0, [eps], samples=16, ascent_steps=5)[0].best <= auto.bound * SLACK
        notes = [n for n in auto.notes if "the joint bound of the blocks from" in n]
        if not notes:
            continue
        k = next(i for i, b in enumerate(engine.blocks) if f"from {b.name} on" in notes[0])
        split += 1
        tail_value = min(v for n, v in calls if n == len(engine.blocks) - k)
        head = math.prod(r.bound for r in auto.layers[:k])  # the paper's, with the analysed radii
        assert auto.bound == pytest.approx(head * tail_value, rel=1e-9)
        prefix = netgen.RefNet(net.input_shape, net.ops[:starts[k]])
        dv = np.linalg.norm(prefix(points) - prefix(x0), axis=1)
        df = np.linalg.norm(net(points) - net(x0), axis=1)
        dx = np.linalg.norm(points - x0.ravel(), axis=1)
        assert np.all(dv <= head * dx * SLACK)
        assert np.all(df <= tail_value * dv * SLACK + 1e-12)
    assert split >= 2  # the split bound is what these radii exercise


def test_budget_admits_larger_tails(tmp_path, monkeypatch):
    """A tail whose forms exceed FORMS_MAX is bounded jointly only under a time
    budget (up to FORMS_MAX_TAIL, searched and refined within the budget): then
    below the bound without it, and still above every ratio found."""
    monkeypatch.setattr(joint, "FORMS_MAX", 50)  # below the shortest tail's 78 forms
    monkeypatch.setattr(tight, "FORMS_MAX", 50)
    # the scaled product (onnxlip.scaling) beats both here (115.6 against 126.1): held apart
    monkeypatch.setattr(tight, "scaled_bound", lambda *a: (math.inf, []))
    net, _ = netgen.wide_net(0)
    path = net.save(tmp_path / f"{net.name}.onnx")
    plain, budgeted = onnxlip.load(path), onnxlip.load(path, time_budget=3)
    x0 = np.random.default_rng(0).standard_normal(net.input_shape)
    eps = 1.0 * float(np.linalg.norm(x0))
    without, within = plain.local_bound(x0, eps), budgeted.local_bound(x0, eps)
    assert not any("the joint bound of the blocks from" in n for n in without.notes)
    assert any("the joint bound of the blocks from" in n for n in within.notes)
    assert within.bound < 0.8 * without.bound
    points = netgen.ball_points(np.random.default_rng(1), x0, eps, 300, 300)
    assert netgen.max_ratio(net, x0, points) <= within.bound * SLACK
    assert plain.lower_bounds(x0, [eps], samples=16, ascent_steps=10)[0].best <= within.bound * SLACK


def test_budget_leaves_time_for_the_proof(monkeypatch):
    """Under a budget no proof try after the first starts past the deadline (each
    is an eigenvalue problem of the test matrix: seconds at 2,000 forms), and no
    refinement round starts, or solves into, the time one proof takes
    (_PROOF_RATE): a budget is overrun by one try at most."""
    forms, _ = _random_forms(np.random.default_rng(7), n=8, o=3, blocks=(2, 2))
    lam, value = _multipliers(forms)
    tries, eigen = [], joint.extreme_eigen
    monkeypatch.setattr(joint, "extreme_eigen", lambda *a, **k: tries.append(1) or eigen(*a, **k))
    assert _proven(forms, lam, 0.5 * value) is None and len(tries) == 12  # below the optimum: every try fails
    tries.clear()
    assert _proven(forms, lam, 0.5 * value, deadline=-math.inf) is None and len(tries) == 1
    assert _proven(forms, lam, 1.1 * value, deadline=-math.inf) is not None  # the first try is made
    solves, solve = [], joint.solve
    monkeypatch.setattr(joint, "solve", lambda *a: solves.append(a[-1]) or solve(*a))
    deadline = time.perf_counter() + 60
    monkeypatch.setattr(joint, "_PROOF_RATE", [1e9])  # a proof would take longer than the budget
    assert joint.refine(forms, lam, deadline) == math.inf and not solves
    monkeypatch.setattr(joint, "_PROOF_RATE", [1e-3])
    proof = forms.proof_seconds
    assert 0 < proof < 60 and math.isfinite(joint.refine(forms, lam, deadline))
    assert solves and all(d == pytest.approx(deadline - proof) for d in solves)
