"""Images in the data: ms-swift's <image> tags + images list, OpenAI image parts, references (paths, URLs, base64)
resolved and checked with file:line errors, and the pipeline: placeholders expanded into image tokens that never
train, truncation that never cuts an image, collate that batches pixels and grids."""
from __future__ import annotations

import base64
import json
import os

import numpy as np
import pytest
from PIL import Image

from serving import serving_files
from sftkit.data.errors import DataError
from sftkit.data.formats import IMAGE_TAG, Message, to_messages
from sftkit.data.images import resolve_image
from sftkit.data.loading import load_conversations
from sftkit.data.pipeline import (CUT_IMAGE, IGNORE_INDEX, IMAGE_ROLE, Encoded, build_example, build_examples, collate,
                                  expand_images, mask)
from sftkit.data.templates import render
from sftkit.data.vision import with_pixels
from sftkit.run import write_run_files


def image_count(example: dict, processor) -> int:
    return sum(token == processor.image_token_id for token in example["input_ids"])


# --- rows -> messages -----------------------------------------------------------------------------------------


def test_ms_swift_rows_give_each_tag_its_image_in_order():
    row = {"query": "<image>and <image>: which is red?", "response": "the first", "images": ["b.png", "c.png"],
           "history": [["<image>what is this?", "a square"]]}
    with pytest.raises(DataError, match=r"field 'images': 3 <image> tag\(s\) for 2 image\(s\)"):
        to_messages(row)
    messages = to_messages({**row, "images": ["a.png", "b.png", "c.png"]})
    assert [m.images for m in messages] == [("a.png",), (), ("b.png", "c.png"), ()]
    assert messages[2].content == "<image>and <image>: which is red?"
    # No tags: every image goes before the first query, as ms-swift does.
    tagless = to_messages({"query": "describe", "response": "a square", "images": ["a.png", "b.png"]})
    assert tagless[0] == Message("user", "<image><image>describe", ("a.png", "b.png"))
    # Without images a tag is plain text, as in any text dataset.
    assert to_messages({"query": "what is <image>?", "response": "a tag"})[0] == Message("user", "what is <image>?")
    with pytest.raises(DataError, match=r"field 'images': 1 <image> tag\(s\) for 2 image\(s\)"):
        to_messages({"query": "<image>describe", "response": "ok", "images": ["a.png", "b.png"]})
    with pytest.raises(DataError, match="field 'response': an <image> tag in a assistant message"):
        to_messages({"query": "<image>describe", "response": "<image>", "images": ["a.png"]})
    with pytest.raises(DataError, match="field 'images': must be a list of image paths"):
        to_messages({"query": "<image>describe", "response": "ok", "images": [3]})


def test_openai_image_parts_become_tags_and_sharegpt_rows_take_the_images_list():
    data_url = "data:image/png;base64,AAAA"
    row = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url}},
                                                     {"type": "text", "text": "What colour?"}]},
                        {"role": "assistant", "content": "red"}]}
    assert to_messages(row)[0] == Message("user", "<image>What colour?", (data_url,))
    qwen_style = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Compare "},
                                                            {"type": "image", "image": "a.png"}]},
                               {"role": "assistant", "content": "ok"}]}
    assert to_messages(qwen_style)[0] == Message("user", "Compare <image>", ("a.png",))
    sharegpt = {"conversations": [{"from": "human", "value": "<image>colour?"}, {"from": "gpt", "value": "red"}],
                "images": ["a.png"]}
    assert to_messages(sharegpt)[0].images == ("a.png",)
    with pytest.raises(DataError, match=r"field 'messages\[0\].content\[0\]': unsupported content part type 'input_audio'"):
        to_messages({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}, {"role": "assistant", "content": "x"}]})
    with pytest.raises(DataError, match=r"field 'messages\[1\].content': only text content parts are allowed here"):
        to_messages({"messages": [{"role": "user", "content": "hi"},
                                  {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "a.png"}}]}]})


# --- loading: references resolved and checked -------------------------------------------------------------------


