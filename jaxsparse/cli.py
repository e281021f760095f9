"""The ``jaxsparse`` command: train, eval, generate, plot, configs, dryrun, bench.

Kept thin on purpose: every command is a call into the importable API, so whatever the CLI
does can be done from a notebook too.
"""

from __future__ import annotations

import argparse
import json
import math
import runpy
import sys
import warnings
from pathlib import Path

from jaxsparse.config import ConfigError
from jaxsparse.errors import NonFiniteTraining


def _cmd_train(args) -> int:
    from jaxsparse import configs
    from jaxsparse.config import apply_overrides, validate
    from jaxsparse.parallel import distributed
    from jaxsparse.train import train

    cfg = configs.get(args.config)
    cfg = validate(apply_overrides(cfg, args.set or []))
    flags = (args.coordinator, args.num_processes, args.process_id)
    if any(flag is not None for flag in flags) or distributed.requested_by_environment():
        distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    workdir = Path(args.workdir or Path("runs") / cfg.name)
    result = train(cfg, workdir)
    if result.stopped_early:
        print(f"stopped at step {result.step}; run the same command again to resume")
        return 0
    print("\nfinal eval: " + json.dumps({k: round(float(v), 4) for k, v in result.eval_metrics.items()}))
    if result.sample is not None:
        # part of the run's log, on a terminal or not: control bytes escaped (an early model
        # samples ESC and BEL as readily as letters)
        print(f"\nsample ({cfg.eval.sample_tokens} bytes, temperature {cfg.eval.temperature}):\n"
              + "-" * 60 + f"\n{_printable(result.sample)}\n" + "-" * 60)
    print(f"workdir: {workdir} (metrics.jsonl, tensorboard/, checkpoints/; `jaxsparse plot {workdir}`)")
    return 0


def _cmd_eval(args) -> int:
    from jaxsparse.data import make_stream
    from jaxsparse.train import evaluate, load
    from jaxsparse.train.step import make_eval_step

    cfg, setup, state = load(args.workdir, args.step)
    metrics = evaluate(setup, make_eval_step(setup), state, make_stream(cfg), cfg)
    print(json.dumps({"step": int(state["step"]), **{k: float(v) for k, v in metrics.items()}},
                     indent=2))
    return 0


def _cmd_generate(args) -> int:
    from jaxsparse.train import load, sample_bytes

    if not 0 <= args.temperature < math.inf:  # NaN too
        raise ConfigError(f"--temperature={args.temperature}: must be a finite number >= 0 "
                          "(0: greedy)")
    if args.top_k < 0:
        raise ConfigError(f"--top-k={args.top_k}: must be >= 0 (0: the full distribution)")
    if not 0 <= args.seed < 2 ** 32:  # JAX keys take 32-bit seeds; a larger one would wrap
        raise ConfigError(f"--seed={args.seed}: must be in [0, 2**32)")
    try:
        prompt_bytes = len(args.prompt.encode())
    except UnicodeEncodeError:  # bytes of the command line that are not UTF-8
        raise ConfigError(f"--prompt={args.prompt!r} is not valid UTF-8 text") from None
    if prompt_bytes == 0:
        raise ConfigError("--prompt='': give at least one character to continue")
    cfg, setup, state = load(args.workdir)
    if args.top_k > cfg.model.vocab_size:
        raise ConfigError(f"--top-k={args.top_k}: must be at most model.vocab_size="
                          f"{cfg.model.vocab_size}")
    if cfg.data.task != "text":
        raise ConfigError(f"generate works on byte-level text models; this run has data.task={cfg.data.task!r}")
    import dataclasses

    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(
        cfg.eval, temperature=args.temperature, top_k=args.top_k))
    limit = cfg.model.max_seq_len - prompt_bytes
    if limit < 1:
        raise ConfigError(f"--prompt is {prompt_bytes} bytes: this model reads at most "
                          f"model.max_seq_len={cfg.model.max_seq_len} tokens, prompt and "
                          "continuation together; give a shorter prompt")
    if args.max_new_tokens is None:  # the default: as many as fit, at most 200
        args.max_new_tokens = min(200, limit)
    if args.max_new_tokens < 1 or args.max_new_tokens > limit:
        raise ConfigError(f"--max-new-tokens={args.max_new_tokens}: must be in [1, {limit}] "
                          f"(model.max_seq_len={cfg.model.max_seq_len} minus the prompt)")
    _write_sample(sample_bytes(setup, state, cfg, args.prompt, args.max_new_tokens, args.seed))
    return 0


