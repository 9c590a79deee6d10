"""Discrete decisions of a run, recorded on the reference and replayed on the others.

A run makes three kinds of decision that are not continuous in its inputs, and two
honest devices can make them differently:

- *indices*: sort, top-k, max/argmax, max-pool (SSD's hard negative mining sorts nearly
  equal anchor losses; a max-pool window can hold a tie), and the boxes torchvision's NMS
  and mmcv's keep (a detector in eval mode: overlaps near the threshold, tied scores;
  mmcv's, outside the dispatcher, through align.numerics.outside). Measured on
  ssd512: the emulated npu-fp32 target picked other negatives, and the classification
  head's bias gradient was 18,000x the reference's error.
- *branches* of piecewise functions (their table: align.numerics.pieces): ReLU and its
  backward mask, threshold, hardtanh / ReLU6 / clamp, leaky ReLU, ELU / SELU / CELU (their
  slopes jump at 0), hard and soft shrink, hardswish / hardsigmoid, maximum / minimum,
  PReLU, sign, round / floor / ceil / trunc, floor and trunc division, remainder and fmod,
  a float cast to an integer dtype, bucketize / searchsorted, the cell bilinear grid
  sampling finds each point in (its gradient by the grid jumps at a cell's edge), and the
  comparisons that feed `where`, including the equalities by which the backward of a max
  or amax over a dim finds the element that was largest. An input that rounding puts on
  the other side of a breakpoint passes a gradient the reference blocked (timm's
  resnet26d in train mode: one flipped ReLU made `layer4.0.act3`'s input gradient fail
  by 10,000x).
- *random draws* from the default generator: dropout, drop-path, bernoulli, rand, randn,
  randint, randperm, normal_, uniform_..., and the slopes RReLU draws inside its kernel in
  training. Another device's generator draws other masks. A dropout mask is one record
  whether the CPU drew it (`bernoulli_`) or a CUDA / NPU build's fused `native_dropout`
  did, so a CPU reference and an NPU target replay each other's masks. Attention with
  dropout (`F.scaled_dot_product_attention`, `nn.MultiheadAttention` in training) runs
  PyTorch's math backend in every run (align.numerics.attention): a fused attention
  kernel draws its mask inside, where no dispatched op sees it; the math backend draws it
  with a dropout op, recorded like the others.

The reference records every decision; the target, the golden and the honest draws take
the reference's. Indices: their values are gathered from their own inputs at the
reference's positions. Branches: the run computes the op with its own kernel, and only
the elements whose branch, by the op's formula on the run's own inputs, differs from the
reference's (the flips) are recomputed on the reference's branch; a wrong kernel (a
leaky slope, a breakpoint moved inside the kernel) keeps its own wrong values everywhere
else and still fails. Scalar arguments (a threshold, a slope, a clamp bound, p, a pool's
padding) are part of a record's identity, so an op called with another breakpoint is not
matched and keeps its own branches; so is the shape of the input an index op indexes
(a pool on an input padded beforehand indexes another plane). Random draws: the
reference's values replace the run's own; a fused dropout kernel is first checked
against its own mask (output = input * mask / (1 - p)), so a kernel with another
scale, or one that drops other elements than the mask it returns, fails and is named
(`Decisions.faults`, kept in the run's trace and its dumps).

How many decisions a run would have made otherwise, and how far the flipped elements
were from the choice (two indices' values apart, a branch's input from its breakpoint;
relative to the input's largest magnitude: an honest flip sits within the rounding of
its input), is reported, not hidden. Draws from an explicit `torch.Generator` (a seeded
loss, align's own jitter) are reproducible by their seed and are not recorded.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch.utils._python_dispatch import (
    TorchDispatchMode,
    _get_current_dispatch_mode,
    _pop_mode_temporarily,
)
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

from align.numerics import outside
from align.numerics.attention import math_when_dropping
from align.numerics.pieces import OUTPUT_IS_BRANCH, PIECES
from align.numerics.verdict import Row
from align.numerics.versions import WRITES_LISTS, bump_written_lists

aten = torch.ops.aten

# -- indices ---------------------------------------------------------------------------------

# ops returning (values, indices) with values == input.gather(dim, indices)
_ALONG_DIM = {
    aten.sort.default,
    aten.sort.stable,
    aten.topk.default,
    aten.max.dim,
    aten.min.dim,
    aten.kthvalue.default,
    aten.median.dim,
    aten.nanmedian.dim,
    aten.mode.default,
    aten.cummax.default,
    aten.cummin.default,
}
# ops returning indices only
_INDICES_ONLY = {aten.argmax.default, aten.argmin.default}
# max-pool: (values, indices), indices flat within each plane of the last `n` dims
_POOLS = {
    aten.max_pool2d_with_indices.default: 2,
    aten.adaptive_max_pool2d.default: 2,
    aten.max_pool3d_with_indices.default: 3,
    aten.adaptive_max_pool3d.default: 3,
    aten.fractional_max_pool2d.default: 2,  # its windows: a torch.rand draw, replayed as such
    aten.fractional_max_pool3d.default: 3,
}
INDEXING = _ALONG_DIM | _INDICES_ONLY | set(_POOLS)
# ops returning the indices of the elements they keep, a count of their own: non-maximum
# suppression keeps a box that no higher-scoring box overlaps by more than a threshold, and
# honest scores and overlaps near a tie or the threshold keep others (measured: torchvision's
# ssdlite320 in eval mode at 320 px, random weights: 272 boxes kept by the reference, 295 by
# the golden, and the check stopped on a shape mismatch). Known by name: torchvision's ops
# exist once it is imported.
KEEPING = {"torchvision.nms.default"}


# -- random draws ------------------------------------------------------------------------------

_RANDOM_PACKETS = {
    aten.bernoulli,
    aten.bernoulli_,
    aten.rand,
    aten.rand_like,
    aten.randn,
    aten.randn_like,
    aten.randint,
    aten.randint_like,
    aten.randperm,
    aten.normal,
    aten.normal_,
    aten.uniform_,
    aten.exponential_,
    aten.geometric_,
    aten.cauchy_,
    aten.log_normal_,
    aten.multinomial,
    aten.random_,
    aten.poisson,
    aten.native_dropout,
}
RANDOM_OPS = {f"aten.{p.__name__}" for p in _RANDOM_PACKETS}
# RReLU in training draws its slopes inside its kernel (Decisions._slopes)
_RRELU_FORWARD = {aten.rrelu_with_noise.default, aten.rrelu_with_noise_.default}
_RRELU = _RRELU_FORWARD | {aten.rrelu_with_noise_backward.default}
_SLOPES = "aten.rrelu_with_noise.slopes"  # the record key of RReLU's drawn slopes
# Bilinear grid sampling finds each sampling point's cell by flooring its coordinates
# inside the kernel: its values are continuous across a cell's edge, the gradient by the
# grid is not (the slope of the next cell). The backward replays the reference's cells
# (measured: the spatial transformer in align.testing.models, fp32, training: the
# golden's gradient norm 2.3% from the reference's at step 2, 0.05% with its cells).
_GRID_BACKWARD = {aten.grid_sampler_2d_backward.default, aten.grid_sampler_3d_backward.default}
# how far inside the reference's cell a flipped point is moved: this many ulps of its
# coordinate in the grid's dtype, beyond what normalizing it back can round away
_INSIDE_ULPS = 8

# An honest run's choices differ from the reference's in a few elements near a breakpoint
# or a tie; a record differing from the run's own in more than this share of its elements
# is another call's (measured: ghostnet_050 at 16 px with one ReLU computed as a shifted
# threshold, every later ReLU of its shape took the record before its own, 3,503 of 19,368
# branches flipped, and the whole network failed with no module wrong alone)
LOOK_PAST = 0.1
LOOKAHEAD = 8  # records of one key and shape looked through for a closer one

Choices = list[tuple[str, torch.Tensor]]  # (record key, tensor) in call order
_ACTIVE: list[Decisions] = []  # the runs recording or replaying now, innermost last
_UNWRAP: list[Callable[[], None]] = []  # puts back what align.numerics.outside wrapped
Where = Callable[[], "tuple[str, int, int] | None"]  # (module, call index, call position)


# How far from a tie a run's own index choices (sort, top-k, max, a max-pool, NMS) may sit
# where they differ from the replayed ones, relative to the values' scale (`Differed.gap`):
# an honest kernel's flips sit within its rounding of a tie, a wrong one's anywhere. The
# limit: FAR_CHOICE times the farthest of runs standing for the reference (honest draws,
# the golden), at least CHOICE_FLOOR unit roundoffs of the run's precision.
FAR_CHOICE = 4.0
CHOICE_FLOOR = 16
# In a whole run the inputs to a choice carry the error of everything upstream, and the
# farthest flip of two or three honest runs is a noisy figure where they flip a few
# elements: there the floor is higher (fp32: 1.5e-5 of the values' scale; bf16: 1.0)
WHOLE_RUN_CHOICE_FLOOR = 256


@dataclass
class Differed:
    """How one run's own decisions compared with the replayed ones, per op."""

    calls: int = 0
    choices: int = 0  # index or branch elements, or drawn elements
    differed: int = 0  # of which the run would have decided otherwise
    gap: float = 0.0  # largest distance of a differing choice, relative to the values' scale
    measured: bool = True  # False for a user's choice (align.decision): no gap to measure
    module: str = ""  # the module call that made the farthest differing choice
    call: int = 0

    def farther(self, gap: float, where: tuple[str, int, int] | None) -> None:
        """Take `gap` if it is the farthest yet, made in the module call `where`."""
        if gap > self.gap:
            self.gap = gap
            self.module, self.call = (where[0], where[1]) if where else ("", 0)

    def describe(self) -> str:
        """'3 of 128 (values 1e-07 apart)': how many choices differed, and how far."""
        details = [f"values {self.gap:.2g} apart"] if self.measured else []
        said = f" ({'; '.join(details)})" if details else ""
        return f"{self.differed} of {self.choices}{said}"


