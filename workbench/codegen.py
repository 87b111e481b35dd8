"""Python source for public-API calls: what a panel's **Show code** prints, ready to paste and run.

    from workbench.codegen import Name, render_call
    print(render_call("workbench.patching", "sweep", [Name("model")], {"clean": ["When Mary ..."], "site": "resid_pre"},
                      preamble_lines=["model = load_model('demo')"], imports=[("workbench.models", "load_model")]))

gives

    from workbench.models import load_model
    from workbench.patching import sweep

    model = load_model('demo')
    result = sweep(model, clean=['When Mary ...'], site='resid_pre')

Values are written as literals: str, int, float, bool, None, tuples, lists, dicts, torch tensors and numpy arrays
(an evenly spaced 1-D tensor as ``torch.linspace``). `Name("x")` stands for a variable, `Expr(text, imports)` for
any expression with the imports it needs, and `call(...)` for a nested call. A line longer than `WIDTH` is broken
one argument (or element) per line. `Script` collects several statements and renders their imports once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

WIDTH = 100
INDENT = "    "

Import = tuple[str, str]  # ("torch", "") is `import torch`; ("workbench.patching", "sweep") a from-import


@dataclass(frozen=True)
class Expr:
    """Source text of an expression, with the imports it needs."""

    text: str
    imports: tuple[Import, ...] = ()


def Name(name: str) -> Expr:  # noqa: N802 (reads as a type in calls: Name("model"))
    """A variable, written as its name."""
    if not name.isidentifier():
        raise ValueError(f"{name!r} is not a Python identifier")
    return Expr(name)


def call(module_path: str, function_name: str, args: Sequence = (), kwargs: Mapping | None = None) -> Expr:
    """``function_name(*args, **kwargs)`` imported from `module_path` (empty: a builtin or a name in scope)."""
    parts = [_source(a) for a in args] + [_source(v, prefix=f"{k}=") for k, v in (kwargs or {}).items()]
    imports = {i for p in parts for i in p.imports}
    if module_path:
        imports.add((module_path, function_name))
    return Expr(_join(function_name + "(", [p.text for p in parts], ")"), tuple(sorted(imports)))


def literal(value) -> Expr:
    """`value` as Python source (see the module docstring for the supported types)."""
    return _source(value)


def render_call(
    module_path: str,
    function_name: str,
    args: Sequence = (),
    kwargs: Mapping | None = None,
    preamble_lines: Iterable[str | Expr] = (),
    *,
    assign: str | None = "result",
    imports: Iterable[Import] = (),
) -> str:
    """Imports, then `preamble_lines`, then ``assign = function_name(args, **kwargs)`` (a bare call if `assign`
    is None), as one block of valid Python."""
    script = Script()
    for line in preamble_lines:
        script.add(line)
    script.add(call(module_path, function_name, args, kwargs), assign=assign)
    for imp in imports:
        script.imports.add(imp)
    return script.render()


@dataclass
class Script:
    """Statements in order, and the imports they need (rendered once, sorted, at the top, below `header`
    comments)."""

    lines: list[str] = field(default_factory=list)
    imports: set[Import] = field(default_factory=set)
    header: list[str] = field(default_factory=list)  # comment lines above the imports

    def add(self, line: str | Expr, *, assign: str | None = None, imports: Iterable[Import] = ()) -> Script:
        """Append a statement: source text, or an expression (``assign = expression`` when `assign` is given)."""
        if isinstance(line, Expr):
            self.imports.update(line.imports)
            text = line.text if assign is None else _assignment(assign, line.text)
        else:
            if assign is not None:
                raise ValueError("assign= applies to expressions, not to lines of text")
            text = line
        self.imports.update(imports)
        self.lines.append(text)
        return self

    def call(
        self,
        assign: str | None,
        module_path: str,
        function_name: str,
        args: Sequence = (),
        kwargs: Mapping | None = None,
    ) -> Script:
        """Append ``assign = function_name(args, **kwargs)``."""
        return self.add(call(module_path, function_name, args, kwargs), assign=assign)

    def render(self) -> str:
        plain = sorted(m for m, n in self.imports if not n)
        grouped: dict[str, set[str]] = {}
        for module, name in self.imports:
            if name:
                grouped.setdefault(module, set()).add(name)
        head = [f"import {m}" for m in plain]
        head += [f"from {m} import {', '.join(sorted(names))}" for m, names in sorted(grouped.items())]
        body = "\n".join(self.lines)
        text = "\n".join(head) + ("\n\n" if head and body else "") + body
        return "\n".join(f"# {c}" for c in self.header) + ("\n" if self.header else "") + text


# -- rendering ----------------------------------------------------------------------------------------------------


def _assignment(name: str, text: str) -> str:
    return f"{name} = {text}"


def _source(value, prefix: str = "") -> Expr:
    """`prefix` + the source of `value` (prefix: ``key=`` of a keyword argument, counted in the line width)."""
    if isinstance(value, Expr):
        return Expr(prefix + value.text, value.imports)
    if value is None or isinstance(value, (bool, int, str)):
        return Expr(prefix + repr(value))
    if isinstance(value, float):
        if math.isnan(value):
            return Expr(prefix + "float('nan')")
        if math.isinf(value):
            return Expr(prefix + ("float('inf')" if value > 0 else "-float('inf')"))
        return Expr(prefix + repr(value))
    if isinstance(value, Mapping):
        items = [(_source(k), _source(v)) for k, v in value.items()]
        imports = tuple(i for k, v in items for i in k.imports + v.imports)
        return Expr(_join(prefix + "{", [f"{k.text}: {v.text}" for k, v in items], "}"), imports)
    if isinstance(value, (list, tuple)):
        items = [_source(v) for v in value]
        imports = tuple(i for v in items for i in v.imports)
        if isinstance(value, tuple):
            close = ",)" if len(items) == 1 else ")"
            return Expr(_join(prefix + "(", [v.text for v in items], close), imports)
        return Expr(_join(prefix + "[", [v.text for v in items], "]"), imports)
    module = type(value).__module__
    if module == "torch" and type(value).__name__ == "Tensor":
        return _tensor(value, prefix)
    if module == "numpy" and type(value).__name__ == "ndarray":
        return _ndarray(value, prefix)
    if module == "numpy":  # a numpy scalar
        return _source(value.item(), prefix)
    raise TypeError(
        f"cannot write a {type(value).__name__} as Python source; pass Name('variable') or Expr('expression')"
    )


def _tensor(value, prefix: str) -> Expr:
    value = value.detach().cpu()
    if value.dim() == 1 and value.is_floating_point() and len(value) >= 3:
        linspace = torch.linspace(float(value[0]), float(value[-1]), len(value), dtype=value.dtype)
        if torch.equal(linspace, value):
            args = [repr(float(value[0])), repr(float(value[-1])), str(len(value))]
            if value.dtype != torch.get_default_dtype():
                args.append(f"dtype={value.dtype}")
            return Expr(_join(prefix + "torch.linspace(", args, ")"), (("torch", ""),))
    if value.numel() == 0:  # a nested empty list loses the shape
        return Expr(f"{prefix}torch.empty({tuple(value.shape)}, dtype={value.dtype})", (("torch", ""),))
    data = value.tolist()
    inferred = torch.tensor(data).dtype  # what torch.tensor makes of the list without a dtype
    text = _source(_short_floats(data) if value.dtype == torch.float32 else data).text
    args = [text] + ([f"dtype={value.dtype}"] if value.dtype != inferred else [])
    return Expr(_join(prefix + "torch.tensor(", args, ")"), (("torch", ""),))


def _short_floats(data):
    """float32 values as their shortest text that reads back to the same float32 (0.28657132, not
    0.28657132387161255)."""
    if isinstance(data, list):
        return [_short_floats(d) for d in data]
    if not math.isfinite(data):
        return data
    return Expr(str(np.float32(data)))


def _ndarray(value, prefix: str) -> Expr:
    if value.size == 0:
        return Expr(f"{prefix}np.empty({value.shape}, dtype={str(value.dtype)!r})", (("numpy as np", ""),))
    data = _source(value.tolist())
    return Expr(
        _join(prefix + "np.array(", [data.text, f"dtype={str(value.dtype)!r}"], ")"), (("numpy as np", ""),)
    )


def _join(open_: str, items: list[str], close: str) -> str:
    """`open_` items `close` on one line when it fits in WIDTH and no item spans lines, else one item per line."""
    one_line = open_ + ", ".join(items) + close
    if len(one_line) <= WIDTH and not any("\n" in i for i in items):
        return one_line
    if items and all(len(i) <= 24 and "\n" not in i for i in items) and not open_.endswith("("):
        # numbers and short strings: as many per line as fit
        rows, row = [], ""
        for item in items:
            if row and len(INDENT) + len(row) + len(item) + 2 > WIDTH:
                rows.append(row)
                row = ""
            row += item + ", "
        rows.append(row)
        inner = "".join(f"{INDENT}{r.rstrip()}\n" for r in rows)
        return f"{open_}\n{inner}{close.lstrip(',')}"
    inner = "".join(f"{INDENT}{_indent(i)},\n" for i in items)
    return f"{open_}\n{inner}{close.lstrip(',')}"


def _indent(text: str) -> str:
    return text.replace("\n", "\n" + INDENT)
