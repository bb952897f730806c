"""No caught exception is kept past its ``except`` with its traceback.

``except E as exc: last = exc`` keeps the exception alive after the handler (Python
deletes ``exc``, not its aliases). Its traceback holds the frame that caught it, and
that frame holds ``last``: a reference cycle, and through the frame's locals everything
the call touched — a whole QSTP tunnel, a request's head and body. Serving processes
run the cyclic collector rarely (``tune_gc``), so such objects stayed in memory until a
full collection: every closed tunnel on relayers and sentries, every failed request
during an outage (fixed in 55d53f9 and 39ec482). The rule: keep
``exc.with_traceback(None)``. A kept error's type and message are what gets reported;
an error raised again gets a fresh traceback where it is raised.

The scan covers assignments of the bare caught name (to a local, an attribute, an
item) and the bare name passed to a container's ``append``/``add``/``extend``/
``insert``/``put_nowait``/``setdefault`` inside its handler.
"""

from __future__ import annotations

import ast
import weakref

from tests.conftest import ROOT
from tests.gcutil import collector_off

_STORES = frozenset({"append", "add", "extend", "insert", "put_nowait", "setdefault"})


def kept_errors(source: str, name: str = "<src>") -> list[str]:
    """``file:line: statement`` for each caught exception kept with its traceback."""
    found: list[str] = []
    for handler in ast.walk(ast.parse(source)):
        if not isinstance(handler, ast.ExceptHandler) or not handler.name:
            continue
        caught = handler.name

        def bare(node: ast.expr | None, caught: str = caught) -> bool:
            return isinstance(node, ast.Name) and node.id == caught

        for node in (n for stmt in handler.body for n in ast.walk(stmt)):
            if (isinstance(node, ast.Assign | ast.AnnAssign) and bare(node.value)) or (
                    isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in _STORES and any(bare(a) for a in node.args)):
                found.append(f"{name}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_source_file_keeps_a_caught_exception_with_its_traceback() -> None:
    found = [hit for path in sorted((ROOT / "src" / "pqcnet").rglob("*.py"))
             for hit in kept_errors(path.read_text(), str(path.relative_to(ROOT)))]
    assert found == [], "keep exc.with_traceback(None) instead:\n" + "\n".join(found)


def test_the_scan_finds_each_kept_form_and_passes_the_fix() -> None:
    kept = """
def f(log, items, q):
    last = None
    try:
        g()
    except OSError as exc:
        last = exc
        self.failure: Exception = exc
        self.failed[1] = exc
        items.append(exc)
        q.put_nowait(exc)
        if True:
            nested = exc
    return last
"""
    assert [h.split(": ", 1)[1] for h in kept_errors(kept)] == [
        "last = exc", "self.failure: Exception = exc", "self.failed[1] = exc",
        "items.append(exc)", "q.put_nowait(exc)", "nested = exc"]
    fixed = """
def f(items):
    try:
        g()
    except OSError as exc:
        last = exc.with_traceback(None)
        items.append(exc.with_traceback(None))
        log.warning("failed", extra={"error": str(exc)})
        raise Other(str(exc)) from exc
    except ValueError:
        pass
"""
    assert kept_errors(fixed) == []


def test_the_cycle_it_guards_against_is_real() -> None:
    """The reason for the rule, shown: a kept exception keeps the catching frame's
    locals alive with the collector off; the fixed form does not."""
    class Payload:
        pass

    def catch(fix: bool) -> weakref.ref[Payload]:
        payload = Payload()
        kept = None
        try:
            raise OSError("boom")
        except OSError as exc:
            kept = exc.with_traceback(None) if fix else exc
        assert kept is not None
        return weakref.ref(payload)

    with collector_off():
        assert catch(fix=False)() is not None  # held by frame <- traceback <- kept
        assert catch(fix=True)() is None
