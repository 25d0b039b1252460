"""Benchmarks of harness on this machine (a benchmark, not a test: figures are printed, nothing is asserted).

    python scripts/bench.py              # everything (several minutes on 2 CPU cores)
    python scripts/bench.py --only default,grid
    python scripts/bench.py --json bench.json

Sections (each prints ratios measured side by side in this one run, since shared machines are noisy):
  pytorch   the hand-written sequential PyTorch reference (scripts/torch_reference.py: the default suite's runs on
            the reference job, one plain training loop after another) as a fresh process, when torch is installed;
            the default and models sections print their ratios to it beside the issue's 18 s figure (with both
            sections, it is measured again before the models section, whose ratios use that measurement)
  paired    rounds of three fresh processes back to back: the PyTorch reference, the default run cold (its own
            empty cache) and warm; each round's ratios to PyTorch, since the machine's speed drifts between
            sections (needs torch)
  machine   float32 matmul FLOP/s of this machine (the roofline the training programs are compared against)
  default   the whole default `harness` run as a fresh process, cold (empty JAX compilation cache) and warm, with
            its compile share and each program's compile vs run seconds (from report.json)
  models    the default run on the reference MLP, the built-in MLP at depth 20 and the built-in CNN on 8x8 digits
            images (each also with budget=60), cold and warm, with compile share and the ratios to the reference MLP
            and to PyTorch; with torch installed, the deep MLP's and the CNN's full suites written in sequential
            PyTorch too, and harness's runs as a fraction of those
  grid      the LR grid (32 LRs x 200 steps, reference job) vmapped in one program vs the same jitted training
            called once per LR; achieved FLOP/s of the vmapped program (XLA's cost analysis / run time)
  floor     the LR grid written by hand in plain JAX (no harness engine) and the import time of jax, flax and
            optax: with the default run's training time, a floor for a warm run on this machine
  monitor   the training monitor's overhead (harness.monitor) on a user's own jitted scan loop, plain vs monitored
  sweep     a 16-point sweep (4 learning rates x 4 seeds) of the reference job three ways: collapsed into vmapped
            programs, the same sweep with collapse=false, and one process per point (a shell loop, as job arrays
            and sweep agents do)
  families  the default run on the reference job written in each model library (tests/families.py: the built-in
            NNX MLP, Flax Linen, Equinox, Haiku) as fresh processes, cold (each its own empty cache) and warm
            (median of three, interleaved across families): wall, compile and run seconds and traces reused

Reference figure (measured by the issue's author on 2 CPU cores): the same five training diagnostics written by
hand in sequential PyTorch take about 16 s (18 s as a process). This machine's own figure comes from the pytorch
section (`pip install torch --index-url https://download.pytorch.org/whl/cpu`, the CPU wheel; torch is not a
dependency of harness).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTORCH_PROCESS_SECONDS = 18.0  # the issue's figure, as a process on 2 cores


def harness_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "harness", *args]


def run_process(args: list[str], cwd: str, cache_dir: str, timeout: float = 1800,
                extra_env: dict[str, str] | None = None) -> float:
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache_dir, WANDB_MODE=os.environ.get("WANDB_MODE", "offline"),
               WANDB_SILENT="true", **(extra_env or {}))
    start = time.perf_counter()
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return elapsed


def bench_pytorch(workdir: str, model: str = "mlp") -> dict | None:
    """The sequential PyTorch reference as a fresh process (None without torch): wall seconds, and its own
    seconds per diagnostic. ``model``: the reference MLP, or another of torch_reference.MODELS."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return None
    out = os.path.join(workdir, "torch.json")
    seconds = run_process([sys.executable, os.path.join(REPO, "scripts", "torch_reference.py"), "--json", out,
                           "--model", model], workdir, os.path.join(workdir, "unused-cache"))
    with open(out) as f:
        return {"process_seconds": seconds, "parts": json.load(f)}


