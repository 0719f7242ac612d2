"""torch_handler.ray.DeepShap on a local Ray cluster: the values of in-process deep_shap,
element-wise; an actor killed or raising part-way is retried and every row comes back once;
a model built on the worker; clear errors; the Parquet example; the core without ray.

One local cluster (2 CPUs, no dashboard) serves the module and is shut down after it. Ray's
workers are fresh processes (never forked from this one) and DeepShap sets one torch thread
per actor. Classes and functions of this module reach the workers pickled by value.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from ray import cloudpickle
from torch import nn

import torch_handler
from torch_handler.additivity import tolerance_for
from torch_handler.ray import DeepShap

REPO = Path(__file__).resolve().parents[1]
ROWS, T, F, H, S = 24, 6, 3, 8, 4
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # Ray Data's own context warns about its deprecated settings whenever it is copied.
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context"),
]
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Classifier(nn.Module):
    """LSTM -> Linear over the last step, 3 outputs; one more input optional (static features)."""

    def __init__(self, static: int = 0):
        super().__init__()
        self.lstm = nn.LSTM(F, H, batch_first=True)
        self.head = nn.Linear(H + static, 3)

    def forward(self, x, static=None):
        last = self.lstm(x)[0][:, -1]
        return self.head(last if static is None else torch.cat([last, static], -1))


def build_classifier(static: int = 0) -> nn.Module:
    """The builder the workers call: seeded weights, float64, in training mode on purpose
    (DeepShap must put it in eval mode)."""
    torch.manual_seed(0)
    return Classifier(static).double().train()


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(ROWS, T, F, generator=generator, dtype=torch.float64)
    references = 0.1 * torch.randn(S, T, F, generator=generator, dtype=torch.float64)
    static = torch.randn(ROWS, 2, generator=generator, dtype=torch.float64)
    static_references = torch.randn(S, 2, generator=generator, dtype=torch.float64)
    return x, references, static, static_references


def rows_dataset(columns: dict[str, np.ndarray], blocks: int = 4):
    """A Ray Dataset of ROWS rows with an ``id`` column, split into ``blocks`` blocks."""
    items = [{"id": i, **{name: array[i] for name, array in columns.items()}} for i in range(ROWS)]
    return ray.data.from_items(items, override_num_blocks=blocks)


def collect(dataset, *names: str) -> dict[str, np.ndarray]:
    """The dataset's rows in id order, after checking each id came back exactly once."""
    rows = dataset.take_all()
    ids = np.array([row["id"] for row in rows])
    assert sorted(ids.tolist()) == list(range(ROWS)), "rows lost or duplicated"
    order = np.argsort(ids)
    return {name: np.stack([rows[i][name] for i in order]) for name in names}


def assert_same_values(ray_values: np.ndarray, expected: torch.Tensor):
    expected = expected.numpy()
    assert ray_values.shape == expected.shape and ray_values.dtype == expected.dtype
    scale = np.abs(expected).max()
    np.testing.assert_allclose(ray_values, expected, rtol=0, atol=tolerance_for(expected.dtype) * scale)


def in_process(inputs, references, **kwargs):
    model = build_classifier(static=2 if isinstance(inputs, tuple) else 0).eval()
    return torch_handler.deep_shap(model, inputs, references, progress=False, **kwargs)


def test_ray_equals_in_process(cluster, data):
    """A module (pickled to each actor), 2 actors, 5 rows a call, each row's output index in a
    column: the values of in-process deep_shap with the per-input target tensor."""
    x, references, _, _ = data
    labels = np.arange(ROWS) % 3
    dataset = rows_dataset({"data": x.numpy(), "label": labels}).map_batches(
        DeepShap, fn_constructor_kwargs=dict(model=build_classifier(), references=references, target="label"),
        compute=ray.data.ActorPoolStrategy(size=2), batch_size=5)
    values = collect(dataset, "shap")
    assert_same_values(values["shap"], in_process(x, references, target=torch.as_tensor(labels)))


@pytest.mark.parametrize("options", [dict(target=1), dict(outputs="all"), dict(outputs=[2, 0])])
def test_a_call_equals_in_process(data, options):
    """The same conversion without Ray (what each actor runs): an int target, several outputs."""
    x, references, _, _ = data
    values = DeepShap(build_classifier(), references, **options)({"data": x.numpy()})["shap"]
    assert_same_values(values, in_process(x, references, **options))


