"""The MNIST reference's tied max-pooling windows and what they do to the local constant.

    python tools/ties.py [--reference DIR] [--eps 1e-3] [--starts N] [--json out.json]

mnist_avant at its x0 has max-pooling windows whose winners are tied exactly, so
||J(x0)|| (onnxruntime's tie-break) is no lower bound of L(x0, eps). On a float64
twin of the net (built from the ONNX initializers, checked against onnxruntime):
the tied windows and the near-ties (members that can overtake within the ball);
a lower bound, the best ratio ||f(x)-f(x0)||/||x-x0|| found at a point of the ball
by DC ascent on the directional derivative, confirmed by the float64 forward and by
onnxruntime at that point; the largest ||J_sel|| found by coordinate ascent over
choices of the tied windows' winners (a search, not a proven maximum); and onnxlip's
own `auto` bound for comparison (the windows bounded jointly, onnxlip.joint: 50.22 on
2026-11-28, against ||J(x0)|| 45.52 and the ascent's lower bound 45.47).
The ascent's model assumes every ReLU, the near-ties and the second pooling layer keep
x0's state on the ball (only the first ReLU's margin is checked here, exactly); the
ratio it reports is re-evaluated at a point of the ball, so it is a lower bound either way.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import onnxlip  # noqa: E402
from onnxlip.report import table  # noqa: E402

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
WEIGHTS = ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "fc1.weight", "fc1.bias",
           "fc2.weight", "fc2.bias", "fc3.weight", "fc3.bias"]


def conv_matrix(w: np.ndarray, size: int) -> np.ndarray:
    """Dense matrix of a valid stride-1 convolution on a (cin, size, size) input, C order."""
    cout, cin, k, _ = w.shape
    out = size - k + 1
    m = np.zeros((cout, out, out, cin, size, size))
    for i in range(out):
        for j in range(out):
            m[:, i, j, :, i:i + k, j:j + k] = w
    return m.reshape(cout * out * out, cin * size * size)


def pool_windows(channels: int, size: int) -> np.ndarray:
    """Flat indices (windows x 4) of a 2x2 stride-2 max-pool, members in row-major order."""
    idx = np.arange(channels * size * size).reshape(channels, size, size)
    members = [idx[:, 0::2, 0::2], idx[:, 0::2, 1::2], idx[:, 1::2, 0::2], idx[:, 1::2, 1::2]]
    return np.stack(members, -1).reshape(-1, 4)


class Twin:
    """float64 mnist_avant: conv-ReLU-pool twice, then three dense layers."""

    def __init__(self, model: onnx.ModelProto, path: Path):
        w = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
        missing = [n for n in WEIGHTS if n not in w]
        if missing:
            raise SystemExit(f"ties: error: {path}: initializers {missing} missing (not mnist_avant)")
        self.c1, self.b1 = conv_matrix(w["conv1.weight"], 28), np.repeat(w["conv1.bias"], 24 * 24)
        self.c2, self.b2 = conv_matrix(w["conv2.weight"], 12), np.repeat(w["conv2.bias"], 8 * 8)
        self.dense = [(w[f"fc{i}.weight"], w[f"fc{i}.bias"]) for i in (1, 2, 3)]
        self.p1, self.p2 = pool_windows(6, 24), pool_windows(16, 8)

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Logits of x (..., 784) and the pre-activations z1, z2, h1, h2."""
        z1 = x @ self.c1.T + self.b1
        z2 = np.maximum(z1, 0)[..., self.p1].max(-1) @ self.c2.T + self.b2
        h = np.maximum(z2, 0)[..., self.p2].max(-1)
        pre = {"z1": z1, "z2": z2}
        for i, (wt, b) in enumerate(self.dense):
            h = h @ wt.T + b
            if i < 2:
                pre[f"h{i + 1}"] = h
                h = np.maximum(h, 0)
        return h, pre


