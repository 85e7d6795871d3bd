"""The EDM method's mechanisms, each pinned against a hand computation."""
import dataclasses

import pytest
import torch

from heads.train.config import build_model, TrainConfig
from heads.train.rundir import load_run
from heads.train.trainer import fit
from heads.train.evaluation import evaluate, predict, Report
from heads.blocks.data import Batch, DataSpec
from heads.blocks.loading import load_head_data
from heads.blocks.modules import Alignment, MemoryCell

SPEC3 = DataSpec(modalities=["a", "b", "c"], dims={"a": 6, "b": 4, "c": 5}, tokens=dict.fromkeys("abc", 1),
                 num_classes=3, class_names=["x", "y", "z"], majority_class=0)
SPEC2 = DataSpec(["a", "b"], {"a": 6, "b": 4}, {"a": 1, "b": 1}, 3, ["x", "y", "z"], 0)


def edm(spec=SPEC3, **options):
    torch.manual_seed(0)
    return build_model(TrainConfig(method="edm", hidden=8, options=options), spec)


def batch(spec=SPEC3, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = {m: torch.randn(n, spec.dims[m], generator=g) for m in spec.modalities}
    return Batch(x, {m: t[:, None] for m, t in x.items()}, {m: torch.ones(n, dtype=torch.bool) for m in x},
                 torch.randint(0, spec.num_classes, (n,), generator=g))


def report(delta):
    return Report(v={}, acc=0, f1=0, unimodal={}, phi={}, delta=delta, edm=0, pred=torch.zeros(0))


@pytest.mark.parametrize("strategy, expected", [
    ("weak-to-strong", ["b", "c", "a"]),  # δ: b 10 > c 2 > a −5: most under-contributing first
    ("strong-to-weak", ["a", "c", "b"]),
    ("fixed", ["c", "a", "b"]),
])
def test_order_follows_deviation(strategy, expected):
    model = edm(order=strategy, initial_order="c,a,b")
    model.start_epoch(1)
    assert model.order == ["c", "a", "b"]  # epoch 1 uses the initial order
    logged = model.end_epoch(report({"a": -5.0, "b": 10.0, "c": 2.0}))
    assert logged["order"] == "c>a>b" and logged["next_order"] == ">".join(expected)
    assert model.order == ["c", "a", "b"]  # inference keeps the order the epoch was trained with
    model.start_epoch(2)
    assert model.order == expected


def test_random_order_is_a_seeded_permutation():
    model = edm(order="random")
    orders = []
    torch.manual_seed(7)
    for epoch in range(1, 6):
        model.start_epoch(epoch)
        orders.append(model.end_epoch(report(dict.fromkeys("abc", 0.0)))["next_order"])
    other = edm(order="random")  # built before seeding: its initialisation must not consume the seeded draws
    torch.manual_seed(7)
    again = other.end_epoch(report(dict.fromkeys("abc", 0.0)))["next_order"]
    assert all(sorted(o.split(">")) == ["a", "b", "c"] for o in orders) and len(set(orders)) > 1
    assert again == orders[0]


def test_threshold_keeps_exactly_entries_above_tau_and_the_diagonal():
    h_cur = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    h_prev = torch.tensor([[1.0, 0.0], [0.8, 0.6], [-1.0, 0.0]])
    # cos(cur_i, prev_j) by hand
    s = torch.tensor([[1.0, 0.8, -1.0], [0.6, 0.96, -0.6], [0.0, 0.6, 0.0]])
    for tau, kept in [(0.5, [[1, 1, 0], [1, 1, 0], [0, 1, 1]]), (0.9, [[1, 0, 0], [0, 1, 0], [0, 0, 1]])]:
        w = Alignment(tau=tau).weights(h_cur, h_prev)
        kept = torch.tensor(kept, dtype=torch.bool)
        expect = torch.where(kept, s, torch.zeros_like(s))
        expect.fill_diagonal_(1.0)
        expect = expect / expect.abs().sum(1, keepdim=True)
        torch.testing.assert_close(w, expect)
    # 0.6 is not > 0.6: strictly greater
    assert Alignment(tau=0.6).weights(h_cur, h_prev)[2, 1] == 0


def test_learnable_gate_keeps_diagonal_and_learns():
    align = Alignment(gate="learnable")
    h = torch.randn(4, 3, requires_grad=True)
    w = align.weights(h, torch.randn(4, 3))
    assert torch.allclose(w.abs().sum(1), torch.ones(4))
    (w @ torch.randn(4, 2)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in align.gate.parameters())


def test_memory_cell_matches_a_hand_computed_step():
    cell = MemoryCell(hidden=2, memory=1)
    with torch.no_grad():
        cell.fuse.weight.copy_(torch.tensor([[0.5, -1.0, 2.0]]))
        cell.fuse.bias.fill_(0.1)
        cell.gates_u.weight.copy_(torch.tensor([[1.0], [2.0], [-1.0], [0.5]]))
        cell.gates_u.bias.copy_(torch.tensor([0.0, 0.1, 0.2, -0.3]))
        cell.gates_h.weight.copy_(torch.tensor([[0.3], [-0.2], [0.4], [1.0]]))
    h, a = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5]])
    state_h, state_c = torch.tensor([[0.2]]), torch.tensor([[-0.4]])
    u = 0.5 * 1 - 1.0 * 2 + 2.0 * 0.5 + 0.1  # = −0.4
    sig = lambda z: 1 / (1 + torch.exp(torch.tensor(z)) ** -1)  # noqa: E731
    f = sig(1.0 * u + 0.0 + 0.3 * 0.2)
    i = sig(2.0 * u + 0.1 - 0.2 * 0.2)
    o = sig(-1.0 * u + 0.2 + 0.4 * 0.2)
    cand = torch.tanh(torch.tensor(0.5 * u - 0.3 + 1.0 * 0.2))
    c = f * -0.4 + i * cand
    out_h, out_c = cell(h, a, state_h, state_c)
    torch.testing.assert_close(out_c, c.reshape(1, 1))
    torch.testing.assert_close(out_h, (o * torch.tanh(c)).reshape(1, 1))