def test_several_input_columns_and_a_builder(cluster, data):
    """column=("seq", "static") for a two-input model built on each worker by a callable."""
    x, references, static, static_references = data
    dataset = rows_dataset({"seq": x.numpy(), "static": static.numpy()}).map_batches(
        DeepShap,
        fn_constructor_kwargs=dict(model=lambda: build_classifier(static=2), column=("seq", "static"),
                                   references=(references, static_references), target=2),
        compute=ray.data.ActorPoolStrategy(size=1), batch_size=7)
    values = collect(dataset, "shap_seq", "shap_static")
    expected = in_process((x, static), (references, static_references), target=2)
    assert_same_values(values["shap_seq"], expected[0])
    assert_same_values(values["shap_static"], expected[1])


class FailsOnce(DeepShap):
    """DeepShap whose call on the batch holding row ``doomed`` fails the first time only, as
    ``failure``: "exit" kills the actor's process, "raise" raises TimeoutError. The marker file
    is created atomically (O_EXCL) by the one call that fails; later calls see it and go on."""

    def __init__(self, *, marker: str, failure: str, doomed: int, **kwargs):
        super().__init__(**kwargs)
        self.marker, self.failure, self.doomed = marker, failure, doomed

    def __call__(self, batch):
        if self.doomed in batch["id"]:
            try:
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pass
            else:
                if self.failure == "exit":
                    os._exit(1)
                raise TimeoutError("a transient failure, simulated once")
        result = super().__call__(batch)
        result["pid"] = np.full(len(batch["id"]), os.getpid())
        result["threads"] = np.full(len(batch["id"]), torch.get_num_threads())
        return result


@pytest.fixture
def retry_transient_errors():
    """Ray Data retries a map call whose error message matches (at most twice here); restored after."""
    context = ray.data.DataContext.get_current()
    saved = context.retried_map_errors, context.max_map_retries
    context.retried_map_errors, context.max_map_retries = ["a transient failure"], 2
    yield
    context.retried_map_errors, context.max_map_retries = saved


@pytest.mark.parametrize("failure", ["exit", "raise"])
def test_an_actor_failing_part_way_is_retried(cluster, data, tmp_path, failure, retry_transient_errors):
    """Row 13 of 24 (4 rows a call) fails once: killed (Ray Data's actors are restarted and
    their calls re-run by default: max_restarts=-1, max_task_retries=-1) or raising (retried
    because its message is listed in ``retried_map_errors``). Every row comes back once, with
    the values of an uninterrupted in-process run, from one-thread actors."""
    x, references, _, _ = data
    marker = tmp_path / "failed-once"
    dataset = rows_dataset({"data": x.numpy()}).map_batches(
        FailsOnce,
        fn_constructor_kwargs=dict(model=build_classifier(), references=references, target=0,
                                   marker=str(marker), failure=failure, doomed=13),
        compute=ray.data.ActorPoolStrategy(size=1), batch_size=4)
    values = collect(dataset, "shap", "pid", "threads")
    assert marker.exists(), "the failure never happened"
    assert_same_values(values["shap"], in_process(x, references, target=0))
    assert set(values["threads"].tolist()) == {1}
    pids = set(values["pid"].tolist())
    assert len(pids) == (2 if failure == "exit" else 1)  # a killed actor's process is replaced


def test_an_error_in_an_actor_reaches_the_driver(cluster, data):
    """A bad column name is not retried: the pipeline fails with DeepShap's message."""
    x, references, _, _ = data
    dataset = rows_dataset({"data": x.numpy()}).map_batches(
        DeepShap, fn_constructor_kwargs=dict(model=build_classifier(), references=references, column="windows"),
        compute=ray.data.ActorPoolStrategy(size=1), batch_size=8)
    with pytest.raises(Exception, match=r"the input column 'windows' is not in the batch.*\['data', 'id'\]"):
        dataset.take_all()


@pytest.fixture
def explainer(data):
    """A DeepShap made in this process (one thread, restored by the module's fixture)."""
    _, references, _, _ = data
    return DeepShap(build_classifier(), references, target=0)