def tied(a: np.ndarray, z: np.ndarray, windows: np.ndarray) -> dict[int, np.ndarray]:
    """Windows whose maximum is reached by two or more active (varying) members: window -> members."""
    v = a[windows]
    top = v.max(1, keepdims=True)
    close = (np.abs(v - top) <= 1e-12 * np.abs(top)) & (z[windows] > 0)
    return {int(w): np.flatnonzero(close[w]) for w in np.flatnonzero(close.sum(1) >= 2)}


class Local:
    """The twin's piecewise-linear increment around x0: the exactly tied pool1 windows take the max
    of their members; ReLUs, pool2 and the other pool1 windows (near-ties too) keep x0's state."""

    def __init__(self, twin: Twin, x0: np.ndarray, eps: float):
        self.out0, pre = twin.forward(x0)
        z1, z2 = pre["z1"], pre["z2"]
        a1, a2 = np.maximum(z1, 0), np.maximum(z2, 0)
        self.l1 = (z1 > 0)[:, None] * twin.c1
        (f1, _), (f2, _), (f3, _) = twin.dense
        fc = f3 @ ((pre["h2"] > 0)[:, None] * f2) @ ((pre["h1"] > 0)[:, None] * f1)
        arg1, arg2 = a1[twin.p1].argmax(1), a2[twin.p2].argmax(1)   # first maximum: ORT's tie-break
        self.win1 = twin.p1[np.arange(len(arg1)), arg1]
        self.k = fc @ ((z2 > 0)[:, None] * twin.c2)[twin.p2[np.arange(len(arg2)), arg2]]  # 10 x 864
        self.rows = self.l1[self.win1]
        self.jb = self.k @ self.rows
        self.ties1, self.ties2 = tied(a1, z1, twin.p1), tied(a2, z2, twin.p2)
        self.relu1_margin = float((np.abs(z1) / (eps * np.linalg.norm(twin.c1, axis=1))).min())
        self.choices = self.choice_sets(a1, z1, twin.p1, eps)
        self.near = {w: m for w, m in self.choices.items() if w not in self.ties1}
        self.tw = np.array(sorted(self.ties1))
        self.delta = [self.l1[twin.p1[w, self.ties1[w]]] - self.rows[w] for w in self.tw]
        self.p1, self.tidx = twin.p1, twin.p1[self.tw]
        self.tmask = np.zeros(self.tidx.shape, bool)
        for i, w in enumerate(self.tw):
            self.tmask[i, self.ties1[w]] = True

    def choice_sets(self, a1: np.ndarray, z1: np.ndarray, windows: np.ndarray,
                    eps: float) -> dict[int, np.ndarray]:
        """Windows where another active member can reach the winner's value within the ball."""
        out = {}
        for w, v in enumerate(a1[windows]):
            top = int(v.argmax())
            members = [top] + [k for k in range(4) if k != top and z1[windows[w, k]] > 0 and v[top] - v[k]
                               <= eps * np.linalg.norm(self.l1[windows[w, top]] - self.l1[windows[w, k]])]
            if len(members) >= 2:
                out[w] = np.array(sorted(members))
        return out

    def g(self, u: np.ndarray) -> np.ndarray:
        """Directional derivative of f at x0 along u (= the increment / s on the ball)."""
        d1 = self.l1 @ u
        q1 = d1[self.win1]
        q1[self.tw] = np.where(self.tmask, d1[self.tidx], -np.inf).max(1)
        return self.k @ q1

    def gnorm(self, u: np.ndarray) -> float:
        return float(np.linalg.norm(self.g(u)))

    def j_sel(self, picks: dict[int, int]) -> np.ndarray:
        """The Jacobian when window w's winner is member picks[w] (others: ORT's tie-break)."""
        j = self.jb.copy()
        for w, m in picks.items():
            j += np.outer(self.k[:, w], self.l1[self.p1[w, m]] - self.rows[w])
        return j


def simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection of v onto the probability simplex."""
    mu = np.sort(v)[::-1]
    cs = np.cumsum(mu) - 1
    rho = np.flatnonzero(mu - cs / np.arange(1, v.size + 1) > 0)[-1]
    return np.maximum(v - cs[rho] / (rho + 1), 0)


def min_norm(a: np.ndarray, blocks: list[np.ndarray], iters: int = 400) -> np.ndarray:
    """a - B^T lam with lam on a product of simplices (one per block) minimizing the norm (FISTA)."""
    if not blocks:
        return a
    b = np.vstack(blocks)
    cuts = np.cumsum([len(x) for x in blocks])[:-1]
    lam = np.concatenate([np.full(len(x), 1.0 / len(x)) for x in blocks])
    step = 1.0 / (np.linalg.norm(b, 2) ** 2 + 1e-12)
    z, t = lam.copy(), 1.0
    for _ in range(iters):
        new = np.concatenate([simplex(p) for p in np.split(z + step * (b @ (a - b.T @ z)), cuts)])
        t_new = (1 + np.sqrt(1 + 4 * t * t)) / 2
        z, lam, t = new + (t - 1) / t_new * (new - lam), new, t_new
    return a - b.T @ lam


def dc_ascent(loc: Local, u: np.ndarray, iters: int = 60) -> tuple[float, np.ndarray]:
    """Monotone ascent of ||g(u)|| on the unit sphere: with y = g(u)/||g(u)||, y.g is convex in
    the windows with y.K[:, w] >= 0 (linearized at u) and concave in the others (kept exact),
    so each step maximizes a minorant; it stops when the value stops rising."""
    u = u / np.linalg.norm(u)
    best, best_u = loc.gnorm(u), u
    for _ in range(iters):
        y = loc.g(u) / best
        c = loc.k[:, loc.tw].T @ y
        a = loc.jb.T @ y
        hurt = []
        for cw, dw in zip(c, loc.delta):
            if cw >= 0:
                a = a + cw * dw[np.argmax(dw @ u)]
            else:
                hurt.append(-cw * dw)
        r = min_norm(a, hurt)
        u = r / np.linalg.norm(r)
        value = loc.gnorm(u)
        if value <= best + 1e-10:
            break
        best, best_u = value, u
    return best, best_u


def power(loc: Local, u: np.ndarray, iters: int = 100) -> tuple[float, np.ndarray]:
    """Power iterations on the Jacobian of the selection u realizes; the best ||g|| seen."""
    u = u / np.linalg.norm(u)
    best, best_u = loc.gnorm(u), u
    for _ in range(iters):
        j = loc.jb + loc.k[:, loc.tw] @ np.array([dw[np.argmax(dw @ u)] for dw in loc.delta])
        u = j.T @ (j @ u)
        u /= np.linalg.norm(u)
        value = loc.gnorm(u)
        if value > best:
            best, best_u = value, u
    return best, best_u


def top_vector(j: np.ndarray) -> np.ndarray:
    return np.linalg.svd(j)[2][0]


def ascent(loc: Local, picks: list[dict[int, int]], starts: int,
           rng: np.random.Generator) -> tuple[float, np.ndarray, list[float]]:
    """DC ascent (alone and after power iterations) from the top singular vectors (both signs) of
    ORT's Jacobian and of the given selections', then of random selections', and Gaussian directions."""
    dirs = []
    for j in [loc.jb] + [loc.j_sel(p) for p in picks]:
        v = top_vector(j)
        dirs += [v, -v]
    while len(dirs) < starts:
        if len(dirs) % 3:
            pick = {w: int(rng.choice(m)) for w, m in loc.ties1.items()}
            dirs.append(rng.choice([-1, 1]) * top_vector(loc.j_sel(pick)))
        else:
            dirs.append(rng.standard_normal(loc.jb.shape[1]))
    found = []
    for u in dirs[:starts]:
        first = dc_ascent(loc, u)
        second = dc_ascent(loc, power(loc, u)[1])
        found.append(max(first, second, key=lambda r: r[0]))
    best = max(found, key=lambda r: r[0])
    return best[0], best[1], [r[0] for r in found]


