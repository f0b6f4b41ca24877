"""Tiny offline checkpoints laid out like the real ones, so tests load them through the same code path.

- `build_tiny_llava`: a LLaVA-OneVision directory like `llava-hf/llava-onevision-qwen2-0.5b-ov-hf` (SigLIP tower at
  384 px / patch 14, so 27x27 = 729 patch features; a two-layer Qwen2; a byte-level BPE tokenizer with Qwen2's
  special tokens and chat template; the real `preprocessor_config.json`).
- `build_tiny_clip`: a sentence-transformers CLIP directory like `clip-ViT-B-32` (legacy `0_CLIPModel` layout).
- `build_tiny_minilm`: a sentence-transformers text model like `all-MiniLM-L6-v2` (BERT + mean pooling + normalise).

Weights are random but seeded: the same arguments give byte-identical weights. Nothing is downloaded.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

# A few hundred words of plain English: the tokenizers are trained on it so that real questions tokenize sensibly.
CORPUS = """
A camera watches the front door of a small house from early morning until late at night. People walk past on the
street, a dog runs across the lawn, and a red car parks in the driveway at about eight o'clock. The mail arrives
before noon; the carrier leaves a brown box on the porch and rings the bell. Later a woman in a blue coat picks up
the box, looks at the label and carries it inside. In the afternoon the light changes, clouds move over the roof
and it starts to rain. Children come home from school with umbrellas, laughing and talking about the game they
played. A cat sits in the window and watches the birds at the feeder. When the sun sets the street lamps turn on,
the red car leaves again, and a neighbour waves from the other side of the road.

What happened at the door? Who picked up the package, and when did it arrive? How many people walked past the
house in the morning? Was the car still there at night? Describe the scene in the kitchen after dinner. What
colour was the coat of the person who opened the door? Where did the dog go after it crossed the lawn? Answer the
question with the time in the video when it happened, and say if you are not sure. The assistant looks at the
frames, remembers the important moments and answers questions about them with short, clear sentences.

The kitchen has a white table, four chairs, a sink under the window and a shelf of green plants. Someone cooks
pasta, cuts bread and pours two glasses of water. A phone rings; a man answers it, writes something on a piece of
paper and puts on his shoes. He opens the door, steps outside and closes it behind him. The room is quiet for an
hour. Then the lights go off, and the only movement is the clock on the wall and the shadow of a tree outside.

One, two, three, four, five, six, seven, eight, nine, ten, eleven, twelve, twenty, thirty, forty, fifty, hundred.
Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday; seconds, minutes, hours, yesterday, today, now.
Yes, no, maybe, first, last, before, after, during, while, until, since, again, never, always, often, sometimes.
"""

# The processor chat template the llava-hf conversion writes (../shared/reference/llava-onevision-chat_template.jinja,
# tests/test_vlm_template.py checks the copy): list-of-parts content, images and video before the text.
LLAVA_CHAT_TEMPLATE = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
# Qwen2-Instruct's string-content template, as a tokenizer_config.json may carry it.
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]

# The real llava-onevision-qwen2 preprocessor_config.json, less the anyres pinpoints (set in the model config).
LLAVA_PREPROCESSOR = {
    "crop_size": {"height": 384, "width": 384},
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_pad": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_processor_type": "LlavaOnevisionImageProcessor",
    "image_std": [0.5, 0.5, 0.5],
    "processor_class": "LlavaOnevisionProcessor",
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"height": 384, "width": 384},
}

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]  # OpenAI CLIP's pixel mean
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]  # OpenAI CLIP's pixel std


def _bpe_tokenizer(specials: list[str], *, vocab_size: int):
    """A byte-level BPE (Qwen2/GPT-2 style) trained on CORPUS, with `specials` as added special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS] * 4, trainer=trainer)
    return tok


TEMPLATE_FORMS = ("json", "jinja", "tokenizer", "json+tokenizer", "none")  # where a checkpoint carries its template


