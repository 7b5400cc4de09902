"""Public API: targets, user rule assignment, streams, start/stop nodes, inspection, caching, compile."""
from __future__ import annotations

import networkx as nx
import pytest
import torch
from torch import nn

import fxrel
from fxrel.catalog.method import seed_gradient
from fxrel.graphs import Stream, build_relevance_graph
from fxrel.graphs.export import to_dot, to_networkx
from fxrel.rules import Flat, Gradient, Pass, ZPlus, kind, module, where
from tests.helpers import autograd_input_gradient, rel_error


class SmallNet(nn.Module):
    """conv-BN-ReLU, a residual add, a concat, max-pool, GAP head: every structural kind in a few lines."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True))
        self.branch = nn.Conv2d(6, 6, 3, padding=1)
        self.side = nn.Conv2d(6, 4, 1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(10, 5)

    def forward(self, x):
        x = self.stem(x)
        y = self.branch(x)
        y += x
        y = torch.relu(y)
        z = torch.cat([y, self.side(y)], 1)
        z = self.pool(z)
        return self.fc(z.mean((2, 3)))


@pytest.fixture
def net():
    torch.manual_seed(0)
    model = SmallNet().eval()
    bn = model.stem[1]
    bn.running_mean.uniform_(-0.2, 0.2)
    bn.running_var.uniform_(0.5, 1.5)
    return model


def test_targets_int_list_tensor_and_topk(net):
    x = torch.randn(3, 3, 8, 8)
    e = fxrel.Explainer(net, "gradient")
    logits = net(x)
    assert torch.allclose(e(x, 2), e(x, [2, 2, 2]), atol=1e-7)
    assert torch.allclose(e(x, torch.tensor([0, 1, 2])), torch.cat([e(x[i:i + 1], i) for i in range(3)]), atol=1e-6)
    second = logits.topk(2, dim=1).indices[:, 1]
    explanation = e.attribute(x, "top-2")
    assert torch.equal(explanation.targets, second)
    assert rel_error(explanation.relevance["x"], autograd_input_gradient(net, x, second)) < 1e-5
    assert torch.equal(e.attribute(x).targets, logits.argmax(1))


def test_rules_by_kind_module_and_predicate(net):
    x = torch.randn(1, 3, 8, 8)
    e = fxrel.Explainer(net, "epsilon_plus_flat", rules=[(module("side"), Flat()), (kind("maxpool"), Gradient())])
    plan = e.rule_plan(x)
    by_module = {row[2]: row[3] for row in plan.rows()}
    assert by_module["side"] == "Flat()" and by_module["branch"].startswith("ZPlus")
    assert by_module["stem.0"] == "Flat()"  # the preset's first layer
    assert "Flat()" in str(plan)
    # a predicate that gives every node the gradient turns the LRP preset into logit × gradient (its seed is y_t)
    every = fxrel.Explainer(net, "epsilon_plus_flat",
                            rules=[(where(lambda n: n.meta["fxrel_kind"] != "activation"), Gradient()),
                                   (kind("activation"), Gradient())])
    logit = net(x)[0, 3]
    assert rel_error(every(x, 3), logit * autograd_input_gradient(net, x, torch.tensor([3]))) < 1e-5


def test_wrong_rule_for_a_kind_is_a_clear_error(net):
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(fxrel.RuleError, match="maxpool"):
        fxrel.Explainer(net, "lrp_epsilon", rules=[(kind("maxpool"), ZPlus())]).rule_plan(x)


def test_two_streams_in_one_sweep_equal_separate_sweeps(net):
    x = torch.randn(2, 3, 8, 8)
    e_grad, e_lrp = fxrel.Explainer(net, "gradient"), fxrel.Explainer(net, "lrp_epsilon")
    canonical = e_grad.canonical_graph(x)
    streams = [e_grad.method.streams(canonical)[0], e_lrp.method.streams(canonical)[0]]
    graph = build_relevance_graph(canonical, streams)
    mask = torch.zeros(2, 5)
    mask[:, 4] = 1
    out = graph.module(x, mask)
    assert torch.allclose(out["gradient:x"], e_grad(x, 4), atol=1e-6)
    assert torch.allclose(out["lrp_epsilon:x"], e_lrp(x, 4), atol=1e-6)
    assert {n.meta.get("fxrel_stream") for n in graph.module.graph.nodes} >= {"gradient", "lrp_epsilon"}


def test_a_stream_sees_the_other_streams_messages(net):
    """A rule may read another stream's relevance at the same node (AGF needs the gradient there)."""

    class TimesOtherStream(Gradient):
        def __call__(self, ctx, relevance):
            return ctx.vjp(relevance * ctx.upstream["grad"] * 2)  # seeds are one-hot, so this doubles

    x = torch.randn(2, 3, 8, 8)
    explainer = fxrel.Explainer(net, "gradient")
    canonical = explainer.canonical_graph(x)
    plain = {n.name: Gradient() for n in canonical.graph.nodes if n.op == "call_function"}
    last = [n.name for n in canonical.graph.nodes if n.meta.get("fxrel_kind") == "linear"][-1]
    mixed = {name: (TimesOtherStream() if name == last else rule) for name, rule in plain.items()}
    graph = build_relevance_graph(canonical, [Stream("grad", plain, seed_gradient),
                                              Stream("mixed", mixed, seed_gradient)])
    mask = torch.zeros(2, 5)
    mask[:, 1] = 1
    out = graph.module(x, mask)
    assert torch.allclose(out["mixed:x"], 2 * out["grad:x"], atol=1e-7)
    assert rel_error(out["grad:x"], explainer(x, 1)) < 1e-6


