"""Images at inference: generation from images (batched == one at a time == transformers' own),
eval prompts carry their images, `generate --image`, `chat --image`, the dashboard chat API, the
processor saved by export and `export --verify` generating from an image."""

from __future__ import annotations

import base64
import io
import json
import shutil

import pytest
import torch

import vision_models as vm
from sftune.cli import main
from sftune.data.images import IMAGE
from sftune.inference import load_for_inference
from sftune.vision_inference import decode_images, first_message_shows


@pytest.fixture
def llava_dir(vlm):
    return vlm("llava")


@pytest.fixture
def qwen_dir(vlm):
    return vlm("qwen2_vl")


def _png(path, colour=(255, 0, 0), size=(56, 56)):
    vm.image(size, colour).save(path)
    return str(path)


@pytest.mark.parametrize("style", ["llava", "qwen2_vl"])
def test_generation_from_images_is_batched_exactly(style, llava_dir, qwen_dir):
    path = {"llava": llava_dir, "qwen2_vl": qwen_dir}[style]
    loaded = load_for_inference(str(path), device="cpu")
    assert type(loaded.fmt).__name__ == "VisionMessagesFormat"
    red, blue = vm.image(colour=(255, 0, 0)), vm.image((84, 56), (0, 0, 255))
    prompts = [loaded.prompt_from_text(IMAGE + "What colour?"), loaded.prompt_from_text(IMAGE + "Hi"),
               loaded.prompt_from_text("no image here")]
    images = [[red], [blue], []]
    batched = loaded.generate(prompts, images=images, max_new_tokens=5, batch_size=4)
    alone = [loaded.generate([p], images=[i], max_new_tokens=5, batch_size=1)[0] for p, i in zip(prompts, images)]
    assert batched == alone
    processor = loaded.tokenizer.sftune_processor  # transformers alone, the same prompt
    enc = processor(text=[prompts[0]], images=[red], return_tensors="pt", add_special_tokens=False)
    stops = loaded.fmt.stop_ids(loaded.tokenizer)
    with torch.no_grad():
        new = loaded.model.generate(**enc, max_new_tokens=5, do_sample=False, eos_token_id=stops,
                                    pad_token_id=loaded.tokenizer.pad_token_id)[0, enc["input_ids"].shape[1]:].tolist()
    new = new[:next((k for k, t in enumerate(new) if t in stops), len(new))]
    assert batched[0] == loaded.tokenizer.decode(new, skip_special_tokens=False)


def test_eval_prompts_carry_their_images(llava_dir, tmp_path):
    from sftune.eval_metrics import generation_examples

    loaded = load_for_inference(str(llava_dir), device="cpu")
    loaded.fmt.base = tmp_path
    _png(tmp_path / "a.png")
    rows = [{"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "colour?"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "red"}]}], "images": ["a.png"]},
            {"messages": [{"role": "user", "content": "no image"}, {"role": "assistant", "content": "ok"}]}]
    with_image, without = generation_examples(loaded.fmt, rows, None)
    assert with_image.reference == "red" and "<image>" in with_image.prompt and len(with_image.images) == 1
    assert without.reference == "ok" and without.images == []
    from sftune.evaluate import run_eval  # sftune eval: image paths relative to the eval file

    (tmp_path / "eval").mkdir()
    _png(tmp_path / "eval" / "a.png")
    data = tmp_path / "eval" / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_eval(str(llava_dir), str(data), max_new_tokens=3, out=str(tmp_path / "eval.json"))
    assert result[str(llava_dir)]["generated"] == 2 and result[str(llava_dir)]["examples"] == 2


def test_generate_and_chat_take_image_files(llava_dir, tiny_model_dir, tmp_path, capsys, monkeypatch):
    png = _png(tmp_path / "red.png")
    assert main(["generate", str(llava_dir), "--prompt", "What colour?", "--image", png, "--max-new-tokens", "3"]) == 0
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"messages": [{"role": "user", "content": "<image>colour?"}], "images": ["red.png"]}))
    assert main(["generate", str(llava_dir), "--file", str(rows), "--max-new-tokens", "3"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["prompt"].count("<image>") == 1
    monkeypatch.setattr("sys.stdin", io.StringIO("What colour?\nAnd now?\n"))
    assert main(["chat", str(llava_dir), "--image", png, "--max-new-tokens", "3"]) == 0
    assert main(["generate", str(tiny_model_dir), "--prompt", "hi", "--image", png]) == 2
    assert "not an image-text-to-text model" in capsys.readouterr().err
    assert main(["generate", str(llava_dir), "--prompt", "hi", "--image", str(tmp_path / "missing.png")]) == 2
    err = capsys.readouterr().err
    assert "--image" in err and "no such file" in err
    assert main(["generate", str(llava_dir), "--file", str(rows), "--image", png]) == 2


def test_images_in_the_chat_api_go_with_the_first_message(llava_dir, tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from sftune.config import config_to_yaml, load_config
    from sftune.dashboard.app import create_app

    buf = io.BytesIO()
    vm.image().save(buf, format="PNG")
    data = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    assert len(decode_images([data])) == 1
    with pytest.raises(Exception, match="not base64"):
        decode_images(["%%%"])
    message, history = first_message_shows("next", [{"role": "user", "content": "first"},
                                                     {"role": "assistant", "content": "ok"}], 1)
    assert message == "next" and history[0]["content"] == IMAGE + "first"
    run = tmp_path / "runs" / "vis"
    shutil.copytree(llava_dir, run)
    (run / "sftune_config.yaml").write_text(config_to_yaml(load_config(None, {"model.path": str(llava_dir)})))
    (run / "metrics.jsonl").write_text(json.dumps({"time": 1.0, "step": 1, "loss": 5.0, "lr": 1e-3}) + "\n")
    client = TestClient(create_app(tmp_path / "runs"))
    with client.stream("POST", "/api/chat", json={"run": "vis", "message": "What colour?", "images": [data],
                                                  "max_new_tokens": 3}) as r:
        assert r.status_code == 200 and "<image>" in json.loads(r.headers["x-prompt"])
        assert "[error" not in "".join(r.iter_text())


def test_export_saves_the_processor_and_verify_generates_from_an_image(qwen_dir, tmp_path):
    from sftune.export.hf import export_run
    from sftune.export.verify import verify_export
    from sftune.vision_model import load_processor

    out = export_run(str(qwen_dir), str(tmp_path / "out"))
    assert (out / "processor_config.json").is_file()
    assert type(load_processor(str(out))).__name__ == "Qwen2VLProcessor"
    result = verify_export(str(qwen_dir), out)
    assert result.ok, result.lines
    assert any("PASS generation from the image" in line for line in result.lines)
