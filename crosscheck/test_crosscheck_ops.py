"""Torch op rules vs their JAX twins, element-wise, on >= 1000 random cases per run.

``torch_handler.ops.OP_RULES`` (the production rules, on ``(N, ...)`` operands and
``(2, N, ...)`` multipliers of both halves) against ``reference_jax.ops`` (float64, per pair,
vmapped over pairs and halves). The two share nothing but the op-rule contract; this file
only converts arrays.

Grid: every case of the op table ``reference_jax.ops.OP_SPECS`` (several parameter settings
for some ops; the cases are declared once, beside each op's twin) x its 2 shapes x 2 dtypes (float64,
float32) x 5 scenarios x 2 draws, each case ``N_PAIRS`` pairs. Scenarios: dense references;
tiny deltas (relative 1e-13 to 1e-5); actual == reference on about half the elements; large
magnitudes; the first operand broadcast (drawn with a size-1 axis and ``expand``-ed, as the
elementwise caller passes it). A case's error is normwise, as in ``pairing.relative_error``:
``max |torch − jax| / max |jax|`` over all operand multipliers of one pair and one half,
worst over the case's pairs and halves; bars 1e-10 (float64), 1e-5 (float32).

The torch side runs every case of one (op, shape, dtype) in one call and the oracle every
case of one (op, shape) in one call: one jit compilation per op and shape.
"""

from __future__ import annotations

import functools
import os
import zlib
from typing import NamedTuple

import jax
import numpy as np
import pytest
import torch
from pairing import TOLERANCE, relative_error

from reference_jax import ops as oracle_ops
from torch_handler import ops as torch_ops

SEED = int(os.environ.get("CROSSCHECK_SEED", "0"))  # a fixed grid by default; vary to explore
N_PAIRS = 3
DRAWS = 2
SCENARIOS = ("dense", "tiny", "some_equal", "large", "expanded")
LARGE = 10.0  # the "large" scenario's scale (positive operands: 5x this)
DTYPES = (torch.float64, torch.float32)


Operand = oracle_ops.Operand


class Config(NamedTuple):
    """One case of the op table (``reference_jax.ops.OP_SPECS``), drawn at each of its shapes."""

    id: str
    op: str
    shapes: tuple[tuple[Operand, ...], ...]  # one operand tuple per tested shape
    params: dict  # static params, and arrays (numpy, float64 or bool) shared by all pairs


CONFIGS = [Config(case.id, name, case.shapes, case.params) for name, spec in oracle_ops.OP_SPECS.items()
           for case in spec.cases]
CASES_PER_RUN = sum(len(c.shapes) for c in CONFIGS) * len(DTYPES) * len(SCENARIOS) * DRAWS


def test_every_op_is_crosschecked_and_the_grid_is_large_enough():
    assert {c.op for c in CONFIGS} == set(oracle_ops.OP_RULES) == set(torch_ops.OP_RULES)
    assert CASES_PER_RUN >= 1000


# --------------------------------------------------------------------------- data


def _draw(rng, operand: Operand, n: int, large: float = 1.0) -> np.ndarray:
    """Values of one operand for n pairs; ``large`` scales them (positive ones 5x more)."""
    shape = (n, *operand.shape)
    if operand.domain == "positive":
        return rng.uniform(0.2, 4.0, shape) * (5.0 * large if large > 1 else 1.0)
    # An exponent stays within ±~8, so that float32 multipliers of pow cannot overflow.
    scale = min(large, 2.0) if operand.domain == "exponent" else large
    if operand.domain == "away_from_zero":
        return scale * rng.choice([-1.0, 1.0], shape) * rng.uniform(0.3, 3.0, shape)
    return scale * (4.0 if operand.domain == "wide" else 1.0) * rng.standard_normal(shape)


def _expanded(rng, operand: Operand, n: int) -> np.ndarray:
    """Values constant along the first per-pair axis (drawn with size 1, then broadcast)."""
    small = _draw(rng, Operand((1, *operand.shape[1:]), operand.domain), n)
    return np.broadcast_to(small, (n, *operand.shape))


def _case(rng, operands: tuple[Operand, ...], scenario: str):
    """(actual, reference) per operand, float64 numpy, (N_PAIRS, *shape)."""
    actual, reference = [], []
    for k, operand in enumerate(operands):
        if scenario == "expanded" and k == 0:
            a, r = _expanded(rng, operand, N_PAIRS), _expanded(rng, operand, N_PAIRS)
        else:
            scale = LARGE if scenario == "large" else 1.0
            a, r = _draw(rng, operand, N_PAIRS, scale), _draw(rng, operand, N_PAIRS, scale)
        if scenario == "tiny":
            r = a * (1.0 + rng.choice([1e-13, 1e-10, 1e-7, 1e-5], a.shape) * rng.standard_normal(a.shape))
        if scenario == "some_equal":
            r = np.where(rng.random(a.shape) < 0.5, a, r)
        actual.append(a)
        reference.append(r)
    return actual, reference