def test_start_and_stop_at_intermediate_nodes(net):
    """Relevance from the residual sum down to the stem output equals autograd of ⟨seed, activation⟩."""
    x = torch.randn(2, 3, 8, 8)
    e = fxrel.Explainer(net, "gradient", start="add_tensor", stops=["stem", "x"])  # a module stands for its output
    canonical = e.canonical_graph(x)
    shape = next(n for n in canonical.graph.nodes if n.name == "add_tensor").meta["tensor_meta"].shape
    seed = torch.randn(shape)
    result = e(x, seed=seed)
    xr = x.clone().requires_grad_()
    stem = net.stem(xr)
    stem.retain_grad()
    y = net.branch(stem) + stem
    (y * seed).sum().backward()
    assert rel_error(result["x"], xr.grad) < 1e-5
    assert rel_error(result["stem"], stem.grad) < 1e-5


def test_relevance_graph_is_explicit_and_inspectable(net):
    x = torch.randn(1, 3, 8, 8)
    graph = fxrel.Explainer(net, "epsilon_plus_flat").relevance_graph(x)
    targets = {str(n.target) for n in graph.module.graph.nodes if n.op == "call_function"}
    assert not any("autograd" in t or "backward" == t for t in targets)
    assert "convolution" in graph.code
    relevance_nodes = [n for n in graph.module.graph.nodes if n.meta.get("fxrel_role") == "relevance"]
    assert relevance_nodes and all(n.meta.get("fxrel_forward") and n.meta.get("fxrel_rule")
                                   for n in relevance_nodes)
    g = to_networkx(graph)
    assert isinstance(g, nx.DiGraph) and nx.is_directed_acyclic_graph(g)
    rel = [d for _, d in g.nodes(data=True) if d["role"] == "relevance"]
    assert all(d["shape"] is not None for d in rel)
    dot = to_dot(graph)
    assert dot.startswith("digraph") and "ZPlus" in dot


def test_layer_table_audits_conservation(net):
    x = torch.randn(1, 3, 8, 8)
    table = fxrel.Explainer(net, "lrp_0").layer_table(x, 1)
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["node", "kind", "module"]
    assert any(line.startswith("add_tensor") for line in lines)


def test_profile_times_every_program_node_once_grouped_by_rule_and_served_kind(net):
    """Every call node of the program with a role is in exactly one group (by rule and the kind it serves, and by op
    with ``by_op``); the groups' shares sum to 1; the rule plan's rules are the relevance groups' rules."""
    from fxrel.graphs.profile import profile_table

    x = torch.randn(2, 3, 8, 8)
    explainer = fxrel.Explainer(net, "epsilon_plus_flat")
    graph = explainer.relevance_graph(x)
    timed = [n for n in graph.module.graph.nodes
             if n.op in ("call_function", "call_method") and n.meta.get("fxrel_role") is not None]
    plan = explainer.rule_plan(x)
    for by_op in (False, True):
        rows = explainer.profile(x, 1, repeats=2, by_op=by_op)
        assert sum(r.nodes for r in rows) == len(timed)
        assert abs(sum(r.share for r in rows) - 1) < 1e-9 and all(r.seconds >= 0 for r in rows)
        assert len({(r.role, r.rule, r.kind, r.op) for r in rows}) == len(rows)
    by_rule = explainer.profile(x, 1, repeats=1)
    relevance = {(r.rule, r.kind) for r in by_rule if r.role == "relevance" and r.rule != "fan-out sum"}
    assert ("ZPlus(stabilizer=1e-06)", "conv") in relevance and ("Flat()", "conv") in relevance
    assert {rule for rule, _ in relevance} <= {repr(r) for r in plan.values()}
    ops = {r.op for r in explainer.profile(x, 1, repeats=1, by_op=True)}
    assert "convolution" in ops
    assert profile_table(by_rule).splitlines()[-1].startswith("total")
    with pytest.raises(ValueError, match="repeats must be"):
        explainer.profile(x, 1, repeats=0)


