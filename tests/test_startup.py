"""Start-up: ``import jmerge``, ``jmerge --help``, every command's ``--help`` and ``jmerge methods`` import no JAX
(nor NumPy); ``jmerge methods``'s static table equals the live registry; ``jmerge merge --dry-run`` compiles
nothing. Each check runs in a fresh interpreter and ends with a positive control (the same probe sees JAX once
something needs it), so it cannot pass vacuously. Wall times are printed by ``scripts/bench_startup.py``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jmerge
from jmerge.cli.method_catalog import CATALOG
from jmerge.cli.methods import format_catalog, live_catalog

HEAVY = ("jax", "jaxlib", "numpy", "ml_dtypes", "flax", "optax", "orbax", "chex", "jaxtyping", "safetensors", "torch")

_PROBE = """
import json, sys
def heavy():
    return sorted({m.split(".")[0] for m in sys.modules} & set(%r))
""" % (HEAVY,)


def _run(body: str, *args: str) -> dict:
    """Run ``body`` in a fresh interpreter (repo root as cwd); it prints one JSON line last."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", _PROBE + textwrap.dedent(body), *args], cwd=root,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_import_and_help_import_no_jax():
    res = _run("""
        import argparse, contextlib, io
        import jmerge
        after_import = heavy()
        import jmerge.cli
        from jmerge.cli import COMMANDS, main
        after_cli = heavy()
        # every command's --help, including sub-commands of sub-commands (demo forwards its arguments)
        p = argparse.ArgumentParser(prog="jmerge")
        sub = p.add_subparsers()
        for c in COMMANDS:
            c.add_parser(sub)
        argvs = [["--help"], ["--version"]]
        for name, cp in sub.choices.items():
            if name == "demo":
                continue
            argvs.append([name, "--help"])
            for a in cp._actions:
                for sname in (getattr(a, "choices", None) or {}) if isinstance(a, argparse._SubParsersAction) else {}:
                    argvs.append([name, sname, "--help"])
        codes = []
        for argv in argvs:
            with contextlib.redirect_stdout(io.StringIO()) as out:
                try:
                    codes.append(main(argv))
                except SystemExit as e:
                    codes.append(e.code)
            assert out.getvalue().startswith("usage:") or argv == ["--version"], (argv, out.getvalue()[:200])
        after_help = heavy()
        control = jmerge.ties  # a public name imports its package (and JAX) on first use
        print(json.dumps({"import": after_import, "cli": after_cli, "help": after_help, "argvs": argvs,
                          "codes": codes, "control": heavy(), "ties": control.__module__}))
    """)
    assert res["import"] == [] and res["cli"] == [] and res["help"] == [], res
    assert ["merge", "--help"] in res["argvs"] and ["experts", "prune", "--help"] in res["argvs"], res["argvs"]
    assert set(res["codes"]) == {0}, res
    assert "jax" in res["control"] and "numpy" in res["control"] and res["ties"] == "jmerge.methods.ties", res


def test_methods_command_imports_no_jax_and_prints_the_live_registry():
    res = _run("""
        import contextlib, io
        from jmerge.cli import main
        with contextlib.redirect_stdout(io.StringIO()) as out:
            code = main(["methods"])
        before = heavy()
        import jmerge
        names = sorted(jmerge.available_methods())
        print(json.dumps({"code": code, "heavy": before, "out": out.getvalue(), "names": names, "control": heavy()}))
    """)
    assert res["code"] == 0 and res["heavy"] == [] and "jax" in res["control"], res
    assert res["out"] == format_catalog(live_catalog()) + "\n"
    listed = [line.split("(", 1)[0].strip() for line in res["out"].splitlines() if not line.startswith(" ")]
    assert listed == res["names"] + ["passthrough"]


def test_static_method_table_equals_the_live_registry():
    live = live_catalog()
    assert CATALOG == live, ("jmerge/cli/method_catalog.py is stale; regenerate it with "
                             "python -c \"import jmerge.cli.methods as m; m.write_catalog()\"")
    assert [e[0] for e in live] == sorted(jmerge.available_methods())
    ties = dict((e[0], e) for e in live)["ties"]
    assert ties[1].startswith("density=0.2") and ties[4] == tuple(n for n, _ in jmerge.ties().steps)


def test_dry_run_compiles_nothing(tmp_path):
    arch = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "arch", "llama")
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"merge_method: ties\nbase_model: {arch}/base\nmodels:\n"
                   + "".join(f"  - model: {arch}/{m}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
                             for m in ("ft1", "ft2"))
                   + "dtype: bfloat16\n")
    res = _run("""
        import contextlib, io
        import jax.monitoring as mon
        events = []
        mon.register_event_duration_secs_listener(lambda name, secs, **kw: events.append(name))
        from jmerge.cli import main
        with contextlib.redirect_stdout(io.StringIO()) as out:
            code = main(["merge", sys.argv[1], sys.argv[2], "--dry-run"])
        during = [e for e in events if "/compile/" in e]
        import jax
        jax.jit(lambda x: x * 2)(1.0)  # the probe sees a compile when one happens
        print(json.dumps({"code": code, "out": out.getvalue(), "during": during,
                          "control": [e for e in events if "/compile/" in e]}))
    """, str(cfg), str(tmp_path / "out"))
    assert res["code"] == 0 and "method: ties" in res["out"] and not (tmp_path / "out").exists(), res
    assert res["during"] == [], res["during"]
    assert "/jax/core/compile/backend_compile_duration" in res["control"], res["control"]