class Batch(NamedTuple):
    """Every case of one (config, shape, dtype), concatenated along the pair axis."""

    dtype: torch.dtype
    actual: list  # torch tensors (N_total, *s_k); the first operand expanded where drawn so
    reference: list
    m: torch.Tensor  # (2, N_total, *s_out)
    scenarios: list  # per case


def _torch_operand(values: np.ndarray, dtype, expand: bool) -> torch.Tensor:
    if not expand:
        return torch.as_tensor(np.array(values), dtype=dtype)
    # Pass the expanded (stride-0) view itself, as the elementwise caller does.
    base = torch.as_tensor(np.array(values[:, :1]), dtype=dtype)
    return base.expand(values.shape)


def _batch(config: Config, shape_index: int, dtype) -> Batch:
    operands = config.shapes[shape_index]
    rng = np.random.default_rng(zlib.crc32(f"{config.id}-{shape_index}-{dtype}".encode()) + SEED)
    groups = {"actual": [[] for _ in operands], "reference": [[] for _ in operands]}
    scenarios = []
    for scenario in SCENARIOS:
        for _ in range(DRAWS):
            actual, reference = _case(rng, operands, scenario)
            for k in range(len(operands)):
                groups["actual"][k].append((actual[k], scenario == "expanded" and k == 0))
                groups["reference"][k].append((reference[k], scenario == "expanded" and k == 0))
            scenarios.append(scenario)

    def join(parts):
        return torch.cat([_torch_operand(v, dtype, expand) for v, expand in parts])

    actual = [join(parts) for parts in groups["actual"]]
    reference = [join(parts) for parts in groups["reference"]]
    out_shape = _output_shape(config, [a[0].double().numpy() for a in actual])
    m = torch.as_tensor(rng.standard_normal((2, actual[0].shape[0], *out_shape)), dtype=dtype)
    return Batch(dtype, actual, reference, m, scenarios)


def _output_shape(config: Config, operands_one_pair) -> tuple[int, ...]:
    static, arrays = _split_params(config.params)
    out = jax.eval_shape(lambda *xs: oracle_ops.OP_FORWARDS[config.op](*xs, **static, **arrays), *operands_one_pair)
    return tuple(out.shape)


def _split_params(params: dict):
    arrays = {k: v for k, v in params.items() if isinstance(v, np.ndarray)}
    static = {k: v for k, v in params.items() if not isinstance(v, np.ndarray)}
    return static, arrays


def _torch_params(params: dict, dtype) -> dict:
    static, arrays = _split_params(params)
    converted = {k: torch.as_tensor(v) if v.dtype == bool else torch.as_tensor(v, dtype=dtype)
                 for k, v in arrays.items()}
    return {**static, **converted}


def _oracle_params(params: dict, dtype) -> dict:
    """The parameters exactly as torch sees them (rounded to its dtype), in float64."""
    static, arrays = _split_params(params)
    converted = {k: v if v.dtype == bool else torch.as_tensor(v, dtype=dtype).double().numpy()
                 for k, v in arrays.items()}
    return {**static, **converted}


# --------------------------------------------------------------------------- comparison


def _to_numpy(t) -> np.ndarray:
    return t.detach().double().numpy()


def _torch_multipliers(rules, config: Config, batch: Batch):
    mults = rules[config.op](batch.m, tuple(batch.actual), tuple(batch.reference),
                             **_torch_params(config.params, batch.dtype))
    assert len(mults) == len(batch.actual)
    for mk, a in zip(mults, batch.actual, strict=True):
        assert mk.shape == (2, *a.shape), f"{config.op}: multiplier {tuple(mk.shape)}, operand {tuple(a.shape)}"
        assert mk.dtype == batch.dtype, f"{config.op}: multiplier dtype {mk.dtype}, operands {batch.dtype}"
    return [_to_numpy(mk) for mk in mults]


@functools.cache
def _oracle_batches(config_index: int, shape_index: int):
    """Both dtypes' batches for one (config, shape) and the oracle's multipliers for each;
    the two calls share one compilation (same shapes, parameters traced)."""
    config = CONFIGS[config_index]
    batches = [_batch(config, shape_index, dtype) for dtype in DTYPES]
    results = []
    for b in batches:
        out = oracle_ops.batched_op_multipliers(
            config.op, _to_numpy(b.m), tuple(_to_numpy(a) for a in b.actual),
            tuple(_to_numpy(r) for r in b.reference), **_oracle_params(config.params, b.dtype),
        )
        results.append([np.asarray(mk) for mk in out])
    return batches, results


def _case_errors(ours: list, expected: list, n_cases: int) -> np.ndarray:
    """Worst normwise error of each case (its N_PAIRS pairs x 2 halves), operands joined."""
    errors = np.zeros(n_cases)
    for case in range(n_cases):
        for pair in range(case * N_PAIRS, (case + 1) * N_PAIRS):
            for half in range(2):
                got = np.concatenate([mk[half, pair].ravel() for mk in ours])
                want = np.concatenate([mk[half, pair].ravel() for mk in expected])
                errors[case] = max(errors[case], relative_error(got, want))
    return errors