def _printable(text: str) -> str:
    """``text`` with control characters other than newlines and tabs escaped (``\\x1b``)."""
    return "".join(c if c.isprintable() or c in "\n\t" else repr(c)[1:-1] for c in text)


def _write_sample(sample: bytes) -> None:
    """The sampled bytes as they are when stdout is a pipe or a file (a byte-level model's
    output, recoverable exactly); on a terminal (or a notebook's stream) as text, with bytes
    that are not valid UTF-8 and control characters other than newlines and tabs escaped
    (``\\x1b``), in whatever encoding the terminal has."""
    sys.stdout.flush()
    buffer = getattr(sys.stdout, "buffer", None)
    if buffer is not None and not sys.stdout.isatty():
        buffer.write(sample + b"\n")
        buffer.flush()
        return
    text = _printable(sample.decode("utf-8", errors="backslashreplace"))
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    print(text.encode(encoding, errors="backslashreplace").decode(encoding), flush=True)


def _cmd_plot(args) -> int:
    from jaxsparse.train.plots import plot_run

    print(plot_run(args.workdir, args.out))
    return 0


def _cmd_configs(args) -> int:
    from jaxsparse import configs

    if args.sharding is not None:
        from jaxsparse.parallel.rules import PRESETS, describe

        if args.sharding not in PRESETS:
            raise ConfigError(f"--sharding {args.sharding!r} is not a sharding preset; "
                              f"allowed: {', '.join(PRESETS)}")
        print(describe(args.sharding))
        return 0
    from jaxsparse.models import count_params
    from jaxsparse.models.transformer import projection_flops_per_token

    names = configs.names()
    width = max((len(n) for n in names), default=4)
    print(f"{'name':<{width}}  {'params':>12}  {'proj MFLOP/tok':>14}  model")
    for name in names:
        cfg = configs.get(name)
        marker = " (default)" if name == configs.DEFAULT else ""
        m = cfg.model
        transformer = m.name in ("transformer", "routing_transformer")
        flops = f"{projection_flops_per_token(m) / 1e6:14.2f}" if transformer else f"{'-':>14}"
        print(f"{name:<{width}}  {count_params(m):>12,}  {flops}  {m.name} d={m.d_model} L={m.n_layers} "
              f"heads={m.n_heads}/{m.n_kv_heads} data={cfg.data.task}{marker}")
    hydra = [name for name in names if configs.get(name).model.name == "hydra"]
    if hydra:
        from jaxsparse.models.hydra import parameter_accounting

        print("\nHydra parameter accounting (from abstract shapes):")
        for name in hydra:
            parts = parameter_accounting(configs.get(name).model)
            print(f"  {name:<{width}}  " + "  ".join(f"{k}={v / 1e6:.2f}M" for k, v in parts.items()))
    return 0


def _cmd_dryrun(args) -> int:
    from jaxsparse import configs
    from jaxsparse.config import MESH_AXES, apply_overrides, validate
    from jaxsparse.dryrun import format_report, mesh_overrides, run_emulated

    overrides, devices = list(args.set or []), args.devices
    if args.mesh is not None:
        mesh, devices = mesh_overrides(args.mesh)
        if args.devices is not None and args.devices != devices:
            raise ConfigError(f"--devices {args.devices} disagrees with --mesh {args.mesh!r}, "
                              f"which needs {devices}")
        overrides = mesh + overrides
    if args.preset:
        overrides.append(f"mesh.preset={args.preset}")
    if devices is None:
        # validated first: a bad config is the error, not the device count chosen for it
        cfg = validate(apply_overrides(configs.get(args.config), overrides))
        sizes = [getattr(cfg.mesh, axis) for axis in MESH_AXES]
        if -1 not in sizes:  # the mesh names its device count
            devices = math.prod(sizes)
        else:
            # 64 emulated devices, or as many as split the config's batch (a bare
            # `jaxsparse dryrun` of hydra_tiny's batch of 32 was refused)
            devices = math.gcd(64, cfg.data.batch_size)
            if devices < 64:
                print(f"--devices {devices}: 64 emulated devices cannot split "
                      f"data.batch_size={cfg.data.batch_size}")
    report = run_emulated(args.config, devices, overrides, not args.no_compile)
    print(format_report(report))
    return 0


