"""``gct-surgery trust``: remember that Python code is yours, so files naming it open."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._output import info, print_json, print_table


def trust(
    spec: Optional[str] = typer.Argument(None, show_default=False,
                                         help="The code: path/to/file.py:object, "
                                              "package.module:object or pickle:PATH."),
    root: Optional[Path] = typer.Option(None, help="The folder package.module is imported "
                                                   "from (default: the current folder, then "
                                                   "the import path)."),
    list_: bool = typer.Option(False, "--list", help="List the remembered code."),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Remember a model factory, task or pickle as yours (by path, content hash and
    name), so checkpoints and run folders that name it open without --trust-source.
    Code you inject from, save with or fine-tune with is remembered already; this is for
    other machines (a cluster node) and for files made elsewhere. If the file changes,
    the tool asks again. The store is $XDG_CONFIG_HOME/gct-surgery/trusted.json, or the
    file $GCT_SURGERY_TRUST_FILE names."""
    from ..io import trust as store

    if list_ or spec is None:
        entries = store.read_store(store.store_path())
        if json_out:
            print_json({"store": str(store.store_path()), "entries": entries})
            return
        print_table(f"trusted code ({store.store_path()})", ["path", "object", "sha256", "added"],
                    [[e.get("path"), e.get("attr"), str(e.get("sha256", ""))[:12], e.get("added")]
                     for e in entries])
        return
    folder = str(root.resolve()) if root else None
    store.locate(spec, folder)  # a spec that names no code, or no file, is one line here
    ref = store.remember(spec, folder)
    if json_out:
        print_json({"store": str(store.store_path()), "path": str(ref.path), "attr": ref.attr,
                    "sha256": ref.sha256})
        return
    info(f"trusted {ref} (sha256 {ref.sha256[:12]}) in {store.store_path()}")