def bench_paired(workdir: str, rounds: int = 2) -> list[dict] | None:
    """``rounds`` rounds of the PyTorch reference, then the default run cold (an empty cache of its own), then warm
    (that cache), as fresh processes back to back: a ratio within a round is measured minutes apart, where the
    sections of one bench run can be an hour apart on a machine whose speed drifts by 1.5x. None without torch."""
    out = []
    for i in range(rounds):
        pytorch = bench_pytorch(workdir)
        if pytorch is None:
            return None
        cache = os.path.join(workdir, f"jax-cache-paired-{i}")
        shutil.rmtree(cache, ignore_errors=True)
        cold = run_process(harness_command("logger=none"), workdir, cache)
        warm = run_process(harness_command("logger=none"), workdir, cache)
        out.append(dict(pytorch_seconds=pytorch["process_seconds"], cold_seconds=cold, warm_seconds=warm))
    return out


def torch_ratios(seconds: float, pytorch: dict | None) -> str:
    """`seconds` as a fraction of the PyTorch reference: measured here (when it was) and the issue's figure."""
    here = "" if pytorch is None else f"{seconds / pytorch['process_seconds']:.2f}x measured here, "
    return f"{here}{seconds / PYTORCH_PROCESS_SECONDS:.2f}x the issue's {PYTORCH_PROCESS_SECONDS:.0f} s"


def latest_report(cwd: str) -> dict:
    reports = []
    for root, _, files in os.walk(os.path.join(cwd, "outputs")):
        if "report.json" in files:
            path = os.path.join(root, "report.json")
            reports.append((os.path.getmtime(path), path))
    with open(max(reports)[1]) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------------------------


def bench_machine() -> dict:
    import jax
    import jax.numpy as jnp

    n = 2048
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    reps, best = 10, float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(reps):
            out = f(a)
        out.block_until_ready()
        best = min(best, (time.perf_counter() - start) / reps)
    return {"matmul_gflops": 2 * n**3 / best / 1e9}


def bench_default(workdir: str) -> dict:
    """The default run cold and warm, plus ablations side by side: cold without the traced-program cache, and warm
    (medians of three) with every program traced again (engine.program_cache=false) and with one CPU device per
    core (engine.cpu_devices=<cores>)."""
    cache = os.path.join(workdir, "jax-cache")
    shutil.rmtree(cache, ignore_errors=True)
    cold = run_process(harness_command(), workdir, cache)
    cold_report = latest_report(workdir)
    # Cold without the traced-program cache (its own empty cache directory): what storing the programs costs.
    untraced_cache = os.path.join(workdir, "jax-cache-no-programs")
    cold_without_programs = run_process(harness_command("engine.program_cache=false"), workdir, untraced_cache)
    warm_runs = [run_process(harness_command(), workdir, cache) for _ in range(3)]
    warm_report = latest_report(workdir)
    ablations = {}
    cores = min(len(os.sched_getaffinity(0)), 8)
    for label, override in (("every program traced again (engine.program_cache=false)", "engine.program_cache=false"),
                            (f"{cores} CPU devices (one per core)", f"engine.cpu_devices={cores}")):
        run_process(harness_command(override), workdir, cache)  # fills the cache for its own programs
        ablations[label] = sorted(run_process(harness_command(override), workdir, cache) for _ in range(3))[1]
    return {
        "cold_seconds": cold,
        "cold_without_program_cache_seconds": cold_without_programs,
        "warm_seconds": sorted(warm_runs)[1],  # the median of three
        "warm_runs": warm_runs,
        "warm_ablations": ablations,
        "status": cold_report["status"],
        "cold_programs": cold_report["programs"],
        "warm_programs": warm_report["programs"],
        "cold_in_process_seconds": cold_report["seconds"],
        "diagnostic_seconds": {k: v["seconds"] for k, v in cold_report["diagnostics"].items()},
    }