def spectral(j: np.ndarray) -> float:
    return float(np.sqrt(np.linalg.eigvalsh(j @ j.T)[-1]))


def coordinate_ascent(loc: Local, options: dict[int, np.ndarray], picks: dict[int, int],
                      rng: np.random.Generator) -> tuple[float, dict[int, int]]:
    """Change one window's winner at a time while ||J_sel|| grows."""
    j = loc.j_sel(picks)
    best, improved = spectral(j), True
    while improved:
        improved = False
        for w in rng.permutation(list(options)):
            for m in options[w]:
                if m == picks[w]:
                    continue
                trial = j + np.outer(loc.k[:, w], loc.l1[loc.p1[w, m]] - loc.l1[loc.p1[w, picks[w]]])
                value = spectral(trial)
                if value > best + 1e-12:
                    best, j, picks[w], improved = value, trial, int(m), True
    return best, picks


def selections(loc: Local, options: dict[int, np.ndarray], starts: int,
               rng: np.random.Generator) -> tuple[float, dict[int, int], list[float]]:
    """Best ||J_sel|| from ORT's tie-break, from every window's last member and from random picks."""
    first = {w: int(loc.p1[w].tolist().index(loc.win1[w])) for w in options}
    inits = [first, {w: int(m[-1]) for w, m in options.items()}]
    inits += [{w: int(rng.choice(m)) for w, m in options.items()} for _ in range(starts - 2)]
    found = [coordinate_ascent(loc, options, dict(p), rng) for p in inits[:starts]]
    best = max(found, key=lambda r: r[0])
    return best[0], best[1], [r[0] for r in found]


