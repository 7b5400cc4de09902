"""Long-running use: no leaks, bounded caches, thread safety."""
from __future__ import annotations

import gc
import threading
import weakref
from pathlib import Path

import torch
from torch import nn

import fxrel
from fxrel.explainer import PROGRAMS_PER_EXPLAINER


def tiny(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()


def resident_mb() -> float:
    """Resident set size of this process (Linux ``/proc``), in MiB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * 4096 / 2 ** 20


def test_a_thousand_calls_over_fifty_shapes_and_twenty_models_free_every_model_and_keep_memory_flat():
    """20 short-lived models, 50 calls each (1,000 in all) over 50 input shapes (5 per model): every model is freed
    when dropped, and the resident memory after the first five models stays flat."""
    shapes = [(1 + i % 5, 3, 8 + i // 5, 8 + i // 5) for i in range(50)]
    refs, memory = [], []
    for m in range(20):
        model = tiny(m)
        for call in range(50):
            shape = shapes[(5 * m + call % 5) % 50]
            relevance = fxrel.explain(model, torch.randn(shape), call % 3, method="epsilon_plus_flat")
            assert relevance.shape == shape and torch.isfinite(relevance).all()
        refs.append(weakref.ref(model))
        del model, relevance
        gc.collect()
        memory.append(resident_mb())
    assert all(r() is None for r in refs)                 # the explain cache holds no model
    growth = memory[-1] - memory[4]
    print(f"resident memory after 5 / 20 models: {memory[4]:.1f} / {memory[-1]:.1f} MiB (growth {growth:+.1f} MiB)")
    assert growth < 40


def test_the_program_cache_is_bounded():
    explainer = fxrel.Explainer(tiny(0), "gradient")
    for size in range(8, 8 + PROGRAMS_PER_EXPLAINER + 4):
        explainer(torch.randn(1, 3, size, size), 0)
    assert len(explainer._graphs) == len(explainer._canonical) == PROGRAMS_PER_EXPLAINER
    assert (((1, 3, 8, 8), torch.float32, torch.device("cpu")) not in explainer._canonical)   # the oldest went


def test_eight_threads_sharing_one_explainer_agree_with_serial_calls():
    model = tiny(1).double()
    explainer = fxrel.Explainer(model, "lrp_epsilon")
    inputs = [torch.randn(1 + i % 4, 3, 8, 8, dtype=torch.float64) for i in range(50)]
    serial = [fxrel.Explainer(model, "lrp_epsilon")(x, 1) for x in inputs]
    results: dict[tuple[int, int], torch.Tensor] = {}
    errors: list[BaseException] = []

    def work(thread: int) -> None:
        try:
            for i, x in enumerate(inputs):
                results[thread, i] = explainer(x, 1)
        except BaseException as exc:  # noqa: BLE001 — reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert all(torch.equal(results[t, i], serial[i]) for t in range(8) for i in range(len(inputs)))