@dataclass(frozen=True)
class Fault:
    """A kernel that contradicts its own decision (a dropout whose output is not its
    input times the mask it returns, scaled by 1 / (1 - p)), where it ran."""

    module: str
    call: int
    op: str
    message: str

    def row(self, isolated: bool) -> Row:
        """The failing row this fault puts in a report."""
        row = Row(self.module, self.call, "forward", self.op, "", [], isolated=isolated)
        row.failed.append("kernel")
        row.metrics["kernel"], row.limits["kernel"] = 1.0, 0.0
        row.message = self.message
        return row


def far_choice_row(
    where: tuple[str, int],
    op: str,
    s: dict[str, Any],
    reach: float,
    floor: float,
    whose: str,
    isolated: bool,
) -> Row | None:
    """A failing row where op's choices (`s`: differed, choices, gap, as
    `choice_gaps_record` holds them) sat beyond FAR_CHOICE times `reach` (the farthest
    of the runs standing for the reference: `whose`) and `floor`; None within."""
    limit = max(floor, FAR_CHOICE * reach)
    if s["gap"] <= limit:
        return None
    row = Row(where[0], where[1], "forward", f"{op} choices", "", [], isolated=isolated)
    row.failed.append("choice_gap")
    row.metrics["choice_gap"], row.limits["choice_gap"] = float(s["gap"]), limit
    row.reference["choice_gap"] = reach
    row.message = (
        f"{op}: {s['differed']} of {s['choices']} of the target's own choices were not the "
        f"reference's, the farthest {s['gap']:.2g} from a tie (relative to the values' "
        f"scale; {whose} farthest {reach:.2g}): a kernel that chooses otherwise, hidden by "
        "the replayed choices"
    )
    return row