def bench_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "experiments" / "bench"


def _cmd_bench(args) -> int:
    available = sorted(p.stem for p in bench_dir().glob("*.py") if not p.stem.startswith("_"))
    if args.name not in available:
        raise ConfigError(f"unknown benchmark {args.name!r}; available: {', '.join(available)}")
    sys.argv = [f"{args.name}.py", *args.args]
    runpy.run_path(str(bench_dir() / f"{args.name}.py"), run_name="__main__")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from jaxsparse import configs

    parser = argparse.ArgumentParser(prog="jaxsparse", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a named config (default: %s)" % configs.DEFAULT)
    p.add_argument("--config", default=configs.DEFAULT, help="named config or path to a .py file")
    p.add_argument("--workdir", help="run directory (default: runs/<config name>)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override a config value; repeatable")
    p.add_argument("--coordinator", help="jax.distributed coordinator host:port (multi-host)")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="evaluate the latest checkpoint of a workdir")
    p.add_argument("--workdir", required=True)
    p.add_argument("--step", type=int)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("generate", help="sample text from a trained workdir")
    p.add_argument("--workdir", required=True)
    p.add_argument("--prompt", default="def ")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="bytes to generate (default: 200, or as many as model.max_seq_len leaves)")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("plot", help="write PNG metric curves of a workdir")
    p.add_argument("workdir")
    p.add_argument("--out")
    p.set_defaults(func=_cmd_plot)

    p = sub.add_parser("configs", help="list named configs with parameter counts, or print "
                                       "a sharding preset's rules")
    p.add_argument("--sharding", metavar="NAME", help="print the logical-axis rules of a "
                   "sharding preset (data, fsdp, fsdp_tp, fsdp_tp_ep, fsdp_tp_sp, full)")
    p.set_defaults(func=_cmd_configs)

    p = sub.add_parser("dryrun", help="compile one training step on an emulated device mesh "
                                      "and report per-device memory, allocating nothing")
    p.add_argument("--config", default=configs.DEFAULT)
    p.add_argument("--mesh", help="mesh axis sizes, e.g. data=16,fsdp=16 (others 1); the "
                   "device count is their product")
    p.add_argument("--preset", help="sharding preset (jaxsparse configs --sharding NAME)")
    p.add_argument("--devices", type=int, help="emulated devices when --mesh is not given "
                   "(default: the product of the config's mesh sizes, or with a -1 axis 64, "
                   "or as many as split data.batch_size)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE")
    p.add_argument("--no-compile", action="store_true", help="lower only")
    p.set_defaults(func=_cmd_dryrun)

    names = sorted(f.stem for f in bench_dir().glob("*.py") if not f.stem.startswith("_"))
    p = sub.add_parser("bench", help="run experiments/bench/NAME.py",
                       description="Run experiments/bench/NAME.py with ARGS (jaxsparse bench "
                       "NAME --help lists its flags).")
    p.add_argument("name", metavar="NAME", help="one of: " + ", ".join(names))
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS",
                   help="the benchmark's own flags")
    p.set_defaults(func=_cmd_bench)
    return parser


def _print_config_warnings(command: str):
    """A ``warnings.showwarning`` that prints warnings about the user's settings (without
    effect, or moving a resumed run's schedule) as the command's own (no source file and
    line: the config is the user's, not ours)."""
    from jaxsparse.config_usage import UnreadKeyWarning
    from jaxsparse.errors import DataChangeWarning, ScheduleChangeWarning

    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, UnreadKeyWarning | ScheduleChangeWarning | DataChangeWarning):
            print(f"jaxsparse {command}: warning: {message}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    return show


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():  # restores the default printer afterwards
        warnings.showwarning = _print_config_warnings(args.command)
        return _run(args)


def _run(args) -> int:
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, NotADirectoryError, IsADirectoryError) as err:
        print(f"jaxsparse {args.command}: error: {err}", file=sys.stderr)
        return 2
    except NonFiniteTraining as err:  # the run's own failure, not the command line's
        print(f"jaxsparse {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # outside training's own handling (e.g. during the sample)
        print(f"jaxsparse {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