def bench_grid() -> dict:
    import numpy as np
    import optax

    from harness import losses
    from harness.data import builtin, dataset
    from harness.engine import compile as programs
    from harness.engine.core import Arrays, Hparams, Problem, TrainSpec
    from harness.engine.driver import train_members
    from harness.models.adapters import ModelFactory
    from harness.models.mlp import MLP
    from harness.optim import OptimSpec
    from harness.tasks import Task

    ds = dataset.from_mapping(builtin.digits())
    arrays = Arrays(*ds.training_arrays())
    model = ModelFactory(MLP, dict(width=128, depth=2), ds.input_shape, 10, ds.x_train[:2]).adapt()
    problem = Problem(model, losses.cross_entropy, OptimSpec(optax.adam), Task(10, ()))
    spec = TrainSpec(steps=200, batch_size=128)
    lrs = np.logspace(-5, 0, 32)

    def timed(fn):
        c0, cs0, rs0 = programs.STATS.compiles, programs.STATS.compile_seconds, programs.STATS.run_seconds
        start = time.perf_counter()
        fn()
        return {"seconds": time.perf_counter() - start, "compiles": programs.STATS.compiles - c0,
                "compile_seconds": programs.STATS.compile_seconds - cs0,
                "run_seconds": programs.STATS.run_seconds - rs0}

    vmapped = timed(lambda: train_members(problem, spec, Hparams.make(lr=lrs), arrays, name="grid_vmapped"))
    looped = timed(lambda: [train_members(problem, spec, Hparams.make(lr=[lr]), arrays, name="grid_loop")
                            for lr in lrs])
    # Achieved model FLOP/s of the vmapped program, by the usual 6 x weights x examples count for a training step
    # of a dense network (forward 2, backward 4). XLA's cost analysis counts a loop body once, so it cannot be used
    # for a scan directly.
    weights = 64 * 128 + 128 * 128 + 128 * 10
    flops = 6 * weights * spec.batch_size * spec.steps * len(lrs)
    return {"vmapped": vmapped, "loop": looped, "program_flops": flops,
            "achieved_gflops": flops / vmapped["run_seconds"] / 1e9}


def _mlp_loss(params, x, y):
    """Cross-entropy of a ReLU MLP given as [(kernel, bias), ...]: the hand-written JAX of the floor and monitor
    sections."""
    import jax
    import optax

    h = x
    for i, (w, b) in enumerate(params):
        h = h @ w + b
        h = jax.nn.relu(h) if i < len(params) - 1 else h
    return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()


