import pytest
from thresher.pipeline.chat import encode, prompt_text
from thresher.pipeline.models import DEFAULT_EMBEDDER, DEFAULT_LM, load_tokenizer, resolve


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


def test_local_dir_identity_changes_with_files(tiny_lm_dir):
    a = resolve(str(tiny_lm_dir))
    assert a.path == str(tiny_lm_dir.resolve()) and not a.remote
    assert resolve(str(tiny_lm_dir)).identity == a.identity


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