def choice_gaps_record(decisions: Decisions) -> dict[str, dict[str, Any]]:
    """`decisions.choice_gaps()` as a dump's step meta holds it (measured ones only)."""
    return {
        op: {
            "differed": s.differed,
            "choices": s.choices,
            "gap": s.gap,
            "module": s.module,
            "call": s.call,
        }
        for op, s in decisions.choice_gaps().items()
        if s.measured
    }


def is_random(key: str) -> bool:
    """True for the record of a random draw (as opposed to an index or a branch)."""
    op = key.split("(", 1)[0]
    return op == _SLOPES or op.rsplit(".", 1)[0] in RANDOM_OPS


class Decisions(TorchDispatchMode):
    """Records the run's decisions, or replays `replay`'s (a recording's `log`).

    One instance per run; enter it around the run's forward and backward. `where` tells
    which module call is running (the capture's hooks), to name faults and to give each
    record its owner (isolation replays a call's own random draws).
    """

    def __init__(self, replay: Choices | None = None, where: Where | None = None) -> None:
        super().__init__()
        self.replay = replay
        self.where = where
        self.log: Choices = []  # what this run went by: its own decisions or the replayed
        self.owners: list[int | None] = []  # the call position that made each record
        self.stats: dict[str, Differed] = {}
        self.faults: list[Fault] = []
        self.unmatched = 0  # calls that matched no record (other op or shape): own kept
        self._chosen: set[str] = set()  # the ops of `stats` that choose indices or boxes
        self.ran: set[str] = set()  # every op the run dispatched (its kernels' kinds)
        self._queues: dict[str, deque[torch.Tensor]] = {}
        for key, t in replay or ():
            self._queues.setdefault(key, deque()).append(t)

    @property
    def choices(self) -> Choices:
        """The decisions this run went by, in call order (what another run replays)."""
        return self.log

    def __enter__(self) -> Decisions:
        self._attention = math_when_dropping()  # a fused kernel's mask is out of sight
        self._attention.__enter__()
        try:
            entered = super().__enter__()
        except BaseException:
            self._attention.__exit__(None, None, None)
            raise
        if not _ACTIVE:  # decisions outside the dispatcher go to the innermost run
            _UNWRAP.append(outside.wrap(lambda *call: _ACTIVE[-1]._outside(*call)))
        _ACTIVE.append(self)
        return entered

    def __exit__(self, *exc: object) -> None:
        _ACTIVE.remove(self)
        if not _ACTIVE:
            _UNWRAP.pop()()
        try:
            super().__exit__(*exc)
        finally:
            self._attention.__exit__(*exc)

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """The mode off inside, where it is the innermost mode (else it stays on)."""
        if _get_current_dispatch_mode() is not self:
            yield
            return
        with _pop_mode_temporarily():
            yield

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ran.add(func.overloadpacket.__name__)
        if func in INDEXING:
            return self._indices(func, args, kwargs)
        if func.namespace != "aten" and str(func) in KEEPING:
            return self._kept(func, args, kwargs)
        if func in _GRID_BACKWARD:
            return self._cells(func, args, kwargs)
        if func in _RRELU and _argument(func, args, kwargs, "training"):
            if func in _RRELU_FORWARD:
                return self._slopes(func, args, kwargs)
            return func(*args, **kwargs)  # the slopes it multiplies by were replayed forward
        if func in PIECES and _floating(args[0]) and _applies(PIECES[func], args, kwargs):
            return self._branches(func, args, kwargs)
        if func.overloadpacket in _RANDOM_PACKETS and not _seeded(func, args, kwargs):
            return self._draw(func, args, kwargs)
        out = func(*args, **kwargs)
        if WRITES_LISTS[func]:  # foreach ops in place (align.numerics.versions)
            bump_written_lists(func, args)
        return out

    # -- the three kinds ------------------------------------------------------------------

    def _indices(self, func, args, kwargs):
        out = func(*args, **kwargs)
        own = out if func in _INDICES_ONLY else out[1]
        key = _index_key(func, args)
        recorded = self._take(key, own.shape, own)
        if recorded is None:
            self._unmatched()
            self._log(key, own.detach().clone())
            return out
        indices = recorded.to(own.device, copy=True)  # the caller may write into it in place
        self._log(key, recorded)
        if func in _INDICES_ONLY:
            at = partial(_arg_values, func, args, kwargs)
            self._count(func, own, indices, (at(own), at(indices)))
            return indices
        values = _gather(func, args, kwargs, indices)
        self._count(func, own, indices, (out[0], values))
        return (values, indices)

    def _kept(self, func, args, kwargs):
        """torchvision's NMS: the reference's kept boxes, by index into the run's own."""
        out = func(*args, **kwargs)
        threshold = _argument(func, args, kwargs, "iou_threshold")
        return self._keep(func.overloadpacket.__name__, func, out, args[0], args[1], threshold)

    def _outside(self, name: str, function, args: tuple, kwargs: dict, kind: str):
        """A decision outside the dispatcher (align.numerics.outside): an NMS called
        (boxes, scores, iou_threshold, ...), recorded and replayed as torchvision's, or a
        function marked `align.decision`, whose integer and bool tensors are replayed."""
        out = function(*args, **kwargs)
        if kind == "nms":
            threshold = kwargs["iou_threshold"] if "iou_threshold" in kwargs else args[2]
            offset = kwargs.get("offset", args[3] if len(args) > 3 else 0)
            named = f"{name}(offset={offset!r})"  # mmcv's +1 box convention is another NMS
            return self._keep(name, named, out, args[0], args[1], float(threshold))
        shapes = [tuple(a.shape) for a in tree_leaves((args, kwargs)) if torch.is_tensor(a)]
        key = f"{name}{shapes}"  # its inputs' shapes: another call is another choice
        leaves, spec = tree_flatten(out)
        self._stat(name).measured = False  # a user's choice: no gap to measure
        for i, own in enumerate(leaves):
            if not torch.is_tensor(own) or own.is_floating_point() or own.is_complex():
                continue  # continuous values are the run's own
            recorded = self._take(key, None)
            if recorded is None:
                self._unmatched()
                self._log(key, own.detach().clone())
                continue
            self._log(key, recorded)
            leaves[i] = recorded.to(device=own.device, dtype=own.dtype, copy=True)
            same = own.shape == recorded.shape
            differed = int((own != leaves[i]).sum()) if same else max(own.numel(), 1)
            self._tally(name, max(own.numel(), recorded.numel()), differed)
        return tree_unflatten(leaves, spec)

    def _keep(self, name: str, op, out, boxes, scores, threshold: float):
        """The reference's kept boxes in place of the run's `out`, by index into its own
        `boxes` (of the same count, at the same IoU threshold), and how they differed."""
        key = _key(op, ((boxes.shape[0],), threshold))
        recorded = self._take(key, None)
        if recorded is None:
            self._unmatched()
            self._log(key, out.detach().clone())
            return out
        self._log(key, recorded)
        kept = recorded.to(device=out.device, dtype=out.dtype, copy=True)
        differ = set(out.tolist()) ^ set(kept.tolist())
        self._tally(name, len(differ | set(kept.tolist())), len(differ))
        self._chosen.add(name)
        if differ:
            s = self._stat(name)
            s.farther(_overlap_gap(boxes, scores, kept, out, threshold), self._here())
        return kept

    def _branches(self, func, args, kwargs):
        piece = PIECES[func]
        key = _key(func, args, {k: kwargs[k] for k in piece.keyed if k in kwargs})
        inplace = _writes_first(func)
        own_branch = None if func in OUTPUT_IS_BRANCH else piece.branch(*args, **kwargs)
        shape = args[0].shape if inplace else None if own_branch is None else own_branch.shape
        recorded = None if shape is None else self._take(key, shape, own_branch)
        original = args[0].clone() if inplace and recorded is not None else None
        out = func(*args, **kwargs)
        if own_branch is None:
            own_branch = out
            if shape is None:
                recorded = self._take(key, out.shape, out)
        if recorded is not None:
            recorded = recorded.to(own_branch.device)
        if recorded is None or recorded.shape != own_branch.shape:
            self._unmatched()
            # a branch computed here is ours; an op's own output goes to the caller too
            own = own_branch.detach()
            self._log(key, own.clone() if own_branch is out else own)
            return out
        self._log(key, recorded)
        flips = own_branch != recorded
        if own_branch.is_floating_point():
            flips &= ~(own_branch.isnan() & recorded.isnan())  # a quotient by 0 on both
        n = int(flips.sum())
        self._tally(func, own_branch.numel(), n)
        if not n:
            return out
        source = (original, *args[1:]) if inplace else args
        self._gap(func, piece.gap(*source, **kwargs), flips, source[piece.decided])
        fixed = piece.value(recorded, *source, **kwargs)
        if func in OUTPUT_IS_BRANCH:
            fixed = fixed.to(out.dtype)
        replayed = torch.where(flips, fixed, out)
        if inplace:
            return out.copy_(replayed)
        return replayed

    def _cells(self, func, args, kwargs):
        """Bilinear grid sampling's backward: the gradient by the grid of each point whose
        cell (the floor of its coordinates) is another than the reference's is that of
        the reference's cell, computed by the run's own kernel on the point moved just
        inside it; every other gradient is the run's own."""
        out = func(*args, **kwargs)
        grad_output, x, grid, mode, padding, corners, wanted = (
            _argument(func, args, kwargs, n)
            for n in ("grad_output", "input", "grid", "interpolation_mode", "padding_mode")
            + ("align_corners", "output_mask")
        )
        sizes = tuple(reversed(x.shape[2:]))  # the grid's x, y (, z)
        if mode != 0 or padding == 2 or not wanted[1] or (corners and 1 in sizes):
            return out  # bilinear, zeros or border padding; a 1-pixel side has no cells
        at = _unnormalized(grid.detach(), sizes, corners, padding == 1)
        # cells beyond the image's first outside one sample zeros alike: int32 floors
        limit = torch.tensor(sizes, dtype=at.dtype, device=at.device)
        own = at.nan_to_num(-2.0).clamp(min=-2.0).minimum(limit + 1).floor().to(torch.int32)
        key = _key(func, (tuple(x.shape), mode, padding, corners))
        recorded = self._take(key, own.shape, own)
        if recorded is None:
            self._unmatched()
            self._log(key, own)
            return out
        self._log(key, recorded)
        recorded = recorded.to(own.device)
        flipped = own != recorded
        points = flipped.any(-1)
        self._tally(func, points.numel(), int(points.sum()))
        if not points.any():
            return out
        self._gap(func, (at - at.round()).abs(), flipped, at)
        margin = _INSIDE_ULPS * torch.finfo(grid.dtype).eps * at.abs().clamp(min=1.0)
        margin = margin.clamp(max=0.25)  # bf16's 8 ulps can be more than half a cell
        cell = recorded.to(at.dtype)
        inside = at.maximum(cell + margin).minimum(cell + 1 - margin)
        inside = torch.where(flipped, inside, at)
        moved = _normalized(inside, sizes, corners).to(grid.dtype)
        there = _unnormalized(moved, sizes, corners, padding == 1).floor()
        points &= (there == cell).all(-1)  # moved into the reference's cell, or kept
        again = func(grad_output, x, moved.to(grid.device), mode, padding, corners, [False, True])
        return (out[0], torch.where(points.unsqueeze(-1).to(grid.device), again[1], out[1]))

    def _draw(self, func, args, kwargs):
        fused = func.overloadpacket is aten.native_dropout
        if fused and not _argument(func, args, kwargs, "train"):
            return func(*args, **kwargs)  # no draw: the input passes through
        if fused:
            key = _mask_key(1 - _argument(func, args, kwargs, "p"))
        elif func is aten.bernoulli_.float:
            key = _mask_key(_argument(func, args, kwargs, "p"))
        else:
            key = _key(func, args)
        out = func(*args, **kwargs)  # the run's own draw: its generator advances as usual
        own = out[1] if fused else out
        if fused and self.replay is not None:
            x, p = args[0], args[1]
            self._check_kernel(
                "native_dropout",
                out[0],
                _dropped(x, out[1].to(x.dtype), p),
                f"input x mask / (1 - p) for the mask it returned (p = {p})",
            )
        recorded = self._replayed_draw(func, key, own)
        if recorded is None:
            return out
        if fused:
            x, p = args[0], args[1]
            mask = recorded.to(device=own.device, dtype=own.dtype, copy=True)
            return (_dropped(x, mask, p), mask)
        # a copy: the caller may write into it in place, and the record must not change
        value = recorded.to(device=own.device, dtype=own.dtype, copy=True)
        if func._schema.is_mutable:
            return out.copy_(value)
        return value

    def _slopes(self, func, args, kwargs):
        """RReLU in training: its kernel draws each negative element's slope into `noise`
        (1 for the others). The reference's slopes are replayed and the output recomputed
        from them; x * slope is continuous at 0, so a sign that rounding flipped is no jump."""
        x, noise = args[0], args[1]
        inplace = _writes_first(func)
        source = x.clone() if inplace and self.replay is not None else x
        out = func(*args, **kwargs)
        if self.replay is not None:
            self._check_kernel(
                "rrelu_with_noise", out, source * noise, "input x the slope it returned"
            )
        lower, upper = (_argument(func, args, kwargs, n) for n in ("lower", "upper"))
        key = f"{_SLOPES}({float(lower)!r},{float(upper)!r})"  # in place or not, one record
        recorded = self._replayed_draw(func, key, noise)
        if recorded is None:
            return out
        noise.copy_(recorded)
        value = source * noise
        return out.copy_(value) if inplace else value

    def _replayed_draw(self, func, key: str, own: torch.Tensor) -> torch.Tensor | None:
        """The reference's draw in place of the run's `own` (its differences counted), or
        None where the record has none: the run keeps, and logs, its own."""
        recorded = self._take(key, own.shape)
        if recorded is None:
            self._unmatched()
            self._log(key, own.detach().clone())
            return None
        self._log(key, recorded)
        self._tally(func, own.numel(), int((own.cpu() != recorded.cpu()).sum()))
        return recorded

    # -- records --------------------------------------------------------------------------

    def _take(self, key: str, shape, own: torch.Tensor | None = None) -> torch.Tensor | None:
        """The next record of `key` of `shape` (of any shape when None), or None. Calls of
        other shapes keep theirs: a run whose graph orders its backward otherwise (an
        in-place ReLU become an out-of-place threshold) still gets each call's own. Where
        the next one disagrees with the run's `own` choice in more than LOOK_PAST of its
        elements, the closest of the next LOOKAHEAD is taken: a call the run did not make
        (a ReLU the target computes with another op) leaves its record behind, and the
        calls after it must not each take the record of the one before."""
        queue = self._queues.get(key)
        if not queue:
            return None
        if shape is None:
            return queue.popleft()
        fits = [i for i, recorded in enumerate(queue) if recorded.shape == shape][:LOOKAHEAD]
        if not fits:
            return None
        pick = fits[0]
        if own is not None and len(fits) > 1 and _disagreement(own, queue[pick]) > LOOK_PAST:
            pick = min(fits, key=lambda i: _disagreement(own, queue[i]))
        recorded = queue[pick]
        del queue[pick]
        return recorded

    def _unmatched(self) -> None:
        if self.replay is not None:
            self.unmatched += 1

    def _log(self, key: str, t: torch.Tensor) -> None:
        self.log.append((key, t))
        here = self._here()
        self.owners.append(None if here is None else here[2])

    def _here(self) -> tuple[str, int, int] | None:
        return self.where() if self.where is not None else None

    def _stat(self, func) -> Differed:
        """The counts of an op, or of a decision outside the dispatcher named `func`."""
        name = func if isinstance(func, str) else func.overloadpacket.__name__
        return self.stats.setdefault(name, Differed())

    def _tally(self, func, choices: int, differed: int) -> None:
        s = self._stat(func)
        s.calls += 1
        s.choices += choices
        s.differed += differed

    def _gap(self, func, gap: torch.Tensor, flips: torch.Tensor, x: torch.Tensor) -> None:
        scale = float(x.detach().abs().max()) or 1.0
        s = self._stat(func)
        s.farther(float(gap.detach()[flips].max()) / scale, self._here())

    def _count(self, func, own, replayed, values) -> None:
        differ = int((own != replayed).sum())
        self._tally(func, own.numel(), differ)
        self._chosen.add(func.overloadpacket.__name__)
        if differ and values is not None:
            mine, theirs = (v.detach().double() for v in values)
            scale = float(mine.abs().max()) or 1.0
            s = self._stat(func)
            s.farther(float((mine - theirs).abs().max()) / scale, self._here())

    def _check_kernel(self, op: str, values, expected, what: str) -> None:
        """A kernel whose values contradict the draw it returned (a dropout's mask, RReLU's
        slopes) is a fault where it ran: replaying the reference's draw would hide it."""
        finfo = torch.finfo(values.dtype)
        bound = (expected.abs() * 4 * finfo.eps).add_(finfo.tiny)
        bad = int(((values - expected).abs() > bound).sum())
        if bad:
            here = self._here()
            module, call = (here[0], here[1]) if here else ("", 0)
            message = f"{op} kernel: {bad} of {values.numel()} outputs are not {what}"
            self.faults.append(Fault(module, call, op, message))

    def choice_gaps(self) -> dict[str, Differed]:
        """The index ops (sort, top-k, max, a max-pool, NMS) whose own choices differed
        from the replayed ones, by name: how many, and how far from a tie they were."""
        return {n: s for n, s in self.stats.items() if n in self._chosen and s.differed}

    def summary(self) -> str:
        """One line: the decisions this run would have made otherwise; '' if none."""
        parts = [f"{name} {s.describe()}" for name, s in sorted(self.stats.items()) if s.differed]
        if self.unmatched:
            parts.append(f"{self.unmatched} calls not matched, their own decision kept")
        return "; ".join(parts)