def bench_floor() -> dict:
    """What the machine allows whatever the implementation: the LR grid's training written by hand in plain JAX
    (no harness engine: no NNX, no non-finite masking, no evaluation) as one jitted, vmapped scan, and the time a
    fresh process needs just to import jax, flax.nnx and optax. The default run's sequential training time scaled
    by (engine / plain-JAX throughput), plus that import time, is a floor for a warm run on this machine."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    sizes, batch, steps, members = (64, 128, 128, 10), 128, 200, 32
    x_all = jax.random.normal(jax.random.key(0), (1348, 64))
    y_all = jax.random.randint(jax.random.key(1), (1348,), 0, 10)

    loss_fn = _mlp_loss
    def train(lr, key):
        keys = jax.random.split(key, len(sizes) - 1)
        params = [(jax.random.normal(k, (a, b)) / np.sqrt(a), jnp.zeros(b))
                  for k, a, b in zip(keys, sizes[:-1], sizes[1:])]
        tx = optax.adam(lr)

        def step(carry, t):
            params, opt_state = carry
            idx = jax.random.randint(jax.random.fold_in(key, t), (batch,), 0, x_all.shape[0])
            loss, grads = jax.value_and_grad(loss_fn)(params, x_all[idx], y_all[idx])
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        return jax.lax.scan(step, (params, tx.init(params)), jnp.arange(steps))[1]

    lrs, keys = jnp.logspace(-5, 0, members), jax.random.split(jax.random.key(2), members)
    program = jax.jit(jax.vmap(train)).lower(lrs, keys).compile()
    program(lrs, keys).block_until_ready()
    run = min(_timed(lambda: program(lrs, keys).block_until_ready()) for _ in range(3))
    flops = 6 * sum(a * b for a, b in zip(sizes[:-1], sizes[1:])) * batch * steps * members
    imports = sorted(_timed(lambda: subprocess.run([sys.executable, "-c", "import jax, flax.nnx, optax"],
                                                   check=True)) for _ in range(3))[1]
    return {"plain_jax_grid_seconds": run, "plain_jax_gflops": flops / run / 1e9, "import_seconds": imports}


def bench_monitor() -> dict:
    """The training monitor's overhead on a user's own loop (harness.monitor): the reference MLP (64-128-128-10)
    trained with Adam as one jitted lax.scan of 500 steps, batch 128, with and without ``hm.monitor`` around the
    optimizer (the loss passed as ``value=``), best of seven runs each, interleaved; also a depth-8 MLP, where the
    per-leaf statistics are more leaves per FLOP, and a wide one (three hidden layers of 1024), where they are
    fewer per FLOP. Each with the default statistics and with ``update_norms=True``. The reads between chunks are
    one transfer per chunk and are not timed."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import harness.monitor as hm

    batch, steps = 128, 500
    x_all = jax.random.normal(jax.random.key(0), (1348, 64))
    y_all = jax.random.randint(jax.random.key(1), (1348,), 0, 10)
    out = {}
    for label, sizes in (("reference", (64, 128, 128, 10)), ("depth8", (64,) + (128,) * 8 + (10,)),
                         ("wide", (64, 1024, 1024, 1024, 10))):
        keys = jax.random.split(jax.random.key(2), len(sizes) - 1)
        params = [(jax.random.normal(k, (a, b)) / np.sqrt(a), jnp.zeros(b))
                  for k, a, b in zip(keys, sizes[:-1], sizes[1:])]

        def program(tx):
            def train(params):
                def step(carry, t):
                    params, opt_state = carry
                    idx = jax.random.randint(jax.random.fold_in(jax.random.key(3), t), (batch,), 0, 1348)
                    loss, grads = jax.value_and_grad(_mlp_loss)(params, x_all[idx], y_all[idx])
                    updates, opt_state = tx.update(grads, opt_state, params, value=loss)
                    return (optax.apply_updates(params, updates), opt_state), loss

                return jax.lax.scan(step, (params, tx.init(params)), jnp.arange(steps))

            compiled = jax.jit(train).lower(params).compile()
            jax.block_until_ready(compiled(params))
            return compiled

        plain = program(optax.with_extra_args_support(optax.adam(1e-3)))
        programs = {"plain": plain, "monitored": program(hm.monitor(optax.adam(1e-3))),
                    "update_norms": program(hm.monitor(optax.adam(1e-3), update_norms=True))}
        times = {k: [] for k in programs}
        for _ in range(7):
            for k, compiled in programs.items():
                times[k].append(_timed(lambda: jax.block_until_ready(compiled(params))))
        out[label] = {k: min(v) for k, v in times.items()}
        out[label]["overhead"] = out[label]["monitored"] / out[label]["plain"] - 1
        out[label]["overhead_update_norms"] = out[label]["update_norms"] / out[label]["plain"] - 1
    return out


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_sweep(workdir: str) -> dict:
    cache = os.path.join(workdir, "jax-cache-sweep")
    lrs, seeds = ["3e-4", "1e-3", "3e-3", "1e-2"], ["0", "1", "2", "3"]
    common = ["logger=none"]
    # Warm the persistent cache once so all three ways compare execution strategies, not first compiles.
    run_process(harness_command(*common), workdir, cache)
    out = {}
    shutil.rmtree(os.path.join(workdir, "multirun"), ignore_errors=True)
    out["collapsed_seconds"] = run_process(
        harness_command("-m", *common, f"optim.lr={','.join(lrs)}", f"seed={','.join(seeds)}"), workdir, cache)
    shutil.rmtree(os.path.join(workdir, "multirun"), ignore_errors=True)
    out["uncollapsed_seconds"] = run_process(
        harness_command("-m", *common, "collapse=false", f"optim.lr={','.join(lrs)}", f"seed={','.join(seeds)}"),
        workdir, cache)
    start = time.perf_counter()
    for lr in lrs:
        for seed in seeds:
            run_process(harness_command(*common, f"optim.lr={lr}", f"seed={seed}"), workdir, cache)
    out["process_per_point_seconds"] = time.perf_counter() - start
    return out


