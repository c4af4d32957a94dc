"""The dashboard's web app: a JSON API over the runs under RUNS_DIR, the data preview, streamed chat,
and one static page (``static/``) that draws with the plotly.js shipped in the ``plotly`` package.

Security: only runs and files under RUNS_DIR are read; names that resolve elsewhere are 404. A token,
when set (required for a non-local host), is checked on every request. Nothing runs user code:
configs with ``model.trust_remote_code`` are refused, and overrides may not name local files outside
RUNS_DIR.
"""

from __future__ import annotations

import json
import queue
import secrets
import threading
from collections import OrderedDict
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import Body, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.middleware.trustedhost import TrustedHostMiddleware

import sftune.dashboard.runs as R
from sftune import vision_inference
from sftune.errors import SftuneError

STATIC = Path(__file__).parent / "static"
LOCAL_HOSTS = ["127.0.0.1", "localhost", "[::1]", "::1", "testserver"]


def plotly_js() -> Path:
    import plotly

    return Path(plotly.__file__).parent / "package_data" / "plotly.min.js"


class Models:
    """Loaded models for chat, the two most recent kept; one generation per model at a time. Loading is
    serialised: transformers' loading (meta-device initialisation) is not thread-safe."""

    def __init__(self, keep: int = 2):
        self.keep, self.cache, self.lock = keep, OrderedDict(), threading.RLock()

    def get(self, run: Path, base: bool):
        key = (str(run), base)
        with self.lock:
            if key not in self.cache:
                loaded = _load_base(self.get(run, False)[0]) if base else _load_run(run)
                self.cache[key] = (loaded, threading.Lock())
            self.cache.move_to_end(key)
            entry = self.cache[key]
            while len(self.cache) > self.keep:
                self.cache.popitem(last=False)
            return entry


def _check_no_remote_code(cfg) -> None:
    if cfg is not None and cfg.model.trust_remote_code:
        raise SftuneError("this config sets model.trust_remote_code: the dashboard does not run a model's own code")


def _load_run(run: Path):
    from sftune.inference import load_for_inference

    loaded = load_for_inference(str(run), device="cpu" if not _cuda() else None)
    _check_no_remote_code(loaded.cfg)
    return loaded


def _load_base(run_loaded):
    """The run's base model (for a from-scratch run: its initial weights), with the run's format."""
    from sftune.inference import Loaded
    from sftune.model import load_model

    cfg = run_loaded.cfg.model_copy(deep=True)
    cfg.lora.enabled = False
    cfg.lora.load_in_4bit = False
    model = load_model(cfg, run_loaded.tokenizer, 0, next(run_loaded.model.parameters()).device).eval()
    return Loaded(model, run_loaded.tokenizer, cfg, run_loaded.fmt, f"{cfg.model.path} (base)")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


class _QueueWriter:
    """A file-like sink for :class:`sftune.generation.Streamer` that hands text to the response."""

    def __init__(self):
        self.q: queue.Queue = queue.Queue()

    def write(self, text: str) -> None:
        if text:
            self.q.put(text)

    def flush(self) -> None:
        pass