def _cell_run(cell, h, a, state_h, state_c):
    """Output, cell state and every parameter's gradient after backward of a fixed linear read-out."""
    cell.zero_grad()
    out_h, out_c = cell(h, a, state_h, state_c)
    (out_h * torch.linspace(-1, 1, out_h.numel()).reshape(out_h.shape)).sum().backward()
    return out_h.detach(), out_c.detach(), {n: p.grad.clone() for n, p in cell.named_parameters()}


def test_memory_cell_shortcuts_compute_the_same_function():
    # a = None must equal a = 0, and a one-row state must equal that row repeated for every sample,
    # in the output and in every parameter gradient; the a-block of W_u gets an exactly zero gradient.
    torch.manual_seed(0)
    cell = MemoryCell(hidden=5, memory=3)
    h = torch.randn(4, 5)
    state_h, state_c = torch.randn(1, 3), torch.randn(1, 3)
    reference = _cell_run(cell, h, torch.zeros(4, 3), state_h.expand(4, -1).clone(), state_c.expand(4, -1).clone())
    shortcut = _cell_run(cell, h, None, state_h, state_c)
    torch.testing.assert_close(shortcut[0], reference[0])
    torch.testing.assert_close(shortcut[1], reference[1])
    for name in reference[2]:
        torch.testing.assert_close(shortcut[2][name], reference[2][name])
    assert torch.equal(shortcut[2]["fuse.weight"][:, 5:], torch.zeros(3, 3))


@pytest.mark.parametrize("order", ["a,b,c", "b,a,c"])
def test_missing_modality_is_skipped_in_the_chain(order):
    # Without alignment samples do not interact, so sample 0 (lacking b) must get exactly the a → c chain.
    model = edm(initial_order=order, align=False)
    model.start_epoch(1)
    b = batch()
    b.present["b"][0] = False
    b.x["b"][0] = 0
    mixed = model.logits(b)
    without_b = model.logits(b.only(["a", "c"]))
    torch.testing.assert_close(mixed[0], without_b[0])
    assert not torch.allclose(mixed[1], without_b[1])  # the others do use b


def test_missing_sample_passes_its_state_through_an_aligned_step():
    model = edm()
    b = batch()
    b.present["b"][0] = False
    b.x["b"][0] = 0
    h_prev, started, state_h, state_c = model.initial_state(b)
    h_prev, started, state_h, state_c = model.chain_step("a", b, h_prev, started, state_h, state_c)
    after_h, after_started, new_h, new_c = model.chain_step("b", b, h_prev, started, state_h, state_c)
    assert torch.equal(new_h[0], state_h[0]) and torch.equal(new_c[0], state_c[0])
    assert torch.equal(after_h[0], h_prev[0]) and after_started.mask.all()
    assert not torch.equal(new_h[1], state_h[1])


def test_first_present_modality_gets_no_aligned_state():
    model = edm(initial_order="b,a,c")
    b = batch()
    b.present["b"][0] = False
    b.x["b"][0] = 0
    h_prev, started, state_h, state_c = model.initial_state(b)
    h_prev, started, state_h, state_c = model.chain_step("b", b, h_prev, started, state_h, state_c)
    assert started.mask.tolist() == [False, True, True, True, True]
    # sample 0 starts at a: same result as a batch where nobody has started (a = 0 for all)
    fresh = model.initial_state(b)
    _, _, h_first, _ = model.chain_step("a", b, *fresh)
    _, _, h_mixed, _ = model.chain_step("a", b, h_prev, started, state_h, state_c)
    torch.testing.assert_close(h_mixed[0], h_first[0])


