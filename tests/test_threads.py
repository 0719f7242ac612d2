"""Explaining is private to the explanation: other threads using the same model get torch's
own forward and gradients, and register() / unregister() from another thread never leaves
shap's hooks behind. Every loop is bounded by a count, never by time."""

from __future__ import annotations

import threading
import warnings

import pytest
import shap
import torch
from captum.attr import DeepLift
from torch import nn

import torch_handler
from torch_handler.explanation import current_explanation, is_active

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


class Classifier(nn.Module):
    """nn.LSTM + nn.Linear: no module shap's own hooks would change the gradients of, so any
    difference in another thread's gradients comes from the recurrent layer."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(3, 6, num_layers=2, batch_first=True)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def make_model():
    torch.manual_seed(0)
    return Classifier().double().eval()


def training_step(model, x, y):
    """A training step's forward and backward: the loss and the weight gradients (through
    autograd.grad: shap's own model.zero_grad() would race with .grad)."""
    loss = nn.functional.mse_loss(model(x), y)
    return [loss.detach(), *torch.autograd.grad(loss, list(model.parameters()))]


def same(a, b) -> bool:
    return all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


BATCHES = [(torch.randn(5, 7, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)) for _ in range(3)]


def run_beside(model, explain_once, explanations: int, max_steps: int = 100_000):
    """Train (without updating) in one thread while another explains ``explanations`` times.

    So that the two really overlap whatever the scheduler does, the explaining thread waits,
    each time the shared nn.LSTM runs for it (inside the explanation: DeepLIFT forward active,
    the engine's hooks on the model), until the training thread has completed one more step.
    Returns (steps whose loss or gradients differ from a run without any explanation, training
    steps completed while an explanation waited, errors of the explaining thread).
    """
    expected = [training_step(model, x, y) for x, y in BATCHES]
    progress = threading.Condition()
    state = {"steps": 0, "done": False, "overlapped": 0}
    errors, wrong = [], []

    def pause_for_a_training_step(module, args, output):
        if threading.current_thread() is not explaining_thread:
            return
        with progress:
            target = state["steps"] + 1
            if progress.wait_for(lambda: state["steps"] >= target, timeout=30):
                state["overlapped"] += 1

    def explain():
        try:
            for _ in range(explanations):
                explain_once()
        except Exception as error:  # reported by the assertion of the caller
            errors.append(error)
        finally:
            with progress:
                state["done"] = True

    def train():
        for step in range(max_steps):
            with progress:
                if state["done"]:
                    return
            x, y = BATCHES[step % len(BATCHES)]
            try:
                ok = same(training_step(model, x, y), expected[step % len(BATCHES)])
            except Exception:  # e.g. no weight gradients at all under the DeepLIFT forward
                ok = False
            if not ok:
                wrong.append(step)
            with progress:
                state["steps"] += 1
                progress.notify_all()

    hook = model.lstm.register_forward_hook(pause_for_a_training_step)
    explaining_thread = threading.Thread(target=explain)
    training_thread = threading.Thread(target=train)
    try:
        for t in (training_thread, explaining_thread):
            t.start()
        for t in (explaining_thread, training_thread):
            t.join()
    finally:
        hook.remove()
    return wrong, state["overlapped"], errors


def test_another_thread_gets_native_forward_and_gradients_while_one_explains():
    model = make_model()
    x, y = BATCHES[0]
    expected = training_step(model, x, y)
    inside, leave = threading.Event(), threading.Event()
    seen = {}

    def explainer():
        with torch_handler.deeplift_mode(model):
            seen["explainer active"] = is_active(model.lstm)
            inside.set()
            leave.wait(timeout=60)

    thread = threading.Thread(target=explainer)
    thread.start()
    assert inside.wait(timeout=60)
    try:
        assert current_explanation() is None and not is_active(model.lstm)
        assert same(training_step(model, x, y), expected)
        x_odd = torch.randn(3, 7, 3, dtype=torch.float64, requires_grad=True)
        model(x_odd).sum().backward()  # an odd batch: only torch's own forward accepts it
    finally:
        leave.set()
        thread.join()
    assert seen["explainer active"]


def test_a_training_loop_beside_shap_gets_exact_gradients():
    model = make_model()
    background, X = torch.randn(6, 7, 3, dtype=torch.float64), torch.randn(2, 7, 3, dtype=torch.float64)
    torch_handler.register()
    try:
        explainer = shap.DeepExplainer(model, background)
        wrong, overlapped, errors = run_beside(model, lambda: explainer.shap_values(X), explanations=4)
    finally:
        torch_handler.unregister()
    assert errors == []
    assert overlapped >= 4
    assert wrong == []


def test_a_training_loop_beside_captum_gets_exact_gradients():
    model = make_model()
    x, baseline = torch.randn(4, 7, 3, dtype=torch.float64), torch.zeros(4, 7, 3, dtype=torch.float64)
    # Captum hooks the module it is given: a forward pre-hook that appends the baselines to the
    # batch of *every* caller. Giving it a wrapper keeps Captum's own hooks off the shared model,
    # so what is tested is the recurrent layer, shared by both threads.
    wrapper = nn.Sequential(model)

    def explain_once():
        with torch_handler.deeplift_mode(wrapper):
            DeepLift(wrapper).attribute(x, baseline, target=0)

    wrong, overlapped, errors = run_beside(model, explain_once, explanations=40)
    assert errors == []
    assert overlapped >= 40
    assert wrong == []


def hook_counts(model):
    return {
        name: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks), len(m._backward_pre_hooks))
        for name, m in model.named_modules()
    }


def test_register_toggled_from_another_thread_never_leaks_shap_hooks():
    model = make_model()
    background, X = torch.randn(4, 7, 3, dtype=torch.float64), torch.randn(1, 7, 3, dtype=torch.float64)
    clean = hook_counts(model)
    stop = threading.Event()
    errors = []

    def toggle():
        i = 0
        while not stop.is_set():
            (torch_handler.register if i % 2 else torch_handler.unregister)()
            i += 1

    toggler = threading.Thread(target=toggle)
    toggler.start()
    try:
        with warnings.catch_warnings():
            # Calls that begin while unregistered are shap's own: its "unrecognized nn.Module"
            # warning, and ours when register() lands in the middle of such a call.
            warnings.simplefilter("ignore")
            for _ in range(60):
                try:
                    shap.DeepExplainer(model, background).shap_values(X, check_additivity=False)
                except Exception as error:
                    errors.append(error)
    finally:
        stop.set()
        toggler.join()
        torch_handler.unregister()
    assert hook_counts(model) == clean
    assert errors == []