def create_app(runs_dir: str | Path, token: str | None = None, local_only: bool = True) -> FastAPI:
    root = Path(runs_dir).resolve()
    app = FastAPI(title="sftune dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    models = Models()
    if local_only:  # a page on another site cannot reach the dashboard through DNS rebinding
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=LOCAL_HOSTS)

    @app.middleware("http")
    async def same_origin_json(request: Request, call_next):
        """POSTs must be JSON from this page: a JSON body makes another site's request preflighted (and
        refused), and a foreign Origin is refused outright (cross-site request forgery)."""
        if request.method not in ("GET", "HEAD"):
            origin = request.headers.get("origin")
            if origin and urlsplit(origin).netloc != request.headers.get("host"):
                return PlainTextResponse("cross-origin request refused", 403)
            if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
                return PlainTextResponse("send JSON (Content-Type: application/json)", 415)
        return await call_next(request)

    if token:
        @app.middleware("http")
        async def check_token(request: Request, call_next):
            given = (request.query_params.get("token") or request.cookies.get("sftune_token")
                     or request.headers.get("authorization", "").removeprefix("Bearer "))
            if not secrets.compare_digest(given.encode(), token.encode()):
                return PlainTextResponse("a token is required: open the URL printed by `sftune ui`", 401)
            response = await call_next(request)
            if request.query_params.get("token"):
                response.set_cookie("sftune_token", token, httponly=True, samesite="strict")
            return response

    def run_or_404(name: str) -> Path:
        try:
            return R.run_dir(root, name)
        except R.NotARun:
            raise HTTPException(404, f"no run '{name}' under the runs directory") from None

    @app.exception_handler(SftuneError)
    async def user_error(request: Request, exc: SftuneError):
        return JSONResponse({"detail": str(exc)}, status_code=400)

    # ------------------------------------------------------------------ pages and assets
    @app.get("/")
    def index():
        return FileResponse(STATIC / "index.html")

    @app.get("/favicon.ico")
    def favicon():
        return PlainTextResponse("", status_code=204)

    @app.get("/static/{name}")
    def static(name: str):
        files = {"app.js": STATIC / "app.js", "style.css": STATIC / "style.css", "plotly.min.js": plotly_js()}
        if name not in files:
            raise HTTPException(404)
        return FileResponse(files[name], headers={"Cache-Control": "max-age=3600"})

    # ------------------------------------------------------------------ runs
    @app.get("/api/runs")
    def list_runs():
        out = []
        for name in R.find_runs(root):
            try:
                out.append(R.summary(root, name))
            except (R.NotARun, OSError):
                continue
        out.sort(key=lambda r: r["start_time"] or 0, reverse=True)
        return {"root": str(root), "runs": out}

    @app.get("/api/run")
    def run(name: str):
        run_or_404(name)
        return R.details(root, name)

    @app.get("/api/metrics")
    def metrics(name: str, since: int = 0):
        run = run_or_404(name)
        records = R.read_metrics(run, since)
        return {"since": since, "next": since + len(records), "records": records, "state": R.state(run)}

    @app.get("/api/file")
    def file(name: str, path: str):
        """A file of a run (report.md, plots, configs); nothing outside RUNS_DIR."""
        run = run_or_404(name)
        try:
            target = R.inside(run, path)
        except R.NotARun:
            raise HTTPException(404, "no such file in this run") from None
        if not target.is_file():
            raise HTTPException(404, "no such file in this run")
        return FileResponse(target)

    @app.get("/api/compare")
    def compare(name: list[str] = Query(...)):
        runs = {n: run_or_404(n) for n in name}
        records = {n: R.read_metrics(p) for n, p in runs.items()}
        return {"runs": [{"name": n, "state": R.state(p), "records": records[n],
                          "total_steps": R.total_steps(records[n], R.read_config(p))} for n, p in runs.items()],
                "config_diff": R.config_diff({n: _resolved(R.read_config(p)) for n, p in runs.items()})}

    # ------------------------------------------------------------------ data preview
    @app.get("/api/recipes")
    def recipes():
        from sftune.config import builtin_recipes

        local = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.yaml")
                       if p.name != "sftune_config.yaml" and "checkpoints" not in p.parts)
        return {"builtin": builtin_recipes(), "files": local[:200], "runs": R.find_runs(root)}

    @app.post("/api/preview")
    def preview(body: dict = Body(...)):
        from sftune.config import apply_overrides, load_config, validate_config
        from sftune.preview import preview_sequences, token_pieces

        recipe, n = str(body.get("recipe") or ""), max(1, min(int(body.get("n") or 3), 50))
        overrides = [o for o in (body.get("overrides") or []) if str(o).strip()]
        for o in overrides:
            _check_override(root, str(o))
        if body.get("run"):  # a run's resolved config
            run = run_or_404(str(body["run"]))
            cfg = validate_config(R.read_config(run), str(run / "sftune_config.yaml"))
            if overrides:
                raw = cfg.model_dump(mode="json")
                apply_overrides(raw, [str(o) for o in overrides])  # the command line's own function
                cfg = validate_config(raw, "the overrides")
        else:
            cfg = load_config(_recipe_path(root, recipe), [str(o) for o in overrides])
        _check_no_remote_code(cfg)
        tokenizer, data, sequences = preview_sequences(cfg, n)
        out = []
        for seq in sequences:
            pieces = token_pieces(tokenizer, seq["input_ids"])
            out.append({"rows": seq["rows"], "tokens": [
                {"text": p, "trained": lab != -100, "weight": w}
                for p, lab, w in zip(pieces, seq["labels"], seq["weights"])]})
        return {"sequences": out, "data_report": data.report.to_dict(),
                "eval_report": data.eval_report.to_dict() if data.eval_report is not None else None,
                "weighted": bool(data.train.weighted)}

    # ------------------------------------------------------------------ a new run from a form
    @app.get("/api/schema")
    def config_schema(recipe: str = "quickstart"):
        from sftune.dashboard.newrun import schema

        return {"recipe": recipe, "fields": schema(_recipe_path(root, recipe))}

    @app.post("/api/train")
    def start_run(body: dict = Body(...)):
        from sftune.config import load_config
        from sftune.dashboard.newrun import start

        overrides = body.get("overrides") or {}
        if not isinstance(overrides, dict):
            raise HTTPException(400, "overrides: an object of dotted keys to values")
        for key, value in overrides.items():
            _check_override(root, f"{key}={value}")
        recipe = _recipe_path(root, str(body.get("recipe") or ""))
        _check_no_remote_code(load_config(recipe, overrides))
        return start(root, recipe, overrides, str(body.get("name") or "").strip())

    # ------------------------------------------------------------------ chat
    @app.post("/api/chat")
    def chat(body: dict = Body(...)):
        from sftune.generation import Streamer

        run = run_or_404(str(body.get("run") or ""))
        if not R.has_final_model(run):
            raise HTTPException(409, "this run has no final model yet (chat needs a finished run)")
        message = str(body.get("message") or "")
        if not message.strip():
            raise HTTPException(400, "empty message")
        history = [{"role": str(m.get("role")), "content": str(m.get("content"))} for m in body.get("history") or []
                   if isinstance(m, dict)]
        max_new = max(1, min(int(body.get("max_new_tokens") or 128), 1024))
        temperature = float(body.get("temperature") or 0.0)
        loaded, lock = models.get(run, bool(body.get("base")))
        tools = body.get("tools") if isinstance(body.get("tools"), list) and loaded.is_chat else None
        images = vision_inference.decode_images(body.get("images"))  # base64, shown with the first message
        vision_inference.need_images_model(loaded.fmt, run.name, images)
        message, history = vision_inference.first_message_shows(message, history if loaded.is_chat else [], len(images))
        prompt = loaded.prompt_from_text(message, history if loaded.is_chat else None, tools=tools)
        sink = _QueueWriter()
        done = object()

        def work():
            try:
                with lock:
                    streamer = Streamer(loaded.tokenizer, set(loaded.fmt.stop_ids(loaded.tokenizer)), sink)
                    loaded.generate([prompt], images=[images] if images else None, max_new_tokens=max_new,
                                    batch_size=1, temperature=temperature, streamer=streamer)
            except Exception as e:  # shown in the reply, not lost in a thread
                sink.write(f"\n[error: {e}]")
            finally:
                sink.q.put(done)

        threading.Thread(target=work, daemon=True).start()

        def stream():
            while (item := sink.q.get()) is not done:
                yield item

        return StreamingResponse(stream(), media_type="text/plain; charset=utf-8",
                                 headers={"X-Prompt": json.dumps(prompt[-200:]), "Cache-Control": "no-store"})

    return app


