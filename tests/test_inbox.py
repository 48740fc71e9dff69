"""The inbox (tools/inbox.py): a file of yours uploaded once per content, whole or not at all.
No Docker; the e2e tests upload through `make run SOURCE=...` on both stores."""

import hashlib
import sys
from pathlib import Path

import pytest

from tests.harness import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import inbox  # noqa: E402

from conftest import IRIS


def test_the_same_bytes_are_uploaded_once_whatever_their_name(tmp_path):
    store = f"file://{tmp_path}/store/inbox"
    laptop = tmp_path / "sales report?.csv"
    laptop.write_bytes(IRIS.read_bytes())
    digest = hashlib.sha256(IRIS.read_bytes()).hexdigest()
    uri, uploaded = inbox.upload(laptop, store)
    assert uploaded and uri == f"{store}/{digest}/sales_report_.csv"  # nothing a URL would misread
    assert Path(uri.removeprefix("file://")).read_bytes() == IRIS.read_bytes()
    (renamed := tmp_path / "copy.csv").write_bytes(IRIS.read_bytes())
    assert inbox.upload(renamed, store) == (uri, False)
    (changed := tmp_path / "sales.csv").write_bytes(IRIS.read_bytes() + b"5.0,3.0,1.0,0.2,setosa\n")
    other, uploaded = inbox.upload(changed, store)
    assert uploaded and other != uri
    assert sorted(p.name for p in (tmp_path / "store" / "inbox").rglob("*") if p.is_file()) == [
        "sales.csv",
        "sales_report_.csv",
    ]


def test_a_file_that_changes_while_it_is_uploaded_leaves_nothing(tmp_path, monkeypatch):
    laptop = tmp_path / "sales.csv"
    laptop.write_bytes(IRIS.read_bytes())
    real = inbox.shutil.copyfileobj

    def then_edited(source, sink, length):  # the user saves the file again mid-upload
        real(source, sink, length)
        sink.write(b"5.0,3.0,1.0,0.2,setosa\n")

    monkeypatch.setattr(inbox.shutil, "copyfileobj", then_edited)
    with pytest.raises(RuntimeError, match="sales.csv changed while it was uploaded"):
        inbox.upload(laptop, f"file://{tmp_path}/store/inbox")
    assert not [p for p in (tmp_path / "store").rglob("*") if p.is_file()]
    with pytest.raises(FileNotFoundError, match="no file .*missing.csv: SOURCE must be a file"):
        inbox.upload(tmp_path / "missing.csv", f"file://{tmp_path}/store/inbox")
