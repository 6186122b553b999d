"""
The one command-line parser of every script here (train.py, experiments/*.py, hf/grpo.py),
in nanoGPT's style: a script's config is its plain module-level assignments, one knob a line with a one-line
trailing comment; `--key=value` overrides a knob, keeping its default's type, and `--help` prints the knobs
with those comments, read from the script's own source. No dependencies. Not here: which values a script
accepts beyond their type (each script checks its own and raises ValueError saying what is allowed).

How a script uses it:

    budget = 28                              # KV slots per layer and head
    rows = "full,smd"                        # table rows, in order
    CONFIG = configurator.knobs(globals())   # right after the block: {"budget": 28, "rows": "full,smd"}

    def make_config(argv):                   # the defaults and the overrides, checked; ValueError if not
        cfg = dict(CONFIG, **configurator.parse(argv, CONFIG))
        ...
        return cfg

    if __name__ == "__main__":
        configurator.cli(main, CONFIG, __file__, check=make_config)   # then main(argv) does the work
"""

import ast
import difflib
import io
import os
import sys
import tokenize

TYPES = (bool, int, float, str, tuple)  # what a knob can hold; a tuple, a non-empty one of numbers


def assignments(source):
    """{name: the one-line trailing comment of its assignment, or ""} for every module-level assignment in the
    file `source`."""
    with open(source) as f:
        text = f.read()
    tokens = tokenize.generate_tokens(io.StringIO(text).readline)
    comments = {t.start[0]: t.string.lstrip("#").strip() for t in tokens if t.type == tokenize.COMMENT}
    out = {}
    for node in ast.parse(text).body:
        if isinstance(node, ast.Assign):  # `n_layer, n_head = 2, 4` assigns two names
            names = [n.id for target in node.targets for n in ast.walk(target) if isinstance(n, ast.Name)]
            out.update(dict.fromkeys(names, comments.get(node.lineno, "")))
    return out


def knobs(namespace):
    """A script's config from its globals(), called right after its config block: every name its own source
    assigns (an import does not) whose value is, so far, a bool, int, float, str or tuple."""
    assigned = assignments(namespace["__file__"])
    return {k: v for k, v in namespace.items()
            if k in assigned and not k.startswith("_") and isinstance(v, TYPES)}


def fits(value, default):
    """value can stand for default: the same type, or an int for a float (a bool is never a number here)."""
    return type(value) is type(default) or (type(value) is int and type(default) is float)


def convert(key, text, default):
    """The text after --key= as a value of default's type: a str as written; a bool True or False; an int
    where a float is wanted; a tuple from `16`, `16,24` or `(16, 24)`, of its default's element type."""
    if isinstance(default, str):
        return text  # --rows=full,smd and --run_name=7 are strings as written
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text  # a bare word: the type check below names what was wanted
    if isinstance(default, tuple):
        items = value if isinstance(value, tuple) else (value,)
        if items and all(fits(v, default[0]) for v in items):
            return tuple(type(default[0])(v) for v in items)
        raise ValueError(f"--{key} wants one {type(default[0]).__name__} or several, comma-separated "
                         f"(default {show(default)}), got {text!r}")
    if fits(value, default):
        return type(default)(value)
    kind = "bool (True or False)" if isinstance(default, bool) else type(default).__name__
    raise ValueError(f"--{key} wants a {kind}, got {text!r}")


def parse(argv, defaults):
    """['--budget=8', '--lr=1'] -> {'budget': 8, 'lr': 1.0}: the overrides, each of its default's type."""
    out = {}
    for arg in argv:
        key, eq, text = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not eq:
            raise ValueError(f"arguments look like --key=value, got {arg!r}")
        if key not in defaults:
            near = difflib.get_close_matches(key, defaults, n=1)
            hint = f"did you mean --{near[0]}? " if near else ""
            raise ValueError(f"unknown config key {key!r}; {hint}known: {', '.join(defaults)}")
        out[key] = convert(key, text, defaults[key])
    return out


def parse_known(argv, defaults, reserved=()):
    """-> (the overrides of keys in defaults, parsed; the other arguments, as given): for a script that
    passes what it does not own on to train.py. reserved: train.py flags the script sets itself."""
    is_own = lambda arg: arg.startswith("--") and arg[2:].partition("=")[0] in defaults
    passed = [a for a in argv if not is_own(a)]
    for key in reserved:
        if any(a.startswith(f"--{key}=") for a in passed):
            raise ValueError(f"the script sets --{key} itself")
    return parse([a for a in argv if is_own(a)], defaults), passed


def show(value):
    """A value as it is typed on the command line: --sweep_budgets=13,21, --rows=full,smd."""
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def command(source):
    """How a script is started from the repo's root: `python train.py` at the top level, `python -m
    experiments.compare` for one in a folder (run as a module, so it imports the core from the root)."""
    path = os.path.relpath(os.path.abspath(source), os.path.dirname(os.path.abspath(__file__)))
    if os.path.dirname(path) and not path.startswith(os.pardir):
        return "python -m " + path.removesuffix(".py").replace(os.sep, ".")
    return f"python {os.path.basename(path)}"


def help_text(defaults, source, epilog=""):
    """A usage line, then every knob as `--name=default  comment`, the comments read from the file `source`;
    a flag too long for the column gets its comment on the next line."""
    comments = assignments(source)
    flags = {k: f"--{k}={show(v)}" for k, v in defaults.items()}
    width = min(max(map(len, flags.values()), default=0), 32)
    lines = [f"usage: {command(source)} [--key=value ...]"]
    for k, flag in flags.items():
        gap = "\n" + " " * (width + 4) if len(flag) > width else " " * (width - len(flag) + 2)
        lines.append(f"  {flag}{gap}{comments.get(k, '')}".rstrip())
    return "\n".join(lines + ([epilog] if epilog else []))


def cli(main, defaults, source, check=None, epilog="", argv=None):
    """A script's `if __name__ == "__main__":` entry. --help (or -h) prints help_text and exits 0. Then
    check(argv) (default: parse(argv, defaults)) runs before any work; a ValueError there prints one line,
    `error: ...`, on stderr and exits 2. Then main(argv), whose errors past the checks keep their
    traceback."""
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(help_text(defaults, source, epilog))
        sys.exit(0)
    try:
        if check:
            check(argv)
        else:
            parse(argv, defaults)
    except ValueError as e:
        print("error: " + " ".join(str(e).splitlines()), file=sys.stderr)
        sys.exit(2)
    main(argv)