# The default suite on deeper and convolutional models (issue: within 3x of the reference MLP's wall time, compile
# share below half), beside the reference job itself.
MODELS = {
    "reference": [],
    "mlp_depth20": ["model.depth=20"],
    "mlp_depth20_b60": ["model.depth=20", "budget=60"],
    "cnn_b60": ["data=digits_image", "model=cnn", "budget=60"],
    "cnn": ["data=digits_image", "model=cnn"],
}
COLD_ONLY = {"cnn"}  # the CNN's full suite takes minutes on 2 cores: measured once
# The models whose full suite scripts/torch_reference.py also writes by hand: the same runs in sequential PyTorch,
# so a model's cost to harness is read beside its cost to a practitioner's loop (a 20-layer MLP has 12x the
# reference MLP's FLOPs per example, the CNN 23x: no engine trains them in the reference's time).
TORCH_MODELS = {"mlp_depth20": "mlp_depth20", "cnn": "cnn"}


def bench_models(workdir: str, warm_runs: int = 2, names: list[str] | None = None) -> dict:
    """The default run on each of MODELS as a fresh process: cold (its own empty cache), then ``warm_runs`` warm
    rounds through the models in turn (the fastest is reported: these machines are noisy and a warm run cannot be
    slower than the machine allows; COLD_ONLY models are measured cold only). Compile share: seconds spent
    compiling over the in-process seconds."""
    out = {}

    def one(name: str) -> tuple[float, dict]:
        cache = os.path.join(workdir, f"jax-cache-model-{name}")
        seconds = run_process(harness_command("logger=none", *MODELS[name]), workdir, cache)
        return seconds, latest_report(workdir)

    names = list(MODELS) if names is None else names
    for name in names:
        shutil.rmtree(os.path.join(workdir, f"jax-cache-model-{name}"), ignore_errors=True)
        seconds, report = one(name)
        out[name] = dict(cold_seconds=seconds, status=report["status"], cold_programs=report["programs"],
                         cold_in_process_seconds=report["seconds"], warm_runs=[], warm_in_process=[],
                         warm_compile=[])
    for _ in range(warm_runs):
        for name in names:
            if name in COLD_ONLY:
                continue
            seconds, report = one(name)
            out[name]["warm_runs"].append(seconds)
            out[name]["warm_in_process"].append(report["seconds"])
            out[name]["warm_compile"].append(report["programs"]["compile_wall_seconds"])
    for r in out.values():
        r["cold_compile_share"] = (r["cold_programs"]["compile_wall_seconds"]
                                   / max(r["cold_in_process_seconds"], 1e-9))
        if not r["warm_runs"]:
            r.update(warm_seconds=float("nan"), warm_compile_share=float("nan"))
            continue
        best = min(range(len(r["warm_runs"])), key=r["warm_runs"].__getitem__)
        r["warm_seconds"] = r["warm_runs"][best]
        r["warm_compile_share"] = r["warm_compile"][best] / max(r["warm_in_process"][best], 1e-9)
    return out


# The reference job's MLP (64-128-128-10, ReLU) in each model library: harness's built-in NNX model and the
# factories of tests/families.py, as a user would write them. `width` is a config key in each, so the capacity
# ladder runs for every family (the built-in model's ladder is width-masked: two programs; the others, the same MLP
# written by a user in NNX included, train one program per width).
FAMILIES = {
    "nnx": [],
    "nnx_user": ["~model", "+model={_target_:families.NNXMLP,width:128,depth:2}"],
    "linen": ["~model", "+model={_target_:families.linen_mlp,width:128,depth:2}"],
    "equinox": ["~model", "+model={_target_:families.equinox_mlp,width:128,depth:2}"],
    "haiku": ["~model", "+model={_target_:families.haiku_mlp,width:128,depth:2}"],
}


