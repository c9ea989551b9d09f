"""``ulfmpy inspect``: list, verify and print checkpoints. Needs no MPI.

Examples::

    ulfmpy inspect runs/run-1                     # table of checkpoints
    ulfmpy inspect runs/run-1 --verify            # ... and verify every checksum
    ulfmpy inspect runs/run-1/ckpt/step-00000120.h5 --manifest
    ulfmpy inspect runs/run-1 --json

Exit status: 0, or 1 when ``--verify`` finds a committed checkpoint that
restore would reject (the very check restore makes,
:func:`ulfmpy._ckpt_files.checkpoint_problems`, with the same reasons): a
manifest unreadable or with damaged fields, a rank file missing, truncated
or failing its checksum. Without ``--verify`` the table already names
manifests whose fields are damaged (they need no rank file read).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ulfmpy import _ckpt_files as _files
from ulfmpy.errors import ConfigError, RestoreError

__all__ = ["configure", "run"]


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="RUN_DIR_OR_CKPT",
                        help="a run directory, its ckpt/ directory, or one checkpoint "
                             "(manifest ckpt/step-NNNNNNNN.h5 or step directory)")
    parser.add_argument("--verify", action="store_true",
                        help="check every committed checkpoint as restore would: manifest "
                         "fields, every rank file and every array's checksum")
    parser.add_argument("--manifest", action="store_true",
                        help="print the manifest (of the newest committed checkpoint for a run dir)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def _is_single(path: Path) -> bool:
    return bool(_files._STEP_RE.match(path.name))


def _rows(path: Path) -> list[dict[str, Any]]:
    if _is_single(path):
        step = int(_files._STEP_RE.match(path.name).group(1))  # type: ignore[union-attr]
        infos = [i for i in _files.list_checkpoints(path.parent) if i.step == step]
        if not infos:
            raise RestoreError(f"no checkpoint at {path}")
    else:
        if not path.exists():
            raise ConfigError(f"{path} does not exist: give a run directory or a checkpoint")
        infos = _files.list_checkpoints(path)
    return [i.as_dict() for i in infos]


def _manifest_dict(m: _files.Manifest) -> dict[str, Any]:
    arrays = {}
    for name, e in m.entries.items():
        a = {"kind": e["kind"], "dtype": e["dtype"]}
        if e["kind"] == "block":
            a["global_shape"] = e["global_shape"]
        if e["kind"] == "rows":
            a["count"] = e["count"]
        a["ranks"] = [dict(r[name], file=f) for r, f in zip(m.ranks, m.files)]
        arrays[name] = a
    return {"path": str(m.path), "step": m.step, "nranks": m.nranks, "attrs": m.attrs,
            "meta": m.meta, "files": m.files, "arrays": arrays}


def _print_table(rows: list[dict[str, Any]], root: Path) -> None:
    print(f"checkpoints under {root}:")
    print(f"  {'step':>10}  {'ranks':>5}  {'bytes':>14}  {'committed':>9}  verified")
    for r in rows:
        verified = r.get("verified", "-")
        if verified is True:
            verified = "ok"
        elif verified is False:
            verified = "FAILED: " + "; ".join(r.get("problems") or ["?"])  # restore's reason
        nranks = "?" if r["nranks"] is None else r["nranks"]
        nbytes = "?" if r["bytes"] is None else f"{r['bytes']:,}"
        committed = "yes" if r["committed"] else "no"
        print(f"  {r['step']:>10}  {nranks:>5}  {nbytes:>14}  {committed:>9}  {verified}")
        if r.get("error") and r.get("problems") != [r["error"]]:  # not twice
            print(f"  {'':>10}  {r['error']}")


def _print_manifest(d: dict[str, Any]) -> None:
    print(f"manifest {d['path']}")
    print(f"  step {d['step']}, {d['nranks']} ranks")
    for key in sorted(d["attrs"]):
        if key not in ("step", "nranks"):
            print(f"  {key}: {d['attrs'][key]}")
    print(f"  meta: {json.dumps(d['meta'], sort_keys=True)}")
    for name, a in d["arrays"].items():
        if a["kind"] == "block":
            print(f"  {name}: {a['dtype']} global {tuple(a['global_shape'])}, "
                  f"distributed over {len(a['ranks'])} blocks (virtual dataset /{name})")
        elif a["kind"] == "rows":
            print(f"  {name}: {a['dtype']} rows of a collection, count in {a['count']!r} "
                  f"({sum(r['rows'] for r in a['ranks'])} rows over {len(a['ranks'])} ranks)")
        else:
            print(f"  {name}: {a['dtype']} per-rank")
        for r in a["ranks"]:
            where = f" start {tuple(r['start'])}" if "start" in r else ""
            print(f"      {r['file']}: shape {tuple(r['shape'])}{where} crc32 {r['checksum']}")


def run(args: argparse.Namespace) -> int:
    path = Path(args.path)
    rows = _rows(path)
    failed = False
    if args.verify:
        for r in rows:
            if not r["committed"]:
                r["verified"] = None
                continue
            v = _files.verify_checkpoint(r["path"])
            r["verified"], r["problems"] = v.ok, v.problems
            failed |= not v.ok
    out: dict[str, Any] = {"path": str(path), "checkpoints": rows}
    if args.manifest:
        committed = [r for r in rows if r["committed"] and not r.get("error")]
        if not committed:
            raise RestoreError(f"no committed checkpoint with an intact manifest at {path}")
        out["manifest"] = _manifest_dict(_files.read_manifest(committed[-1]["path"]))
    if args.json:
        print(json.dumps(out, indent=2, default=str))
    else:
        if rows:
            _print_table(rows, path)
        else:
            print(f"no checkpoints under {path}")
        if args.manifest:
            _print_manifest(out["manifest"])
    return 1 if failed else 0
