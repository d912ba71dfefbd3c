import pytest
from thresher.pipeline.models.chat import encode, prompt_text
from thresher.pipeline.models.resolve import DEFAULT_EMBEDDER, DEFAULT_LM, load_tokenizer, resolve


def test_builtin_models_resolve_offline():
    lm = resolve(DEFAULT_LM)
    assert lm.identity.startswith("smollm2-135m-instruct@") and not lm.remote
    assert resolve(DEFAULT_LM).path == lm.path  # converted once, then reused from the cache
    emb = resolve(DEFAULT_EMBEDDER)
    assert emb.path.endswith("model") and not emb.remote


def test_resolver_errors_and_hub_names(tmp_path):
    with pytest.raises(FileNotFoundError, match="unknown model"):
        resolve("no-such-model")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve(str(tmp_path))
    hub = resolve("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert hub.remote and hub.identity == "hub:HuggingFaceTB/SmolLM2-135M-Instruct"


def test_local_dir_identity_follows_content_not_place_or_time(tiny_lm_dir, tmp_path):
    import os
    import shutil

    a = resolve(str(tiny_lm_dir))
    assert a.path == str(tiny_lm_dir.resolve()) and not a.remote
    copy = tmp_path / tiny_lm_dir.name
    shutil.copytree(tiny_lm_dir, copy)
    for f in copy.rglob("*"):
        os.utime(f, (1, 1))                                  # other mtimes, same bytes
    assert resolve(str(copy)).identity == a.identity
    (copy / "sub").mkdir()                                   # weights in a sub-folder count
    (copy / "sub" / "model.safetensors").write_bytes(b"\0" * 64)
    b = resolve(str(copy)).identity
    assert b != a.identity
    (copy / "sub" / "model.safetensors").write_bytes(b"\1" + b"\0" * 63)   # same size, one byte
    assert resolve(str(copy)).identity not in (a.identity, b)
    big = next(f for f in copy.glob("*.safetensors"))
    data = bytearray(big.read_bytes())
    data[-1] ^= 0xFF                                         # the last byte of the weights
    big.write_bytes(bytes(data))
    assert resolve(str(copy)).identity not in (a.identity, b)


def test_response_only_mask_covers_assistant_turns():
    tok = load_tokenizer(resolve(DEFAULT_LM))
    row = {"kind": "chat", "text": None, "messages": [
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "It is four."},
        {"role": "user", "content": "And three plus three?"},
        {"role": "assistant", "content": "Six."}]}
    enc = encode(tok, row, max_tokens=4096)
    scored = tok.decode(enc.input_ids[enc.loss_mask])
    assert scored.replace("<|im_end|>", "|").replace("\n", "") == "It is four.|Six.|"
    assert "two plus two" not in scored and "<|im_start|>" not in scored
    full = encode(tok, row, max_tokens=4096, response_only=False)
    assert full.loss_mask.sum() == len(full.input_ids) - 1
    short = encode(tok, row, max_tokens=10)
    assert short.truncated and len(short.input_ids) == 10
    assert prompt_text(tok, row["messages"]).endswith("And three plus three?<|im_end|>\n<|im_start|>assistant\n")


def test_text_rows_score_every_token():
    tok = load_tokenizer(resolve(DEFAULT_LM))
    enc = encode(tok, {"kind": "text", "text": "Plain web text about heating.", "messages": None}, 512)
    assert enc.loss_mask.sum() == len(enc.input_ids) - 1 and not enc.loss_mask[0]