def test_no_memory_ablation_is_h_plus_aligned_state():
    model = edm(memory=False, align=False, inherit=False)
    model.start_epoch(1)
    b = batch()
    h = {m: torch.relu(model.proj[m].linear(b.x[m])) for m in "abc"}
    # without alignment each step replaces the state by h_k; the last modality decides
    torch.testing.assert_close(model.logits(b), model.cls(h["c"]))


def test_inheritance_moves_the_initial_state_only_when_enabled():
    for inherit in (True, False):
        model = edm(SPEC2, inherit=inherit)
        model.optimizer = model.configure_optimizer()
        model.start_epoch(1)
        model.train_step(batch(SPEC2, n=8))
        assert (model.memory_h.abs().sum() > 0) == inherit and (model.memory_c.abs().sum() > 0) == inherit


def test_inherited_state_that_no_step_replaces_stays_as_it_is():
    # Without the cell, C passes through every step untouched, so its moving average must not move
    # (the state read back is a view of the buffer being updated).
    model = edm(SPEC2, memory=False)
    model.optimizer = model.configure_optimizer()
    model.start_epoch(1)
    with torch.no_grad():
        model.memory_c.copy_(torch.linspace(-1, 1, model.memory_c.numel()))
    before = model.memory_c.clone()
    model.train_step(batch(SPEC2, n=8))
    torch.testing.assert_close(model.memory_c, before)
    assert not torch.equal(model.memory_h, torch.zeros_like(model.memory_h))  # H did move


def test_any_number_of_modalities_forms_a_chain():
    spec5 = DataSpec(list("pqrst"), dict.fromkeys("pqrst", 3), dict.fromkeys("pqrst", 1), 2, ["n", "y"], 0)
    model = edm(spec5)
    model.optimizer = model.configure_optimizer()
    model.start_epoch(1)
    loss = model.train_step(batch(spec5, n=6))
    assert torch.isfinite(loss) and model.logits(batch(spec5)).shape == (5, 2)
    nxt = model.end_epoch(report({"p": 1.0, "q": 5.0, "r": -3.0, "s": 0.0, "t": 2.0}))["next_order"]
    assert nxt == "q>t>p>s>r"


def test_evaluation_does_not_depend_on_row_order_and_reload_is_identical(small_av, tmp_path):
    data = load_head_data([small_av])
    result = fit(data, TrainConfig(method="edm", epochs=2, batch_size=64), tmp_path, progress=False)
    test = data.test
    perm = torch.randperm(len(test), generator=torch.Generator().manual_seed(3))
    shuffled = test.subset(perm)
    a = predict(result.model, test, data.spec.modalities, 64)
    b = predict(result.model, shuffled, data.spec.modalities, 64)
    assert torch.equal(a[perm], b)
    reloaded, cfg = load_run(tmp_path)
    assert reloaded.order == result.model.order
    assert torch.equal(reloaded.memory_h, result.model.memory_h)
    assert torch.equal(evaluate(reloaded, test, data.spec, cfg.batch_size).pred, result.test.pred)
    epochs = (tmp_path / "epochs.csv").read_text().splitlines()
    assert "order" in epochs[0] and "val_phi_audio" in epochs[0] and "val_edm" in epochs[0]


def test_invalid_options_are_refused():
    with pytest.raises(ValueError, match="--tau must lie"):
        edm(tau=1.5)
    with pytest.raises(ValueError, match="--initial-order must name each of a, b, c once"):
        edm(initial_order="a,b")
    # The ranges are [0, 1): both ends checked.
    edm(tau=0.0), edm(inherit_momentum=0.0)
    for options in ({"tau": 1.0}, {"inherit_momentum": 1.0}):
        with pytest.raises(ValueError, match="must lie in \\[0, 1\\)"):
            edm(**options)


def test_options_shape_the_model():
    # Memory width: --memory-dim (default 64), 0 = the hidden width d (8 here), and d without the cell.
    assert edm().memory_h.numel() == 64 and edm().cls.in_features == 64
    assert edm(memory_dim=0).memory_h.numel() == 8 and edm(memory_dim=5).memory_h.numel() == 5
    assert edm(memory=False, memory_dim=5).memory_h.numel() == 8 and edm(memory=False).cell is None
    assert edm(gate="learnable").align.gate is not None and edm().align.gate is None
    assert edm(tau=0.3).align.tau == 0.3


