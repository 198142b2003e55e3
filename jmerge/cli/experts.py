"""``jmerge experts stats|prune``: expert load of an MoE checkpoint on some text, and expert pruning.

    jmerge experts stats CKPT --text FILE [--jsonl FILE --task-field task --text-field text] [--png OUT.png]
    jmerge experts prune CKPT OUT --keep K (--text FILE | --jsonl FILE)
    jmerge experts prune CKPT OUT --keep 0,2,5  (or per layer: "0,2;1,3;...")

Text is tokenised with the checkpoint's ``tokenizer.json`` (the ``tokenizers`` package), one document per
non-empty line (or JSONL record), truncated to ``--max-length`` tokens, in right-padded batches
(:mod:`jmerge.models.text`).

References: Lu et al. (2024), "Not All Experts are Equal: Efficient Expert Pruning and Skipping for
Mixture-of-Experts Large Language Models"; Dahlke et al. (2025), "Mixture of Tunable Experts".
"""

from __future__ import annotations

from .common import fail

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    p = sub.add_parser("experts", help="MoE expert load statistics and expert pruning")
    esub = p.add_subparsers(dest="experts_cmd", metavar="{stats,prune}")
    s = esub.add_parser("stats", help="per-layer expert load on a text file (table, optional heatmap PNG)")
    s.add_argument("ckpt")
    _add_data_args(s)
    s.add_argument("--png", help="write a heatmap of the load per layer and expert (needs matplotlib)")
    s.set_defaults(run=run)
    q = esub.add_parser("prune", help="write a checkpoint with fewer experts per layer")
    q.add_argument("ckpt")
    q.add_argument("out")
    q.add_argument("--keep", required=True,
                   help="K (the K most loaded experts per layer, measured on --text/--jsonl), or expert ids "
                        "'0,2,5' for every layer, or per layer '0,2;1,3;...'")
    _add_data_args(q)
    q.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    q.set_defaults(run=run)
    p.set_defaults(run=lambda a: fail("jmerge experts needs a subcommand: stats or prune", 2))


def _add_data_args(p) -> None:
    p.add_argument("--text", help="a text file, one document per non-empty line")
    p.add_argument("--jsonl", help="a JSONL file of records with a text field (and optionally a task field)")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")
    p.add_argument("--task-field", help="JSONL field naming each record's task: one load table per task")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)


class _UsageError(Exception):
    pass


def _loads(a, model) -> dict[str, "object"]:
    from ..models import expert_load  # noqa: PLC0415
    from ..models.text import encode_texts, load_tokenizer, make_batches, read_documents  # noqa: PLC0415
    docs = read_documents(a.text, a.jsonl, text_field=a.text_field, task_field=a.task_field)
    tok = load_tokenizer(a.ckpt)
    out = {}
    for task, texts in docs.items():
        batches = make_batches(encode_texts(tok, texts, max_length=a.max_length), a.batch_size,
                               max_length=a.max_length, vocab_size=model.config.vocab_size)
        out[task] = expert_load(model, [(b.ids, b.mask) for b in batches])  # filler rows: mask 0, not counted
    return out


def _table(load, moe_layers) -> str:
    E = load.shape[1]
    lines = ["layer " + " ".join(f"expert{e:>3d}" for e in range(E)) + " assigned"]
    for i, row in enumerate(load):
        if not moe_layers[i]:
            continue
        tot = max(int(row.sum()), 1)
        lines.append(f"{i:>5d} " + " ".join(f"{100 * v / tot:8.1f}%" for v in row) + f" {int(row.sum()):8d}")  # (token, slot) pairs
    return "\n".join(lines)


def _parse_keep(text: str):
    t = text.strip()
    if t.isdigit():
        return int(t)
    try:
        return [[int(x) for x in part.split(",") if x.strip()] for part in t.split(";")]
    except ValueError:
        raise _UsageError(f"--keep {text!r}: give K, expert ids '0,2,5', or per-layer lists '0,2;1,3'") from None


def run(a) -> int:
    from ..core import MergeInputError  # noqa: PLC0415
    try:
        import jax.numpy as jnp  # noqa: PLC0415
        from ..models import load_model, prune_experts  # noqa: PLC0415
        if a.experts_cmd == "prune":
            keep = _parse_keep(a.keep)
            load = None
            if isinstance(keep, int) and (a.text or a.jsonl):
                model = load_model(a.ckpt, jnp.float32)
                load = sum(_loads(a, model).values())
            elif isinstance(keep, int):
                raise _UsageError("--keep K picks the K most loaded experts: give --text FILE or --jsonl FILE to "
                                  "measure the load, or list the experts to keep ('0,2,5')")
            kept = prune_experts(a.ckpt, a.out, keep, load=load, overwrite=a.overwrite)
            print(f"wrote {a.out}: {len(kept[0])} experts per layer kept")
            return 0
        model = load_model(a.ckpt, jnp.float32)
        if model.config.num_experts <= 0:
            raise _UsageError(f"{a.ckpt}: model_type {model.config.model_type!r} has no experts")
        loads = _loads(a, model)
        for task, load in loads.items():
            print(f"task {task}" if task else "expert load (% of routed assignments per layer)")
            print(_table(load, model.config.moe_layers))
        if a.png:
            from ..demo.heatmap import expert_heatmap  # noqa: PLC0415
            moe = [i for i, f in enumerate(model.config.moe_layers) if f]
            print(expert_heatmap({t: v[moe] for t, v in loads.items()}, a.png))
        return 0
    except (_UsageError, ValueError, ImportError) as e:  # ImportError: the tokenizers package
        return fail(str(e), 2)
    except (MergeInputError, OSError) as e:
        return fail(str(e), 1)