def _errors(config_index: int, shape_index: int, rules=None):
    """Per dtype: the case errors and scenarios of one (config, shape)."""
    batches, oracle = _oracle_batches(config_index, shape_index)
    rules = torch_ops.OP_RULES if rules is None else rules
    out = []
    for batch, expected in zip(batches, oracle, strict=True):
        ours = _torch_multipliers(rules, CONFIGS[config_index], batch)
        out.append((batch, _case_errors(ours, expected, len(batch.scenarios))))
    return out


@pytest.mark.parametrize("shape_index", [0, 1], ids=["shape0", "shape1"])
@pytest.mark.parametrize("config_index", range(len(CONFIGS)), ids=[c.id for c in CONFIGS])
def test_torch_rule_agrees_with_the_jax_twin(config_index, shape_index):
    for batch, errors in _errors(config_index, shape_index):
        tolerance = TOLERANCE[batch.dtype]
        worst = int(np.argmax(errors))
        assert errors[worst] <= tolerance, (
            f"{CONFIGS[config_index].id} {batch.dtype} scenario {batch.scenarios[worst]}: "
            f"{errors[worst]:.3g} > {tolerance:g}"
        )
        assert np.isfinite(errors).all()


# The ops whose torch rule has a compiled twin on the CPU (sdpa_rule_f64, softmax_rule_f64):
# the test above checks the twin (loaded by conftest.py); this checks the rule as torch ops too.
COMPILED_TWINS = ("softmax", "scaled_dot_product_attention")


@pytest.mark.parametrize("shape_index", [0, 1], ids=["shape0", "shape1"])
@pytest.mark.parametrize("config_index", [i for i, c in enumerate(CONFIGS) if c.op in COMPILED_TWINS],
                         ids=[c.id for c in CONFIGS if c.op in COMPILED_TWINS])
def test_torch_ops_path_of_a_compiled_rule_agrees_with_the_jax_twin(monkeypatch, config_index, shape_index):
    from torch_handler.recurrent import cpu_kernels
    from torch_handler.recurrent.fused_loops import ENV

    assert cpu_kernels.serving(torch.device("cpu")) is not None  # else the test above ran this path
    monkeypatch.setenv(ENV, "0")
    assert cpu_kernels.serving(torch.device("cpu")) is None
    test_torch_rule_agrees_with_the_jax_twin(config_index, shape_index)


# --------------------------------------------------------------------------- the crosscheck bites


def _config_index(id_: str) -> int:
    return next(i for i, c in enumerate(CONFIGS) if c.id == id_)


def test_a_changed_rule_is_caught():
    """Two plausible bugs, each made in the torch table only: the Shapley mean of mul's
    partner replaced by its actual value, and sigmoid's Rescale factor replaced by the
    gradient at the actual input (what a plain-gradient fallback gives). The comparison
    above must report both far above its bars."""
    original_mul = torch_ops.OP_RULES["mul"]

    def mul_with_actual_partner(m, actual, reference):
        (_, v_a), (u_r, _) = actual, reference
        return original_mul(m, actual, (u_r, v_a))[0], original_mul(m, actual, reference)[1]

    def sigmoid_gradient(m, actual, reference):
        (x_a,) = actual
        s = torch.sigmoid(x_a.double())
        return ((m.double() * s * (1 - s)).to(x_a.dtype),)

    broken = {**torch_ops.OP_RULES, "mul": mul_with_actual_partner, "sigmoid": sigmoid_gradient}
    for id_ in ("mul", "sigmoid"):
        healthy = _errors(_config_index(id_), 0)
        assert max(errors.max() for _, errors in healthy) <= TOLERANCE[torch.float32]
        for batch, errors in _errors(_config_index(id_), 0, rules=broken):
            dense = errors[[s == "dense" for s in batch.scenarios]]
            assert dense.max() > 1e-3, (id_, batch.dtype, dense)


def summary() -> list[tuple[str, str, int, float]]:
    """(config id, dtype, cases, worst error) over the whole grid, for the README table."""
    rows = []
    for config_index, config in enumerate(CONFIGS):
        worst = {dtype: (0, 0.0) for dtype in DTYPES}
        for shape_index in range(len(config.shapes)):
            for batch, errors in _errors(config_index, shape_index):
                n, w = worst[batch.dtype]
                worst[batch.dtype] = (n + len(errors), max(w, float(errors.max())))
        rows += [(config.id, str(dtype).removeprefix("torch."), *worst[dtype]) for dtype in DTYPES]
    return rows


if __name__ == "__main__":  # python crosscheck/test_crosscheck_ops.py: the table of worst errors
    table = summary()
    print(f"{len(CONFIGS)} op configurations, {sum(r[2] for r in table)} cases")
    print("| op | float64 worst | float32 worst |\n|---|---|---|")
    for i in range(0, len(table), 2):
        print(f"| {table[i][0]} | {table[i][3]:.1e} | {table[i + 1][3]:.1e} |")