def _unnormalized(grid: torch.Tensor, sizes, corners: bool, border: bool) -> torch.Tensor:
    """grid_sample's pixel coordinates of a grid in [-1, 1] (clipped to the image with
    border padding), in float64."""
    g = grid.detach().cpu()  # float64 on the CPU: a device may have none (MPS)
    size = torch.tensor(sizes, dtype=g.dtype)
    at = (g + 1) / 2 * (size - 1) if corners else ((g + 1) * size - 1) / 2  # as the kernel
    at, size = at.double(), size.double()
    return at.clamp(min=torch.zeros_like(size), max=size - 1) if border else at


def _normalized(at: torch.Tensor, sizes, corners: bool) -> torch.Tensor:
    """The grid of pixel coordinates `at` (_unnormalized's inverse)."""
    size = torch.tensor(sizes, dtype=torch.float64)
    return at / (size - 1) * 2 - 1 if corners else (2 * at + 1) / size - 1


def _overlap_gap(boxes, scores, kept, own, threshold: float) -> float:
    """How close each box kept by one run only came to being decided the other way: by
    its overlap with a box either run kept (from the IoU threshold) or by their scores
    (apart, relative to the largest); an honest difference sits within rounding of one."""
    from torchvision.ops import box_iou

    boxes, scores = boxes.detach().cpu().double(), scores.detach().cpu().double()
    kept, own = kept.cpu(), own.cpu()
    both = torch.cat([kept, own]).unique()
    differ = both[~(torch.isin(both, kept) & torch.isin(both, own))]
    overlap = (box_iou(boxes[differ], boxes[both]) - threshold).abs()
    scale = float(scores.abs().max()) or 1.0
    order = (scores[differ][:, None] - scores[both][None, :]).abs() / scale
    pair = torch.minimum(overlap, order)
    pair[differ[:, None] == both[None, :]] = torch.inf  # a box and itself
    return float(pair.amin(1).max())


