"""Questions are framed by the checkpoint's own chat template, in every form a real checkpoint carries it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from checkpoints import LLAVA_CHAT_TEMPLATE, build_tiny_llava
from test_cli import one_line_error, vidmem, vidmem_in_process

from vidmem.agents.models import load_vlm

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
QUESTION = "What happened at the door?"


def test_test_checkpoints_carry_the_real_processor_template() -> None:
    if not REFERENCE.is_dir():
        pytest.skip(f"the reference folder {REFERENCE} is not beside the repository")
    assert LLAVA_CHAT_TEMPLATE == (REFERENCE / "llava-onevision-chat_template.jinja").read_text()
    assert LLAVA_CHAT_TEMPLATE == json.loads((REFERENCE / "llava-onevision-chat_template.json").read_text())["chat_template"]


@pytest.mark.parametrize("form", ["json", "jinja", "tokenizer", "json+tokenizer"])
def test_every_template_form_frames_the_video_before_the_question(tmp_path, form) -> None:
    vlm = load_vlm(str(build_tiny_llava(tmp_path / "llava", template=form)), device="cpu")
    expected_form = {"json+tokenizer": "chat_template.json"}.get(form, {"json": "chat_template.json",
                     "jinja": "chat_template.jinja", "tokenizer": "tokenizer_config.json"}.get(form))
    assert vlm.layout.form == expected_form
    assert vlm.layout.head.startswith("<|im_start|>system\nYou are vidmem")
    assert vlm.layout.head.endswith("<|im_end|>\n<|im_start|>user\n")
    assert vlm.layout.tail(QUESTION) == f"\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    if form != "tokenizer":  # the processor's own rendering of a video question, as llava-hf's processor does it
        messages = [
            {"role": "system", "content": [{"type": "text", "text": vlm.system_prompt}]},
            {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]},
        ]
        rendered = vlm.tokenizer.apply_chat_template(
            messages, chat_template=LLAVA_CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True
        )
        assert vlm.layout.head + "<video>" + vlm.layout.tail(QUESTION) == rendered
    assert vlm.end_of_turn_id == vlm.tokenizer.convert_tokens_to_ids("<|im_end|>") and vlm.end_of_turn_id in vlm.stop_ids


def test_a_checkpoint_with_only_the_list_content_template_answers_and_one_without_says_why(tmp_path, tiny_models,
                                                                                        videos, capfd) -> None:
    # ingest and ask through the CLI's main in-process (a model load each, not a Python start-up); the refusal runs
    # the `vidmem` script itself
    models = type(tiny_models)(llava=build_tiny_llava(tmp_path / "json-only", template="json"),
                               llava_other=tiny_models.llava_other, clip=tiny_models.clip, minilm=tiny_models.minilm)
    assert not (models.llava / "chat_template.jinja").exists()
    assert "chat_template" not in json.loads((models.llava / "tokenizer_config.json").read_text())
    memory = tmp_path / "memory"
    ingest = vidmem_in_process(capfd, "ingest", str(videos["counter.mp4"]["file"]), "--json", memory=memory,
                               models=models)
    assert ingest.returncode == 0, ingest.stderr
    asked = vidmem_in_process(capfd, "ask", "what number is shown?", "--json", memory=memory, models=models)
    assert asked.returncode == 0, asked.stderr
    assert json.loads(asked.stdout)["segments"]

    bare = type(tiny_models)(llava=build_tiny_llava(tmp_path / "bare", template="none"),
                             llava_other=tiny_models.llava_other, clip=tiny_models.clip, minilm=tiny_models.minilm)
    line = one_line_error(vidmem("ask", "what number is shown?", memory=memory, models=bare))
    assert "chat template" in line and "chat_template.json" in line
