"""One line per user error: the root cause and its fix, not a traceback or jsonargparse's nested union report.

``--debug`` on the command line or ``NEUROLIGHT_DEBUG=1`` in the environment shows the full trace instead.
"""

from __future__ import annotations

import importlib
import os
import re

DEBUG_FLAG = "--debug"
DEBUG_ENV = "NEUROLIGHT_DEBUG"

# Lines of jsonargparse's union report that only restate the type or the given value.
_NOISE = re.compile(
    r"^(- )?(Does not validate against any of the Union subtypes|Subtypes: |Errors:|Given value|"
    r"Expected a <class 'NoneType'>|Expected a path but )"
)
_PROBLEM = re.compile(r"^- Problem with given class_path '([^']+)':\s*(.*)$")
_KEY = re.compile(r'^(- )?Parser key "([^"]+)":\s*(.*)$')
# Lightning's generic fallbacks: a problem reported against them repeats the one of the named class.
_FALLBACKS = ("lightning.Callback", "lightning.pytorch.callbacks.callback.Callback")


def debug_requested(argv: list[str]) -> tuple[bool, list[str]]:
    """Whether the user asked for tracebacks, and ``argv`` without ``--debug``."""
    debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0", "false", "False")
    return debug, [arg for arg in argv if arg != DEBUG_FLAG]


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _innermost(block: list[str]) -> tuple[list[str], str]:
    """The ``Parser key`` path and the last meaningful line of one nested error block."""
    keys, cause = [], ""
    for raw in block:
        line = raw.strip()
        match = _KEY.match(line)
        if match:
            keys.append(match.group(2))
            line = match.group(3)
        if line and not _NOISE.match(line):
            cause = line.removeprefix("- ")
    return keys, cause


def config_error_line(message: str, subcommand: str | None) -> str:
    """The root cause of a jsonargparse error, e.g. ``model.dict_vec_size (SparseAutoencoderModule): Expected a
    <class 'int'>. Got value: abc``, followed by where the accepted options are listed."""
    lines = [line for line in message.splitlines() if line.strip()]
    top = _KEY.match(lines[0].strip()) if lines else None
    key = top.group(2) if top else None
    problems = []
    for i, line in enumerate(lines):
        match = _PROBLEM.match(line.strip())
        if not match:
            continue
        block = [match.group(2)] if match.group(2) else []
        for follow in lines[i + 1 :]:
            if _indent(follow) <= _indent(line):
                break
            block.append(follow)
        keys, cause = _innermost(block)
        problems.append((match.group(1), keys, cause))
    named = [p for p in problems if p[0] not in _FALLBACKS] or problems
    if not named:
        _, cause = _innermost(lines)
        return cause or message.strip().splitlines()[-1]
    class_path, keys, cause = named[0]
    package, _, name = class_path.rpartition(".")
    where = ".".join([key, *keys] if key else keys)
    missing = re.match(r"module '([\w.]+)' has no attribute '(\w+)'", cause)
    if missing:
        return f"{where}: no class '{name}' in {package}; {_exports(package)}"
    hint = f"; the accepted options: neurolight {subcommand} --{key}.help {name}" if key and subcommand else ""
    return f"{where} ({name}): {cause}{hint}"


def _exports(package: str) -> str:
    try:
        exports = importlib.import_module(package).__all__
    except (ImportError, AttributeError):
        return "check the class_path"
    return f"it exports {', '.join(sorted(exports))}"


def exit_with(error: BaseException, debug: bool, prefix: str = "neurolight") -> None:
    """Re-raise under ``debug``; else exit with status 1 and one line naming the error."""
    if debug:
        raise error
    detail = " ".join(str(error).split()) or type(error).__name__
    # SystemExit with a message: Python prints it to stderr and exits with status 1.
    raise SystemExit(f"{prefix}: error: {detail} (set {DEBUG_ENV}=1 or pass {DEBUG_FLAG} for the traceback)") from None
