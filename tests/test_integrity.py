"""``sftune verify RUN_DIR`` (``sftune.integrity``): per checkpoint intact or damaged (which file), which one a
resume would take, the final model; exit status 1 when something is damaged; ``--json``."""

import json
import shutil

import pytest

from sftune.cli import main
from sftune.integrity import verify_run
from sftune.training import train

from conftest import train_config
from test_faults import flip_middle

pytestmark = pytest.mark.usefixtures("no_plots")


@pytest.fixture(scope="module")
def finished(tiny_model_dir, qa_rows_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sftune.training.build_report", lambda o: o / "report.md")
        train(train_config(tiny_model_dir, qa_rows_file, out, **{"train.max_steps": 4, "train.save_every": 2,
                                                                  "train.batch_size": 4, "train.keep_checkpoints": 3}))
    return out


def verify(run, capsys, *extra):
    code = main(["verify", str(run), *extra])
    return code, capsys.readouterr().out


def test_an_intact_run(finished, capsys):
    code, out = verify(finished, capsys)
    assert code == 0, out
    assert "step-0000002: intact (5 files, sha256)" in out and "step-0000004: intact" in out
    assert "a resume would take: step-0000004" in out and "final model: intact" in out and "verify: OK" in out


def test_damaged_checkpoint_and_final_model(finished, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    flip_middle(run / "checkpoints" / "step-0000004" / "model.safetensors")
    flip_middle(run / "model.safetensors")
    code, out = verify(run, capsys)
    assert code == 1
    assert "step-0000004: DAMAGED: model.safetensors: its sha256 differs" in out
    assert "step-0000002: intact" in out and "a resume would take: step-0000002" in out
    assert "final model: DAMAGED: model.safetensors" in out and "verify: DAMAGED" in out
    code, out = verify(run, capsys, "--json")
    report = json.loads(out)
    assert code == 1 and report["ok"] is False and report["resume"] == "step-0000002"
    assert [(c["name"], c["status"], c["file"]) for c in report["checkpoints"]] == [
        ("step-0000002", "intact", None), ("step-0000004", "damaged", "model.safetensors")]
    assert report["final_model"]["status"] == "damaged"


def test_legacy_and_set_aside_checkpoints(finished, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "checkpoints" / "step-0000002" / "manifest.json").unlink()  # written before digests
    (run / "checkpoints" / "step-0000004").rename(run / "checkpoints" / "step-0000004.corrupt")
    code, out = verify(run, capsys)
    assert code == 0
    assert "step-0000002: no digests (written before sftune recorded them)" in out
    assert "step-0000004.corrupt: set aside earlier" in out and "a resume would take: step-0000002" in out
    (run / "checkpoints" / "step-0000002" / "optimizer.bin").write_bytes(b"x" * 10)  # a legacy file that won't load
    assert verify_run(run)["checkpoints"][0]["file"] == "optimizer.bin" and not verify_run(run)["ok"]
    assert main(["verify", str(tmp_path / "nope")]) == 2
