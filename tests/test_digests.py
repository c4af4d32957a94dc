"""Digests (``sftune.digests``): manifests of whole directories (sub-directories included, as FSDP's sharded
checkpoints have), a changed byte of the same size found and named, legacy directories, set-aside names,
sidecars of single files, and what a final save wrote."""

import hashlib
import json

import pytest

from sftune.digests import (MANIFEST, MODEL_MANIFEST, check_dir, check_model, file_digest, model_snapshot, record,
                            record_model, set_aside, sidecar_check, write_sidecar)
from sftune.errors import SftuneError


def test_manifest_covers_every_file_and_finds_a_flipped_byte(tmp_path):
    (tmp_path / "shards").mkdir()
    (tmp_path / "model.safetensors").write_bytes(b"w" * 10_000)
    (tmp_path / "shards" / "__1_0.distcp").write_bytes(b"s" * 100)
    record(tmp_path, step=3)
    m = json.loads((tmp_path / MANIFEST).read_text())
    assert m["algorithm"] == "sha256" and m["step"] == 3 and sorted(m["files"]) == ["model.safetensors",
                                                                                    "shards/__1_0.distcp"]
    assert m["files"]["model.safetensors"]["sha256"] == hashlib.sha256(b"w" * 10_000).hexdigest()
    assert check_dir(tmp_path).status == "intact" and check_dir(tmp_path).files == 2
    (tmp_path / "shards" / "__1_0.distcp").write_bytes(b"s" * 50 + b"X" + b"s" * 49)  # same size
    c = check_dir(tmp_path)
    assert c.status == "damaged" and c.file == "shards/__1_0.distcp" and "same size" in c.why
    (tmp_path / "shards" / "__1_0.distcp").unlink()
    assert check_dir(tmp_path).why == "missing"
    (tmp_path / MANIFEST).write_text("{trunc")
    assert check_dir(tmp_path).file == MANIFEST


def test_legacy_and_set_aside(tmp_path):
    ck = tmp_path / "step-0000004"
    ck.mkdir()
    assert check_dir(ck).status == "legacy" and check_dir(ck).ok
    assert set_aside(ck).name == "step-0000004.corrupt"
    ck.mkdir()
    assert set_aside(ck).name == "step-0000004.corrupt-2"  # an earlier one set aside is kept too


def test_sidecar(tmp_path):
    f = tmp_path / "cache-abc.arrow"
    f.write_bytes(b"a" * 5000)
    assert sidecar_check(f) == "no digest was recorded for it"
    write_sidecar(f)
    assert sidecar_check(f) is None and file_digest(f) == hashlib.sha256(b"a" * 5000).hexdigest()
    f.write_bytes(b"a" * 2000 + b"b" + b"a" * 2999)
    assert "differs" in sidecar_check(f)


def test_model_manifest_records_what_the_save_wrote(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("{}\n")  # the run's own files are not the model's
    before = model_snapshot(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"m" * 4096)
    (tmp_path / "config.json").write_text("{}")
    record_model(tmp_path, before)
    assert sorted(json.loads((tmp_path / MODEL_MANIFEST).read_text())["files"]) == ["config.json", "model.safetensors"]
    check_model(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("{}\n{}\n")  # a run file changing is no damage
    check_model(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"m" * 4095 + b"x")
    with pytest.raises(SftuneError, match="do not match what was written: model.safetensors"):
        check_model(tmp_path)