def ort_ratio(session: ort.InferenceSession, x0: np.ndarray, u: np.ndarray,
              eps: float) -> tuple[float, float]:
    """onnxruntime's ratio between float32 x0 and float32(x0 + s u), s shrunk until ||dx|| <= eps."""
    name = session.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return session.run(None, {name: x.reshape(1, 1, 28, 28)})[0].astype(np.float64).ravel()

    x0f = x0.astype(np.float32)
    s = eps
    for _ in range(20):
        xp = (x0f + s * u).astype(np.float32)
        dist = float(np.linalg.norm(xp.astype(np.float64) - x0f))
        if dist <= eps:
            break
        s *= eps / dist * (1 - 1e-7)
    return float(np.linalg.norm(run(xp) - run(x0f)) / dist), dist


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, default=REFERENCE)
    parser.add_argument("--eps", type=float, default=1e-3)
    parser.add_argument("--starts", type=int, default=24,
                        help="starts of the ascent (>= 4); the selection search uses 10x")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args()
    path, xpath = args.reference / "mnist_avant.onnx", args.reference / "mnist_avant_x0.npy"
    if not (path.is_file() and xpath.is_file()):
        print(f"ties: no mnist_avant.onnx / mnist_avant_x0.npy under {args.reference}, skipped")
        return 0
    start, rng = time.perf_counter(), np.random.default_rng(args.seed)
    starts = max(args.starts, 4)
    twin = Twin(onnx.load(path), path)
    x0 = np.load(xpath).astype(np.float64).ravel()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    loc = Local(twin, x0, args.eps)
    y0 = session.run(None, {session.get_inputs()[0].name: x0.astype(np.float32).reshape(1, 1, 28, 28)})[0]
    rel = float(np.abs(y0.ravel() - loc.out0).max() / np.abs(loc.out0).max())
    if rel > 1e-4:
        raise SystemExit(f"ties: error: {path}: the float64 twin differs from onnxruntime at x0 "
                         f"by {rel:.2e} relative")
    report: dict = {"eps": args.eps, "starts": starts, "twin_vs_ort_rel": rel,
                    "relu1_margin": loc.relu1_margin,
                    "tied": {"pool1": len(loc.ties1), "pool2": len(loc.ties2),
                             "pool1_members": np.bincount([len(m) for m in loc.ties1.values()]).tolist()},
                    "near_ties": {str(w): m.tolist() for w, m in loc.near.items()}}
    print(f"float64 twin vs onnxruntime at x0: max relative difference {rel:.2e}")
    print(f"tied windows at x0: pool1 {len(loc.ties1)}, pool2 {len(loc.ties2)}; members per pool1 window: "
          + ", ".join(f"{n} x{k}" for k, n in enumerate(report["tied"]["pool1_members"]) if n))
    chan = sorted({w // 144 for w in loc.ties1})
    print(f"  pool1 tied windows' channels: {chan}; first ReLU's smallest margin |z|/(eps||row||): "
          f"{loc.relu1_margin:.3f}")
    print(f"near-ties within eps={args.eps:g} (window: members that can win): "
          + (", ".join(f"{w} (ch {w // 144}, {w % 144 // 12},{w % 12}): {m.tolist()}"
                       for w, m in loc.near.items()) or "none"))
    if loc.ties2:
        print("  note: the ascent keeps pool2's winners fixed; its ties are not modelled")

    t = time.perf_counter()
    ort_tiebreak = spectral(loc.jb)
    exact, exact_picks, exact_all = selections(loc, loc.ties1, 10 * starts, rng)
    both, both_picks, both_all = selections(loc, loc.choices, 10 * starts, rng)
    report["selections"] = {"ort_tiebreak": ort_tiebreak, "ties": exact, "ties_and_near": both,
                            "ties_found": exact_all, "ties_and_near_found": both_all,
                            "seconds": time.perf_counter() - t}

    t = time.perf_counter()
    best, u, found = ascent(loc, [exact_picks, both_picks], starts, rng)
    f64 = float(np.linalg.norm(twin.forward(x0 + args.eps * u)[0] - loc.out0) / args.eps)
    ort_value, dist = ort_ratio(session, x0, u, args.eps)
    report["ascent"] = {"best_derivative": best, "ratio_float64": f64, "ratio_ort": ort_value,
                        "ort_distance": dist, "found": found, "seconds": time.perf_counter() - t}
    t = time.perf_counter()
    auto = onnxlip.load(path, seed=args.seed).local_bound(x0.reshape(1, 1, 28, 28), args.eps)
    report["auto"] = {"bound": auto.bound, "source": auto.source, "seconds": time.perf_counter() - t}
    report["seconds"] = time.perf_counter() - start

    rows = [["||J(x0)||, onnxruntime's tie-break (first maximum)", ort_tiebreak, "-"],
            [f"best ratio found, DC ascent on the directional derivative ({starts} starts)", best, "lower"],
            [f"  the float64 twin at x0 + eps*u (||dx|| = {args.eps:g})", f64, "lower"],
            [f"  onnxruntime float32 at that point (||dx|| = {dist:.6g})", ort_value, "lower"],
            [f"max ||J_sel|| found, {len(loc.ties1)} tied windows ({10 * starts} starts)", exact, "search"],
            [f"max ||J_sel|| found, ties and near-ties ({len(loc.choices)} windows)", both, "search"],
            [f"onnxlip auto ({auto.source}: proven, rounding covered)", auto.bound, "upper"]]
    print("\n" + table(["quantity", "value", "kind"], rows))
    print(f"\nDC ascent: median over starts {np.median(found):.4f}, "
          f"{sum(v > best - 1e-4 for v in found)}/{len(found)} starts within 1e-4 of the best "
          f"({report['ascent']['seconds']:.1f} s); selection search {report['selections']['seconds']:.1f} s; "
          f"total {report['seconds']:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
