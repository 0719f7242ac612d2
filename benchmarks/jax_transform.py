"""reference_jax.deeplift(fn) against jax.grad of the same function, both jit-compiled, on CPU.

    python benchmarks/jax_transform.py [--batch 16] [--steps 100] [--hidden 128] [--layers 2]
                                       [--repeats 5] [--threads 1] [--out out]

The function: a plain-JAX ``lax.scan`` LSTM stack (torch's gate layout, float64) with a linear
read-out of the last hidden state, explained for a batch of (input, reference) pairs:
``jit(vmap(deeplift(fn)))(xs, refs)`` against ``jit(vmap(grad(fn)))(xs)``. Printed: the first
call (tracing + compilation + one run) and the steady state (median of ``--repeats`` calls,
the two variants interleaved so that load from other processes hits both alike), their ratio,
the command and the machine. ``--threads`` caps XLA's CPU threads (set before JAX loads).
The summation check of the explained batch is printed too (a benchmark asserts nothing).
"""

from __future__ import annotations

import os
import sys
import time


def _parse():
    from bench_common import base_parser

    parser = base_parser(__doc__.splitlines()[0], "pairs in the batch", 16)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    return parser.parse_args()


def main() -> None:
    args = _parse()
    if args.threads:  # before JAX initialises its CPU client
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                                   f"intra_op_parallelism_threads={args.threads}").strip()
    import jax
    import jax.numpy as jnp
    import numpy as np
    from bench_common import interleaved_times, machine, median, write_json

    import reference_jax

    if args.quick:
        args.samples, args.steps, args.hidden, args.features, args.repeats = 2, 5, 8, 3, 2
    B, T, H, F, L = args.samples, args.steps, args.hidden, args.features, args.layers
    rng = np.random.default_rng(args.seed)
    scale = 1.0 / np.sqrt(H)
    layers = [(rng.uniform(-scale, scale, (4 * H, F if layer == 0 else H)), rng.uniform(-scale, scale, (4 * H, H)),
               rng.uniform(-scale, scale, 4 * H)) for layer in range(L)]
    readout = rng.standard_normal(H)

    def fn(x):
        """x (T, F) -> scalar: an L-layer LSTM, read-out of the last hidden state."""
        seq = x
        for w_ih, w_hh, b in layers:
            def step(state, x_t, w_ih=w_ih, w_hh=w_hh, b=b):
                h, c = state
                i, f, g, o = jnp.split(w_ih @ x_t + w_hh @ h + b, 4)
                c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
                h = jax.nn.sigmoid(o) * jnp.tanh(c)
                return (h, c), h

            _, seq = jax.lax.scan(step, (jnp.zeros(H), jnp.zeros(H)), seq)
        return seq[-1] @ readout

    xs, refs = rng.standard_normal((B, T, F)), rng.standard_normal((B, T, F))
    transform = jax.jit(jax.vmap(reference_jax.deeplift(fn)))
    gradient = jax.jit(jax.vmap(jax.grad(fn)))
    calls = {"deeplift": lambda: jax.block_until_ready(transform(xs, refs)),
             "grad": lambda: jax.block_until_ready(gradient(xs))}

    first = {}
    for name, call in calls.items():
        start = time.perf_counter()
        call()
        first[name] = time.perf_counter() - start
    times = interleaved_times(calls, args.repeats, warmup=1, device=_Cpu())
    steady = {name: median(values) for name, values in times.items()}

    m = transform(xs, refs)
    fx, fr = jax.vmap(fn)(xs), jax.vmap(fn)(refs)
    gap = float(np.max(np.abs(np.sum((xs - refs) * m, axis=(1, 2)) - (fx - fr)) / np.maximum(np.abs(fx), np.abs(fr))))

    command = " ".join([os.path.basename(sys.executable), *sys.argv])
    info = machine() | {"jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", "")}
    print(f"command: {command}")
    print(f"machine: {info}")
    print(f"LSTM layers {L}, T {T}, H {H}, F {F}, {B} pairs, float64, CPU")
    print(f"first call (trace + compile + run): deeplift {first['deeplift']:.2f} s, grad {first['grad']:.2f} s, "
          f"ratio {first['deeplift'] / first['grad']:.2f}")
    print(f"steady state (median of {args.repeats}): deeplift {steady['deeplift'] * 1e3:.1f} ms, "
          f"grad {steady['grad'] * 1e3:.1f} ms, ratio {steady['deeplift'] / steady['grad']:.2f}")
    print(f"summation: max |Σ attributions − Δf| / max(|f(x)|, |f(r)|) = {gap:.2e}")
    path = write_json(args.out, "jax_transform", {
        "command": command, "machine": info, "sizes": dict(layers=L, steps=T, hidden=H, features=F, pairs=B),
        "first_call_s": first, "steady_s": steady, "times_s": times,
        "steady_ratio": steady["deeplift"] / steady["grad"], "first_call_ratio": first["deeplift"] / first["grad"],
        "summation_gap": gap,
    })
    print(f"wrote {path}")


class _Cpu:
    """The ``device`` interleaved_times synchronises (JAX calls above block themselves)."""

    type = "cpu"


if __name__ == "__main__":
    main()