def build_tiny_llava(directory: Path, *, seed: int = 0, vision_hidden: int = 32, template: str = "json",
                     tie_word_embeddings: bool = True) -> Path:
    """Writes a tiny LLaVA-OneVision checkpoint into `directory` and returns it.

    template: where the chat template lives, as real checkpoints carry it: "json" (the processor's list-content
    template in chat_template.json, as the llava-hf conversion writes it), "jinja" (the same in chat_template.jinja),
    "tokenizer" (Qwen2's string template in tokenizer_config.json), "json+tokenizer" (both) or "none".
    tie_word_embeddings: True as in Qwen2-0.5B, False as in Qwen2-7B. A tiny random model so tied repeats its last
    prompt token (a newline: every answer is empty); with its own output head it answers in words, token by token.
    """
    if template not in TEMPLATE_FORMS:
        raise ValueError(f"template must be one of {TEMPLATE_FORMS}")
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        PreTrainedTokenizerFast,
        Qwen2Config,
        SiglipVisionConfig,
    )

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_bpe_tokenizer(QWEN2_SPECIALS, vocab_size=700),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=QWEN2_SPECIALS[1:],
        model_max_length=8192,
        clean_up_tokenization_spaces=False,
    )
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN2_SPECIALS}

    vision = SiglipVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=384,  # real: 27x27 = 729 patches
        patch_size=14,
        vision_use_head=False,
    )
    text = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=ids["<image>"],
        video_token_index=ids["<video>"],
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    # the real checkpoints' generation config names the stops and nothing else (greedy, no penalties)
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    # name the class the real checkpoint names, so AutoTokenizer takes the same route (it reads tokenizer.json)
    tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text())
    tokenizer_config["tokenizer_class"] = "Qwen2Tokenizer"
    if "tokenizer" in template:
        tokenizer_config["chat_template"] = QWEN2_CHAT_TEMPLATE
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    if template.startswith("json"):
        (directory / "chat_template.json").write_text(json.dumps({"chat_template": LLAVA_CHAT_TEMPLATE}, indent=2))
    if template == "jinja":
        (directory / "chat_template.jinja").write_text(LLAVA_CHAT_TEMPLATE)
    (directory / "preprocessor_config.json").write_text(json.dumps(LLAVA_PREPROCESSOR, indent=2))
    return directory


def build_tiny_clip(directory: Path, *, seed: int = 0) -> Path:
    """Writes a tiny sentence-transformers CLIP directory (the `clip-ViT-B-32` layout) and returns it."""
    from tokenizers import processors
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig, PreTrainedTokenizerFast

    directory = Path(directory)
    module = directory / "0_CLIPModel"
    module.mkdir(parents=True, exist_ok=True)
    specials = ["<|startoftext|>", "<|endoftext|>"]
    raw = _bpe_tokenizer(specials, vocab_size=600)
    bos, eos = raw.token_to_id(specials[0]), raw.token_to_id(specials[1])
    raw.post_processor = processors.TemplateProcessing(
        single=f"{specials[0]} $A {specials[1]}", special_tokens=[(specials[0], bos), (specials[1], eos)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token=specials[0],
        eos_token=specials[1],
        pad_token=specials[1],
        unk_token=specials[1],
        model_max_length=77,  # CLIP's text context
    )
    config = CLIPConfig(
        text_config=CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=eos,
        ).to_dict(),
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=224,
            patch_size=32,
        ).to_dict(),
        projection_dim=32,
    )
    torch.manual_seed(seed)
    CLIPModel(config).eval().save_pretrained(module)
    tokenizer.save_pretrained(module)
    (module / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "crop_size": {"height": 224, "width": 224},
                "do_center_crop": True,
                "do_convert_rgb": True,
                "do_normalize": True,
                "do_rescale": True,
                "do_resize": True,
                "image_mean": CLIP_MEAN,
                "image_processor_type": "CLIPImageProcessor",
                "image_std": CLIP_STD,
                "resample": 3,
                "rescale_factor": 0.00392156862745098,
                "size": {"shortest_edge": 224},
            },
            indent=2,
        )
    )
    modules = [{"idx": 0, "name": "0", "path": "0_CLIPModel", "type": "sentence_transformers.models.CLIPModel"}]
    (directory / "modules.json").write_text(json.dumps(modules, indent=2))
    return directory


def build_tiny_minilm(directory: Path, *, seed: int = 0) -> Path:
    """Writes a tiny sentence-transformers text model (the `all-MiniLM-L6-v2` layout) and returns it."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    raw = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    raw.normalizer = normalizers.BertNormalizer(lowercase=True)
    raw.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    raw.decoder = decoders.WordPiece()
    raw.train_from_iterator(
        [CORPUS] * 4, trainer=trainers.WordPieceTrainer(vocab_size=600, special_tokens=specials, show_progress=False)
    )
    cls_id, sep_id = raw.token_to_id("[CLS]"), raw.token_to_id("[SEP]")
    raw.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
        model_max_length=256,
    )
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=512,
        pad_token_id=raw.token_to_id("[PAD]"),
    )
    torch.manual_seed(seed)
    BertModel(config).eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 256, "do_lower_case": False}))
    pooling = directory / "1_Pooling"
    pooling.mkdir(exist_ok=True)
    (pooling / "config.json").write_text(
        json.dumps(
            {
                "word_embedding_dimension": 32,
                "pooling_mode_cls_token": False,
                "pooling_mode_mean_tokens": True,
                "pooling_mode_max_tokens": False,
                "pooling_mode_mean_sqrt_len_tokens": False,
            }
        )
    )
    (directory / "2_Normalize").mkdir(exist_ok=True)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (directory / "modules.json").write_text(json.dumps(modules, indent=2))
    return directory