def test_loading_resolves_paths_and_base64_and_names_bad_images_by_file_and_line(tmp_path, monkeypatch, pictures):
    folder = tmp_path / "data"
    folder.mkdir()
    os.link(pictures[0], folder / "square.png")
    (folder / "notes.png").write_text("not an image")
    encoded = base64.b64encode(open(pictures[1], "rb").read()).decode()
    rows = [{"query": "<image>colour?", "response": "red", "images": ["square.png"]},           # relative to the file
            {"query": "<image>colour?", "response": "green", "images": [f"data:image/png;base64,{encoded}"]},
            {"query": "<image>colour?", "response": "green", "images": [encoded]},                # bare base64
            {"query": "colour?", "response": "blue", "images": ["missing.png"]},
            {"query": "<image>colour?", "response": "blue", "images": ["notes.png"]},
            {"query": "<image><image>colour?", "response": "blue", "images": ["square.png"]}]
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=rf"{path}:4, field 'images\[0\]': no such image file 'missing.png' \(looked in {folder}"):
        load_conversations([str(path)])
    conversations, report = load_conversations([str(path)], strategy="skip")
    assert [c[0].images for c in conversations] == [(str(folder / "square.png"),), (rows[1]["images"][0],), (encoded,)]
    assert report.kept == 3 and report.with_images == 3 and sum(report.skipped.values()) == 3
    assert any("notes.png' is not a readable image" in reason for reason in report.skipped)
    assert "2 <image> tag(s) for 1 image(s)" in "".join(report.skipped)


def test_url_images_download_once_and_fail_clearly_offline(tmp_path, monkeypatch, pictures):
    monkeypatch.setenv("SFTKIT_CACHE", str(tmp_path / "cache"))
    row = {"query": "<image>colour?", "response": "red"}
    with serving_files(os.path.dirname(pictures[0])) as base_url:
        url = f"{base_url}/{os.path.basename(pictures[0])}"
        (tmp_path / "web.jsonl").write_text(json.dumps(row | {"images": [url]}) + "\n", encoding="utf-8")
        conversations, _ = load_conversations([str(tmp_path / "web.jsonl")])
    assert conversations[0][0].images == (url,)
    assert [p.read_bytes() for p in (tmp_path / "cache" / "images").iterdir()] == [open(pictures[0], "rb").read()]
    (tmp_path / "offline.jsonl").write_text(json.dumps(row | {"images": ["http://127.0.0.1:9/cat.png"]}) + "\n")
    with pytest.raises(DataError, match=r"offline.jsonl:1, field 'images\[0\]': could not download the image "
                                        r"http://127.0.0.1:9/cat.png: .*Offline\? Download it and give its path"):
        load_conversations([str(tmp_path / "offline.jsonl")])


def test_hub_image_bytes_go_to_the_cache(tmp_path, monkeypatch, pictures):
    monkeypatch.setenv("SFTKIT_CACHE", str(tmp_path))
    data = open(pictures[0], "rb").read()
    cached = resolve_image({"bytes": data, "path": "COCO_1.png"})
    assert cached.startswith(str(tmp_path)) and cached.endswith(".png") and open(cached, "rb").read() == data


def test_the_validation_split_keeps_its_images(tmp_path, pictures):
    conversation = to_messages({"query": "<image>colour?", "response": "red", "images": [pictures[0]]})
    write_run_files(str(tmp_path), {}, [conversation])
    assert json.loads((tmp_path / "val_dataset.jsonl").read_text())["images"] == [pictures[0]]
    assert load_conversations([str(tmp_path / "val_dataset.jsonl")])[0] == [conversation]


# --- pipeline --------------------------------------------------------------------------------------------------


def test_qwen_template_places_images_as_the_real_qwen2_vl_chat_template(vision):
    tokenizer, processor = vision
    conversation = to_messages({"query": "Compare <image> with <image>.", "response": "Same.", "images": ["x", "a", "b"],
                                "history": [["<image>What is it?", "A square."]]})
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
            {"role": "assistant", "content": "A square."},
            {"role": "user", "content": [{"type": "text", "text": "Compare "}, {"type": "image"},
                                         {"type": "text", "text": " with "}, {"type": "image"}, {"type": "text", "text": "."}]},
            {"role": "assistant", "content": "Same."}]
    ours = "".join(text for text, _ in render([m if not m.images else
                                              Message(m.role, m.content.replace(IMAGE_TAG, processor.placeholder), m.images)
                                              for m in conversation], "qwen"))
    assert ours == tokenizer.apply_chat_template(chat, tokenize=False)
    assert processor.placeholder == "<|vision_start|><|image_pad|><|vision_end|>"


