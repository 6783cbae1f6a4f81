"""method='auto', the default: the tightest local bound the analysis proves.

1. The reach analysis (onnxlip.reach) bounds every pre-activation over the
   ball, exactly while the network is stable there. Its decisions use the
   trace's elementwise rounding-error bounds (rigorous, no solver involved).
2. Where every ReLU and max-pooling window provably keeps its state, f is
   affine on the ball and L(x0, ε) = ||J(x0)||: the analysis holds J(x0) as a
   dense matrix, whose norm LAPACK gives (deterministic, rounding covered).
   No eigensolver runs.
3. Otherwise the linearized network with the uncertain neurons bounded
   together with it (onnxlip.joint: an S-lemma over their centres and radii,
   where they are few) or apart (onnxlip.tight's telescoping: on chains and on
   graphs with residual, concat and fan-out), with the analysis' bounds
   wherever they are tighter than the paper's radii; never above the paper's
   own composition with those radii (the smallest is kept). Where nothing beats
   that composition, on a chain its factors of consecutive dense blocks are
   taken with diagonal scalings between them (onnxlip.scaling: the CIFAR-10
   reference's fc1 and fc2 at the larger radii, 1.13-1.15x lower).
4. Past the memory budget of the analysis (ImageNet-sized inputs), or at
   activations it does not follow, the blocks from there on keep the paper's
   radii, and a note says so; where nothing was analysed and the network has
   more than TIGHT_NEURONS_MAX neurons, the paper's bound itself.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace

from .blocks import Block, is_chain
from .bounds import BoundResult, LayerRecord, Trace, as_solver, block_record, local_bound
from .reach import Reach, analyse
from .spectral import Solver
from .tight import tight_local_bound

#: Without the reach analysis (past the memory budget from the first block),
#: the tight bound's products cost too much beyond this many neurons: the
#: paper's bound is kept (AlexNet, VGG16).
TIGHT_NEURONS_MAX = 500_000
#: Where more than this share of the analysed neurons and windows of a chain is
#: uncertain, the telescoping's correction terms exceed the paper's bound and
#: only cost time: the paper's composition is kept, or the joint bound where
#: the uncertain units are few enough for it (onnxlip.joint.FORMS_MAX). (CIFAR-10 reference, with
#: each carry capped by the paper's suffix products: the telescoping beats the
#: paper's composition up to ε = 0.01, 4.5% uncertain, 1117 against 1207, and
#: equals it at 0.0127, 6.2%.) Not on other graphs, where the paper pays 1 +
#: the branch's product of norms per residual unit: the DAG battery's nets
#: gained at up to 60-90% uncertain.
TIGHT_UNCERTAIN_MAX = 0.05


def auto_local_bound(blocks: list[Block], nominal: Trace, eps: float,
                     solver: Solver | float | None, budget: float,
                     target: float = math.inf, seconds: float = 0.0) -> BoundResult:
    """The 'auto' bound; `source` on the result says which step produced it
    (`target`, `seconds`: see tight_local_bound)."""
    start = time.perf_counter()
    solver = as_solver(solver)
    reach = analyse(blocks, nominal, eps, budget)
    if reach.exact:
        records = annotate([block_record(k, b, None) for k, b in enumerate(blocks)], reach)
        return BoundResult(reach.jacobian_norm_bound(), records, time.perf_counter() - start, eps,
                           seed=solver.seed, source="exact", notes=reach.notes,
                           estimate=reach.jacobian_norm_estimate())
    reached = [(c, b.out_size) for c, b in zip(reach.counts, blocks) if c is not None]
    if reach.counts[0] is None and sum(b.out_size for b in blocks) > TIGHT_NEURONS_MAX:
        result = local_bound(blocks, nominal, eps, solver)  # ImageNet-sized: the paper's bound
        notes = reach.notes + ["the network is too large for the tight bound without the reach "
                               "analysis: the paper's bound"]
    elif is_chain(blocks) and \
            sum(c[2] for c, _ in reached) > TIGHT_UNCERTAIN_MAX * sum(n for _, n in reached):
        result = tight_local_bound(blocks, nominal, eps, solver, reach=reach.changes, telescope=False,
                                   target=target, seconds=seconds)
        notes = reach.notes + result.notes
    else:
        result = tight_local_bound(blocks, nominal, eps, solver, reach=reach.changes, target=target,
                                   seconds=seconds)
        notes = reach.notes + result.notes
    return replace(result, layers=annotate(result.layers, reach), notes=notes,
                   seconds=time.perf_counter() - start)


def annotate(records: list[LayerRecord], reach: Reach) -> list[LayerRecord]:
    """The records with the analysis' counts where it reached a block: active,
    inactive and uncertain neurons (max-pooling: stable and unstable windows as
    active and uncertain), and in `test` how they were decided: 'exact reach'
    (no uncertain neuron before the block: its radii are exact), 'relaxed reach'
    (after one: a linear relaxation's) or 'paper radius'."""
    out, before = [], 0
    for record, count in zip(records, reach.counts):
        record = replace(record)
        if count is None:
            record.test = "paper radius"
        else:
            if record.kind != "affine":
                record.active, record.inactive, record.uncertain = count
            record.test = "exact reach" if before == 0 else "relaxed reach"
            before += count[2]
        out.append(record)
    return out
