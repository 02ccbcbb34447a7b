"""Images in records (issue 21, the data layer): every format people have reads into content
parts with resolved references, `data check` opens every picture, and a text model refuses
image records in one sentence instead of training on a literal "<image>"."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tunesmith.data.images import has_images, images_of
from tunesmith.data.validate import check_file, load_records
from tunesmith.errors import TunesmithError

DEMO = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "llamafactory-demo"


def png(path: Path, size=(32, 24), color=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def data_uri(size=(8, 8)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (0, 90, 200)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_the_shared_mllm_demo_reads_as_image_parts_and_checks():
    rep = check_file(DEMO / "mllm_demo.json")
    assert rep.ok and rep.kind == "sft" and len(rep.entries) == 6
    raw = json.loads((DEMO / "mllm_demo.json").read_text())
    for (_, rec), src in zip(rep.entries, raw):
        refs = [ref for _, ref in images_of(rec)]
        assert refs == [str((DEMO / p).resolve()) for p in src["images"]]  # each placeholder, its image, in order
        text = "".join(p["text"] for m in rec["messages"] if isinstance(m["content"], list)
                       for p in m["content"] if p["type"] == "text")
        assert "<image>" not in text and "images" not in rec.get("meta", {})
    assert rep.images == {"count": 8, "files": 3, "records": 6, "min": "300x166", "max": "300x199",
                          "formats": ["JPEG"]}
    first = rep.entries[0][1]["messages"]
    assert first[0]["content"] == [{"type": "image", "image": str((DEMO / "mllm_demo_data/1.jpg").resolve())},
                                   {"type": "text", "text": "Who are they?"}]
    assert first[2]["content"][-1]["type"] == "image" and isinstance(first[1]["content"], str)  # text stays text


def test_every_image_format_people_have(tmp_path):
    pic = png(tmp_path / "pics" / "a.png")
    rows = [
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "pics/a.png"}},
                                                   {"type": "text", "text": "What colour is it?"}]},
                      {"role": "assistant", "content": "Red."}]},
        {"messages": [{"role": "user", "content": [{"type": "image", "image": str(pic)}, "Colour?"]},
                      {"role": "assistant", "content": [{"type": "text", "text": "Red."}]}]},  # text parts → a string
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": data_uri()},
                                                   {"type": "text", "text": "And this one?"}]},
                      {"role": "assistant", "content": "Blue."}]},
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "file://" + str(pic)},
                                                   {"type": "text", "text": "Again?"}]},
                      {"role": "assistant", "content": "Red again."}]},
    ]
    (tmp_path / "openai.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recs = load_records(tmp_path / "openai.jsonl")
    assert [len(images_of(r)) for r in recs] == [1, 1, 1, 1] and recs[1]["messages"][1]["content"] == "Red."
    assert images_of(recs[0])[0][1] == str(pic) == images_of(recs[3])[0][1]
    assert images_of(recs[2])[0][1].startswith("data:image/png;base64,")
    llava = [{"id": "1", "image": "pics/a.png", "conversations": [
        {"from": "human", "value": "<image>\nDescribe the picture."}, {"from": "gpt", "value": "A red square."}]},
        {"id": "2", "image": "pics/a.png", "conversations": [  # no placeholder: before the first user turn
            {"from": "human", "value": "What shape?"}, {"from": "gpt", "value": "A square."}]}]
    (tmp_path / "llava.json").write_text(json.dumps(llava))
    recs = load_records(tmp_path / "llava.json")
    assert [m["content"][0] for m in (r["messages"][0] for r in recs)] == [{"type": "image", "image": str(pic)}] * 2
    pairs = [{"conversations": [{"from": "human", "value": "<image>Which colour?"}],
              "chosen": {"from": "gpt", "value": "Red."}, "rejected": {"from": "gpt", "value": "Green."},
              "images": ["pics/a.png"]}]
    (tmp_path / "pairs.json").write_text(json.dumps(pairs))
    (pair,) = load_records(tmp_path / "pairs.json")
    assert has_images(pair) and images_of(pair) == [("prompt.0.content.0", str(pic))]
    assert isinstance(pair["chosen"][0]["content"], str)


@pytest.mark.parametrize("record, field, says", [
    ({"messages": [{"role": "user", "content": "<image>What?"}, {"role": "assistant", "content": "x"}],
      "images": ["gone.png"]}, "messages.0.content.0", "gone.png does not exist"),
    ({"messages": [{"role": "user", "content": "<image><image>What?"}, {"role": "assistant", "content": "x"}],
      "images": ["pics/a.png"]}, "images", "2 <image> placeholder(s) in the text but 1 image(s)"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.org/a.png"}},
                                                 "What?"]}, {"role": "assistant", "content": "x"}]},
     "messages.0.content.0", "is a web address; tunesmith fetches nothing from the network"),
    ({"messages": [{"role": "user", "content": "<image>What?"}, {"role": "assistant", "content": "x"}],
      "images": ["pics/broken.png"]}, "messages.0.content.0", "is not an image Pillow can decode"),
    ({"messages": [{"role": "user", "content": "<image>What?"}, {"role": "assistant", "content": "x"}],
      "images": ["pics/strip.png"]}, "messages.0.content.0", "strip.png is 20000x1 pixels"),
    ({"messages": [{"role": "user", "content": "<image>What?"}, {"role": "assistant", "content": "x"}],
      "images": ["pics/half.jpg"]}, "messages.0.content.0", "is not an image Pillow can decode"),
    ({"messages": [{"role": "user", "content": "What?"},
                   {"role": "assistant", "content": [{"type": "image", "image": "pics/a.png"}]}]},
     "messages.1.content", "an image in a assistant message"),
    ({"messages": [{"role": "user", "content": "look"}, {"role": "assistant", "content": "<image> here"}],
      "images": ["pics/a.png"]}, "images", "a assistant turn holds <image>; images go in user turns"),
    ({"messages": [{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]},
                   {"role": "assistant", "content": "x"}]}, "messages.0.content.0", "content part of type 'audio'"),
])
def test_bad_images_are_one_sentence_at_their_field(tmp_path, record, field, says):
    png(tmp_path / "pics" / "a.png")
    (tmp_path / "pics" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    Image.new("L", (20000, 1)).save(tmp_path / "pics" / "strip.png")
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 40).convert("RGB").save(buf, format="JPEG")
    (tmp_path / "pics" / "half.jpg").write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])  # cut off
    (tmp_path / "d.jsonl").write_text(json.dumps(record) + "\n")
    rep = check_file(tmp_path / "d.jsonl")
    assert not rep.ok
    e = rep.errors[0]
    assert e.line == 1 and e.field == field and says in e.reason, (e.field, e.reason)


def test_an_empty_images_column_is_no_image_and_text_records_stay_text(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi <image> there"}, {"role": "assistant", "content": "x"}],
             "images": None},
            {"messages": [{"role": "user", "content": "plain"}, {"role": "assistant", "content": "y"}], "images": []},
            {"text": "a document", "images": ["a.png"]}]
    for i, row in enumerate(rows):
        (tmp_path / f"{i}.jsonl").write_text(json.dumps(row) + "\n")
        (rec,) = load_records(tmp_path / f"{i}.jsonl")
        assert not has_images(rec) and rec.get("meta", {}).get("images") == row["images"]
    assert load_records(tmp_path / "0.jsonl")[0]["messages"][0]["content"] == "hi <image> there"  # text, as written
    (tmp_path / "pics").mkdir()
    png(tmp_path / "pics" / "a.png")
    (tmp_path / "d.csv").write_text('messages,images\n"[{""role"": ""user"", ""content"": ""<image>What?""}, '
                                    '{""role"": ""assistant"", ""content"": ""Red.""}]","[""pics/a.png""]"\n')
    (rec,) = load_records(tmp_path / "d.csv")  # a JSON list in a CSV cell
    assert images_of(rec) == [("messages.0.content.0", str(tmp_path / "pics" / "a.png"))]


def test_a_text_model_refuses_image_records_in_one_sentence(tmp_path):
    from tiny import make_tokenizer
    from tunesmith.data.tokenize import training_sequences

    (rec,) = [r for _, r in check_file(DEMO / "mllm_demo.json").entries][:1]
    with pytest.raises(TunesmithError, match="holds images, which a text model's chat template cannot show"):
        training_sequences(rec, make_tokenizer("chatml"))
    proc = subprocess.run([sys.executable, "-m", "tunesmith", "data", "inspect", str(DEMO / "mllm_demo.json")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "holds images" in proc.stderr and "Traceback" not in proc.stderr
    # data check reads it (with a text tokenizer the image records are counted, not tokenized)
    proc = subprocess.run([sys.executable, "-m", "tunesmith", "data", "check", str(DEMO / "mllm_demo.json")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "images: 8 in 6 record(s)" in proc.stdout + proc.stderr
    # the canonical output of data curate reads back with the same pictures
    out = tmp_path / "mm.jsonl"
    proc = subprocess.run([sys.executable, "-m", "tunesmith", "data", "curate", str(DEMO / "mllm_demo.json"), "-o",
                           str(out), "--workers", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-1500:]
    again = check_file(out)
    assert again.ok and again.images["count"] == 8