def bench_families(workdir: str, warm_runs: int = 3) -> dict:
    """The default run per family as fresh processes: cold (each family its own empty cache), then warm rounds
    that go through the families in turn, so a noisy hour weighs on all of them alike. Compile and run seconds
    come from each process's report.json (run seconds: the programs' execution: the family's own compute)."""
    tests = os.path.join(REPO, "tests")
    extra_env = {"PYTHONPATH": os.pathsep.join(p for p in (tests, REPO, os.environ.get("PYTHONPATH")) if p)}
    out = {family: {"warm_runs": [], "warm_reports": []} for family in FAMILIES}

    def one(family: str) -> tuple[float, dict]:
        cache = os.path.join(workdir, f"jax-cache-family-{family}")
        seconds = run_process(harness_command(*FAMILIES[family]), workdir, cache, extra_env=extra_env)
        return seconds, latest_report(workdir)

    for family in FAMILIES:
        shutil.rmtree(os.path.join(workdir, f"jax-cache-family-{family}"), ignore_errors=True)
        seconds, report = one(family)
        out[family].update(cold_seconds=seconds, cold_programs=report["programs"], status=report["status"],
                           cold_in_process_seconds=report["seconds"])
    for _ in range(warm_runs):
        for family in FAMILIES:
            seconds, report = one(family)
            out[family]["warm_runs"].append(seconds)
            out[family]["warm_reports"].append(report)
    for family, r in out.items():
        order = sorted(range(len(r["warm_runs"])), key=r["warm_runs"].__getitem__)
        median = order[len(order) // 2]
        r["warm_seconds"] = r["warm_runs"][median]
        r["warm_programs"] = r.pop("warm_reports")[median]["programs"]
    return out


# ---------------------------------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only",
                        default="pytorch,paired,machine,default,models,grid,floor,monitor,sweep,families")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--model-warm-runs", type=int, default=2, help="warm rounds of the models section")
    parser.add_argument("--models", default=None,
                        help=f"comma-separated models of the models section (default all: {','.join(MODELS)})")
    args = parser.parse_args()
    only = set(args.only.split(","))
    workdir = tempfile.mkdtemp(prefix="harness-bench-")
    results = {}
    pytorch = None
    if "pytorch" in only:
        pytorch = results["pytorch"] = bench_pytorch(workdir)
        if pytorch is None:
            print("pytorch: not measured (torch is not installed); ratios are to the issue's figure alone, "
                  f"{PYTORCH_PROCESS_SECONDS:.0f} s as a process")
        else:
            parts = ", ".join(f"{k} {v:.1f} s" for k, v in pytorch["parts"].items() if k != "total")
            print(f"pytorch: the default suite's runs in sequential PyTorch take {pytorch['process_seconds']:.1f} s "
                  f"as a process here ({pytorch['parts']['total']:.1f} s training: {parts}); the issue's figure "
                  f"is {PYTORCH_PROCESS_SECONDS:.0f} s")
    if "paired" in only:
        rounds = results["paired"] = bench_paired(workdir)
        if rounds is None:
            print("paired: not measured (torch is not installed)")
        else:
            print("paired: the default run beside the PyTorch reference, round by round, as fresh processes "
                  "(targets: cold 0.50x, warm 0.35x)")
            for i, r in enumerate(rounds):
                print(f"  round {i + 1}: PyTorch {r['pytorch_seconds']:.1f} s, harness cold {r['cold_seconds']:.1f} s "
                      f"({r['cold_seconds'] / r['pytorch_seconds']:.2f}x), warm {r['warm_seconds']:.1f} s "
                      f"({r['warm_seconds'] / r['pytorch_seconds']:.2f}x)")
    if "machine" in only:
        results["machine"] = bench_machine()
        print(f"machine: float32 matmul {results['machine']['matmul_gflops']:.0f} GFLOP/s")
    if "default" in only:
        d = results["default"] = bench_default(workdir)
        cp = d["cold_programs"]
        print(f"default run ({d['status']}): cold {d['cold_seconds']:.1f} s, warm {d['warm_seconds']:.1f} s "
              f"(median of {len(d['warm_runs'])}) as a fresh process; {cp['compiles']} compiles, "
              f"{cp.get('compile_wall_seconds', cp['compile_seconds']):.1f} s of the cold run compiling")
        print(f"  vs sequential PyTorch as a process: cold {torch_ratios(d['cold_seconds'], pytorch)}; warm "
              f"{torch_ratios(d['warm_seconds'], pytorch)} (targets: 0.50x cold, 0.35x warm)")
        print(f"  cold without the traced-program cache (engine.program_cache=false): "
              f"{d['cold_without_program_cache_seconds']:.1f} s")
        for label, seconds in d["warm_ablations"].items():
            print(f"  warm with {label}: {seconds:.1f} s ({seconds / d['warm_seconds']:.2f}x the default's time)")
        print(f"  cold, per program (in-process wall time {d['cold_in_process_seconds']:.1f} s):")
        for name, p in sorted(cp["by_program"].items()):
            print(f"  {name:28s} compiles {int(p['compiles'])}  compile {p['compile_seconds']:6.2f} s  "
                  f"run {p['run_seconds']:6.2f} s")
        for name, seconds in d["diagnostic_seconds"].items():
            print(f"  diagnostic {name:16s} {seconds:6.2f} s")
    if "models" in only:
        chosen = None if args.models is None else ["reference", *(n for n in args.models.split(",") if n != "reference")]
        if chosen is not None and set(chosen) - set(MODELS):
            parser.error(f"--models: unknown {sorted(set(chosen) - set(MODELS))}; known: {', '.join(MODELS)}")
        if pytorch is None and results.get("paired"):
            pytorch = {"process_seconds": results["paired"][-1]["pytorch_seconds"]}  # the paired section's last
        if pytorch is not None and "default" in only:
            # Measured again beside this section: these machines' speed drifts by 1.5x within an hour.
            pytorch = results["pytorch_beside_models"] = bench_pytorch(workdir)
            print(f"pytorch, measured again beside the models section: {pytorch['process_seconds']:.1f} s")
        m = results["models"] = bench_models(workdir, args.model_warm_runs, chosen)
        ref = m["reference"]
        torch_seconds = PYTORCH_PROCESS_SECONDS if pytorch is None else pytorch["process_seconds"]
        source = "the issue's figure" if pytorch is None else "measured here"
        print(f"models: the default suite as a fresh process (sequential PyTorch on the reference job: "
              f"{torch_seconds:.1f} s, {source}; "
              f"targets: each within 3x of the reference MLP, compile share < 1/2)")
        print(f"  {'model':16s} {'status':9s} {'cold s':>7s} {'/ref':>5s} {'compile':>8s} {'compiles':>8s}   "
              f"{'warm s':>7s} {'/ref':>5s} {'compile':>8s}   {'cold/torch':>10s} {'warm/torch':>10s}")
        for name, r in m.items():
            print(f"  {name:16s} {r['status']:9s} {r['cold_seconds']:7.1f} "
                  f"{r['cold_seconds'] / ref['cold_seconds']:5.2f} {r['cold_compile_share']:8.0%} "
                  f"{r['cold_programs']['compiles']:8d}   {r['warm_seconds']:7.1f} "
                  f"{r['warm_seconds'] / ref['warm_seconds']:5.2f} {r['warm_compile_share']:8.0%}   "
                  f"{r['cold_seconds'] / torch_seconds:10.2f} {r['warm_seconds'] / torch_seconds:10.2f}")
        own = {name: bench_pytorch(workdir, TORCH_MODELS[name]) for name in m if name in TORCH_MODELS}
        own = {name: t for name, t in own.items() if t is not None}
        if own:
            results["pytorch_per_model"] = own
            print("  the same model's suite in sequential PyTorch (scripts/torch_reference.py --model), measured "
                  "after the runs above; harness's runs as a fraction of it:")
            for name, t in own.items():
                r, seconds = m[name], t["process_seconds"]
                warm = f", warm {r['warm_seconds'] / seconds:.2f}x" if r["warm_runs"] else ""
                print(f"  {name:16s} PyTorch {seconds:7.1f} s ({seconds / torch_seconds:.1f}x the reference "
                      f"job's); harness cold {r['cold_seconds'] / seconds:.2f}x{warm}")
    if "grid" in only:
        g = results["grid"] = bench_grid()
        v, lp = g["vmapped"], g["loop"]
        print(f"LR grid, 32 LRs x 200 steps: vmapped {v['seconds']:.2f} s ({v['compiles']} compile, "
              f"{v['compile_seconds']:.2f} s compiling) vs one jitted run per LR {lp['seconds']:.2f} s "
              f"({lp['compiles']} compile): {lp['seconds'] / v['seconds']:.1f}x faster vmapped "
              f"({lp['run_seconds'] / v['run_seconds']:.1f}x on run time alone)")
        print(f"  achieved {g['achieved_gflops']:.1f} GFLOP/s ({g['program_flops'] / 1e9:.0f} GFLOP in the "
              f"program)" + (f", {g['achieved_gflops'] / results['machine']['matmul_gflops']:.0%} of matmul peak"
                             if "machine" in results else ""))
    if "floor" in only:
        f = results["floor"] = bench_floor()
        print(f"floor: the LR grid written by hand in plain JAX (one jitted vmapped scan, no harness) runs in "
              f"{f['plain_jax_grid_seconds']:.2f} s = {f['plain_jax_gflops']:.1f} GFLOP/s; importing jax, flax.nnx "
              f"and optax takes {f['import_seconds']:.2f} s in a fresh process")
        if "default" in results and "grid" in results:
            sequential = results["default"]["warm_programs"]["run_seconds"]
            ratio = results["grid"]["achieved_gflops"] / f["plain_jax_gflops"]
            floor = sequential * ratio + f["import_seconds"]
            print(f"  the default run's training runs {sequential:.1f} s (warm); at "
                  f"plain-JAX throughput ({ratio:.2f}x the engine's time) that is {sequential * ratio:.1f} s, so a "
                  f"warm run cannot take less than about {floor:.1f} s here "
                  f"(target {0.35 * PYTORCH_PROCESS_SECONDS:.1f} s)")
    if "monitor" in only:
        mon = results["monitor"] = bench_monitor()
        for label, r in mon.items():
            print(f"monitor ({label} MLP, 500 Adam steps in one jitted scan): {r['plain'] * 1e3:.0f} ms plain, "
                  f"{r['monitored'] * 1e3:.0f} ms with harness.monitor: {r['overhead']:+.1%} (target under 10%); "
                  f"with update_norms=True {r['update_norms'] * 1e3:.0f} ms: {r['overhead_update_norms']:+.1%}")
    if "sweep" in only:
        s = results["sweep"] = bench_sweep(workdir)
        print(f"16-point sweep (4 LRs x 4 seeds): collapsed {s['collapsed_seconds']:.1f} s, collapse=false "
              f"{s['uncollapsed_seconds']:.1f} s, one process per point {s['process_per_point_seconds']:.1f} s: "
              f"collapsed is {s['process_per_point_seconds'] / s['collapsed_seconds']:.1f}x faster than a process "
              f"per point (target 20x) and {s['uncollapsed_seconds'] / s['collapsed_seconds']:.1f}x faster "
              f"than collapse=false")
    if "families" in only:
        fam = results["families"] = bench_families(workdir)
        base = fam["nnx"]
        print("families: the default run on the reference job written in each library, as a fresh process "
              "(compile: wall seconds compiling; run: programs' execution)")
        print(f"  {'family':8s} {'status':9s} {'cold s':>7s} {'compile':>8s} {'run':>6s} {'compiles':>8s}   "
              f"{'warm s':>7s} {'compile':>8s} {'run':>6s} {'reused':>7s}   {'warm/nnx':>8s} {'run/nnx':>7s}")
        for family, r in fam.items():
            cp, wp = r["cold_programs"], r["warm_programs"]
            print(f"  {family:8s} {r['status']:9s} {r['cold_seconds']:7.1f} {cp['compile_wall_seconds']:8.1f} "
                  f"{cp['run_seconds']:6.1f} {cp['compiles']:8d}   {r['warm_seconds']:7.1f} "
                  f"{wp['compile_wall_seconds']:8.1f} {wp['run_seconds']:6.1f} "
                  f"{wp['traces_reused']:3d}/{wp['compiles']:<3d}   {r['warm_seconds'] / base['warm_seconds']:8.2f} "
                  f"{wp['run_seconds'] / base['warm_programs']['run_seconds']:7.2f}")
        ladders = []
        for family, r in fam.items():
            rungs = [p for name, p in r["cold_programs"]["by_program"].items() if name.startswith("capacity/")]
            ladders.append(f"{family} {sum(p['compiles'] for p in rungs):.0f} "
                           f"({sum(p['compile_seconds'] for p in rungs):.1f} s)")
        print(f"  capacity ladder, cold: programs (compile seconds): {', '.join(ladders)}; the built-in model's "
              f"ladder is width-masked, any other trains one program per width")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