def test_errors_name_the_problem(data, explainer):
    x, references, _, _ = data
    batch = {"data": x[:3].numpy(), "id": np.arange(3)}
    with pytest.raises(KeyError, match=r"the input column 'data' is not in the batch.*column=\.\.\."):
        explainer({"windows": batch["data"]})
    with pytest.raises(TypeError, match=r"'data' has dtype <U1: it must hold numbers"):
        explainer({"data": np.full((3, T, F), "a")})
    ragged = np.empty(2, dtype=object)
    ragged[:] = [np.zeros((T, F)), np.zeros((T - 1, F))]
    with pytest.raises(TypeError, match=r"has dtype object: its rows differ in shape"):
        explainer({"data": ragged})
    with pytest.raises(ValueError, match=r"rows of shape \(6, 2\), the references \(6, 3\)"):
        explainer({"data": batch["data"][..., :2]})
    with pytest.raises(ValueError, match=r"output column 'shap' is already in the batch"):
        explainer({**batch, "shap": batch["data"]})
    with pytest.raises(TypeError, match=r"dict of numpy arrays, got list.*batch_format='numpy'"):
        explainer([batch])
    with pytest.raises(TypeError, match=r"returned int, not an nn.Module"):
        DeepShap(lambda: 3, references)
    with pytest.raises(TypeError, match=r"references must be floating point.*torch.int64"):
        DeepShap(build_classifier(), references.long())
    with pytest.raises(ValueError, match=r"1 reference tensors for 2 input columns"):
        DeepShap(build_classifier(2), references, column=("a", "b"))
    with pytest.raises(TypeError, match=r"per-row targets go in a column"):
        DeepShap(build_classifier(), references, target=torch.tensor([0, 1]))
    with pytest.raises(TypeError, match=r"the target column 'label' must hold one integer output index per row"):
        DeepShap(build_classifier(), references, target="label")({**batch, "label": np.zeros(3)})


def test_numeric_columns_take_the_references_dtype(data, explainer):
    """An integer (one-hot-like) column is computed in the references' float64: the values of
    the float64 column."""
    _, references, _, _ = data
    ints = np.random.default_rng(0).integers(0, 2, size=(4, T, F)).astype(np.uint8)
    values = explainer({"data": ints})["shap"]
    expected = in_process(torch.as_tensor(ints, dtype=torch.float64), references, target=0)
    assert_same_values(values, expected)


def test_the_callers_model_is_left_as_found(data):
    _, references, _, _ = data
    model = build_classifier()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    explainer = DeepShap(model, references, target=0)
    assert not explainer.model.training  # the actor's copy explains in eval mode
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_parquet_example(cluster, tmp_path):
    """examples/ray_parquet.py, small: Parquet in, Parquet out, equal to in-process deep_shap."""
    spec = importlib.util.spec_from_file_location("ray_parquet_example", REPO / "examples" / "ray_parquet.py")
    example = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = example  # importable by name, so cloudpickle can send it by value
    spec.loader.exec_module(example)
    cloudpickle.register_pickle_by_value(example)
    windows = example.make_inputs(40)
    weights = example.save_model(tmp_path / "model.pt")
    inputs = example.write_inputs(tmp_path / "inputs", windows, files=2)
    references = example.make_references()
    output = example.explain(inputs, tmp_path / "shap", weights, references, actors=1, rows_per_call=16)
    table = ray.data.read_parquet(str(output)).to_pandas().sort_values("id")
    assert table["id"].tolist() == list(range(40))
    values = np.stack(table["shap"].to_list())
    expected = torch_handler.deep_shap(example.load_forecaster(str(weights)).eval(), torch.as_tensor(windows),
                                       references, progress=False)
    assert_same_values(values, expected)


def test_the_core_never_imports_ray():
    """Importing torch_handler and explaining in-process loads no ray module; only
    torch_handler/ray.py mentions it."""
    script = textwrap.dedent("""
        import sys
        import torch, torch_handler
        model = torch.nn.Sequential(torch.nn.Linear(3, 2))
        torch_handler.deep_shap(model, torch.randn(4, 3), torch.zeros(2, 3), target=0, progress=False)
        loaded = sorted(m for m in sys.modules if m == "ray" or m.startswith("ray."))
        assert not loaded, loaded
    """)
    subprocess.run([sys.executable, "-c", script], check=True)
    package = Path(torch_handler.__file__).parent
    importing = [p.name for p in package.rglob("*.py") if "import ray" in p.read_text() and p.name != "ray.py"]
    assert importing == []
