"""One answer to "which tokens end a turn", for training, evaluation, chat and serve."""
from types import SimpleNamespace

from frugal_rlhf.data.tokenize import stop_tokens
from frugal_rlhf.models.loading import byte_tokenizer


def test_stop_tokens_are_eos_chatml_end_and_what_the_model_declares():
    tok = byte_tokenizer()  # EOS is <|im_end|>
    im_end, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|pad|>")
    assert stop_tokens(tok) == (im_end,)
    tok.eos_token = "<|pad|>"  # a template that ends turns with <|im_end|> while EOS is another token
    assert stop_tokens(tok) == tuple(sorted({im_end, pad}))
    model = SimpleNamespace(config=SimpleNamespace(eos_token_id=5),
                            generation_config=SimpleNamespace(eos_token_id=[7, 5]))
    assert stop_tokens(tok, model) == tuple(sorted({im_end, pad, 5, 7}))
    assert stop_tokens(tok, SimpleNamespace(config=SimpleNamespace(eos_token_id=None))) == stop_tokens(tok)