def _resolved(raw: dict) -> dict:
    """A run's config with every default filled in (as saved by a different sftune version, it may not
    validate: then as written)."""
    from sftune.config import validate_config

    try:
        return validate_config(raw).model_dump(mode="json")
    except SftuneError:
        return raw


def _check_override(root: Path, item: str) -> None:
    """Overrides may not point the preview at local files outside RUNS_DIR."""
    _, _, value = item.partition("=")
    value = value.strip()
    if value and not value.startswith("builtin:") and ("/" in value or value.startswith(".")):
        p = Path(value).expanduser()
        p = p if p.is_absolute() else root / p
        if p.exists():
            try:
                R.inside(root, str(p.resolve()))
            except R.NotARun:
                raise SftuneError(f"'{item}': the dashboard only reads local files under {root}") from None


def _recipe_path(root: Path, recipe: str) -> str:
    """A built-in recipe name, or a YAML file under RUNS_DIR."""
    from sftune.config import builtin_recipes

    if recipe in builtin_recipes():
        return recipe
    try:
        path = R.inside(root, recipe)
    except R.NotARun:
        raise SftuneError(f"recipe '{recipe}': give a built-in recipe ({', '.join(builtin_recipes())}) "
                          "or a YAML file under the runs directory") from None
    if not path.is_file() or path.suffix not in (".yaml", ".yml"):
        raise SftuneError(f"recipe '{recipe}' is not a YAML file under the runs directory")
    return str(path)
