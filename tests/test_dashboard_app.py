"""``sftune ui``: the dashboard's API through the framework's test client (no browser, no network)."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("fastapi", reason="the dashboard needs its extra: pip install 'sftune[ui]'")
pytest.importorskip("httpx", reason="the test client needs httpx (in the test extra)")
from fastapi.testclient import TestClient  # noqa: E402

from dashboard_helpers import chat_run, fake_run  # noqa: E402
from sftune.dashboard.app import create_app  # noqa: E402


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "runs"
    fake_run(root, "done", steps=12)
    fake_run(root, "live", steps=5, final=False)
    fake_run(root, "stopped", steps=4, final=False, checkpoint=True, age_s=3600)
    fake_run(root, "crashed", steps=3, final=False, age_s=3600)
    fake_run(root, "sweep/a", steps=6, lr=2e-3)
    fake_run(root, "locked", steps=2, final=False, age_s=3600, lock_pid=os.getpid())
    (tmp_path / "secret.txt").write_text("not for the dashboard")
    return root


@pytest.fixture
def client(root):
    return TestClient(create_app(root))


def test_runs_list_states_and_summaries(client):
    runs = {r["name"]: r for r in client.get("/api/runs").json()["runs"]}
    assert set(runs) == {"done", "live", "stopped", "crashed", "sweep/a", "locked"}
    assert {n: r["state"] for n, r in runs.items()} == {
        "done": "finished", "live": "running", "stopped": "interrupted", "crashed": "failed",
        "sweep/a": "finished", "locked": "running"}  # a live PID in the lock file: running, however old
    done = runs["done"]
    assert (done["recipe"], done["step"], done["max_steps"]) == ("quickstart", 12, 12)
    assert done["loss"] == pytest.approx(3.8) and done["eval_loss"] == 4.0 and done["tokens_per_s"] == 912.0
    assert done["start_time"] > 0 and done["chat"] is False  # no final model in a fake run


def test_lock_with_a_dead_pid_is_not_running(root, client):
    lock = root / "locked" / ".sftune.lock"
    lock.write_text(lock.read_text().replace(str(os.getpid()), "999999999"))
    runs = {r["name"]: r for r in client.get("/api/runs").json()["runs"]}
    assert runs["locked"]["state"] == "failed"
    lock.write_text(json.dumps({"pid": 999999999, "host": "another-machine"}))  # cannot be checked from here
    assert {r["name"]: r for r in client.get("/api/runs").json()["runs"]}["locked"]["state"] == "running"


def test_run_details_and_incremental_metrics(client, root):
    d = client.get("/api/run", params={"name": "done"}).json()
    assert d["final_metrics"]["eval_loss"] == 4.0 and d["config"]["train"]["max_steps"] == 12
    assert "recipe: quickstart" in d["config_yaml"] and "metrics.jsonl" in d["files"]
    assert client.get("/api/run", params={"name": "stopped"}).json()["checkpoints"][0]["step"] == 4
    m = client.get("/api/metrics", params={"name": "live"}).json()
    assert len(m["records"]) == 7 and m["next"] == 7 and m["state"] == "running"
    with (root / "live" / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 6, "loss": 4.4, "lr": 1e-3}) + "\n" + '{"step": 7, "lo')  # a line mid-write
    m = client.get("/api/metrics", params={"name": "live", "since": 7}).json()
    assert [r["step"] for r in m["records"]] == [6] and m["next"] == 8


def test_compare_overlays_and_diffs_configs(client):
    c = client.get("/api/compare", params=[("name", "done"), ("name", "sweep/a")]).json()
    assert [r["name"] for r in c["runs"]] == ["done", "sweep/a"]
    assert [len([x for x in r["records"] if "loss" in x]) for r in c["runs"]] == [12, 6]
    assert [r["total_steps"] for r in c["runs"]] == [12, 6]  # the compare charts' "fraction of the run"
    diff = {d["key"]: d["values"] for d in c["config_diff"]}
    assert diff == {"train.max_steps": {"done": 12, "sweep/a": 6}, "train.lr": {"done": 0.001, "sweep/a": 0.002}}

def test_compare_fills_in_defaults(client, root):
    from sftune.config import Config

    default = Config().train.batch_size
    with (root / "done" / "sftune_config.yaml").open("a") as f:
        f.write(f"  batch_size: {default}\n")  # written in one config only, with the default value
    c = client.get("/api/compare", params=[("name", "done"), ("name", "sweep/a")]).json()
    assert "train.batch_size" not in {d["key"] for d in c["config_diff"]}


@pytest.mark.parametrize("params", [
    {"name": "../secret.txt"}, {"name": ".."}, {"name": "/etc"}, {"name": "done/../../"}, {"name": "nope"}])
def test_run_names_outside_runs_dir_are_refused(client, params):
    assert client.get("/api/run", params=params).status_code == 404
    assert client.get("/api/metrics", params=params).status_code == 404


@pytest.mark.parametrize("path", ["../../secret.txt", "../crashed/metrics.jsonl", "/etc/passwd", "..", "%2e%2e/x",
                                  "checkpoints/../../../secret.txt"])
def test_file_path_traversal_is_refused(client, path):
    r = client.get("/api/file", params={"name": "done", "path": path})
    assert r.status_code == 404 and "not for the dashboard" not in r.text


def test_files_of_a_run_are_served(client):
    r = client.get("/api/file", params={"name": "done", "path": "sftune_config.yaml"})
    assert r.status_code == 200 and "quickstart" in r.text
    assert client.get("/static/../app.py").status_code == 404
    assert client.get("/static/plotly.min.js").status_code == 200  # from the plotly package, not a CDN


def test_page_and_static_assets_reference_nothing_remote(client):
    page = client.get("/").text
    assert '<script src="/static/plotly.min.js">' in page
    for asset in ("/", "/static/app.js", "/static/style.css"):
        assert "http://" not in client.get(asset).text and "https://" not in client.get(asset).text


def test_token_and_host_checks(root):
    guarded = TestClient(create_app(root, token="s3cret", local_only=False))
    assert guarded.get("/api/runs").status_code == 401
    assert guarded.get("/api/runs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    r = guarded.get("/", params={"token": "s3cret"})
    assert r.status_code == 200 and "sftune_token" in r.headers["set-cookie"]
    assert guarded.get("/api/runs").status_code == 200  # the cookie from the first visit
    local = TestClient(create_app(root))
    assert local.get("/api/runs", headers={"Host": "evil.example"}).status_code == 400  # DNS rebinding
    # cross-site request forgery: a foreign Origin, or a form / text body that skips the CORS preflight
    body = {"run": "done", "message": "hi"}
    assert local.post("/api/chat", json=body, headers={"Origin": "http://evil.example"}).status_code == 403
    assert local.post("/api/chat", content=json.dumps(body), headers={"Content-Type": "text/plain"}).status_code == 415
    assert local.post("/api/chat", json=body, headers={"Origin": "http://testserver"}).status_code == 409


def test_preview_refuses_files_outside_runs_dir(client, tmp_path):
    r = client.post("/api/preview", json={"recipe": str(tmp_path / "x.yaml")})
    assert r.status_code == 400 and "built-in recipe" in r.json()["detail"]
    r = client.post("/api/preview", json={"recipe": "quickstart", "overrides": [f"data.path={tmp_path}"]})
    assert r.status_code == 400 and "only reads local files under" in r.json()["detail"]
    r = client.post("/api/preview", json={"recipe": "quickstart", "overrides": ["model.trust_remote_code=true"]})
    assert r.status_code == 400 and "trust_remote_code" in r.json()["detail"]
    r = client.post("/api/preview", json={"recipe": "quickstart", "overrides": ["data.nope=1"]})
    assert r.status_code == 400 and "data.nope" in r.json()["detail"]  # the CLI's own config error


def test_preview_matches_sftune_preview_json(client, capsys):
    from sftune.cli import main

    r = client.post("/api/preview", json={"recipe": "quickstart", "overrides": ["data.limit=40"], "n": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert main(["preview", "quickstart", "data.limit=40", "-n", "2", "--json"]) == 0
    cli = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(body["sequences"]) == len(cli) == 2
    for seq, ref in zip(body["sequences"], cli):
        assert "".join(t["text"] for t in seq["tokens"]) == ref["text"]
        assert [t["trained"] for t in seq["tokens"]] == [lab != -100 for lab in ref["labels"]]
        assert seq["rows"] == ref["rows"]
        trained = "".join(t["text"] for t in seq["tokens"] if t["trained"])
        assert trained.endswith("<|endoftext|>") and "Q:" not in trained  # the completion and EOS only
    assert body["data_report"]["rows_used"] == 40


def test_chat_streams_with_the_training_format(tmp_path):
    root = tmp_path / "runs"
    chat_run(root)
    fake_run(root, "unfinished", final=False)
    client = TestClient(create_app(root))
    assert client.post("/api/chat", json={"run": "unfinished", "message": "hi"}).status_code == 409
    assert client.post("/api/chat", json={"run": "../runs/chat/..", "message": "hi"}).status_code == 404
    with client.stream("POST", "/api/chat", json={"run": "chat", "message": "reverse abc", "max_new_tokens": 6}) as r:
        assert r.status_code == 200
        assert json.loads(r.headers["x-prompt"]) == "Q: reverse abc\nA:"  # the run's training template
        pieces = list(r.iter_text())
    assert "".join(pieces).strip()  # an untrained model: some text, cut at 6 tokens
    assert len(pieces) >= 2  # streamed: a piece per generated token, not the whole reply at the end
    with client.stream("POST", "/api/chat", json={"run": "chat", "message": "reverse abc", "max_new_tokens": 6,
                                                  "base": True}) as r:
        assert r.status_code == 200 and "".join(r.iter_text()).strip()


def test_new_run_form_schema_and_validation(client, root, monkeypatch):
    import subprocess

    fields = {f["key"]: f for f in client.get("/api/schema", params={"recipe": "quickstart"}).json()["fields"]}
    assert fields["train.max_steps"]["value"] == 2000 and fields["train.max_steps"]["kind"] == "int"
    assert fields["data.packing"]["kind"] == "bool" and fields["train.scheduler"]["kind"] == "choice"
    assert fields["data.prompt"]["value"] == "Q: {instruction}\nA:" and fields["train.lr"]["description"]
    assert client.get("/api/schema", params={"recipe": "../x.yaml"}).status_code == 400

    import sftune.dashboard.newrun as newrun

    started = []
    monkeypatch.setattr(newrun, "_children", [])
    monkeypatch.setattr(subprocess, "Popen", lambda cmd, **kw: started.append(cmd) or type("P", (), {"pid": 1})())
    bad = client.post("/api/train", json={"recipe": "quickstart", "name": "x", "overrides": {"train.max_steps": "many"}})
    assert bad.status_code == 400 and "train.max_steps" in bad.json()["detail"]  # pydantic's message, as the CLI
    bad = client.post("/api/train", json={"recipe": "quickstart", "name": "x", "overrides": {"train.nope": 1}})
    assert bad.status_code == 400 and "train.nope" in bad.json()["detail"]
    for name in ("../escape", "/tmp/abs", "done", "", ".hidden"):
        r = client.post("/api/train", json={"recipe": "quickstart", "name": name, "overrides": {}})
        assert r.status_code == 400, name
    r = client.post("/api/train", json={"recipe": "quickstart", "name": "new/one",
                                        "overrides": {"train.max_steps": 5, "train.output_dir": "/elsewhere"}})
    assert r.status_code == 200, r.text
    assert started == [[started[0][0], "-m", "sftune", "train", str(root.resolve() / "new/one/sftune_config.yaml")]]
    saved = (root / "new" / "one" / "sftune_config.yaml").read_text()
    assert "max_steps: 5" in saved and f"output_dir: {root.resolve() / 'new/one'}" in saved
    assert {r["name"]: r["state"] for r in client.get("/api/runs").json()["runs"]}["new/one"] == "running"