def _disagreement(own: torch.Tensor, recorded: torch.Tensor) -> float:
    """The share of elements where a run's own choice differs from a record's."""
    differ = own.detach() != recorded.to(own.device)
    return float(differ.sum()) / max(differ.numel(), 1)


def _writes_first(func) -> bool:
    """True for an op that writes its result into its first argument (relu_, clamp_)."""
    alias = func._schema.arguments[0].alias_info
    return alias is not None and alias.is_write


def _floating(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()


def _seeded(func, args: tuple, kwargs: dict) -> bool:
    """True when the draw comes from an explicit torch.Generator (reproducible by seed)."""
    if isinstance(kwargs.get("generator"), torch.Generator):
        return True
    return any(isinstance(a, torch.Generator) for a in args)


def _key(func, args: tuple, named: dict[str, Any] | None = None) -> str:
    """A record's identity: the op and its scalar arguments (a threshold, a slope, p; a
    pool's kernel size, stride and padding), and the keyword arguments `named` (a rounding
    mode, a cast's dtype)."""
    scalars = [repr(a) for a in args if _scalar(a)]
    scalars += [f"{k}={v!r}" for k, v in (named or {}).items()]
    return f"{func}({','.join(scalars)})" if scalars else str(func)


def _applies(piece, args: tuple, kwargs: dict) -> bool:
    """True when this call of a piecewise op has breakpoints (a division that rounds, a
    cast to an integer dtype; not a plain division or a cast between floats)."""
    return piece.applies is None or piece.applies(*args, **kwargs)


def _scalar(a: Any) -> bool:
    """A number, or a list of numbers (a pool's padding: [1, 1])."""
    if isinstance(a, (list, tuple)):
        return bool(a) and all(isinstance(v, (bool, int, float)) for v in a)
    return isinstance(a, (bool, int, float))


def _index_key(func, args: tuple) -> str:
    """An index record's identity: `_key` and the shape of the input it indexes. A pool
    computed on an input padded beforehand (another device's decomposition) indexes
    another plane: the reference's indices are not its."""
    return _key(func, (tuple(args[0].shape), *args[1:]))


def _mask_key(keep: float) -> str:
    """The record key of a mask kept with probability `keep`, fused or not: a CPU's
    `F.dropout` draws it with `noise.bernoulli_(1 - p)`, a CUDA or NPU build with
    `native_dropout(x, p)`. Keyed alike (`1 - p` is the double the C++ computes), each
    side replays the other's mask."""
    return f"{aten.bernoulli_.float}({float(keep)!r})"


def _dropped(x: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
    scale = 1.0 / (1.0 - p) if p < 1 else 0.0
    return x * mask * scale


def note(role: str, summary: str) -> str:
    """The report's note on a run that replayed choices it would have made otherwise."""
    return (
        f"the {role} would have made some discrete choices (indices, branches, random draws) "
        f"otherwise: {summary}; it used the reference's (align.numerics.decisions)"
    )


def _argument(func, args: tuple, kwargs: dict, name: str) -> Any:
    for i, arg in enumerate(func._schema.arguments):
        if arg.name == name:
            if i < len(args):
                return args[i]
            return kwargs.get(name, arg.default_value)
    raise KeyError(name)


def _arg_values(func, args: tuple, kwargs: dict, indices: torch.Tensor) -> torch.Tensor:
    """An argmax's or argmin's input values at `indices` (the largest, or what it chose)."""
    source, dim = args[0], _argument(func, args, kwargs, "dim")
    if dim is None:
        return source.flatten()[indices]
    index = indices if _argument(func, args, kwargs, "keepdim") else indices.unsqueeze(dim)
    return source.gather(dim, index).view(indices.shape)


def _gather(func, args: tuple, kwargs: dict, indices: torch.Tensor) -> torch.Tensor:
    """The op's values at `indices`, taken from its own input."""
    source = args[0]
    if func in _POOLS:
        n = _POOLS[func]
        flat = source.flatten(start_dim=-n)
        return flat.gather(-1, indices.flatten(start_dim=-n)).view(indices.shape)
    dim = _argument(func, args, kwargs, "dim")
    dim = dim % max(source.dim(), 1)
    index = indices if indices.dim() == source.dim() else indices.unsqueeze(dim)
    values = source.gather(dim, index)
    return values if indices.dim() == source.dim() else values.squeeze(dim)