def test_each_chain_step_loss_averages_the_samples_that_have_the_modality():
    """Step k's loss is the CE over the samples that have modality k (the others pass their state
    through and add nothing), the logged loss the mean over the M steps, and a modality nobody in the
    batch has takes no step while the chain goes on. Without memory and alignment ``H_k = h_k``, and
    with lr = 0 the parameters stay put, so each step's loss is ``CE(cls(P_k(x_k)))`` over its rows."""
    model = edm(memory=False, align=False)
    model.optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    steps, plain = [], model.optimizer.step
    model.optimizer.step = lambda *a, **k: (steps.append(1), plain(*a, **k))[1]
    model.start_epoch(1)
    b = batch(n=6)
    for m, absent in {"a": [0], "b": [1, 2], "c": [5]}.items():
        b.present[m][absent] = False
        b.x[m][absent] = 0

    def ce(m):
        rows = b.present[m]
        return torch.nn.functional.cross_entropy(model.cls(torch.relu(model.proj[m].linear(b.x[m][rows]))), b.y[rows])

    with torch.no_grad():
        expect = (ce("a") + ce("b") + ce("c")) / 3
    torch.testing.assert_close(model.train_step(b), expect)
    assert len(steps) == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())  # absent rows give no NaN gradient
    # Nobody has a (first in the order): b and c still take their steps.
    b.present["a"][:] = False
    b.x["a"][:] = 0
    steps.clear()
    model.train_step(b)
    assert len(steps) == 2


@pytest.mark.parametrize("options", [{}, {"gate": "learnable"}, {"memory": False}, {"inherit": False}])
def test_subset_logits_equal_each_subsets_own_pass_and_share_prefixes(options):
    """evaluate's per-epoch φ scores every subset through ``subset_logits``: the logits must be those of
    ``logits(batch.only(S))`` bit for bit, for every subset, with missing samples, and the chain must take
    one step per prefix node (2^M − 1 = 15 at M = 4), not one per modality of each subset (M·2^(M−1) = 32)."""
    from heads import metrics

    spec = DataSpec(["a", "b", "c", "d"], {"a": 6, "b": 4, "c": 5, "d": 3}, dict.fromkeys("abcd", 1), 3, ["x", "y", "z"], 0)
    model = edm(spec, initial_order="c,a,d,b", **options)
    with torch.no_grad():
        model.memory_h.normal_()
        model.memory_c.normal_()
    model.start_epoch(1)
    model.eval()
    b = batch(spec, n=9, seed=3)
    b.present["a"][[0, 4]] = False
    b.present["d"][2] = False
    for m in b.x:
        b.x[m] = b.x[m] * b.present[m][:, None]
        b.tokens[m] = b.x[m][:, None]
    subsets = [s for s in metrics.all_subsets(spec.modalities) if s]
    steps, plain = [], model.chain_step
    model.chain_step = lambda *args: (steps.append(args[0]), plain(*args))[1]
    with torch.no_grad():
        shared = model.subset_logits(b, subsets)
        assert len(steps) == 15 and steps[:3] == ["c", "a", "a"]  # the tree grows in the chain's order
        for i, s in enumerate(subsets):
            assert torch.equal(shared[i], model.logits(b.only(s))), sorted(s)
    # A modality nobody in the batch has is passed by: every subset equals its own pass, with no step for d.
    gone = dataclasses.replace(b, present={**b.present, "d": torch.zeros(9, dtype=torch.bool)},
                               x={**b.x, "d": torch.zeros_like(b.x["d"])}, counts=None)
    gone.tokens = {m: t[:, None] for m, t in gone.x.items()}
    steps.clear()
    with torch.no_grad():
        shared = model.subset_logits(gone, subsets)
        assert "d" not in steps and len(steps) == 7  # the tree of c, a, b
        for i, s in enumerate(subsets):
            assert torch.equal(shared[i], model.logits(gone.only(s))), sorted(s)
    # A wanted subset list with gaps grows only the prefixes it needs: {b} alone is one step.
    steps.clear()
    with torch.no_grad():
        only_b = model.subset_logits(b, [frozenset("b")])
    assert steps == ["b"] and torch.equal(only_b[0], model.logits(b.only("b")))


def test_evaluation_uses_subset_logits_and_gets_the_per_subset_numbers(small_av):
    """``evaluate`` routes edm's subsets through ``subset_logits`` (one call per evaluation batch) and gives
    the same report as one pass per subset."""
    data = load_head_data([small_av])
    result = fit(data, TrainConfig(method="edm", epochs=2, batch_size=16, seed=1), progress=False)
    model, split = result.model, data.val
    calls, plain = [], model.subset_logits
    model.subset_logits = lambda *args: (calls.append(1), plain(*args))[1]
    shared = evaluate(model, split, data.spec, 16)
    assert len(calls) == -(-len(split) // 16)
    model.subset_logits = None  # the core's per-subset path
    alone = evaluate(model, split, data.spec, 16)
    assert shared.v == alone.v and shared.loss == alone.loss and torch.equal(shared.pred, alone.pred)