def test_classes_explains_k_classes_per_image_in_one_batch_equal_to_single_target_calls(net, monkeypatch):
    """``Explainer.classes``: [B, K] relevance equal to K single-target calls per image (float64: to rounding), for
    the same classes for every image and for per-image classes; a chunked run pads its short last chunk, so one
    relevance program (one build) serves every chunk; bad class arguments are named."""
    model = net.double()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    explainer = fxrel.Explainer(model, "epsilon_plus_flat")
    shared = explainer.classes(x, [4, 0])
    assert shared.shape == (3, 2, 3, 8, 8)
    for b in range(3):
        for k, c in enumerate((4, 0)):
            assert rel_error(shared[b, k], explainer(x[b:b + 1], c)[0]) < 1e-12
    per_image = torch.tensor([[1, 2], [3, 4], [0, 1]])
    builds = []
    original = fxrel.Explainer.relevance_graph

    def counted(self, x, stops=None):
        key = (tuple(x.shape), stops)
        if key not in builds:
            builds.append(key)
        return original(self, x, stops)

    monkeypatch.setattr(fxrel.Explainer, "relevance_graph", counted)
    chunked = explainer.classes(x, per_image, chunk=4)   # 6 rows: chunks of 4 and 2 (padded to 4)
    assert [shape[0] for shape, _ in builds] == [4]
    for b in range(3):
        for k in range(2):
            expected = explainer(x[b:b + 1], int(per_image[b, k]))[0]
            assert rel_error(chunked[b, k], expected) < 1e-12
    with pytest.raises(fxrel.InputError, match=r"classes must be \[K\]"):
        explainer.classes(x, torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(fxrel.InputError, match="integer class indices"):
        explainer.classes(x, [0.5])
    with pytest.raises(fxrel.InputError, match="chunk must be"):
        explainer.classes(x, [0], chunk=0)
    with pytest.raises(fxrel.InputError, match="out of range|class"):
        explainer.classes(x, [7])


def test_conservation_audit_finds_every_rule_conserving_on_a_bias_free_net_and_names_a_leaking_rule(net):
    """Every rule application of LRP-0 on the constant-free net sends on what it receives (to rounding, relative to
    its own Σ|R|); LRP-ε with a large ε leaks at the conv and linear nodes, and the audit names them."""
    from fxrel.coverage import constant_free

    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    bare = constant_free(net.double())
    rows = fxrel.Explainer(bare, "lrp_0").conservation_audit(x, 1)
    canonical = fxrel.Explainer(bare, "lrp_0").canonical_graph(x)
    assert {r.node for r in rows} == {n.name for n in canonical.graph.nodes if n.op == "call_function"}
    assert max(r.leak for r in rows) < 1e-13
    total = fxrel.Explainer(bare, "lrp_0")(x, 1).sum().item()
    assert abs(rows[0].sent - total) < 1e-12 * abs(total)   # the first node in forward order sends to the input
    leaking = {r.kind for r in fxrel.Explainer(bare, "lrp_epsilon", epsilon=0.5).conservation_audit(x, 1)
               if r.leak > 1e-6}
    assert "conv" in leaking and "linear" in leaking


def test_explainer_caches_per_signature(net, monkeypatch):
    x = torch.randn(2, 3, 8, 8)
    e = fxrel.Explainer(net, "lrp_epsilon")
    e(x, 1)
    calls = []
    import fxrel.explainer as module_under_test
    monkeypatch.setattr(module_under_test, "capture", lambda *a, **k: calls.append(1))
    e(torch.randn(2, 3, 8, 8), 2)  # same signature: no new capture
    assert calls == []
    monkeypatch.undo()
    fxrel.explain(net, x, 1, method="lrp_epsilon")
    fxrel.explain(net, x, 2, method="lrp_epsilon")
    cached = fxrel.explainer._CACHE[net]
    assert len(cached) == 1


def test_another_method_on_the_same_explainer_reuses_its_capture(net, monkeypatch):
    x = torch.randn(2, 3, 8, 8)
    gradient = fxrel.Explainer(net, "gradient")
    gradient(x, 1)
    import fxrel.explainer as module_under_test
    monkeypatch.setattr(module_under_test, "capture", lambda *a, **k: pytest.fail("captured again"))
    lrp = gradient.using("lrp_epsilon", epsilon=1e-3)
    assert lrp.canonical_graph(x) is gradient.canonical_graph(x)
    monkeypatch.undo()
    assert torch.equal(lrp(x, 1), fxrel.Explainer(net, "lrp_epsilon", epsilon=1e-3)(x, 1))


def test_compiled_equals_eager_without_graph_breaks(net):
    x = torch.randn(2, 3, 8, 8)
    eager = fxrel.Explainer(net, "epsilon_gamma_box", low=-3.0, high=3.0)
    graph = eager.relevance_graph(x)
    mask = torch.zeros(2, 5)
    mask[:, 2] = 1
    explanation = torch._dynamo.explain(graph.module)(x, mask)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = fxrel.Explainer(net, "epsilon_gamma_box", low=-3.0, high=3.0, compile=True)
    assert rel_error(compiled(x, 2), eager(x, 2)) < 1e-5
    runner = compiled._runner(x, None)[1]
    compiled(torch.randn(2, 3, 8, 8), 1)
    assert compiled._runner(x, None)[1] is runner  # cached: the second call reuses the compiled program


def test_methods_registry_lists_every_method():
    names = fxrel.methods()
    for name in ("gradient", "gradient_x_input", "guided_backprop", "deconvnet", "lrp_0", "lrp_epsilon", "lrp_gamma",
                 "lrp_zplus", "lrp_alpha_beta", "lrp_flat", "lrp_wsquare", "lrp_zbox", "epsilon_plus_flat",
                 "epsilon_gamma_box", "epsilon_alpha2_beta1_flat"):
        assert name in names


def test_gradient_x_input_and_pass_rule(net):
    x = torch.randn(2, 3, 8, 8)
    gxi = fxrel.Explainer(net, "gradient_x_input")(x, 0)
    assert rel_error(gxi, autograd_input_gradient(net, x, torch.tensor([0, 0])) * x) < 1e-5
    assert Pass().accepts("activation") and not Pass().accepts("conv")


def test_zero_terms_after_a_relu_are_left_out_of_the_graph(net):
    """z⁺ on a ReLU output: the x⁻·W⁻ term is identically zero, so the builder emits one modified conv, not two."""
    x = torch.randn(1, 3, 8, 8)
    graph = fxrel.Explainer(net, "lrp_zplus").relevance_graph(x)
    conv_nodes = {}
    for n in graph.module.graph.nodes:
        if n.meta.get("fxrel_role") == "relevance" and "convolution" in str(n.target):
            conv_nodes.setdefault(n.meta["fxrel_forward"], []).append(n)
    canonical = graph.canonical
    for node in canonical.graph.nodes:
        if node.meta.get("fxrel_kind") != "conv":
            continue
        # one forward + one transposed conv per term: 2 terms on the raw image, 1 after a ReLU
        expected = 2 if node.args[0].meta["fxrel_nonnegative"] else 4
        assert len(conv_nodes[node.name]) == expected, node.name


def test_a_module_pattern_applies_its_rule_where_the_rule_fits(net):
    """``module("stem*")`` selects the stem's conv and ReLU; a conv rule lands on the conv, the ReLU falls through."""
    x = torch.randn(1, 3, 8, 8)
    plan = fxrel.Explainer(net, "epsilon_plus_flat", rules=[(module("stem*"), ZPlus())]).rule_plan(x)
    by_module = {row[2]: row[3] for row in plan.rows()}
    assert by_module["stem.0"].startswith("ZPlus") and by_module["stem.2"] == "Pass()"


def test_explainers_follow_parameters_changed_in_place_or_loaded(net):
    """Programs hold the parameters as constants; in-place edits and load_state_dict must not leave them stale."""
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 1])
    explainer = fxrel.Explainer(net, "gradient")
    before = explainer(x, t)
    with torch.no_grad():
        next(net.parameters()).mul_(-2.0)
    assert rel_error(explainer(x, t), autograd_input_gradient(net, x, t)) < 1e-5
    assert rel_error(fxrel.explain(net, x, t, method="gradient"), autograd_input_gradient(net, x, t)) < 1e-5
    net.load_state_dict({k: v * 1.5 if v.is_floating_point() else v for k, v in net.state_dict().items()})
    assert rel_error(explainer(x, t), autograd_input_gradient(net, x, t)) < 1e-5
    assert rel_error(explainer(x, t), before) > 1e-3