def test_each_image_becomes_as_many_tokens_as_its_pixels_give_and_none_train(vision, pictures):
    tokenizer, processor = vision
    row = {"query": "<image>then <image>: colours?", "response": "red, green", "images": pictures[:2]}
    example = build_example(row, tokenizer=tokenizer, template="qwen", processor=processor)
    grids = processor.pixels([Image.open(path).convert("RGB") for path in pictures[:2]])["image_grid_thw"]
    assert example["image_tokens"] == [4, 6] == (grids.prod(-1) // 4).tolist()
    assert image_count(example, processor) == 10 and example["images"] == pictures[:2]
    trained = [token for token, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "red, green<|im_end|>"
    everything = build_example(row, tokenizer=tokenizer, template="qwen", processor=processor, train_on="all")
    assert all(label == IGNORE_INDEX for token, label in zip(everything["input_ids"], everything["labels"])
               if token == processor.image_token_id)


def test_expand_images_is_pure_and_checks_the_count():
    encoded = expand_images(Encoded([5, 9, 6, 9, 7], ["user"] * 5), [2, 3], 9)
    assert encoded.input_ids == [5, 9, 9, 6, 9, 9, 9, 7]
    assert encoded.roles == ["user", IMAGE_ROLE, IMAGE_ROLE, "user", IMAGE_ROLE, IMAGE_ROLE, IMAGE_ROLE, "user"]
    assert mask(encoded, "all") == [5, IGNORE_INDEX, IGNORE_INDEX, 6, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 7]
    with pytest.raises(DataError, match="the prompt holds 2 image tokens for 1 images"):
        expand_images(Encoded([9, 9], ["user", "user"]), [4], 9)


def test_truncation_drops_an_example_it_would_cut_inside_an_image_and_counts_it(vision, pictures):
    tokenizer, processor = vision
    one = to_messages({"query": "<image>colours?", "response": "red " * 30, "images": [pictures[2]]})
    full = build_example(one, tokenizer=tokenizer, template="qwen", processor=processor)
    first_image = full["input_ids"].index(processor.image_token_id)
    inside = dict(tokenizer=tokenizer, template="qwen", processor=processor, truncation_side="left",
                  max_length=len(full["input_ids"]) - first_image - 3)
    assert build_example(one, **inside) is None
    kept, dropped = build_examples([one, one], **inside)
    assert kept == [] and dropped == {CUT_IMAGE: 2}
    # A cut that removes a whole image keeps the example and only the images it holds.
    two = to_messages({"query": "<image>and this?", "response": "green " * 30, "images": [pictures[0]],
                       "history": [["<image>colours?", "red"]]} | {"images": [pictures[2], pictures[0]]})
    longest = build_example(two, tokenizer=tokenizer, template="qwen", processor=processor)
    second = len(longest["input_ids"]) - longest["input_ids"][::-1].index(processor.image_token_id) - 4
    cut = build_example(two, tokenizer=tokenizer, template="qwen", processor=processor, truncation_side="left",
                        max_length=len(longest["input_ids"]) - second + 2)
    assert cut["images"] == [pictures[0]] and cut["image_tokens"] == [4] and image_count(cut, processor) == 4
    assert cut["input_ids"] == longest["input_ids"][-len(cut["input_ids"]):]
    right = build_example(one, tokenizer=tokenizer, template="qwen", processor=processor, max_length=first_image + 40)
    assert right["image_tokens"] == [16] and len(right["input_ids"]) == first_image + 40


def test_collate_batches_pixels_grids_and_image_positions(vision, pictures):
    tokenizer, processor = vision
    rows = [{"query": "<image><image>colours?", "response": "red, green", "images": pictures[:2]},
            {"query": "no picture here", "response": "fine"},
            {"query": "<image>colour?", "response": "blue", "images": [pictures[2]]}]
    examples = [with_pixels(build_example(row, tokenizer=tokenizer, template="qwen", processor=processor), processor)
                for row in rows]
    batch = collate(examples, tokenizer.pad_token_id)
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 6], [1, 8, 8]]
    assert batch["pixel_values"].shape == (16 + 24 + 64, 3 * 2 * 14 * 14)
    np.testing.assert_array_equal(batch["pixel_values"][:16].numpy(), examples[0]["pixel_values"][:16])
    assert batch["mm_token_type_ids"].sum(-1).tolist() == [10, 0, 16]
    assert batch["mm_token_type_ids"].shape == batch["input_ids"].shape
    assert ((batch["input_ids"] == processor.image_token_id) == batch["mm_token_type_ids"].bool()).all()
    assert "pixel_values" not in collate([examples[1]], tokenizer.pad_token_id)


def test_an_image_that_changed_on_disk_is_reported(vision, pictures, tmp_path):
    tokenizer, processor = vision
    picture = tmp_path / "changing.png"
    os.link(pictures[0], picture)
    example = build_example({"query": "<image>?", "response": "red", "images": [str(picture)]}, tokenizer=tokenizer,
                            template="qwen", processor=processor)
    picture.unlink()
    os.link(pictures[2], picture)
    with pytest.raises(DataError, match=r"now give \[16\] image tokens, but the example was tokenized for \[4\]"):
        with_pixels(example, processor)


def test_a_text_model_refuses_image_data_clearly(tokenizer, pictures):
    conversation = to_messages({"query": "<image>colour?", "response": "red", "images": [pictures[0]]})
    with pytest.raises(DataError, match="the data has images but the model takes none"):
        build_examples([conversation], tokenizer=tokenizer, template="chatml")
