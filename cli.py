"""
The command line every entry point shares, in the spirit of nanoGPT's configurator: settings from plain-Python
config files (config/*.py) and --key=value flags, checked before any work; user errors as one line and an exit code,
never a traceback; and progress that suits where the output goes - a bar on a terminal, a few short lines in a log
file. It imports nothing from the project, so every module (data/ included) can use it.

    cfg = cli.configure(DEFAULTS, argv)          # defaults <- config files <- --key=value
    cli.check(cfg, lr=cli.POSITIVE, batch_size=cli.at_least(1))
    cli.run(main)                                # the script's entry point: UserError -> `error: ...`, exit 1 or 2
"""

import argparse
import ast
import os
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

# -----------------------------------------------------------------------------
# User errors: one clear line, a non-zero exit, nothing written


class UserError(Exception):
    """Something the user can fix (a flag, a file, a checkpoint): reported as one line, never as a traceback."""


class ConfigError(UserError):
    pass


class CheckpointError(UserError):
    pass


def run(main, argv=None):
    """Run main(argv) for a command-line entry point: a UserError ends with `error: ...` and exit 2 (bad
    configuration) or 1 (bad files or data); Ctrl-C with a hint that the run resumes."""
    try:
        result = main(sys.argv[1:] if argv is None else argv)
        if dist.is_initialized():
            # gloo aborts a rank ("terminate called without an active exception") that tears down while its peer
            # still talks: meet first, then leave together
            dist.barrier()
            dist.destroy_process_group()
        return result
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, ConfigError) else 1)
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to resume from the last checkpoint", file=sys.stderr)
        sys.exit(130)


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the scripts that take --flag value (bench.py, python -m data.*): a bad flag is a ConfigError,
    reported by run() like every other user error."""

    def error(self, message):
        raise ConfigError(f"{message} (see --help)")


# -----------------------------------------------------------------------------
# Configuration: plain Python files and --key=value, like nanoGPT's configurator


def configure(defaults, argv):
    """defaults (dict) overridden by config files (`config/x.py`) then `--key=value` flags, in order.
    Unknown keys and wrong types are errors: a typo must never silently train the wrong thing."""
    cfg = dict(defaults)

    def set_key(key, value, where):
        if key not in cfg:
            raise ConfigError(f"unknown config key {key!r} ({where}); known keys: {', '.join(sorted(cfg))}")
        old = cfg[key]
        if old is not None and value is not None and type(value) is not type(old):
            if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            else:
                raise ConfigError(f"config key {key!r} ({where}) must be {type(old).__name__}, "
                                  f"got {type(value).__name__} {value!r}")
        cfg[key] = value

    for arg in argv:
        if arg.startswith("--"):
            key, sep, text = arg[2:].partition("=")
            if not sep:
                raise ConfigError(f"expected --key=value, got {arg!r}")
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text  # a bare string, e.g. --out_dir=out/nano
            set_key(key, value, arg)
        else:
            if not os.path.isfile(arg):
                raise ConfigError(f"config file not found: {arg}")
            namespace = {}
            exec(open(arg).read(), {}, namespace)
            for key, value in namespace.items():
                if not key.startswith("_"):
                    set_key(key, value, arg)
    return cfg


def check(cfg, **rules):
    """Check settings before any work: each rule is key=(test, what the value must be). The first that fails is a
    ConfigError naming the key, its value and the rule."""
    for key, (test, what) in rules.items():
        try:
            ok = test(cfg[key])
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ConfigError(f"{key}={cfg[key]!r}: must be {what}")


def at_least(n):
    return (lambda v: not isinstance(v, bool) and v >= n), f"a number >= {n}"


def between(lo, hi):
    return (lambda v: not isinstance(v, bool) and lo <= v <= hi), f"between {lo} and {hi}"


POSITIVE = (lambda v: not isinstance(v, bool) and v > 0), "> 0"
DISTANCES = (lambda v: isinstance(v, list) and v and all(isinstance(d, int) and d > 0 for d in v),
             "a non-empty list of positive integers (turns between a fact and its question)")
CURRICULUM = (lambda v: isinstance(v, list) and v and all(DISTANCES[0](entry) for entry in v),
              "a non-empty list of non-empty lists of distances, e.g. [[1], [1, 2]]")


def check_device(name):
    """'auto', 'cpu', 'cuda' or 'cuda:N' that this machine has, or 'mps'."""
    if name in ("auto", "cpu") or (name == "mps" and torch.backends.mps.is_available()):
        return
    if name.startswith("cuda"):
        index = name.partition(":")[2]
        if torch.cuda.is_available() and (not index or (index.isdigit() and int(index) < torch.cuda.device_count())):
            return
        raise ConfigError(f"device={name!r}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                          f"use --device=cpu or --device=auto")
    raise ConfigError(f"device={name!r}: must be auto, cpu, cuda, cuda:N or mps")


WORLD_HINT = "build the offline world with: python -m data.memory_world --out_dir data/cache/world"


def require_files(folder, names, hint=WORLD_HINT):
    """Each file must exist in folder; else a UserError that says how to make it."""
    missing = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise UserError(f"{', '.join(missing)} not found in {folder} ({hint})")


# -----------------------------------------------------------------------------
# Progress: a bar on a terminal; in a file, a line every tenth of the way (a bar's redraws would fill the log)


class progress:
    """tqdm where stderr is a terminal; otherwise a short line at every tenth of the total and at the end. Use as
    tqdm: iterate, set_postfix(...), update(n), write(line), close(); or as a context manager."""

    def __init__(self, iterable=None, total=None, desc="", initial=0, disable=False, **tqdm_args):
        self.iterable, self.desc, self.disable = iterable, desc, disable
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n, self.postfix, self.t0 = initial, "", time.time()
        self.step = max(1, -(-(self.total or 0) // 10))  # a line at every tenth of the way, and at the end
        self.next_line = (initial // self.step + 1) * self.step
        self.bar = None
        if not disable and sys.stderr.isatty():
            self.bar = tqdm(iterable, total=self.total, desc=desc, initial=initial, dynamic_ncols=True, **tqdm_args)

    def __iter__(self):
        if self.bar is not None or self.disable:
            yield from (self.bar if self.bar is not None else self.iterable)
            return
        for item in self.iterable:
            yield item
            self.update(1)

    def update(self, n=1):
        if self.bar is not None:
            return self.bar.update(n)
        self.n += n
        if not self.disable and self.total and (self.n >= self.next_line or self.n == self.total):
            self.next_line = min((self.n // self.step + 1) * self.step, self.total)
            print(f"{self.desc}: {self.n}/{self.total} ({time.time() - self.t0:.0f}s){self.postfix}", flush=True)

    def set_postfix(self, **kv):
        if self.bar is not None:
            return self.bar.set_postfix(**kv)
        self.postfix = "  " + "  ".join(f"{k} {v}" for k, v in kv.items())

    def write(self, line):
        if self.bar is not None:
            return self.bar.write(line)
        print(line, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
